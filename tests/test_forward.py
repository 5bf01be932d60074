"""The spectrum emulator and χ² refinement (stellarnet.refinement.fit) on a known synthetic forward model."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from stellarnet.refinement.training import SpectraBlocks, train_emulator
from stellarnet.refinement.emulator import SpectrumEmulator, emulator_from_state, emulator_state
from stellarnet.refinement.basis import chip_segments, fit_weights
from stellarnet.refinement.fit import refine_labels

NAMES = ["TEFF", "LOGG", "FE_H", "ALPHA_FE"]
MEAN = np.array([4800.0, 2.5, -0.2, 0.1])
STD = np.array([400.0, 0.8, 0.3, 0.1])
P = 240
NOISE = 0.01


def true_flux(labels: np.ndarray) -> np.ndarray:
    """A smooth made-up spectrum: 24 absorption lines whose depths depend on the labels."""
    z = (np.atleast_2d(labels) - MEAN) / STD
    rng = np.random.default_rng(3)
    coef = rng.normal(0, 0.7, (24, 4))
    depth = 0.4 / (1 + np.exp(-(z @ coef.T)))  # (N, 24)
    centers = np.linspace(5, P - 5, 24)
    x = np.arange(P)
    profile = np.exp(-0.5 * ((x[None, :] - centers[:, None]) / 2.5) ** 2)  # (24, P)
    return (1 - depth @ profile).astype(np.float32)


def draw(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = MEAN + STD * rng.uniform(-1.5, 1.5, (n, 4))
    flux = true_flux(labels) + NOISE * rng.standard_normal((n, P)).astype(np.float32)
    return labels, flux, np.full_like(flux, NOISE)


@pytest.fixture(scope="module")
def emulator() -> SpectrumEmulator:
    labels, flux, err = draw(1000, 0)
    torch.manual_seed(0)
    model, info = train_emulator(labels, flux, err, None, NAMES, None, hidden=64, epochs=100, batch_size=64, lr=5e-3)
    assert info["stars"] == 1000 and info["epochs"] == 100
    assert 0.8 < info["chi2_per_pixel"] < 1.3  # fits (nearly) down to the noise
    return model


def test_emulator_reproduces_the_forward_model(emulator):
    labels, _, _ = draw(200, 1)
    err = emulator.flux(labels) - true_flux(labels)
    assert np.sqrt(np.mean(err**2)) < 0.6 * NOISE


def test_refine_recovers_labels_with_calibrated_sigma(emulator):
    labels, flux, err = draw(300, 2)
    rng = np.random.default_rng(5)
    start = labels + 0.3 * STD * rng.standard_normal(labels.shape)  # a poor first guess (the network's role)
    r = refine_labels(emulator, flux, err, None, start)
    before = np.abs(start - labels).mean(0)
    after = np.abs(r.labels - labels).mean(0)
    assert np.all(after < 0.25 * before), (before, after)
    z = (r.labels - labels) / r.sigma  # the emulator's own error adds to the noise: z a bit wider than 1
    assert np.all((np.std(z, 0) > 0.8) & (np.std(z, 0) < 2.5)), np.std(z, 0)
    assert 0.9 < np.median(r.chi2) < 1.25
    assert np.mean(r.masked_segments > 0) < 0.05  # clean spectra: (almost) nothing clipped


def test_formal_sigma_is_calibrated_when_the_model_is_exact(emulator):
    rng = np.random.default_rng(8)
    labels = MEAN + STD * rng.uniform(-1.2, 1.2, (400, 4))
    flux = emulator.flux(labels) + NOISE * rng.standard_normal((400, P)).astype(np.float32)
    start = labels + 0.2 * STD * rng.standard_normal(labels.shape)
    r = refine_labels(emulator, flux, np.full_like(flux, NOISE), None, start)
    z = (r.labels - labels) / r.sigma
    assert np.all(np.abs(np.std(z, 0) - 1) < 0.15), np.std(z, 0)
    assert np.all(np.abs(np.mean(np.abs(z) < 1, 0) - 0.683) < 0.08)
    assert abs(np.median(r.chi2) - 1) < 0.05


def test_segment_clipping_removes_a_corrupted_chip_segment(emulator):
    labels, flux, err = draw(100, 3)
    bad = flux.copy()
    bad[:, : P // 4] += 0.05  # e.g. persistence: an additive offset on a quarter of the spectrum
    # without the continuum correction, which (one quadratic over this grid-less spectrum) would
    # partly absorb the offset and hide it from the clipping
    clipped = refine_labels(emulator, bad, err, None, labels, continuum_degree=None)
    naive = refine_labels(emulator, bad, err, None, labels, clip_rounds=0, continuum_degree=None)
    assert np.all(clipped.masked_segments >= 1)
    assert np.all(clipped.pixel_fraction <= 0.75 + 1e-6) and np.median(clipped.pixel_fraction) == 0.75
    err_clipped = np.abs(clipped.labels - labels).mean(0) / STD
    err_naive = np.abs(naive.labels - labels).mean(0) / STD
    assert err_clipped.mean() < 0.5 * err_naive.mean(), (err_clipped, err_naive)


def test_continuum_correction_absorbs_a_normalization_error(emulator):
    """A smooth multiplicative error of the continuum (as a noisy normalization leaves) biases the
    labels; fitting the continuum polynomial with them removes the bias."""
    labels, flux, err = draw(200, 6)
    rng = np.random.default_rng(7)
    x = np.linspace(-1, 1, P)
    a = rng.normal(0, 0.01, (200, 3))  # ~1 % continuum error, the size of the noise
    distorted = flux * (1 + a[:, :1] + a[:, 1:2] * x + a[:, 2:] * (2 * x**2 - 1)).astype(np.float32)
    with_cont = refine_labels(emulator, distorted, err, None, labels, continuum_degree=2)
    without = refine_labels(emulator, distorted, err, None, labels, continuum_degree=None)
    clean = refine_labels(emulator, flux, err, None, labels, continuum_degree=None)
    e_with, e_without, e_clean = (np.abs(r.labels - labels).mean(0) / STD for r in (with_cont, without, clean))
    assert e_with.mean() < 0.5 * e_without.mean(), (e_with, e_without)
    assert e_with.mean() < 1.5 * e_clean.mean(), (e_with, e_clean)  # the price of 3 more parameters
    assert np.all(np.median(with_cont.sigma / clean.sigma, 0) > 1.0)  # σ marginalized over the coefficients
    assert abs(np.median(with_cont.chi2) - 1) < 0.25


def test_continuum_basis_follows_the_chips():
    from stellarnet.io import grids
    from stellarnet.refinement.basis import continuum_basis

    basis = continuum_basis(7214, "dr12", 2).numpy()
    assert basis.shape == (7214, 9)
    for i, sl in enumerate(grids.chip_slices("dr12")):
        cols = basis[:, 3 * i:3 * i + 3]
        assert np.all(cols[sl, 0] == 1) and np.all(np.delete(cols, np.r_[sl], axis=0) == 0)
        assert cols[sl.start, 1] == -1 and cols[sl.stop - 1, 1] == 1 and cols[sl.start, 2] == 1
    assert continuum_basis(100, None, 1).shape == (100, 2)
    assert continuum_basis(100, None, None).shape == (100, 0)
    with pytest.raises(ValueError, match="pixels"):
        continuum_basis(100, "dr12", 2)


def test_masked_and_bad_pixels_get_no_weight():
    flux = np.ones((2, 5), np.float32)
    err = np.array([[0.01, 0.0, np.nan, 1e-6, 0.02], [0.01, 0.01, 0.01, 0.01, 0.01]], np.float32)
    flux[1, 3] = np.inf
    mask = np.array([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    w = fit_weights(flux, err, mask)
    assert w[0, 0] == pytest.approx(1e4)
    assert w[0, 1] == w[0, 2] == w[0, 4] == 0 and w[1, 3] == 0
    assert w[0, 3] == pytest.approx(1 / 0.002**2)  # capped


def test_nonfinite_start_gives_nan_rows_and_bad_shapes_raise(emulator):
    labels, flux, err = draw(3, 4)
    start = labels.copy()
    start[1, 0] = np.nan
    r = refine_labels(emulator, flux, err, None, start)
    assert np.isnan(r.labels[1]).all() and np.isfinite(r.labels[[0, 2]]).all()
    with pytest.raises(ValueError, match="grid"):
        refine_labels(emulator, flux[:, :-1], err[:, :-1], None, labels)
    with pytest.raises(ValueError, match="init"):
        refine_labels(emulator, flux, err, None, labels[:, :3])


def test_training_input_errors():
    labels, flux, err = draw(20, 5)
    with pytest.raises(ValueError, match="at least 10"):
        train_emulator(np.full_like(labels, np.nan), flux, err, None, NAMES, None, epochs=1)
    with pytest.raises(ValueError, match="epochs"):
        train_emulator(labels, flux, err, None, NAMES, None, epochs=0)


def test_state_round_trip_is_weights_only(emulator):
    buf = io.BytesIO()
    torch.save(emulator_state(emulator, {"sigma_scale": [1.0, 2.0, 3.0, 4.0]}), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    again = emulator_from_state(state)
    labels, _, _ = draw(5, 6)
    np.testing.assert_array_equal(again.flux(labels), emulator.flux(labels))
    assert state["sigma_scale"] == [1.0, 2.0, 3.0, 4.0]
    with pytest.raises(ValueError, match="config"):
        emulator_from_state({"state_dict": {}})


def test_chip_segments_follow_the_grid():
    from stellarnet.io import grids

    seg = chip_segments(grids.n_pixels("dr12"), "dr12")
    assert seg.shape == (grids.n_pixels("dr12"), 12) and torch.all(seg.sum(1) == 1)
    first_green = grids.chip_slices("dr12")[1].start
    assert seg[first_green].argmax() == 4 and seg[first_green - 1].argmax() == 3
    with pytest.raises(ValueError, match="pixels"):
        chip_segments(100, "dr12")


def test_label_calibration_removes_a_smooth_bias_despite_noisy_references():
    from stellarnet.refinement.calibration import apply_label_calibration, fit_label_calibration

    rng = np.random.default_rng(9)
    truth = MEAN + STD * rng.uniform(-1.5, 1.5, (20000, 4))
    z = (truth - MEAN) / STD
    biased = truth + STD * 0.1 * np.stack([z[:, 0] ** 2 - 0.5, 0.3 * z[:, 1], 0.2 + 0 * z[:, 2], z[:, 0] * z[:, 3]], 1)
    ref_err = 0.2 * STD * np.ones_like(truth)  # references much noisier than the bias
    reference = truth + ref_err * rng.standard_normal(truth.shape)
    reference[::7, 2] = np.nan  # missing reference labels are skipped
    cal = fit_label_calibration(biased, reference, ref_err, degree=2)
    fixed = apply_label_calibration(biased, cal)
    before = np.abs(biased - truth).mean(0) / STD
    after = np.abs(fixed - truth).mean(0) / STD
    assert np.all(after < 0.3 * before), (before, after)
    assert cal["n"][2] < cal["n"][0] == 20000
    lin = apply_label_calibration(biased, fit_label_calibration(biased, reference, ref_err, degree=1))
    assert np.abs(lin - truth).mean(0)[0] / STD[0] > 2 * after[0]  # a quadratic bias needs degree 2
    np.testing.assert_array_equal(apply_label_calibration(biased, None), biased)
    few = fit_label_calibration(biased[:20], reference[:20], ref_err[:20])
    np.testing.assert_array_equal(apply_label_calibration(biased[:20], few), biased[:20])  # too few stars: no change
    with pytest.raises(ValueError, match="degree"):
        fit_label_calibration(biased, reference, degree=3)


def test_label_calibration_leaves_out_catalogue_failures():
    """3 % of the reference labels off by 10-30 of their σ, all on one side (a catalogue's unflagged
    failed fits): the clipped calibration stays near the one without them, the plain least squares
    is pulled by them (> 3x the error), and the clipped rows are counted."""
    from stellarnet.refinement.calibration import apply_label_calibration, fit_label_calibration

    rng = np.random.default_rng(11)
    truth = MEAN + STD * rng.uniform(-1.5, 1.5, (8000, 4))
    z = (truth - MEAN) / STD
    biased = truth + STD * 0.1 * np.stack([z[:, 0] ** 2 - 0.5, 0.3 * z[:, 1], 0.2 + 0 * z[:, 2], z[:, 0] * z[:, 3]], 1)
    ref_err = 0.2 * STD * np.ones_like(truth)
    reference = truth + ref_err * rng.standard_normal(truth.shape)
    bad = rng.random(len(truth)) < 0.03
    failed = reference.copy()
    failed[bad] += ref_err[bad] * rng.uniform(10, 30, (bad.sum(), 4)) * (1 + (z[bad] > 0))  # worse at one end
    clean = apply_label_calibration(biased, fit_label_calibration(biased, reference, ref_err))
    cal = fit_label_calibration(biased, failed, ref_err)
    clipped = apply_label_calibration(biased, cal)
    plain = apply_label_calibration(biased, fit_label_calibration(biased, failed, ref_err, clip_sigma=None))
    err_clean, err_clipped, err_plain = (np.abs(x - truth).mean(0) / STD for x in (clean, clipped, plain))
    assert np.all(err_clipped < 1.2 * err_clean + 0.002), (err_clean, err_clipped)
    assert np.all(err_plain > 3 * err_clipped), (err_plain, err_clipped)
    assert all(abs(c - bad.sum()) <= 0.02 * bad.sum() + 3 for c in cal["clipped"]), (cal["clipped"], bad.sum())
    assert cal["n"][0] + cal["clipped"][0] == len(truth)


def test_pixel_clipping_rejects_outliers_that_carry_a_finite_error(emulator):
    """3 % of the pixels moved down by 20-50 σ with a 1.5x error (sky-line residuals, unflagged cosmic
    rays): the fit with pixel clipping stays close to the clean fit, without it the error grows > 2x."""
    rng = np.random.default_rng(21)
    labels = MEAN + STD * rng.uniform(-1.2, 1.2, (200, 4))
    clean = emulator.flux(labels) + NOISE * rng.standard_normal((200, P)).astype(np.float32)
    err = np.full_like(clean, NOISE)
    flux, bad_err = clean.copy(), err.copy()
    hit = rng.random(flux.shape) < 0.03
    flux[hit] -= rng.uniform(20, 50, hit.sum()).astype(np.float32) * NOISE
    bad_err[hit] *= 1.5
    start = labels + 0.2 * STD * rng.standard_normal(labels.shape)
    ref = np.abs(refine_labels(emulator, clean, err, None, start, continuum_degree=None).labels - labels).mean(0)
    kept = refine_labels(emulator, flux, bad_err, None, start, continuum_degree=None, clip_rounds=2)
    clipped = refine_labels(emulator, flux, bad_err, None, start, continuum_degree=None, clip_rounds=2, pixel_clip=5.0)
    e_kept = np.abs(kept.labels - labels).mean(0)
    e_clip = np.abs(clipped.labels - labels).mean(0)
    assert np.all(e_clip < 1.5 * ref), (e_clip, ref)
    assert np.all(e_kept > 2.0 * e_clip), (e_kept, e_clip)
    # most of the corrupted pixels are found, few clean ones are lost
    assert 0.015 < np.median(clipped.outlier_fraction) < 0.04
    assert np.all(kept.outlier_fraction == 0)


def test_lsf_fit_absorbs_broader_lines(emulator):
    """Spectra whose lines are broader than the training set's (LSF variance + 1.2 px², as from another
    fibre): fitting the LSF change keeps the labels close to the clean fit; without it they are biased."""
    from scipy.ndimage import gaussian_filter1d

    rng = np.random.default_rng(31)
    labels = MEAN + STD * rng.uniform(-1.2, 1.2, (200, 4))
    clean = emulator.flux(labels)
    broad = gaussian_filter1d(clean, np.sqrt(1.2), axis=1, mode="nearest")
    noise = NOISE * rng.standard_normal(clean.shape).astype(np.float32)
    err = np.full_like(clean, NOISE)
    start = labels + 0.2 * STD * rng.standard_normal(labels.shape)
    kw = {"continuum_degree": None}
    ref = np.abs(refine_labels(emulator, clean + noise, err, None, start, **kw).labels - labels).mean(0) / STD
    plain = refine_labels(emulator, broad + noise, err, None, start, **kw)
    fitted = refine_labels(emulator, broad + noise, err, None, start, fit_lsf=True, **kw)
    e_plain = np.abs(plain.labels - labels).mean(0) / STD
    e_fit = np.abs(fitted.labels - labels).mean(0) / STD
    assert e_fit.mean() < 0.5 * e_plain.mean(), (e_fit, e_plain)
    assert e_fit.mean() < 2.0 * ref.mean(), (e_fit, ref)
    assert np.median(fitted.lsf_variance) == pytest.approx(1.2, abs=0.4)
    assert abs(np.median(fitted.shift)) < 0.05  # no shift was put in
    assert np.median(fitted.chi2) < np.median(plain.chi2)
    assert plain.lsf_variance is None and plain.shift is None


def test_line_shape_fit_measures_a_velocity_shift(emulator):
    """Spectra moved by 0.3 pixels (≈ 1.2 km/s on the APOGEE grid): the fitted shift finds it and explains
    the residual (χ² back to ≈ 1), the labels are no worse (this model's lines are broad: 2.5 px)."""
    from scipy.ndimage import shift as nd_shift

    rng = np.random.default_rng(32)
    labels = MEAN + STD * rng.uniform(-1.2, 1.2, (150, 4))
    moved = nd_shift(emulator.flux(labels), (0, 0.3), order=3, mode="nearest")
    flux = moved + NOISE * rng.standard_normal(moved.shape).astype(np.float32)
    err = np.full_like(flux, NOISE)
    fitted = refine_labels(emulator, flux, err, None, labels, fit_lsf=True, continuum_degree=None)
    plain = refine_labels(emulator, flux, err, None, labels, continuum_degree=None)
    assert np.median(fitted.shift) == pytest.approx(0.3, abs=0.05)
    assert np.median(fitted.chi2) < 1.1 < np.median(plain.chi2)
    e_fit = (np.abs(fitted.labels - labels) / STD).mean()
    assert e_fit < 1.1 * (np.abs(plain.labels - labels) / STD).mean()


# ------------------------------------------------------------------ mutation-benchmark survivors
def test_continuum_basis_of_degree_zero_is_one_constant_per_chip():
    """Degree 0 (a per-chip scale) is a real correction, not "no correction" (None or < 0)."""
    from stellarnet.refinement.basis import continuum_basis

    assert continuum_basis(7214, "dr12", 0).shape == (7214, 3)
    assert continuum_basis(7214, "dr12", -1).shape == (7214, 0)


def test_line_shape_operator_matches_a_real_broadening_and_shift():
    """The second-order line-shape expansion against exact operations on a Gaussian line (σ = 2.5 px):
    a shift of δ = 0.4 px (m(x − δ), analytic) and an LSF variance change s = 0.8 px² (variances add)
    agree to a few % of the change, and the returned derivatives are the flux's (finite differences)."""
    from stellarnet.refinement.fit import _line_shape, _line_shape_mask

    x = torch.arange(200, dtype=torch.float64)

    def line(center: float, var: float) -> torch.Tensor:
        return 1 - 0.5 * torch.exp(-0.5 * (x - center) ** 2 / var) * (6.25 / var) ** 0.5

    m = line(100.0, 6.25)[None]
    inner = _line_shape_mask(200, None).double()
    for u, exact in (((0.0, 0.4), line(100.4, 6.25)), ((0.8, 0.0), line(100.0, 7.05))):
        flux, _ = _line_shape(m, torch.tensor([u], dtype=torch.float64), inner)
        err = (flux[0] - exact).abs().max().item()
        change = (exact - m[0]).abs().max().item()
        # within 8 % of the change itself (measured: shift 5 %, the central differences' own error;
        # LSF 0.6 %); the shift's second-order coefficient doubled gives 14 %
        assert err < 0.08 * change, (u, err, change)
    u = torch.tensor([[0.5, 0.3]], dtype=torch.float64)
    flux, d = _line_shape(m, u, inner)
    for j in range(2):
        h = torch.zeros_like(u)
        h[0, j] = 1e-5
        fd = (_line_shape(m, u + h, inner)[0] - _line_shape(m, u - h, inner)[0]) / 2e-5
        torch.testing.assert_close(d[..., j], fd, atol=1e-6, rtol=1e-4)


def test_line_shape_fit_without_clip_steps_has_a_covariance(emulator):
    """clip_iters=0 recomputes the normal equations (with the line-shape prior) after the clipping:
    finite σ, within 20 % of the default path's."""
    labels, flux, err = draw(40, 11)
    a = refine_labels(emulator, flux, err, None, labels, fit_lsf=True, clip_iters=0, continuum_degree=None)
    b = refine_labels(emulator, flux, err, None, labels, fit_lsf=True, continuum_degree=None)
    assert np.isfinite(a.sigma).all()
    np.testing.assert_allclose(np.median(a.sigma, 0), np.median(b.sigma, 0), rtol=0.2)


def test_emulator_training_reports_the_masked_share():
    """``masked_pixel_fraction`` is the share of pixels the clip after ``clip_after`` masked (not the
    share kept): small, and larger when a quarter of the spectrum is corrupted by +0.3 in 10 % of the
    stars (measured 0.04 clean, 0.22 corrupted with this small emulator)."""
    labels, flux, err = draw(400, 12)
    _, clean = train_emulator(labels, flux, err, None, NAMES, None, hidden=64, epochs=30, batch_size=64, lr=5e-3)
    flux[:40, 60:120] += 0.3
    _, bad = train_emulator(labels, flux, err, None, NAMES, None, hidden=64, epochs=30, batch_size=64, lr=5e-3)
    assert clean["masked_pixel_fraction"] < bad["masked_pixel_fraction"] < 0.4


def test_fine_tuning_checks_the_starting_emulator(emulator):
    """init_model: training continues from it (χ² no worse after one epoch); one made for other
    pixels or labels is refused."""
    labels, flux, err = draw(200, 13)
    tuned, info = train_emulator(labels, flux, err, None, NAMES, None, epochs=1, batch_size=64, lr=1e-4,
                                 init_model=emulator)
    assert tuned.hidden == emulator.hidden and info["chi2_per_pixel"] < 1.5
    with pytest.raises(ValueError, match="does not match"):
        train_emulator(labels, flux[:, :200], err[:, :200], None, NAMES, None, epochs=1, init_model=emulator)
    with pytest.raises(ValueError, match="does not match"):
        train_emulator(labels, flux, err, None, ["A", "B", "C", "D"], None, epochs=1, init_model=emulator)


def test_outlier_fraction_counts_the_rejected_pixels(emulator):
    """2 % of the pixels moved by 20 σ (finite errors, not flagged): the pixel clip rejects them and
    reports that fraction (± 1 %)."""
    labels, flux, err = draw(60, 14)
    rng = np.random.default_rng(2)
    hit = rng.random(flux.shape) < 0.02
    flux = np.where(hit, flux - 20 * NOISE, flux)
    r = refine_labels(emulator, flux, err, None, labels, pixel_clip=5, continuum_degree=None)
    assert abs(np.median(r.outlier_fraction) - 0.02) < 0.01


def test_label_calibration_needs_more_stars_than_coefficients():
    """Whatever min_stars says, a label needs more usable stars than its polynomial has coefficients
    (degree 2 in 4 labels: 15) — an exactly determined fit would pass through the noise."""
    from stellarnet.refinement.calibration import fit_label_calibration

    rng = np.random.default_rng(4)
    labels = MEAN + STD * rng.uniform(-1, 1, (16, 4))
    reference = labels + 0.1 * STD * rng.standard_normal(labels.shape)
    exact = fit_label_calibration(labels[:15], reference[:15], degree=2, min_stars=1)
    assert all(not np.any(c) for c in exact["coef"])
    enough = fit_label_calibration(labels, reference, degree=2, min_stars=1)
    assert all(np.any(c) for c in enough["coef"])


def test_streamed_training_reads_blocks_and_fits_as_well_as_in_memory():
    """Spectra that stay on disk (:class:`SpectraBlocks`): every read is ascending and at most ``block``
    stars, every star is read once per epoch (plus the mean-spectrum and clip passes), the stars with
    non-finite labels never; the emulator fits as well as one trained in memory, and the corrupted
    segments are clipped the same way."""
    labels, flux, err = draw(400, 12)
    flux[:40, 60:120] += 0.3
    labels[5] = np.nan
    reads: list[np.ndarray] = []

    def read(pos: np.ndarray):
        reads.append(pos.copy())
        return flux[pos], err[pos], None

    epochs = 30
    src = SpectraBlocks(n=400, n_pixels=P, read=read, block=96)
    streamed, info = train_emulator(labels, src, None, None, NAMES, None, hidden=64, epochs=epochs, batch_size=64,
                                    lr=5e-3)
    memory, ref = train_emulator(labels, flux, err, None, NAMES, None, hidden=64, epochs=epochs, batch_size=64,
                                 lr=5e-3)
    assert info["streamed"] and not ref["streamed"] and info["stars"] == ref["stars"] == 399
    assert all(len(r) <= 96 and np.all(np.diff(r) > 0) for r in reads)
    counts = np.bincount(np.concatenate(reads), minlength=400)
    assert counts[5] == 0 and np.all(np.delete(counts, 5) == epochs + 2)  # + mean spectrum + clip pass
    assert info["chi2_per_pixel"] < 1.15 * ref["chi2_per_pixel"]
    assert info["masked_pixel_fraction"] == pytest.approx(ref["masked_pixel_fraction"], abs=0.03)
    test_labels, _, _ = draw(200, 1)
    rms = [np.sqrt(np.mean((m.flux(test_labels) - true_flux(test_labels)) ** 2)) for m in (streamed, memory)]
    assert rms[0] < 1.5 * rms[1] and max(rms) < 2 * NOISE, rms  # measured 0.0177 vs 0.0138 after 30 epochs
    with pytest.raises(ValueError, match="rows"):
        train_emulator(labels[:10], src, None, None, NAMES, None, epochs=1)


def test_cached_blocks_train_exactly_as_arrays():
    """SpectraBlocks(cache=True) fills the same tensors block by block: the very same emulator."""
    labels, flux, err = draw(150, 14)
    src = SpectraBlocks(n=150, n_pixels=P, read=lambda pos: (flux[pos], err[pos], None), block=40, cache=True)
    a, ia = train_emulator(labels, src, None, None, NAMES, None, hidden=16, epochs=6, batch_size=16)
    b, ib = train_emulator(labels, flux, err, None, NAMES, None, hidden=16, epochs=6, batch_size=16)
    assert not ia["streamed"] and ia["chi2_per_pixel"] == ib["chi2_per_pixel"]
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka


def test_spline_continuum_basis_is_a_partition_of_unity_per_chip():
    from stellarnet.io import grids
    from stellarnet.refinement.basis import continuum_spline_basis

    basis = continuum_spline_basis(7214, "dr12", 100.0).numpy()
    wave = grids.wavelength("dr12")
    k = 0
    for sl in grids.chip_slices("dr12"):
        width = wave[sl][-1] - wave[sl][0]
        n = int(round(width / 100.0)) + 3  # cubic B-splines on that many intervals
        cols = basis[:, k:k + n]
        np.testing.assert_allclose(cols[sl].sum(1), 1.0, atol=1e-5)  # a constant is in the span
        assert np.all(np.delete(cols, np.r_[sl], axis=0) == 0) and np.all(cols >= 0)
        k += n
    assert k == basis.shape[1]
    assert continuum_spline_basis(7214, "dr12", 50.0).shape[1] > basis.shape[1]
    with pytest.raises(ValueError, match="grid"):
        continuum_spline_basis(240, None, 100.0)
    with pytest.raises(ValueError, match="positive"):
        continuum_spline_basis(7214, "dr12", 0)


def _correlated(shape: tuple[int, int], rho: float, rng: np.random.Generator) -> np.ndarray:
    """Unit-variance noise with lag-1 correlation ``rho`` (3-tap kernel a, b, a; b² + 2a² = 1, 2ab = rho)."""
    from stellarnet.simulate.shifts import noise_kernel

    a, b = noise_kernel(np.array([rho]))
    x = rng.standard_normal((shape[0], shape[1] + 2))
    return (a * x[:, :-2] + b * x[:, 1:-1] + a * x[:, 2:]).astype(np.float32)


def test_noise_correlation_widens_sigma_for_shared_noise_and_not_for_white_noise(emulator):
    """σ allows for noise that neighbouring pixels share: on white noise the factor is ≈ 1; on noise with
    lag-1 correlation 0.4 the measured correlation is ≈ 0.4, σ grows and the errors' z std moves toward 1,
    while the labels themselves do not change."""
    rng = np.random.default_rng(40)
    labels = MEAN + STD * rng.uniform(-1.2, 1.2, (300, 4))
    clean = emulator.flux(labels)
    err = np.full_like(clean, NOISE)
    kw = {"continuum_degree": None}
    white = clean + NOISE * rng.standard_normal(clean.shape).astype(np.float32)
    a = refine_labels(emulator, white, err, None, labels, **kw)
    b = refine_labels(emulator, white, err, None, labels, noise_correlation=True, **kw)
    assert a.noise_correlation is None and b.noise_correlation.shape == (300, 2)
    assert np.median(b.noise_correlation[:, 0]) < 0.05
    np.testing.assert_array_equal(a.labels, b.labels)
    assert np.all(b.sigma >= a.sigma * (1 - 1e-6)) and np.median(b.sigma / a.sigma) < 1.05

    shared = clean + NOISE * _correlated(clean.shape, 0.4, rng)
    c = refine_labels(emulator, shared, err, None, labels, **kw)
    d = refine_labels(emulator, shared, err, None, labels, noise_correlation=True, **kw)
    np.testing.assert_array_equal(c.labels, d.labels)
    assert np.median(d.noise_correlation[:, 0]) == pytest.approx(0.4, abs=0.06)
    assert np.median(d.sigma / c.sigma) > 1.15  # this model's lines are 2.5 px wide: ~(1 + 2·0.4·0.9)^½

    def z_std(r):
        z = (r.labels - labels) / r.sigma
        return float(np.mean(1.4826 * np.median(np.abs(z - np.median(z, 0)), 0)))

    assert abs(z_std(d) - 1.0) < abs(z_std(c) - 1.0)
    assert 0.8 < z_std(d) < 1.25


def test_noise_correlation_factor_is_one_for_white_residuals_and_ignores_chip_boundaries():
    from stellarnet.refinement.residuals import _chip_straddles, noise_correlation_factor

    n, P = 64, 7214
    g = torch.Generator().manual_seed(0)
    resid = torch.randn(n, P, generator=g)
    smooth = torch.nn.functional.avg_pool1d(torch.randn(n, 1, P + 4, generator=g), 5, 1)[:, 0]  # lag-1 auto 0.8
    influence = smooth[..., None].repeat(1, 1, 2)
    pairs = _chip_straddles(P, "dr12", "cpu")
    assert all(len(v) == 2 * k for k, v in pairs.items())  # three chips: two boundaries, k pairs across each
    factor, rho = noise_correlation_factor(resid, influence, pairs)
    assert factor.shape == (n, 2) and rho.shape == (n, 2)
    assert float(factor.median()) < 1.03 and float(factor.min()) >= 1.0
    shared = resid[:, :-1] + resid[:, 1:]  # lag-1 correlation 0.5
    factor, rho = noise_correlation_factor(torch.nn.functional.pad(shared, (0, 1)), influence, pairs)
    assert float(rho[:, 0].median()) == pytest.approx(0.5, abs=0.03)
    assert float(factor.median()) == pytest.approx(1 + 2 * 0.5 * 0.8, abs=0.08)


@pytest.mark.parametrize("kind", ["spline", "chebyshev", "one_segment", "none"])
def test_weighted_gram_matches_dense(kind: str) -> None:
    """Bᵀ diag(v) B from the overlapping pairs equals the dense product for every continuum basis,
    and the cached pair products go when the basis does."""
    import gc

    from stellarnet.refinement import basis as fw_basis
    from stellarnet.refinement import fit as fw

    basis = {"spline": lambda: fw_basis.continuum_spline_basis(7214, "dr12", 100.0),
             "chebyshev": lambda: fw_basis.continuum_basis(7214, "dr12", 4),
             "one_segment": lambda: fw_basis.continuum_basis(300, None, 3),
             "none": lambda: fw_basis.continuum_basis(7214, "dr12", None)}[kind]()
    v = torch.rand(5, basis.shape[0], dtype=torch.float64).float()
    dense = (v[:, :, None] * basis[None]).transpose(1, 2) @ basis
    gram = fw._weighted_gram(basis, v)
    assert gram.shape == dense.shape
    if dense.numel():
        assert torch.allclose(gram, dense, rtol=1e-5, atol=1e-5 * float(dense.abs().max()))
        assert torch.equal(gram, gram.transpose(1, 2))
    key = id(basis)
    assert key in fw._GRAM_PLANS
    del basis
    gc.collect()
    assert key not in fw._GRAM_PLANS


def test_companion_score_finds_a_double_lined_binary_and_not_a_single_star(emulator):
    """Single stars (with or without a 0.3 px shift, which the line-shape fit absorbs; with errors quoted
    3× too small, which the score's χ² normalization absorbs) score like the largest of ~46 N(0, 1) lags;
    the same stars blended with a twin companion 5 px away (flux ratio 0.5) score well above them.
    (This toy model's lines are broad, σ 2.5 px, and 10 px apart, so the companion's fall between them;
    its line depths are random functions of the labels, so only a twin has the primary's line pattern, as
    real stars of one composition share their transitions. With lines this broad the line-shape nuisances
    absorb part of a 5 px doublet, so the binary is fitted without them. Its 240 pixels bound the
    χ²-normalized score to ~√240 × the correlation: the APOGEE threshold is checked on the suite.)"""
    from scipy.ndimage import shift as nd_shift

    from stellarnet.network.flags import FLAG_COMPANION

    rng = np.random.default_rng(41)
    labels = MEAN + STD * rng.uniform(-1.2, 1.2, (120, 4))
    single = emulator.flux(labels)
    blend = (single + 0.5 * nd_shift(single, (0, 5.0), order=3, mode="nearest")) / 1.5
    moved = nd_shift(single, (0, 0.3), order=3, mode="nearest")
    err = np.full_like(single, NOISE)
    score = {}
    for name, model_flux, fit_lsf, quoted in (("single", single, True, err), ("single_plain", single, False, err),
                                              ("moved", moved, True, err), ("too_small", single, True, err / 3),
                                              ("binary", blend, False, err)):
        flux = model_flux + NOISE * rng.standard_normal(single.shape).astype(np.float32)
        r = refine_labels(emulator, flux, quoted, None, labels, fit_lsf=fit_lsf, continuum_degree=None)
        assert r.companion.shape == (len(labels),) and np.isfinite(r.companion).all()
        score[name] = r.companion
    for name in ("single", "single_plain", "moved", "too_small"):
        assert np.percentile(score[name], 99) < 0.6 * FLAG_COMPANION, name
    assert np.median(score["binary"]) > 1.5 * np.percentile(score["single"], 99)
    assert np.median(score["binary"]) > 5.0


def test_companion_score_uses_pairs_within_a_chip_only():
    """A pattern and its copy k pixels further on give t_k = its norm; the same copy placed across the
    boundary of two chips gives nothing (no wrap-around, no cross-chip pairs)."""
    from stellarnet.refinement.residuals import companion_score

    P_ = 200
    lines = torch.zeros(1, P_)
    lines[0, 40:50] = -1.0
    resid = torch.zeros(1, P_)
    resid[0, 50:60] = -1.0  # the lines 10 px redward
    chips = [slice(0, 100), slice(100, 200)]
    assert float(companion_score(resid, lines, chips)[0]) == pytest.approx(np.sqrt(10.0), rel=1e-4)
    across = torch.zeros(1, P_)
    across[0, 105:115] = -1.0
    lines_b = torch.zeros(1, P_)
    lines_b[0, 90:100] = -1.0  # 15 px apart, but on two chips
    assert float(companion_score(across, lines_b, chips)[0]) == pytest.approx(0.0, abs=1e-5)


def test_gross_outliers_leave_before_the_first_step(emulator, monkeypatch):
    """Fill values and an unflagged bad column with an ordinary error (1 % of the pixels at 9999, a run of
    8 pixels at 3): they are clipped against the starting model before the first Gauss–Newton step, so
    the fit (continuum correction included) stays close to the clean one; clipped only after the first
    steps, they have already dragged the continuum and the labels away."""
    from stellarnet.refinement import fit as fit_module

    rng = np.random.default_rng(8)
    labels = MEAN + STD * rng.uniform(-1.2, 1.2, (100, 4))
    clean = emulator.flux(labels) + NOISE * rng.standard_normal((100, P)).astype(np.float32)
    err = np.full_like(clean, NOISE)
    flux = clean.copy()
    flux[rng.random(flux.shape) < 0.01] = 9999.0
    for i, s in enumerate(rng.integers(0, P - 8, 100)):
        flux[i, s:s + 8] = 3.0
    start = labels + 0.2 * STD * rng.standard_normal(labels.shape)
    kw = dict(continuum_degree=2, clip_rounds=1, pixel_clip=5.0)
    ref = np.abs(refine_labels(emulator, clean, err, None, start, **kw).labels - labels).mean(0)
    pre = refine_labels(emulator, flux, err, None, start, **kw)
    e_pre = np.abs(pre.labels - labels).mean(0)
    assert np.all(e_pre < 1.3 * ref), (e_pre, ref)
    assert np.all(pre.outlier_fraction > 0.03)  # the run and the fill values, counted as outliers
    monkeypatch.setattr(fit_module, "GROSS_CLIP_FACTOR", float("inf"))
    late = refine_labels(emulator, flux, err, None, start, **kw)
    assert np.all(np.nanmean(np.abs(late.labels - labels), 0) > 3 * e_pre)


def test_lsf_per_chip_fit_absorbs_an_lsf_that_differs_between_chips():
    """Spectra whose three chips have their own LSF changes (+0.8, 0, −0.6 px²): fitting one change per
    chip recovers the labels; one change for the whole spectrum leaves them biased."""
    from stellarnet.refinement.fit import _line_shape, _line_shape_mask

    torch.manual_seed(3)
    model = SpectrumEmulator(NAMES, 7214, hidden=16, label_mean=MEAN, label_std=STD, grid="dr12")
    with torch.no_grad():
        for layer in model.net:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.mul_(0.3)
        model.net[-1].bias.fill_(1.0)
    model.eval()
    rng = np.random.default_rng(4)
    labels = MEAN + STD * rng.uniform(-1.0, 1.0, (40, 4))
    chips = _line_shape_mask(7214, "dr12", per_chip=True)
    u = torch.tensor([[0.8, 0.0, -0.6, 0.0]]).repeat(40, 1)
    with torch.no_grad():
        m = model(model.standardize(torch.as_tensor(labels, dtype=torch.float32)))
        flux = _line_shape(m, u, chips)[0].numpy()
    noise = 0.001
    flux = flux + noise * rng.standard_normal(flux.shape).astype(np.float32)
    err = np.full_like(flux, noise)
    start = labels + 0.1 * STD * rng.standard_normal(labels.shape)
    kw = dict(continuum_degree=None, fit_lsf=True, iters=4)
    per_chip = refine_labels(model, flux, err, None, start, lsf_per_chip=True, **kw)
    one = refine_labels(model, flux, err, None, start, lsf_per_chip=False, **kw)
    z_chip = np.abs(per_chip.labels - labels) / per_chip.sigma
    z_one = np.abs(one.labels - labels) / one.sigma
    assert np.median(z_chip) < 1.0, np.median(z_chip, 0)
    assert np.median(z_one) > 3 * np.median(z_chip), (np.median(z_one, 0), np.median(z_chip, 0))
    np.testing.assert_allclose(per_chip.lsf_variance, np.mean([0.8, 0.0, -0.6]), atol=0.05)
    assert np.median(per_chip.chi2) < 1.2 < np.median(one.chi2)


def test_common_residual_finds_what_the_stars_share_and_nothing_else():
    """A residual every star shares (telluric-like dips at fixed pixels) is measured to within its
    standard error; pixels where the stars share nothing, or too few stars were fit, get 0."""
    from stellarnet.refinement.residuals import common_residual

    rng = np.random.default_rng(3)
    n, p = 400, 2000
    model = 1.0 - 0.3 * rng.random((n, p)) ** 8  # line-like absorption, different in every star
    shared = np.zeros(p)
    dips = 60 + rng.choice(p - 60, 25, replace=False)
    shared[dips] = -rng.uniform(0.01, 0.04, 25)
    flux = model * (1 + shared) * (1 + rng.normal(0, 0.01, (n, p)))
    weight = np.ones((n, p))
    weight[:, :40] = 0  # never fit
    weight[10:, 40:60] = 0  # fit in 10 stars only
    c, err = common_residual(flux, model, weight)
    assert c.shape == err.shape == (p,)
    np.testing.assert_allclose(c[dips], shared[dips], atol=4 * np.median(err[60:]))
    others = np.setdiff1d(np.arange(60, p), dips)
    assert np.mean(c[others] != 0) < 0.01  # 3σ: ~0.3 % by chance
    assert (c[:60] == 0).all() and np.isinf(err[:40]).all()
    with pytest.raises(ValueError, match="one shape"):
        common_residual(flux, model[:, :10], weight)


def test_member_spread_is_what_a_refit_with_the_member_gives(emulator):
    """The members' spread is the first-order change of the fitted labels: fitting again with the member
    as the model moves each star by about that much (median ratio near 1, the same stars most)."""
    from stellarnet.refinement.training import train_members

    labels, flux, err = draw(1000, 0)
    member = train_members(emulator, labels, SpectraBlocks.of_arrays(flux, err, None), n_members=1, epochs=15,
                           seed=3)[0]
    truth, f, e = draw(150, 5)
    main = refine_labels(emulator, f, e, None, truth, continuum_degree=None, iters=4)
    assert main.emulator_spread is None
    r = refine_labels(emulator, f, e, None, truth, continuum_degree=None, iters=4, members=[member])
    np.testing.assert_allclose(r.labels, main.labels)  # the labels are the emulator's, whatever the members
    refit = refine_labels(member, f, e, None, r.labels, continuum_degree=None, iters=4)
    moved = np.abs(refit.labels - r.labels)
    assert np.all(r.emulator_spread > 0)
    ratio = np.median(moved / r.emulator_spread, 0)
    assert np.all((ratio > 0.7) & (ratio < 1.4)), ratio
    assert all(np.corrcoef(moved[:, j], r.emulator_spread[:, j])[0, 1] > 0.8 for j in range(4))
    with pytest.raises(ValueError, match="member"):
        other = emulator_from_state(emulator_state(emulator))
        other.label_mean.add_(1.0)
        refine_labels(emulator, f, e, None, truth, continuum_degree=None, members=[other])


def test_member_spread_grows_where_training_stars_are_few():
    """An emulator trained where stars with a high first label are rare (1 in 20 kept): the members
    (each trained further on half of the stars) disagree there, and the refined labels with them —
    the spread in that corner is several times the spread in the dense part."""
    from stellarnet.refinement.training import train_members

    labels, flux, err = draw(3000, 21)
    z = (labels - MEAN) / STD
    keep = (z[:, 0] < 0.5) | (np.random.default_rng(22).random(len(z)) < 0.05)
    labels, flux, err = labels[keep], flux[keep], err[keep]
    torch.manual_seed(1)
    main, _ = train_emulator(labels, flux, err, None, NAMES, None, hidden=64, epochs=100, batch_size=64, lr=5e-3)
    members = train_members(main, labels, SpectraBlocks.of_arrays(flux, err, None), n_members=2, epochs=30, seed=4)
    truth, f, e = draw(400, 23)
    zt = (truth - MEAN) / STD
    r = refine_labels(main, f, e, None, truth, continuum_degree=None, iters=4, members=members)
    dense, sparse = zt[:, 0] < 0.0, zt[:, 0] > 1.0
    ratio = np.median(r.emulator_spread[sparse], 0) / np.median(r.emulator_spread[dense], 0)
    assert ratio[0] > 2.0, ratio
