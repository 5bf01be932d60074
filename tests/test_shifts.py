"""The shift suite's perturbations (stellarnet.simulate.shifts): each does what it says."""

from __future__ import annotations

import numpy as np
import pytest

from stellarnet.io import grids
from stellarnet.io.grids import KMS_PER_PIXEL, LSF_SIGMA_PIX
from stellarnet.simulate.instrument import BAD_ERR, observe_spectra
from stellarnet.simulate.shifts import (SHIFT_SUITE, Shift, add_detector_defects, broaden_lsf,
                                        continuum_residual, correlate_noise, convention_pixels, corrupt_pixels, normalize_convention,
                                        shift_suite, shift_velocity)

P = grids.n_pixels("dr12")
LABELS = np.array([[4700.0, 2.5, -0.1, 0.05], [5600.0, 4.3, 0.1, 0.0]])


def _lines(width: float = LSF_SIGMA_PIX) -> np.ndarray:
    """(1, P) flux 5 with isolated Gaussian lines of σ = ``width`` pixels every 60 pixels."""
    x = np.arange(P)
    return (5.0 * (1 - 0.5 * np.exp(-0.5 * (((x % 60) - 30) / width) ** 2)))[None].astype(np.float32)


def _width_and_centre(flux: np.ndarray, start: int = 600) -> tuple[float, float]:
    d = 5.0 - flux[0, start:start + 60].astype(np.float64)
    x = np.arange(60)
    c = (d * x).sum() / d.sum()
    return float(np.sqrt((d * (x - c) ** 2).sum() / d.sum())), float(c)


@pytest.mark.parametrize("change", [0.2, -0.2])
def test_lsf_changes_the_line_width_by_the_factor(change):
    w0, _ = _width_and_centre(_lines())
    w1, _ = _width_and_centre(broaden_lsf(_lines(), np.array([change])))
    assert w1 / w0 == pytest.approx(1 + change, abs=0.02)


def test_lsf_per_chip_changes_each_chip_by_its_own_factor():
    change = np.array([[0.2, 0.0, -0.2]])
    out = broaden_lsf(_lines(), change)
    for c, sl in enumerate(grids.chip_slices("dr12")):
        start = sl.start + (60 - sl.start % 60)  # a whole line inside the chip
        w_in, _ = _width_and_centre(_lines(), start)
        w_out, _ = _width_and_centre(out, start)
        assert w_out / w_in == pytest.approx(1 + change[0, c], abs=0.04)
    suite = SHIFT_SUITE["lsf_chips"]
    assert suite.lsf_per_chip and suite.lsf == (-0.2, 0.2)


def test_velocity_shift_moves_lines_by_v_over_kms_per_pixel():
    _, c0 = _width_and_centre(_lines())
    _, c1 = _width_and_centre(shift_velocity(_lines(), np.array([1.0])))
    assert KMS_PER_PIXEL == pytest.approx(4.14, abs=0.01)
    assert c1 - c0 == pytest.approx(1.0 / KMS_PER_PIXEL, abs=0.01)


def test_continuum_residual_tilts_and_curves_within_its_amplitude():
    res = continuum_residual(500, 0.02, np.random.default_rng(0))
    assert res.shape == (500, P)
    assert np.all(np.abs(res - 1) <= 0.02 * (1 + 2 / 3) + 1e-6)
    tilt = (res[:, -1] - res[:, 0]) / 2  # the curvature term is equal at both ends
    assert np.abs(tilt).max() > 0.018 and np.abs(tilt).max() <= 0.02 + 1e-6
    assert np.std(tilt) > 0.008  # U(-0.02, 0.02): σ = 0.0115


