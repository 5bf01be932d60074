"""Tests of stellarnet.io.spectra on the two real DR17 apStar files and synthetic spectra."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from stellarnet.io import grids
from stellarnet.io import spectra as S
from stellarnet.preparation import spectra as P
from stellarnet.io.bitmasks import APOGEE_PIXMASK
from stellarnet.common.paths import resource

APSTAR_MULTI = "apStar-dr17-2M17335483-2753043.fits"  # NVISITS = 3
APSTAR_SINGLE = "apStar-dr17-2M19485057+5005279.fits"  # NVISITS = 1
APSTARS = [APSTAR_MULTI, APSTAR_SINGLE]


# ----------------------------------------------------------------------------------------------
# helpers


def synthetic(grid: str = "dr17", n: int = 1, snr: float = 300.0, seed: int = 0):
    """Spectra = per-chip quadratic continuum × absorption lines that avoid continuum pixels."""
    rng = np.random.default_rng(seed)
    cont_pix = P.continuum_pixels(grid)
    p = grids.n_pixels(grid)
    cont = np.empty((n, p))
    for k, sl in enumerate(grids.chip_slices(grid)):
        x = np.linspace(-1, 1, sl.stop - sl.start)
        a0 = rng.uniform(500, 2000, (n, 1))
        cont[:, sl] = a0 * (1 + rng.uniform(-0.2, 0.2, (n, 1)) * x + rng.uniform(-0.1, 0.1, (n, 1)) * x**2)
    centres = rng.choice(np.flatnonzero(~cont_pix), size=400, replace=False)
    pix = np.arange(p)
    lines = np.ones((n, p))
    for c in centres:
        prof = 0.5 * np.exp(-0.5 * ((pix - c) / 1.5) ** 2)
        lines *= 1 - rng.uniform(0.2, 1.0, (n, 1)) * prof
    lines[:, cont_pix] = 1.0  # continuum pixels are exact continuum
    true_flux = cont * lines
    err = true_flux / snr
    flux = true_flux + rng.normal(size=true_flux.shape) * err
    return flux, err, cont, lines


def write_aspcapstar(path: Path, flux, err, model=None, objid: str | None = None,
                     crval1: float = 4.179) -> Path:
    h0 = fits.PrimaryHDU()
    if objid is not None:
        h0.header["OBJID"] = objid
    hdus = [h0]
    for arr in (flux, err) + ((model,) if model is not None else ()):
        h = fits.ImageHDU(np.asarray(arr, dtype=">f4"))
        h.header["CRVAL1"] = crval1
        h.header["CDELT1"] = 6e-6
        h.header["CRPIX1"] = 1
        h.header["CTYPE1"] = "LOG-LINEAR"
        hdus.append(h)
    fits.HDUList(hdus).writeto(path)
    return path


@pytest.fixture(scope="module")
def apstar_raw():
    out = {}
    for name in APSTARS:
        with fits.open(resource(name)) as h:
            out[name] = (h[0].header.copy(), h[1].data.copy(), h[2].data.copy(), h[3].data.copy())
    return out


# ----------------------------------------------------------------------------------------------
# real apStar files


@pytest.mark.parametrize("name", APSTARS)
def test_read_apstar_real_shapes_and_wavelength(name, apstar_raw):
    sp = S.read_apstar(resource(name))
    header, flux, _, _ = apstar_raw[name]
    assert sp.kind == "apStar"
    assert sp.flux.shape == sp.flux_err.shape == sp.pixmask.shape == (8575,)
    assert sp.flux.dtype == np.float64 and sp.flux.dtype.isnative
    assert sp.pixmask.dtype == np.int64 and sp.pixmask.dtype.isnative
    np.testing.assert_allclose(sp.wavelength, grids.wavelength_full(), rtol=1e-12)
    assert sp.apogee_id == header["OBJID"] == name.removeprefix("apStar-dr17-").removesuffix(".fits")
    assert sp.header["NVISITS"] == header["NVISITS"]
    assert sp.n_visits == header["NVISITS"]
    # DR17 apStar is 2-D even for one visit: NVISITS + 2 rows, or 2 rows for one visit
    assert flux.shape[0] == (header["NVISITS"] + 2 if header["NVISITS"] > 1 else 2)
    np.testing.assert_array_equal(sp.flux, flux[0])
    assert "COMMENT" not in sp.header and isinstance(sp.header["SNR"], float)


def test_read_apstar_rows_and_visits(apstar_raw):
    header, flux, err, mask = apstar_raw[APSTAR_MULTI]
    path = resource(APSTAR_MULTI)
    glob = S.read_apstar(path, row="global")
    assert glob.row == 1
    np.testing.assert_array_equal(glob.flux, flux[1])
    for k in range(header["NVISITS"]):
        v = S.read_apstar(path, row=k)
        assert v.row == k + 2
        np.testing.assert_array_equal(v.flux, flux[k + 2])
        np.testing.assert_array_equal(v.pixmask, mask[k + 2])
    with pytest.raises(IndexError, match="visit index 3 out of range.*3 visit"):
        S.read_apstar(path, row=3)
    with pytest.raises(IndexError):
        S.read_apstar(path, row=-1)
    with pytest.raises(ValueError, match="row must be"):
        S.read_apstar(path, row="best")


def test_read_apstar_single_visit_rows(apstar_raw):
    _, flux, _, _ = apstar_raw[APSTAR_SINGLE]
    path = resource(APSTAR_SINGLE)
    assert not flux[1].any()  # DR17 one-visit files: row 1 is all zeros
    for row in ("combined", "global", 0):
        sp = S.read_apstar(path, row=row)
        assert sp.row == 0
        np.testing.assert_array_equal(sp.flux, flux[0])
    with pytest.raises(IndexError):
        S.read_apstar(path, row=1)


@pytest.mark.parametrize("name", APSTARS)
def test_real_pixmask_bits_are_known(name):
    sp = S.read_apstar(resource(name))
    values = np.unique(sp.pixmask)
    assert values.min() >= 0 and values.max() < 2**17
    names = set()
    for v in values:
        decoded = APOGEE_PIXMASK.decode(int(v))
        assert not [d for d in decoded if d.startswith("BIT")], decoded
        names.update(decoded)
    assert {"BADPIX", "SIG_TELLURIC", "PERSIST_LOW"} <= names


@pytest.mark.parametrize("name", APSTARS)
def test_real_gaps_are_bad(name):
    sp = S.read_apstar(resource(name))
    bad = P.bad_pixel_mask(sp.flux, sp.flux_err, sp.pixmask)
    h = sp.header
    outside = np.ones(8575, bool)  # pixels no frame contributes to
    for lo, hi in (("BMIN", "BMAX"), ("GMIN", "GMAX"), ("RMIN", "RMAX")):
        outside[h[lo] : h[hi] + 1] = False
    assert np.isnan(sp.flux[outside]).all()  # combined rows: NaN outside the chips
    assert bad[outside].all()
    # inside the dr17 chips almost everything is usable
    assert bad[grids.grid_indices("dr17")].mean() < 0.1


@pytest.mark.parametrize("name", APSTARS)
def test_prepare_real_apstar_normalized(name):
    sp = S.read_apstar(resource(name))
    flux, err, good = P.prepare_spectrum(sp.flux, sp.flux_err, sp.pixmask, grid="dr17")
    assert flux.shape == err.shape == good.shape == (7514,)
    assert flux.dtype == err.dtype == np.float32 and good.dtype == bool
    assert np.isfinite(flux).all() and np.isfinite(err).all()
    assert good.mean() > 0.9
    assert (flux[~good] == 1.0).all() and (err[~good] == P.BAD_PIXEL_ERR).all()
    assert (err[good] < P.BAD_PIXEL_ERR).all() and (err[good] > 0).all()
    cont_pix = P.continuum_pixels("dr17")
    for sl in grids.chip_slices("dr17"):
        sel = cont_pix[sl] & good[sl]
        assert abs(np.median(flux[sl][sel]) - 1) < 0.02
    # lines go well below the continuum; the M giant (Teff ~3700 K) has ~1% of pixels up to
    # ~1.12 above its pseudo-continuum, so the upper bound is loose
    assert np.percentile(flux[good], 1) < 0.8 and np.percentile(flux[good], 99) < 1.2
    # S/N after normalization is close to the header's median S/N per pixel
    snr = np.median(flux[good] / err[good])
    assert 0.7 < snr / sp.header["SNR"] < 1.5


def test_prepare_real_error_propagation():
    sp = S.read_apstar(resource(APSTAR_MULTI))
    f = grids.gap_delete(sp.flux, "dr17")
    e = grids.gap_delete(sp.flux_err * P.persistence_weight(sp.pixmask), "dr17")
    bad = grids.gap_delete(P.bad_pixel_mask(sp.flux, sp.flux_err, sp.pixmask), "dr17")
    nf, ne, cont = P.continuum_normalize(f, e, bad, grid="dr17")
    flux, err, good = P.prepare_spectrum(sp.flux, sp.flux_err, sp.pixmask, grid="dr17")
    np.testing.assert_allclose(err[good], (e / cont)[good], rtol=1e-5)
    np.testing.assert_allclose(flux[good], (f / cont)[good], rtol=1e-5)
    np.testing.assert_allclose(ne, e / cont)
    # pixels with absurd errors (up to 1e13 in the real file, even without a mask bit) are bad
    assert not good[e / cont >= P.BAD_PIXEL_ERR].any()


def test_prepare_real_visits_and_dr12_grid():
    path = resource(APSTAR_MULTI)
    cont_pix = P.continuum_pixels("dr12")
    batch = [S.read_apstar(path, row=k) for k in range(3)]
    fl = np.stack([b.flux for b in batch])
    er = np.stack([b.flux_err for b in batch])
    pm = np.stack([b.pixmask for b in batch])
    flux, err, good = P.prepare_spectrum(fl, er, pm, grid="dr12")
    assert flux.shape == (3, 7214)
    for i in range(3):
        assert abs(np.median(flux[i][cont_pix & good[i]]) - 1) < 0.02
        f1, e1, g1 = P.prepare_spectrum(fl[i], er[i], pm[i], grid="dr12")
        np.testing.assert_allclose(f1, flux[i], rtol=1e-6)
        np.testing.assert_array_equal(g1, good[i])
    # visit rows: 0 flux and 0 error outside the chips (not NaN as in the combined rows)
    assert (fl[:, :190] == 0).all() and (er[:, :190] == 0).all()
    assert P.bad_pixel_mask(fl, er, pm)[:, :190].all()
    assert (good.mean(axis=1) > 0.9).all()


def test_real_combined_normalized_spectrum_dr12():
    with np.load(resource("apogee_combined_2M13012770+5754582.npz")) as z:
        spec, spec_err = z["spectrum"], z["spec_err"]
    assert spec.shape == spec_err.shape == (7214,)
    cont_pix = P.continuum_pixels("dr12")
    assert abs(np.median(spec[cont_pix]) - 1) < 0.02
    assert 0 <= spec.min() and np.percentile(spec, 99) < 1.1 and np.percentile(spec, 1) < 0.85
    # already normalized: the fitted continuum of a normalized spectrum is ≈ 1
    bad = P.bad_pixel_mask(spec, spec_err)
    _, _, cont = P.continuum_normalize(spec, spec_err, bad, grid="dr12")
    assert np.all(np.abs(cont - 1) < 0.02)
    flux, err, good = P.prepare_spectrum(spec, spec_err, None, grid="dr12", normalized=True)
    np.testing.assert_allclose(flux[good], spec[good], rtol=1e-6)
    assert good.mean() > 0.9


# ----------------------------------------------------------------------------------------------
# synthetic continuum normalization


@pytest.mark.parametrize("grid", ["dr17", "dr12"])
def test_continuum_recovered(grid):
    flux, err, cont, lines = synthetic(grid, n=1)
    bad = np.zeros(flux.shape, bool)
    # corrupt a few continuum pixels and flag them: they must not affect the fit
    cp = np.flatnonzero(P.continuum_pixels(grid))[::15]
    flux[0, cp] = 1e6
    bad[0, cp] = True
    nf, ne, c = P.continuum_normalize(flux[0], err[0], bad[0], grid=grid)
    assert nf.shape == ne.shape == c.shape == (grids.n_pixels(grid),)
    assert np.max(np.abs(c / cont[0] - 1)) < 0.005
    np.testing.assert_allclose(ne, err[0] / c)
    ok = ~bad[0]
    assert np.median(np.abs(nf[ok] - lines[0, ok])) < 0.01


def test_continuum_higher_degree_and_given_continuum():
    flux, err, cont, _ = synthetic("dr17", n=2, seed=3)
    nf, ne, c = P.continuum_normalize(flux, err, None, degree=4)
    assert np.max(np.abs(c / cont - 1)) < 0.005
    nf2, ne2, c2 = P.continuum_normalize(flux, err, None, continuum=cont)
    np.testing.assert_allclose(c2, cont)
    np.testing.assert_allclose(nf2, flux / cont)
    with pytest.raises(ValueError, match="continuum shape"):
        P.continuum_normalize(flux, err, None, continuum=cont[0, :100])


def test_batch_equals_loop_and_dtype():
    flux, err, _, _ = synthetic("dr17", n=6, seed=5)
    rng = np.random.default_rng(2)
    bad = rng.random(flux.shape) < 0.05
    nf, ne, c = P.continuum_normalize(flux, err, bad)
    for i in range(len(flux)):
        a, b, d = P.continuum_normalize(flux[i], err[i], bad[i])
        np.testing.assert_allclose(nf[i], a, rtol=1e-10)
        np.testing.assert_allclose(ne[i], b, rtol=1e-10)
        np.testing.assert_allclose(c[i], d, rtol=1e-10)
    f32 = P.continuum_normalize(flux.astype(np.float32), err.astype(np.float32), bad)
    assert all(x.dtype == np.float32 for x in f32)
    np.testing.assert_allclose(f32[0], nf, rtol=1e-4)


def test_nan_and_zero_flux_become_bad():
    flux, err, cont, _ = synthetic("dr17", n=1, seed=7)
    full = grids.gap_insert(flux[0], "dr17")  # gaps = 0 flux
    full_err = grids.gap_insert(err[0], "dr17")
    pm = np.zeros(8575, np.int64)
    idx = grids.grid_indices("dr17")
    cp = idx[P.continuum_pixels("dr17")]
    full[cp[0]] = np.nan
    full[cp[1]] = np.inf
    full[cp[2]] = 0.0
    full_err[cp[3]] = np.nan
    full_err[cp[4]] = -1.0
    full_err[cp[5]] = 0.0
    pm[cp[6]] = 1 << APOGEE_PIXMASK.bit("BADPIX")
    pm[cp[7]] = 1 << APOGEE_PIXMASK.bit("SIG_SKYLINE")
    pm[cp[8]] = 1 << APOGEE_PIXMASK.bit("PERSIST_HIGH")  # down-weighted, not bad
    pm[cp[9]] = 1 << APOGEE_PIXMASK.bit("SIG_TELLURIC")  # not in the default bits
    bad = P.bad_pixel_mask(full, full_err, pm)
    assert bad[cp[:8]].all() and not bad[cp[8:10]].any()
    assert bad[np.setdiff1d(np.arange(8575), idx)].all()  # gap pixels (flux 0)
    flux_o, err_o, good = P.prepare_spectrum(full, full_err, pm, grid="dr17")
    pos = np.searchsorted(idx, cp[:10])
    assert not good[pos[:8]].any() and good[pos[8:10]].all()
    assert (flux_o[pos[:8]] == 1.0).all() and (err_o[pos[:8]] == P.BAD_PIXEL_ERR).all()
    assert np.isfinite(flux_o).all() and np.isfinite(err_o).all()
    # the continuum is still fine; persistence inflated the error ×3 at that pixel
    c = grids.gap_delete(full, "dr17") / flux_o
    assert abs(np.median(c[good] / cont[0][good]) - 1) < 0.005
    ratio = err_o[pos[8]] / (full_err[cp[8]] / cont[0][pos[8]])
    assert ratio == pytest.approx(P.PERSIST_ERR_FACTORS[9], rel=0.01)


def test_bad_pixel_mask_bits_argument_and_errors():
    flux = np.ones(5)
    err = np.full(5, 0.1)
    pm = np.array([0, 1 << 12, 1 << 13, 1, 1 << 10])
    np.testing.assert_array_equal(P.bad_pixel_mask(flux, err, pm), [0, 1, 0, 1, 0])
    np.testing.assert_array_equal(P.bad_pixel_mask(flux, err, pm, bits=["SIG_TELLURIC"]), [0, 0, 1, 0, 0])
    np.testing.assert_array_equal(P.bad_pixel_mask(flux, err, pm, bits=()), [0] * 5)
    with pytest.raises(ValueError, match="pixmask shape"):
        P.bad_pixel_mask(flux, err, pm[:3])
    with pytest.raises(TypeError, match="integer"):
        P.bad_pixel_mask(flux, err, pm.astype(float))
    with pytest.raises(ValueError, match="flux_err shape"):
        P.bad_pixel_mask(flux, err[:2])


def test_persistence_weight():
    pm = np.array([0, 1 << 9, 1 << 10, 1 << 11, (1 << 10) | (1 << 11), 1])
    np.testing.assert_allclose(P.persistence_weight(pm), [1, 3, 2, 1.5, 2, 1])
    np.testing.assert_array_equal(P.persistence_weight(None, shape=(4,)), np.ones(4))
    with pytest.raises(ValueError):
        P.persistence_weight(None)


def test_wrong_grid_length_errors():
    flux, err, _, _ = synthetic("dr17", n=1)
    with pytest.raises(ValueError, match="7514 pixels but grid 'dr12' has 7214"):
        P.continuum_normalize(flux, err, None, grid="dr12")
    with pytest.raises(ValueError, match="gap_delete"):
        P.continuum_normalize(np.ones(8575), np.ones(8575), None)
    with pytest.raises(ValueError, match="expected 8575"):
        P.prepare_spectrum(np.ones(7000), np.ones(7000), None)
    with pytest.raises(ValueError, match="flux_err shape"):
        P.continuum_normalize(flux, err[:, :10], None)
    with pytest.raises(ValueError, match="bad shape"):
        P.continuum_normalize(flux, err, np.zeros(5, bool))
    # grid=None infers the grid from the length
    _, _, c = P.continuum_normalize(flux, err, None, grid=None)
    assert c.shape == flux.shape


def test_too_few_continuum_pixels_gives_nan_chip():
    flux, err, _, _ = synthetic("dr17", n=2, seed=11)
    bad = np.zeros(flux.shape, bool)
    sl = grids.chip_slices("dr17")[1]
    cp = P.continuum_pixels("dr17")
    keep = np.flatnonzero(cp[sl])[: P.MIN_CONTINUUM_PIXELS - 1] + sl.start
    bad[0, sl] = True
    bad[0, keep] = False  # only MIN-1 continuum pixels left in the green chip of spectrum 0
    nf, ne, c = P.continuum_normalize(flux, err, bad)
    assert np.isnan(c[0, sl]).all() and np.isnan(nf[0, sl]).all()
    assert np.isfinite(c[0, : sl.start]).all() and np.isfinite(c[1]).all()
    full = grids.gap_insert(flux, "dr17")
    full_err = grids.gap_insert(err, "dr17", fill=1.0)
    pm = np.zeros(full.shape, np.int64)
    pm[:, grids.grid_indices("dr17")] = np.where(bad, 1, 0)
    f, e, good = P.prepare_spectrum(full, full_err, pm)
    assert not good[0, sl].any() and good[0, : sl.start].mean() > 0.99 and good[1].mean() > 0.99
    assert np.isfinite(f).all() and np.isfinite(e).all()


def test_all_bad_spectrum_raises_or_flags():
    flux, err, _, _ = synthetic("dr17", n=2, seed=13)
    full = grids.gap_insert(flux, "dr17")
    full_err = grids.gap_insert(err, "dr17")
    full[1] = np.nan
    with pytest.raises(P.SpectrumQualityError, match=r"rows \[1\]"):
        P.prepare_spectrum(full, full_err, None)
    with pytest.raises(P.SpectrumQualityError, match="no good pixel"):
        P.prepare_spectrum(np.zeros(8575), np.ones(8575), None)
    f, e, good = P.prepare_spectrum(full, full_err, None, allow_empty=True)
    assert not good[1].any() and good[0].mean() > 0.99
    assert (f[1] == 1).all() and (e[1] == P.BAD_PIXEL_ERR).all()


def test_continuum_pixels_reference_files():
    c17 = P.continuum_pixels("dr17")
    c12 = P.continuum_pixels(7214)
    assert c17.dtype == bool and c17.shape == (7514,) and c17.sum() == 532
    assert c12.dtype == bool and c12.shape == (7214,) and c12.sum() == 529
    for g, c in (("dr17", c17), ("dr12", c12)):
        assert all(c[sl].sum() > 100 for sl in grids.chip_slices(g))
    c17[:] = False  # a copy: the cached mask is untouched
    assert P.continuum_pixels("dr17").sum() == 532
    with pytest.raises(ValueError, match="unknown APOGEE grid"):
        P.continuum_pixels("dr14")


# ----------------------------------------------------------------------------------------------
# aspcapStar and file errors


def test_read_aspcapstar_built_file(tmp_path):
    rng = np.random.default_rng(0)
    flux = grids.gap_insert(1 - 0.3 * rng.random(7514) ** 6, "dr17")
    err = grids.gap_insert(np.full(7514, 0.01), "dr17")
    model = flux * 1.001
    path = write_aspcapstar(tmp_path / "aspcapStar-dr17-2M00000002+7417074.fits", flux, err, model)
    sp = S.read_aspcapstar(path)
    assert sp.kind == "aspcapStar" and sp.normalized
    assert sp.apogee_id == "2M00000002+7417074"  # from the file name
    np.testing.assert_allclose(sp.flux, flux, rtol=1e-6)
    np.testing.assert_allclose(sp.model, model, rtol=1e-6)
    assert (sp.pixmask == 0).all() and sp.pixmask.dtype == np.int64
    np.testing.assert_allclose(sp.wavelength, grids.wavelength_full(), rtol=1e-12)
    f, e, good = P.prepare_spectrum(sp.flux, sp.flux_err, sp.pixmask, grid="dr17", normalized=True)
    np.testing.assert_allclose(f, grids.gap_delete(flux, "dr17"), rtol=1e-6)
    assert good.all()
    # dispatch by name and by structure
    assert S.read_spectrum(path).kind == "aspcapStar"
    other = shutil.copy(path, tmp_path / "star.fits")
    assert S.read_spectrum(other).kind == "aspcapStar"
    copied = shutil.copy(resource(APSTAR_MULTI), tmp_path / "spectrum.fits")
    sp2 = S.read_spectrum(copied, row=1)
    assert sp2.kind == "apStar" and sp2.row == 3 and sp2.apogee_id == "2M17335483-2753043"


def test_read_aspcapstar_objid_and_no_model(tmp_path):
    path = write_aspcapstar(tmp_path / "x.fits", np.ones(8575), np.full(8575, 0.01), objid="2M1-2")
    sp = S.read_aspcapstar(path)
    assert sp.apogee_id == "2M1-2" and sp.model is None


def test_aspcapstar_format_errors(tmp_path):
    with pytest.raises(S.SpectrumFormatError, match="missing HDU2"):
        p = tmp_path / "aspcapStar-dr17-2M1.fits"
        fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(np.ones(8575))]).writeto(p)
        S.read_aspcapstar(p)
    with pytest.raises(S.SpectrumFormatError, match=r"shape \(7514,\)"):
        S.read_aspcapstar(write_aspcapstar(tmp_path / "short.fits", np.ones(7514), np.ones(7514)))
    with pytest.raises(S.SpectrumFormatError, match="not the APOGEE 8575-pixel"):
        S.read_aspcapstar(write_aspcapstar(tmp_path / "w.fits", np.ones(8575), np.ones(8575), crval1=4.2))
    p = tmp_path / "table.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns([fits.Column("a", "E", array=np.ones(3))]),
                  fits.ImageHDU(np.ones(8575))]).writeto(p)
    with pytest.raises(S.SpectrumFormatError, match="HDU1 .flux. holds no image"):
        S.read_aspcapstar(p)


def test_apstar_format_errors(tmp_path):
    src = resource(APSTAR_MULTI)
    raw = src.read_bytes()
    junk = tmp_path / "apStar-dr17-junk.fits"
    junk.write_text("this is not a FITS file " * 200)
    with pytest.raises(S.SpectrumFormatError, match="not a readable FITS"):
        S.read_apstar(junk)
    for cut in (len(raw) // 2, 20000, 100):
        t = tmp_path / f"apStar-dr17-trunc{cut}.fits"
        t.write_bytes(raw[:cut])
        with pytest.raises(S.SpectrumFormatError, match=str(t.name)):
            S.read_apstar(t)
    with pytest.raises(FileNotFoundError):
        S.read_apstar(tmp_path / "missing.fits")
    # NVISITS inconsistent with the number of rows
    with fits.open(src) as h:
        h[0].header["NVISITS"] = 5
        bad_nv = tmp_path / "apStar-dr17-nv.fits"
        h.writeto(bad_nv)
    with pytest.raises(S.SpectrumFormatError, match="NVISITS=5"):
        S.read_apstar(bad_nv)
    # mask HDU with a different shape; missing mask HDU
    with fits.open(src) as h:
        h[3].data = h[3].data[:2]
        bad_shape = tmp_path / "apStar-dr17-shape.fits"
        h.writeto(bad_shape)
    with pytest.raises(S.SpectrumFormatError, match="shapes differ"):
        S.read_apstar(bad_shape)
    with fits.open(src) as h:
        fits.HDUList([h[0].copy(), h[1].copy(), h[2].copy()]).writeto(tmp_path / "apStar-dr17-3.fits")
    with pytest.raises(S.SpectrumFormatError, match="missing HDU3"):
        S.read_apstar(tmp_path / "apStar-dr17-3.fits")


def test_one_dimensional_apstar(tmp_path):
    """Older one-visit apStar files hold 1-D arrays; they read as the single spectrum."""
    sp = S.read_apstar(resource(APSTAR_SINGLE))
    hdus = [fits.PrimaryHDU(header=fits.Header({"NVISITS": 1, "OBJID": sp.apogee_id}))]
    for arr in (sp.flux, sp.flux_err, sp.pixmask):
        h = fits.ImageHDU(arr)
        h.header["CRVAL1"], h.header["CDELT1"] = 4.179, 6e-6
        hdus.append(h)
    p = tmp_path / "asStar-dr17-test.fits"
    fits.HDUList(hdus).writeto(p)
    one = S.read_spectrum(p, row=0)
    assert one.kind == "apStar" and one.row is None and one.n_visits == 1
    np.testing.assert_array_equal(one.flux, sp.flux)
    np.testing.assert_array_equal(one.pixmask, sp.pixmask)


def test_flux_that_is_not_what_its_kind_says_is_refused():
    """An "aspcapStar" holding un-normalized or negated flux, or apStar flux that is negated, gets
    a SpectrumQualityError (per star in predict), never labels; allow_empty makes them all-bad rows."""
    from stellarnet.io.spectra import SpectrumQualityError

    prepare_spectrum = P.prepare_spectrum
    rng = np.random.default_rng(0)
    n = grids.n_pixels("dr12")
    norm = 1 - 0.1 * rng.random(n)
    err = np.full(n, 0.01)
    prepare_spectrum(norm, err, None, grid="dr12", normalized=True)  # fine
    for bad, what in ((norm * 1500.0, "median flux 14"), (-norm, "median flux -0.9"), (norm * 0.1, "median flux 0.09")):
        with pytest.raises(SpectrumQualityError, match=f"{what}.*not that of a continuum-normalized"):
            prepare_spectrum(bad, err, None, grid="dr12", normalized=True)
    raw = 800.0 * norm
    prepare_spectrum(raw, err * 800, None, grid="dr12", normalized=False)
    with pytest.raises(SpectrumQualityError, match="not positive: negated"):
        prepare_spectrum(-raw, err * 800, None, grid="dr12", normalized=False)
    batch = np.stack([norm, norm * 1500.0, norm])
    with pytest.raises(SpectrumQualityError, match=r"rows \[1\]"):
        prepare_spectrum(batch, np.full_like(batch, 0.01), None, grid="dr12", normalized=True)
    f, e, good = prepare_spectrum(batch, np.full_like(batch, 0.01), None, grid="dr12", normalized=True, allow_empty=True)
    assert good[0].all() and not good[1].any() and good[2].all()
    assert (f[1] == 1).all()


def test_negative_flux_beyond_its_error_is_bad():
    # a star's flux cannot be negative: −0.5 ± 0.01 (over-subtracted sky, a fill value) is corrupt,
    # −0.01 ± 0.01 (noise in a faint pixel) and −0.2 ± 0.1 (2 σ) are kept
    flux = np.array([1.0, -0.5, -0.01, -0.2, 0.3])
    err = np.array([0.01, 0.01, 0.01, 0.1, 0.01])
    np.testing.assert_array_equal(P.negative_flux(flux, err), [0, 1, 0, 0, 0])
    np.testing.assert_array_equal(P.bad_pixel_mask(flux, err), [0, 1, 0, 0, 0])
    out_flux, out_err, good = P.mask_unusable_pixels(flux, err)
    np.testing.assert_array_equal(good, [1, 0, 1, 1, 1])
    assert out_flux[1] == 1.0 and out_err[1] == P.BAD_PIXEL_ERR


def test_negative_pixels_in_a_normalized_spectrum_are_masked_like_flagged_ones():
    flux, err, _, _ = synthetic("dr17", n=1)
    normed = flux / np.nanmedian(flux)
    normed_err = err / np.nanmedian(flux)
    f_ok, _, good_ok = P.prepare_spectrum(normed, normed_err, None, grid="dr17", normalized=True)
    corrupt = normed.copy()
    idx = np.flatnonzero(good_ok.reshape(-1))[::40]  # every 40th usable pixel set to −0.5 with its error kept
    corrupt.reshape(-1)[idx] = -0.5  # synthetic() spectra are on the gap-removed grid
    f_bad, e_bad, good_bad = P.prepare_spectrum(corrupt, normed_err, None, grid="dr17", normalized=True)
    assert not good_bad.reshape(-1)[idx].any()
    assert (good_bad.reshape(-1) == np.isin(np.arange(good_ok.size), idx, invert=True) & good_ok.reshape(-1)).all()
    assert (f_bad.reshape(-1)[idx] == 1.0).all() and (e_bad.reshape(-1)[idx] == P.BAD_PIXEL_ERR).all()
