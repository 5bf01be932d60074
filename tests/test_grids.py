"""Tests of stellarnet.io.grids (APOGEE wavelength grids and gap removal)."""

from __future__ import annotations

import numpy as np
import pytest

from stellarnet.io import grids
from stellarnet.common.paths import resource


@pytest.mark.parametrize("grid, n", [("dr17", 7514), ("dr12", 7214), (7514, 7514), ("7214", 7214)])
def test_pixel_counts(grid, n):
    assert grids.n_pixels(grid) == n
    idx = grids.grid_indices(grid)
    assert idx.shape == (n,)
    assert np.all(np.diff(idx) > 0) and idx[0] >= 0 and idx[-1] < grids.N_PIX_FULL
    slices = grids.chip_slices(grid)
    assert len(slices) == 3
    assert slices[0].start == 0 and slices[-1].stop == n
    assert all(a.stop == b.start for a, b in zip(slices, slices[1:]))


def test_chip_ranges_match_survey_facts():
    assert grids.CHIP_RANGES["dr17"] == ((246, 3274), (3585, 6080), (6344, 8335))
    assert grids.CHIP_RANGES["dr12"] == ((322, 3242), (3648, 6048), (6412, 8306))


def test_grid_name_aliases_and_unknown():
    assert grids.grid_name(7514) == "dr17"
    assert grids.grid_name("7214") == "dr12"
    with pytest.raises(ValueError, match="unknown APOGEE grid"):
        grids.grid_name("dr16")
    with pytest.raises(ValueError):
        grids.n_pixels(8575)


def test_wavelength_endpoints():
    wave = grids.wavelength_full()
    assert wave.shape == (8575,)
    assert wave[0] == pytest.approx(15100.8, abs=0.1)
    assert wave[-1] == pytest.approx(16999.0, abs=1.0)
    # log-linear: constant step in log10 λ of 6e-6
    assert np.allclose(np.diff(np.log10(wave)), 6e-6, rtol=1e-6)
    for g in ("dr17", "dr12"):
        w = grids.wavelength(g)
        assert w.shape == (grids.n_pixels(g),)
        assert np.all(np.diff(w) > 0)


def test_dr12_wavelength_matches_reference_file():
    with np.load(resource("apogee_wavelength_7214.npz")) as z:
        ref = z["wavelength"]
    np.testing.assert_allclose(grids.wavelength("dr12"), ref, rtol=1e-9)


@pytest.mark.parametrize("grid", ["dr17", "dr12"])
def test_gap_delete_insert_round_trip(grid):
    rng = np.random.default_rng(1)
    full = rng.normal(size=(3, grids.N_PIX_FULL))
    cut = grids.gap_delete(full, grid)
    assert cut.shape == (3, grids.n_pixels(grid))
    back = grids.gap_insert(cut, grid, fill=np.nan)
    keep = np.zeros(grids.N_PIX_FULL, bool)
    keep[grids.grid_indices(grid)] = True
    np.testing.assert_array_equal(back[:, keep], full[:, keep])
    assert np.isnan(back[:, ~keep]).all()
    np.testing.assert_array_equal(grids.gap_delete(back, grid), cut)
    # 1-D works and gap pixels are dropped
    one = grids.gap_delete(np.arange(grids.N_PIX_FULL), grid)
    np.testing.assert_array_equal(one, grids.grid_indices(grid))


def test_wrong_length_errors():
    with pytest.raises(ValueError, match="8575"):
        grids.gap_delete(np.zeros(7514), "dr17")
    with pytest.raises(ValueError, match="7214"):
        grids.gap_insert(np.zeros(7514), "dr12")