def test_outliers_carry_finite_inflated_errors_and_are_not_flagged():
    rng = np.random.default_rng(1)
    flux = np.full((20, P), 5.0, np.float32)
    err = np.full((20, P), 0.05, np.float32)
    protect = np.zeros((20, P), bool)
    protect[:, :100] = True  # e.g. already bad pixels
    f0, e0 = flux.copy(), err.copy()
    hit = corrupt_pixels(flux, err, (0.01, 0.03), (3.0, 10.0), rng, protect=protect)
    frac = hit.mean(1)
    assert np.all((frac > 0.008) & (frac < 0.031))
    assert not hit[:, :100].any()
    assert np.all(np.isfinite(err)) and np.all(err < 1.0)  # finite: nothing a reader would mask
    ratio = err[hit] / e0[hit]
    assert ratio.min() >= 3.0 - 1e-5 and ratio.max() <= 10.0 + 1e-5
    dev = (flux[hit] - f0[hit]) / e0[hit]
    assert np.all(np.abs(dev) >= 5.0 - 1e-4) and np.all(np.abs(dev) <= 30.0 + 1e-4)
    assert 0.55 < np.mean(dev < 0) < 0.8  # two thirds downward
    assert np.array_equal(flux[~hit], f0[~hit]) and np.array_equal(err[~hit], e0[~hit])


def test_detector_defects_keep_the_error_and_are_not_flagged():
    rng = np.random.default_rng(2)
    flux = np.full((40, P), 5.0, np.float32)
    err = np.full((40, P), 0.05, np.float32)
    protect = np.zeros((40, P), bool)
    protect[:, :100] = True  # already flagged pixels
    f0, e0 = flux.copy(), err.copy()
    hit = add_detector_defects(flux, err, (0.002, 0.01), rng, protect=protect)
    assert np.array_equal(err, e0)  # the error array knows nothing of them
    assert not hit[:, :100].any() and np.array_equal(flux[:, :100], f0[:, :100])
    assert np.array_equal(flux[~hit], f0[~hit])
    dev = (flux[hit] - f0[hit]) / e0[hit]
    hot = dev >= 10.0 - 1e-3
    dead = np.abs(flux[hit]) <= 1.0 * 0.05 + 1e-6  # reads ~0: no signal
    column = (flux[hit] / f0[hit] >= 1.5 - 1e-5) & (flux[hit] / f0[hit] <= 3.0 + 1e-5)
    assert np.all(hot | dead | column)
    assert dev[hot].max() <= 200.0 + 1e-3 and dead.sum() > 0
    frac = hit.mean(1)
    assert np.all(frac < 0.01 + 20 / P + 1e-9) and np.all(frac > 0.0015)
    # a contiguous run of 5-20 pixels in about half the stars
    runs = [np.diff(np.flatnonzero(np.abs(flux[i] / f0[i] - 1) > 0.45)) for i in range(40)]
    with_column = sum(int(np.any(np.convolve(r == 1, np.ones(4), "valid") == 4)) for r in runs)
    assert 8 <= with_column <= 32


@pytest.mark.parametrize("convention", ["cannon", "astronn", "aspcap"])
def test_normalization_conventions_recover_a_smooth_continuum(convention):
    x = np.linspace(-1, 1, P)
    cont = (4.0 + 0.5 * x + 0.3 * x**2)[None]
    lines = _lines(2.0) / 5.0
    free = convention_pixels("cannon") | convention_pixels("astronn")
    lines[:, free] = 1.0  # absorption only away from both continuum-pixel sets (as real lines, mostly)
    flux = (lines * cont).astype(np.float64)
    err = np.full_like(flux, 0.004)
    nf, ne, c = normalize_convention(flux, err, None, convention)
    pix = convention_pixels(convention)
    assert pix is None or pix.sum() > 300
    ratio = c / cont
    # pixel sets with line-free continuum recover it to 0.1 %; ASPCAP-like clipping sits on the upper envelope
    assert np.median(np.abs(ratio - 1)) < (0.01 if convention == "aspcap" else 0.001)
    assert np.allclose(ne, err / c)


