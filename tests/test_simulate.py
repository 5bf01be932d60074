"""Tests of the survey simulator (tiny surveys in tmp dirs)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from stellarnet.io import grids
from stellarnet.io.bitmasks import ASPCAPFLAG, EXTRATARG, PARAM_ORDER, PARAMFLAG, STARFLAG
from stellarnet.preparation.spectra import continuum_normalize
from stellarnet.io.spectra import read_aspcapstar
from stellarnet.simulate.allstar import ALLSTAR_DTYPES, ALLSTAR_NAME, tmass_designation
from stellarnet.physics.kurucz import load_emulator
from stellarnet.simulate.external import GALAH_DTYPES, GALAH_NAME, LAMOST_DTYPES, LAMOST_NAME, apply_offsets, lamost_designation
from stellarnet.simulate.instrument import observe_spectra
from stellarnet.simulate.population import STAGES, sample_population
from stellarnet.simulate.spectra_files import aspcapstar_path
from stellarnet.simulate.survey import OFFSETS_NAME, SIMULATION_JSON, TRUTH_NAME, simulate_survey

N_STARS = 300
KW = dict(n_stars=N_STARS, seed=7, stars_per_field=50, progress=False, dup_fraction=0.05)


@pytest.fixture(scope="module")
def survey(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return simulate_survey(tmp_path_factory.mktemp("sim") / "survey", **KW)


@pytest.fixture(scope="module")
def allstar(survey: dict[str, Path]) -> np.ndarray:
    return np.asarray(fits.getdata(survey["allstar"], 1))


@pytest.fixture(scope="module")
def truth(survey: dict[str, Path]) -> np.ndarray:
    return np.asarray(fits.getdata(survey["truth"], 1))


def _s(a: np.ndarray) -> np.ndarray:
    return np.char.strip(np.char.decode(np.asarray(a, dtype="S"), "ascii")) if np.asarray(a).dtype.kind == "S" else np.char.strip(np.asarray(a, str))


# --------------------------------------------------------------------------- emulator / spectra


def test_emulator_matches_reference_forward_pass() -> None:
    emu = load_emulator()
    with np.load(Path(__file__).resolve().parents[1] / "data/reference/kurucz_spectral_emulator.npz") as z:
        x = (np.array([4700.0, 2.4, -0.2, 0.1]) - z["x_min"]) / (z["x_max"] - z["x_min"]) - 0.5
        h = 1.0 / (1.0 + np.exp(-(np.einsum("pki,i->pk", z["w_array_0"], x) + z["b_array_0"])))
        ref = (h * z["w_array_1"]).sum(-1) + z["b_array_1"]
    out = emu(np.array([[4700.0, 2.4, -0.2, 0.1]]))
    assert out.shape == (1, 7214) and out.dtype == np.float32
    np.testing.assert_allclose(out[0], ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="outside the emulator box"):
        emu(np.array([[9000.0, 2.0, 0.0, 0.0]]))


def test_fe_lines_deepen_with_metallicity() -> None:
    """Equivalent widths of H-band Fe I lines grow with [Fe/H] at fixed Teff, logg, [α/Fe]."""
    emu = load_emulator()
    wave = grids.wavelength("dr12")
    feh = np.array([-0.9, -0.5, -0.1, 0.3])
    flux = emu(np.array([[4600.0, 2.5, f, 0.0] for f in feh]))
    norm, _, _ = continuum_normalize(flux, np.ones_like(flux), None, grid="dr12")
    fe_air = np.array([15194.49, 15207.53, 15395.72, 15490.34, 15648.52, 15964.87, 16040.65, 16153.25])
    dl = np.gradient(wave)
    n_lines = 0
    for lam in fe_air * 1.000273:  # vacuum
        win = np.abs(wave - lam) < 0.9
        if win.sum() < 4:
            continue
        ew = ((1.0 - norm[:, win]) * dl[win]).sum(axis=1)
        assert np.all(np.diff(ew) > 0), (lam, ew)
        n_lines += 1
    assert n_lines >= 6


def test_noise_matches_snr() -> None:
    rng = np.random.default_rng(0)
    pop = sample_population(40, rng)
    snr = np.array([30.0, 100.0, 300.0, 60.0] * 10)
    f, e, m = observe_spectra(pop.labels, snr, rng, full_grid=False)
    good = (e > 0) & (e < 1e3)
    pulls = (f - m) / e
    assert 0.9 < np.std(pulls[good]) < 1.1
    measured = np.array([np.median(m[i, good[i]] / e[i, good[i]]) for i in range(len(snr))])
    np.testing.assert_allclose(measured, snr, rtol=0.12)
    # higher SNR → lower scatter of the normalized flux about the model
    rms = np.array([np.std(f[i, good[i]] - m[i, good[i]]) for i in range(len(snr))])
    assert rms[2] < rms[1] < rms[0]


def test_bad_pixel_runs_flagged_by_error() -> None:
    rng = np.random.default_rng(1)
    pop = sample_population(2, rng)
    start = np.zeros((2, 8), np.int32)
    length = np.zeros((2, 8), np.int32)
    start[0, 0], length[0, 0] = 1000, 25
    f, e, m = observe_spectra(pop.labels, np.array([100.0, 100.0]), rng, start, length, full_grid=False)
    assert np.all(e[0, 1000:1025] >= 1e3) and np.all(e[0, :1000] < 1)
    assert np.all(e[1] < 1)


# --------------------------------------------------------------------------- survey files


def test_allstar_schema(survey: dict[str, Path]) -> None:
    with fits.open(survey["allstar"]) as h:
        assert len(h) == 2 and h[0].data is None
        data = h[1].data
        names = list(data.dtype.names)
        assert names == [c for c, _, _ in ALLSTAR_DTYPES]
        for col, dt, shape in ALLSTAR_DTYPES:
            got = data.dtype[col]
            if shape:
                assert got.shape == shape and got.base.str == np.dtype(dt).str, col
            elif dt.startswith("S"):
                assert got.kind == "S" and got.itemsize == int(dt[1:]), col
            else:
                assert got.str == np.dtype(dt).str, col
        off = h[1].fileinfo()["datLoc"]
    raw = survey["allstar"].read_bytes()
    first_id = raw[off : off + 30]
    assert first_id.startswith(b"2M") and first_id.endswith(b" ") and b"\0" not in first_id  # space padded


def test_allstar_content(allstar: np.ndarray) -> None:
    ids = _s(allstar["APOGEE_ID"])
    assert all(re.fullmatch(r"2M\d{8}[+-]\d{7}", i) for i in ids)
    assert set(_s(allstar["TELESCOPE"])) <= {"apo25m", "lco25m"}
    alpha = allstar["ALPHA_M"]
    assert 0 < np.isnan(alpha).mean() < 0.2
    assert np.isfinite(allstar["TEFF"]).all()
    assert (allstar["TEFF_ERR"] > 20).all() and np.nanmedian(allstar["TEFF_ERR"]) < 150
    il = PARAM_ORDER.index("LOGG")
    np.testing.assert_array_equal(allstar["PARAM"][:, PARAM_ORDER.index("TEFF")], allstar["TEFF"])
    pf = allstar["PARAMFLAG"][:, il]
    assert PARAMFLAG.any_set(pf, ["SPEC_RC"]).any() and PARAMFLAG.any_set(pf, ["SPEC_RGB"]).any()
    vs = allstar["VSCATTER"]
    assert (vs[allstar["NVISITS"] == 1] == 0).all() and (vs > 1).any()


def test_spec_rc_flags_follow_truth(allstar: np.ndarray, truth: np.ndarray) -> None:
    stage = dict(zip(_s(truth["APOGEE_ID"]), _s(truth["STAGE"])))
    st = np.array([stage[i] for i in _s(allstar["APOGEE_ID"])])
    rc = PARAMFLAG.any_set(allstar["PARAMFLAG"][:, PARAM_ORDER.index("LOGG")], ["SPEC_RC"])
    giants = (st == "RC") | (st == "RGB")
    agree = (rc == (st == "RC"))[giants].mean()
    assert agree > 0.9
    assert not rc[~giants].any()


def test_low_snr_flags(allstar: np.ndarray) -> None:
    snr = allstar["SNR"]
    flag = allstar["ASPCAPFLAG"]
    np.testing.assert_array_equal(ASPCAPFLAG.any_set(flag, ["SN_WARN"]), snr < 70)
    np.testing.assert_array_equal(ASPCAPFLAG.any_set(flag, ["SN_BAD"]), snr < 30)
    assert ASPCAPFLAG.any_set(flag, ["STAR_BAD"])[snr < 30].all()
    assert (snr < 70).any()
    low = STARFLAG.any_set(allstar["STARFLAG"], ["LOW_SNR"])
    assert (snr[low] / np.sqrt(allstar["NVISITS"][low]) < 10).all()
    names = _s(allstar["ASPCAPFLAGS"])
    assert all(("SN_WARN" in n) == bool(w) for n, w in zip(names, ASPCAPFLAG.any_set(flag, ["SN_WARN"])))


def test_duplicates(allstar: np.ndarray) -> None:
    ids = _s(allstar["APOGEE_ID"])
    dup = EXTRATARG.any_set(allstar["EXTRATARG"], ["DUPLICATE"])
    assert dup.sum() >= 5
    fld = _s(allstar["FIELD"])
    tel = _s(allstar["TELESCOPE"])
    for i in np.flatnonzero(dup):
        rows = np.flatnonzero(ids == ids[i])
        assert rows.size == 2
        j = rows[rows != i][0]
        assert not dup[j] and allstar["SNR"][j] > allstar["SNR"][i]
        assert (fld[i], tel[i]) != (fld[j], tel[j])
    assert np.unique(ids[~dup]).size == (~dup).sum()


def test_aspcapstar_files(survey: dict[str, Path], allstar: np.ndarray) -> None:
    ids, fld, tel = _s(allstar["APOGEE_ID"]), _s(allstar["FIELD"]), _s(allstar["TELESCOPE"])
    outside = np.ones(grids.N_PIX_FULL, bool)
    outside[grids.grid_indices("dr12")] = False
    for r in range(0, len(ids), 37):
        p = aspcapstar_path(survey["root"], tel[r], fld[r], ids[r])
        assert p.exists(), p
        assert p.relative_to(survey["root"]).parts[:5] == ("apogee", "spectro", "aspcap", "dr17", "synspec_rev1")
        with fits.open(p) as h:
            h.verify("exception")
            assert len(h) == 4 and h[0].data is None
            assert h[0].header["OBJID"] == ids[r]
            assert h[0].header["CRVAL1"] == pytest.approx(4.179) and h[0].header["CDELT1"] == pytest.approx(6e-6)
            assert all(h[k].header["NAXIS1"] == 8575 and h[k].data.shape == (8575,) for k in (1, 2, 3))
            assert h[0].header["SNR"] == pytest.approx(float(allstar["SNR"][r]), rel=1e-3)
        s = read_aspcapstar(p)
        assert s.apogee_id == ids[r] and s.model is not None
        assert (s.flux[outside] == 0).all() and (s.flux_err[outside] == 0).all()
        good = (s.flux_err > 0) & (s.flux_err < 1e3)
        assert 0.8 < np.median(s.flux[good]) < 1.02
        assert abs(np.median(s.flux[good] - s.model[good])) < 0.01
        assert np.median(s.model[good] / s.flux_err[good]) == pytest.approx(float(allstar["SNR"][r]), rel=0.15)


def test_photometry_physics(allstar: np.ndarray, truth: np.ndarray) -> None:
    rc = _s(truth["STAGE"]) == "RC"
    assert abs(np.median(truth["ABS_K"][rc]) + 1.6) < 0.3
    # the same from the catalogue: K, AK_TARG and parallax (ϖ/σ > 5)
    first = ~EXTRATARG.any_set(allstar["EXTRATARG"], ["DUPLICATE"])
    a = allstar[first]
    order = {k: i for i, k in enumerate(_s(truth["APOGEE_ID"]))}
    t = truth[[order[i] for i in _s(a["APOGEE_ID"])]]
    plx, eplx = a["GAIAEDR3_PARALLAX"], a["GAIAEDR3_PARALLAX_ERROR"]
    ok = (_s(t["STAGE"]) == "RC") & np.isfinite(plx) & (plx / eplx > 5)
    with np.errstate(invalid="ignore"):
        mk = a["K"] - a["AK_TARG"] + 5 * np.log10(plx / 100.0)
    assert ok.sum() >= 5 and abs(np.median(mk[ok]) + 1.6) < 0.3
    # colours redden with lower Teff (giants, dereddened)
    giant = np.isin(_s(t["STAGE"]), ["RGB", "RC"])
    jk0 = (a["J"] - a["K"]) - 1.5 * a["AK_TARG"]
    assert np.corrcoef(t["TEFF"][giant], jk0[giant])[0, 1] < -0.7
    # distance / parallax consistency
    np.testing.assert_allclose(t["PARALLAX_TRUE"], 1000.0 / t["DIST_PC"])
    assert np.corrcoef(t["A_K"], np.exp(-np.abs(t["GLAT"]) / 5.0))[0, 1] > 0 or np.ptp(t["GLAT"]) < 5


def test_population_physics() -> None:
    rng = np.random.default_rng(3)
    pop = sample_population(5000, rng)
    emu = load_emulator()
    assert emu.in_box(pop.labels).all()
    frac = np.bincount(pop.stage, minlength=4) / 5000
    np.testing.assert_allclose(frac, [0.17, 0.08, 0.55, 0.20], atol=0.01)
    ms = pop.stage == STAGES.index("MS")
    assert pop.teff[ms].min() >= 4000 and pop.teff[ms].max() <= 7000 and (pop.logg[ms] >= 4.0).all()
    rc = pop.stage == STAGES.index("RC")
    assert 2.25 <= pop.logg[rc].min() and pop.logg[rc].max() <= 2.7
    cn = pop.c_fe - pop.n_fe
    assert np.median(cn[rc]) < np.median(cn[pop.stage == STAGES.index("RGB")]) < np.median(cn[ms]) - 0.1
    # metal-poor RC stars are hotter
    assert np.corrcoef(pop.fe_h[rc], pop.teff[rc])[0, 1] < -0.5


def test_external_catalogues(survey: dict[str, Path], truth: np.ndarray) -> None:
    offsets = json.loads((survey["root"] / OFFSETS_NAME).read_text())
    assert set(offsets) == {"galah", "lamost"}
    assert set(offsets["galah"]) == {"teff", "logg", "fe_h", "alpha_fe"}
    assert set(offsets["lamost"]) == {"teff", "logg", "feh"}
    assert set(offsets["galah"]["teff"]) == {"const", "teff_slope_per_1000K", "feh_slope"}
    g = np.asarray(fits.getdata(survey["root"] / GALAH_NAME, 1))
    lam = np.asarray(fits.getdata(survey["root"] / LAMOST_NAME, 1))
    assert list(g.dtype.names) == [c for c, _, _ in GALAH_DTYPES]
    assert list(lam.dtype.names) == [c for c, _, _ in LAMOST_DTYPES]
    assert "alpha_fe" not in lam.dtype.names
    # GALAH − truth follows the injected offsets (clean rows matched by 2MASS id)
    tid = {k: i for i, k in enumerate(np.char.lstrip(_s(truth["APOGEE_ID"]), "2M"))}
    gid = _s(g["tmass_id"])
    m = np.array([i in tid for i in gid]) & (g["flag_sp"] == 0)
    assert m.sum() >= 10
    t = truth[[tid[i] for i in gid[m]]]
    expect = apply_offsets(offsets["galah"]["teff"], t["TEFF"], t["FE_H"])
    resid = g["teff"][m] - t["TEFF"] - expect
    assert abs(np.median(resid)) < 3 * np.std(resid) / np.sqrt(m.sum()) + 5
    assert (g["flag_repeat"] == 1).sum() <= (g["flag_repeat"] == 0).sum()
    # LAMOST: matched by designation from the truth positions; −9999 = failed
    des = dict(zip(lamost_designation(truth["RA"], truth["DEC"]), range(len(truth))))
    ld = _s(lam["designation"])
    ml = np.array([d in des for d in ld]) & (lam["teff"] > -9000)
    assert ml.sum() >= 10
    tl = truth[[des[d] for d in ld[ml]]]
    r = lam["feh"][ml] - tl["FE_H"] - apply_offsets(offsets["lamost"]["feh"], tl["TEFF"], tl["FE_H"])
    assert abs(np.median(r)) < 0.03
    # LAMOST positions carry sub-arcsecond jitter
    sep = np.hypot((lam["ra"][ml] - tl["RA"]) * np.cos(np.radians(tl["DEC"])), lam["dec"][ml] - tl["DEC"]) * 3600
    assert 0.05 < np.median(sep) < 0.6


def test_designations() -> None:
    # 13h01m27.70s +57°54'58.2" (the reference star 2M13012770+5754582); 2MASS truncates
    ra = (13 + 1 / 60 + 27.707 / 3600) * 15
    dec = 57 + 54 / 60 + 58.27 / 3600
    des = tmass_designation(np.array([0.0, 359.9999, ra]), np.array([-0.5, 89.99, dec]))
    assert des.tolist() == ["00000000-0030000", "23595997+8959240", "13012770+5754582"]
    assert lamost_designation(np.array([ra]), np.array([-dec]))[0] == "J130127.71-575458.3"


# --------------------------------------------------------------------------- determinism / idempotency / CLI


def test_determinism_and_idempotency(tmp_path: Path) -> None:
    kw = dict(n_stars=60, seed=11, stars_per_field=30, progress=False)
    a = simulate_survey(tmp_path / "a", **kw)
    b = simulate_survey(tmp_path / "b", **kw)
    c = simulate_survey(tmp_path / "c", **{**kw, "seed": 12})
    assert a["allstar"].read_bytes() == b["allstar"].read_bytes()
    assert a["truth"].read_bytes() == b["truth"].read_bytes()
    assert a["galah"].read_bytes() == b["galah"].read_bytes()
    fa = sorted(p.relative_to(a["root"]) for p in a["aspcap_dir"].rglob("*.fits"))
    fb = sorted(p.relative_to(b["root"]) for p in b["aspcap_dir"].rglob("*.fits"))
    assert fa == fb and len(fa) >= 60
    assert all((a["root"] / p).read_bytes() == (b["root"] / p).read_bytes() for p in fa[:10])
    assert a["allstar"].read_bytes() != c["allstar"].read_bytes()
    # idempotent: same config → nothing rewritten
    mtime = a["allstar"].stat().st_mtime_ns
    simulate_survey(tmp_path / "a", **kw)
    assert a["allstar"].stat().st_mtime_ns == mtime
    # different config → regenerated (old spectra removed)
    simulate_survey(tmp_path / "a", **{**kw, "spectra": False})
    info = json.loads((tmp_path / "a" / SIMULATION_JSON).read_text())
    assert info["status"] == "complete" and info["config"]["spectra"] is False
    assert not (tmp_path / "a" / "apogee").exists()
    # a non-empty foreign folder is refused
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.txt").write_text("x")
    with pytest.raises(FileExistsError):
        simulate_survey(tmp_path / "d", **kw)


def test_cli_catalogue_only(tmp_path: Path) -> None:
    root = tmp_path / "cli"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    res = subprocess.run(
        [sys.executable, "-m", "stellarnet.simulate", f"root={root}", "n_stars=80", "seed=3", "spectra=false", "progress=false"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert (root / ALLSTAR_NAME).exists() and (root / TRUTH_NAME).exists()
    assert not (root / "apogee").exists()
    assert not (tmp_path / "outputs").exists()  # Hydra writes nothing into the CWD
    assert len(fits.getdata(root / ALLSTAR_NAME, 1)) >= 80


def test_shifted_survey(tmp_path: Path) -> None:
    """``shift=<suite name>``: the same stars' files carry the perturbation, the population follows the
    shift's mix, the hash of an unshifted survey is what it was, and an unknown name is refused."""
    from stellarnet.simulate.shifts import SHIFTED_MIX
    from stellarnet.simulate.survey import config_hash

    kw = dict(n_stars=60, seed=11, stars_per_field=30, progress=False, external=False)
    plain = simulate_survey(tmp_path / "plain", **kw)
    lsf = simulate_survey(tmp_path / "lsf", **kw, shift="lsf_20pc")
    assert plain["allstar"].read_bytes() == lsf["allstar"].read_bytes()  # catalogue untouched by an LSF change
    files = sorted(p.relative_to(plain["root"]) for p in plain["aspcap_dir"].rglob("*.fits"))
    assert files == sorted(p.relative_to(lsf["root"]) for p in lsf["aspcap_dir"].rglob("*.fits"))
    a = np.stack([fits.getdata(plain["root"] / p, 1) for p in files[:20]])
    b = np.stack([fits.getdata(lsf["root"] / p, 1) for p in files[:20]])
    diff = np.abs(a - b)[np.isfinite(a - b)]
    assert diff.max() > 1e-3 and np.median(diff) < 0.05  # broadened lines, same stars and noise level
    info = json.loads(lsf["simulation"].read_text())
    assert info["config"]["shift"]["name"] == "lsf_20pc"
    cfg = dict(json.loads(plain["simulation"].read_text())["config"])
    assert "shift" not in cfg and config_hash(cfg) == config_hash({**cfg, "shift": None})

    mixed = simulate_survey(tmp_path / "mixed", **kw, shift="population")
    truth = fits.getdata(mixed["truth"], 1)
    dwarfs = np.mean(_s(truth["STAGE"]) == "MS")
    assert json.loads(mixed["simulation"].read_text())["config"]["mix"] == SHIFTED_MIX
    assert dwarfs > 0.2  # the default mix has 17 % dwarfs, the shifted one 38 %
    faint = simulate_survey(tmp_path / "faint", **kw, shift="low_snr", spectra=False)
    snr = {k: fits.getdata(p["allstar"], 1)["SNR"] for k, p in (("plain", plain), ("faint", faint))}
    assert np.allclose(snr["faint"], 0.25 * snr["plain"], rtol=1e-3)  # the catalogue's SNR says what the spectra have
    with pytest.raises(KeyError, match="unknown shifts"):
        simulate_survey(tmp_path / "bad", **kw, shift="no_such_shift")