def test_smooth_convention_is_a_running_mean_that_follows_the_lines():
    """The "smooth" convention (Ho et al. 2017): a line-free spectrum comes back flat away from the chip
    edges, while lines pull the pseudo-continuum down — normalized flux averages ~1 on 100 Å scales."""
    from stellarnet.io import grids

    x = np.linspace(-1, 1, P)
    cont = (4.0 + 0.5 * x + 0.3 * x**2)[None].astype(np.float64)
    err = np.full_like(cont, 0.004)
    nf, ne, c = normalize_convention(cont, err, None, "smooth")
    inner = np.zeros(P, bool)
    for sl in grids.chip_slices("dr12"):
        inner[sl.start + 400:sl.stop - 400] = True  # beyond ~2 kernel widths from the chip edges
    assert np.max(np.abs(nf[0, inner] - 1)) < 2e-3
    lines = (_lines(2.0) / 5.0).astype(np.float64)
    nf, ne, c = normalize_convention(lines * cont, err, None, "smooth")
    assert np.median(c[0, inner] / cont[0, inner]) < 0.97  # the lines' mean depth went into the "continuum"
    assert abs(np.mean(nf[0, inner]) - 1) < 0.01
    assert np.allclose(ne, err / c)


def test_conventions_differ_from_each_other():
    assert not np.array_equal(convention_pixels("cannon"), convention_pixels("astronn"))
    with pytest.raises(ValueError, match="normalization"):
        Shift(normalization="iraf")
    with pytest.raises(ValueError, match="lo <= hi"):
        Shift(lsf=(0.2, -0.2))
    with pytest.raises(KeyError, match="unknown shifts"):
        shift_suite(["none", "nope"])
    assert set(shift_suite(["none", "combined"])) == {"none", "combined"}
    assert SHIFT_SUITE["none"].is_null and not SHIFT_SUITE["combined"].is_null


def _observe(shift: Shift | None, seed: int = 3):
    bad_start = np.array([[1000] + [0] * 7, [0] * 8])
    bad_len = np.array([[40] + [0] * 7, [0] * 8])
    return observe_spectra(LABELS, np.array([150.0, 80.0]), np.random.default_rng(seed), bad_start, bad_len,
                           np.array([0, 0]), full_grid=False, shift=shift)


def test_no_shift_leaves_the_default_survey_unchanged():
    a = _observe(None)
    b = _observe(Shift())
    for x, y in zip(a, b):
        assert np.array_equal(x, y)


def test_error_conventions_rescale_or_flatten_the_good_pixels_only():
    flux0, err0, _ = _observe(None)
    _, err2, _ = _observe(Shift(err_scale=(2.0, 2.0)))
    good = err0 < BAD_ERR / 1e3
    assert np.allclose(err2[good], 2 * err0[good], rtol=1e-5)
    assert np.array_equal(err2[~good], err0[~good])
    flux_f, err_f, _ = _observe(Shift(err_flat=True))
    for i in range(2):
        g = good[i]
        assert np.ptp(err_f[i, g]) == 0 and err_f[i, g][0] == pytest.approx(np.median(err0[i, g]), rel=1e-5)
    assert np.array_equal(flux_f, flux0)  # how errors are quoted does not touch the flux


def test_combined_shift_changes_flux_but_keeps_it_normalized():
    flux0, _, _ = _observe(None)
    flux1, err1, model1 = _observe(SHIFT_SUITE["combined"])
    good = np.isfinite(flux1) & (err1 < 1e3)
    assert not np.allclose(flux1[good], flux0[good], atol=1e-3)
    assert 0.9 < np.median(flux1[good]) < 1.05
    assert np.all(np.isfinite(err1[good])) and np.all(err1[good] > 0)


def test_errors_in_crlb_units_measure_distance_from_the_bound():
    """label_metrics with a CRLB: errors drawn at exactly 2 × each star's bound score 2 (within the
    sampling error of a robust σ of 4,000 draws, ~2 %), whatever the spread of the bounds; stars
    without a bound (NaN) are left out of that number only."""
    from stellarnet.benchmarks.shift_suite import label_metrics

    rng = np.random.default_rng(5)
    n = 4000
    bound = np.column_stack([rng.uniform(2, 20, n), rng.uniform(0.005, 0.05, n)])
    truth = np.zeros((n, 2))
    est = 2.0 * bound * rng.standard_normal((n, 2))
    bound[:100, 0] = np.nan
    m = label_metrics(est, None, truth, ["TEFF", "LOGG"], bound)
    assert m["TEFF"]["robust_sigma_over_crlb"] == pytest.approx(2.0, rel=0.05)
    assert m["LOGG"]["robust_sigma_over_crlb"] == pytest.approx(2.0, rel=0.05)
    assert m["TEFF"]["n"] == n  # the plain metrics keep every star
    assert m["TEFF"]["median_crlb"] == pytest.approx(np.nanmedian(bound[:, 0]))
    assert "robust_sigma_over_crlb" not in label_metrics(est, None, truth, ["TEFF", "LOGG"])["TEFF"]


def test_true_crlb_is_larger_at_lower_snr_and_nan_outside_the_box():
    """The bound scales as 1/S/N (white noise) and is NaN for labels outside the spectral model's box."""
    from stellarnet.benchmarks.shift_suite import true_crlb

    labels = np.array([[4800.0, 2.5, 0.0, 0.05], [4800.0, 2.5, 0.0, 0.05], [20000.0, 2.5, 0.0, 0.05]])
    b = true_crlb(labels, np.array([100.0, 50.0, 100.0]))
    assert np.all(np.isfinite(b[:2])) and np.all(np.isnan(b[2]))
    np.testing.assert_allclose(b[1] / b[0], 2.0, rtol=1e-6)
    assert 1.0 < b[0, 0] < 15.0  # K at S/N 100 for a giant: a few K (median 4 K in the suite)


def test_the_stress_shift_is_combined_with_every_effect_wider():
    """``combined_2x`` keeps combined's conventions and widens every range (a stress test, not a new effect)."""
    a, b = SHIFT_SUITE["combined"], SHIFT_SUITE["combined_2x"]
    assert (b.normalization, b.mix) == (a.normalization, a.mix)
    assert b.lsf[0] < a.lsf[0] and b.lsf[1] > a.lsf[1]
    assert b.rv_kms > a.rv_kms and b.continuum_tilt > a.continuum_tilt
    assert b.outlier_fraction[1] > a.outlier_fraction[1] and b.persistence_fraction > a.persistence_fraction
    assert b.err_scale[0] < a.err_scale[0] and b.err_scale[1] > a.err_scale[1]
    flux, err, _ = _observe(b)
    good = np.isfinite(flux) & (err < 1e3)
    assert 0.85 < np.median(flux[good]) < 1.1


def test_flagged_pixels_are_scattered_short_runs_with_the_bad_pixel_error():
    from stellarnet.simulate.instrument import BAD_ERR
    from stellarnet.simulate.shifts import flag_pixels

    m = flag_pixels((300, P), (0.02, 0.08), np.random.default_rng(0))
    share = m.mean(1)
    assert 0.015 < share.min() and share.max() < 0.095 and abs(share.mean() - 0.05) < 0.006
    starts = m[:, 1:] & ~m[:, :-1]
    assert 1.5 < m[:, 1:].sum() / starts.sum() < 2.0  # runs of 1–3 pixels, mean 1.75
    _, err0, _ = _observe(None)
    _, err, _ = _observe(Shift(masked_fraction=(0.05, 0.05)))
    extra = (err > 1e-3 * BAD_ERR) & ~(err0 > 1e-3 * BAD_ERR)  # normalized: BAD_ERR / continuum
    assert 0.03 < extra.mean() < 0.07


@pytest.mark.parametrize("rho", [0.0, 0.2, 0.4, 0.6])
def test_correlated_noise_keeps_the_pixel_variance_and_has_the_asked_lag1_correlation(rho):
    x = np.random.default_rng(5).standard_normal((40, P)).astype(np.float32)
    y = correlate_noise(x, np.full(40, rho))
    assert np.var(y) == pytest.approx(1.0, abs=0.01)
    lag1 = np.mean(y[:, 1:] * y[:, :-1]) / np.var(y)
    assert lag1 == pytest.approx(rho, abs=0.01)
    with pytest.raises(ValueError):
        correlate_noise(x, np.full(40, 0.75))


def test_correlated_noise_shift_changes_only_the_noise_not_the_quoted_errors():
    flux0, err0, model0 = _observe(None)
    flux1, err1, model1 = _observe(Shift(noise_correlation=(0.3, 0.3)))
    good = err0 < BAD_ERR / 1e3
    assert np.allclose(err1[good], err0[good], rtol=1e-3)
    assert np.allclose(model1, model0, rtol=1e-3)
    resid = np.where(good, (flux1 - model1) / err1, 0.0)[0, 2000:2800]
    lag1 = np.mean(resid[1:] * resid[:-1]) / np.mean(resid**2)
    assert 0.15 < lag1 < 0.45  # white in the default survey:
    resid0 = np.where(good, (flux0 - model0) / err0, 0.0)[0, 2000:2800]
    assert abs(np.mean(resid0[1:] * resid0[:-1]) / np.mean(resid0**2)) < 0.12
    with pytest.raises(ValueError):
        Shift(noise_correlation=(0.5, 0.8))


def test_low_snr_observes_the_same_stars_with_a_quarter_of_the_snr():
    from stellarnet.benchmarks.shift_suite import simulate

    base, low = simulate(Shift(), 12, 3), simulate(SHIFT_SUITE["low_snr"], 12, 3)
    assert np.array_equal(base["labels"], low["labels"])
    assert np.allclose(low["snr"], 0.25 * base["snr"])
    good = (base["flux_err"] < 1) & (low["flux_err"] < 1)  # not flagged (nor the chip gaps' NaN)
    ratio = np.nanmedian(np.where(good, low["flux_err"] / base["flux_err"], np.nan), axis=1)
    assert np.allclose(ratio, 4.0, rtol=0.01)
    # the flux is noisier, not only the quoted error: the same model with noise 4σ instead of σ differs by
    # 3σ (the same draws scaled) to √17 σ (independent draws)
    z = np.nanstd(np.where(good, (low["flux"] - base["flux"]) / base["flux_err"], np.nan), axis=1)
    assert np.all((z > 2.8) & (z < 4.3)), z
    with pytest.raises(ValueError, match="snr_scale"):
        Shift(snr_scale=0.0)


def test_score_catalogue_joins_rows_to_truth() -> None:
    """A catalogue with a duplicate row of one star is scored row by row against the star's truth;
    labels on the S/N bin only, stages over all rows; a star missing from the truth is named."""
    from astropy.table import Table

    from stellarnet.io.bitmasks import STELLARNET_FLAG
    from stellarnet.benchmarks.shift_suite import score_catalogue

    rng = np.random.default_rng(0)
    n = 400
    ids = np.array([f"2M{i:08d}" for i in range(n)])
    truth = Table({"APOGEE_ID": ids.astype("S18"), "TEFF": rng.uniform(4000, 6000, n), "LOGG": rng.uniform(1, 4, n),
                   "FE_H": rng.uniform(-1, 0.3, n), "ALPHA_FE": rng.uniform(0, 0.3, n),
                   "STAGE": np.array(["RGB"] * n), "STAGE_CODE": np.full(n, 2)})
    rows = np.r_[np.arange(n), 3]  # star 3 observed twice
    err = np.array([10.0, 0.02, 0.01, 0.01])
    pred = Table({"APOGEE_ID": ids[rows], "SNR": np.where(np.arange(len(rows)) % 2 == 0, 150.0, 60.0),
                  "STAGE": np.array(["RGB"] * (len(rows) - 1) + ["RC"]),
                  "STELLARNET_FLAG": np.zeros(len(rows), np.int32)})
    for j, c in enumerate(("TEFF", "LOGG", "FE_H", "ALPHA_FE")):
        t = np.asarray(truth[c])[rows]
        pred[c] = t + rng.normal(0, err[j], len(rows))
        pred[c + "_ERR"] = np.full(len(rows), err[j])
        pred[c + "_NET"] = t + rng.normal(0, 3 * err[j], len(rows))
        pred[c + "_NET_ERR"] = np.full(len(rows), err[j])  # the network's σ is 3× too small
    pred["STELLARNET_FLAG"][:40] = STELLARNET_FLAG.value_of(["HIGH_CHI2"])
    res = score_catalogue(pred, truth)
    assert res["n_rows"] == n + 1 and res["n_bin"] == (n + 2) // 2
    for j, c in enumerate(("TEFF", "LOGG", "FE_H", "ALPHA_FE")):
        assert res["refined"][c]["robust_sigma"] == pytest.approx(err[j], rel=0.2)
        assert 0.8 < res["refined"][c]["z_std"] < 1.2 and 0.55 < res["refined"][c]["coverage_1sigma"] < 0.8
        assert res["network"][c]["z_std"] == pytest.approx(3.0, rel=0.2)
    assert res["stage"]["accuracy"] == pytest.approx(n / (n + 1))
    assert res["flag_any_bad"] == pytest.approx(40 / (n + 1))
    with pytest.raises(KeyError, match="not in the truth"):
        score_catalogue(pred, truth[1:])


def test_companion_blends_a_cooler_dwarf_at_another_velocity():
    """The blend is the flux-weighted mean of the primary and a cooler dwarf of the same composition moved
    by 10–60 km/s: lines diluted where only the primary absorbs, new lines where the companion does; a
    zero flux ratio changes nothing."""
    from stellarnet.physics.kurucz import load_emulator
    from stellarnet.simulate.shifts import add_companion

    emu = load_emulator()
    labels = np.array([[4600.0, 2.4, -0.2, 0.1], [5600.0, 4.3, 0.0, 0.0]])
    primary = emu(labels)
    same = add_companion(primary, labels, (0.0, 0.0), (10.0, 60.0), np.random.default_rng(0), emu)
    np.testing.assert_allclose(same, primary, atol=1e-6)
    blend = add_companion(primary, labels, (0.4, 0.4), (30.0, 30.0), np.random.default_rng(0), emu)
    assert blend.shape == primary.shape and np.isfinite(blend).all()
    rel = blend / primary - 1.0
    assert np.abs(rel).max() > 0.02  # a visible second spectrum
    level = np.percentile(blend, 95, axis=1) / np.percentile(primary, 95, axis=1)
    np.testing.assert_allclose(level, 1.0, atol=0.02)  # the primary's continuum level kept
    assert "sb2" in SHIFT_SUITE and SHIFT_SUITE["sb2"].companion_flux_ratio == (0.1, 0.5)
    with pytest.raises(ValueError, match="companion_flux_ratio"):
        Shift(companion_flux_ratio=(-0.1, 0.2))


def test_shared_residual_puts_the_same_dips_in_every_spectrum_and_keeps_the_errors():
    """``shared_residual``: every star's normalized flux × the same fixed dips (40, depth ≤ 4 %), at the
    same pixels whatever the star; the quoted errors and flagged pixels unchanged."""
    from stellarnet.simulate.shifts import SHARED_RESIDUAL_LINES, shared_residual_lines

    dips = shared_residual_lines(0.04)
    assert dips.shape == (P,) and dips.min() >= 1 - 0.04 - 1e-6 and dips.min() < 0.985
    assert np.array_equal(dips, shared_residual_lines(0.04))  # fixed positions
    assert np.sum((dips[1:-1] < dips[:-2]) & (dips[1:-1] < dips[2:]) & (dips[1:-1] < 0.999)) >= SHARED_RESIDUAL_LINES - 5
    flux0, err0, model0 = _observe(None)
    flux1, err1, model1 = _observe(SHIFT_SUITE["shared_residual"])
    good = err0 < BAD_ERR / 1e3
    assert np.array_equal(err1, err0) and np.array_equal(model1, model0)
    for i in range(2):  # both stars, a giant and a dwarf: the same ratio at every good pixel
        np.testing.assert_allclose(flux1[i, good[i]] / flux0[i, good[i]], dips[good[i]], rtol=1e-5)
    assert np.array_equal(flux1[~good], flux0[~good])
    with pytest.raises(ValueError, match="shared_residual"):
        Shift(shared_residual=0.6)
