"""What the emulator's training and the fit share: chip slices and segments, the continuum-correction
bases (per-chip Chebyshev, or cubic B-splines with knots every ~100 Å), inverse-variance fit weights
(capped at S/N 500) and chip-segment clipping."""

from __future__ import annotations

import numpy as np
import torch

from stellarnet.io import grids

MAX_WEIGHT = 1.0 / 0.002**2  # inverse-variance cap: no pixel counts as better than S/N 500


SEGMENTS_PER_CHIP = 4


def _chips(n_pixels: int, grid: str | None) -> list[slice]:
    """The grid's chip slices (the whole spectrum as one chip if the grid is unknown)."""
    slices = grids.chip_slices(grid) if grid is not None else [slice(0, n_pixels)]
    if slices[-1].stop != n_pixels:
        raise ValueError(f"grid {grid!r} has {slices[-1].stop} pixels, spectra have {n_pixels}")
    return slices


def chip_segments(n_pixels: int, grid: str | None, per_chip: int = SEGMENTS_PER_CHIP) -> torch.Tensor:
    """(P, K) float32 one-hot matrix of the pixels' segment: each chip cut into ``per_chip`` equal
    parts (one segment for the whole spectrum if the grid is unknown)."""
    seg = np.zeros(n_pixels, np.int64)
    k = 0
    for sl in _chips(n_pixels, grid):
        edges = np.linspace(sl.start, sl.stop, per_chip + 1).astype(int)
        for a, b in zip(edges[:-1], edges[1:]):
            seg[a:b] = k
            k += 1
    return torch.from_numpy(np.eye(k, dtype=np.float32)[seg])


def continuum_basis(n_pixels: int, grid: str | None, degree: int | None) -> torch.Tensor:
    """(P, K) float32 basis of a multiplicative continuum correction: per chip, Chebyshev polynomials
    T₀…T_degree of x ∈ [−1, 1] across the chip (zero outside it), i.e. the space in which the
    per-chip continuum normalization (:func:`stellarnet.preparation.spectra.continuum_normalize`) errs.
    One segment for the whole spectrum if the grid is unknown; ``degree`` None or < 0: K = 0."""
    if degree is None or int(degree) < 0:
        return torch.zeros(n_pixels, 0)
    cols = []
    for sl in _chips(n_pixels, grid):
        x = np.linspace(-1.0, 1.0, sl.stop - sl.start)
        for k in range(int(degree) + 1):
            b = np.zeros(n_pixels, np.float32)
            b[sl] = np.polynomial.chebyshev.chebval(x, [0.0] * k + [1.0])
            cols.append(b)
    return torch.from_numpy(np.stack(cols, 1))


def continuum_spline_basis(n_pixels: int, grid: str | None, spacing: float) -> torch.Tensor:
    """(P, K) float32 basis of a multiplicative continuum correction: per chip, cubic B-splines in
    wavelength with knots about every ``spacing`` Å (zero outside the chip). Where a per-chip
    polynomial only absorbs continuum errors on the chip's scale (~500 Å), these follow any
    smooth normalization error on scales above ~``spacing`` — e.g. a pseudo-continuum that tracks
    the line blanketing (a running mean under a 50 Å kernel, Ho et al. 2017) — at the price of
    the information in broader spectral features. Needs a known grid (its wavelengths)."""
    from scipy.interpolate import BSpline

    if grid is None:
        raise ValueError("a spline continuum needs the spectra's grid (wavelengths); use continuum_degree instead")
    if not spacing or float(spacing) <= 0:
        raise ValueError(f"continuum_knots must be a positive spacing in Å, got {spacing!r}")
    wave = grids.wavelength(grid)
    cols = []
    for sl in _chips(n_pixels, grid):
        w = wave[sl]
        lo, hi = float(w[0]), float(w[-1])
        inner = np.linspace(lo, hi, max(1, int(round((hi - lo) / float(spacing)))) + 1)
        knots = np.r_[[lo] * 3, inner, [hi] * 3]
        design = BSpline.design_matrix(np.clip(w, lo, hi), knots, 3).toarray()
        for j in range(design.shape[1]):
            b = np.zeros(n_pixels, np.float32)
            b[sl] = design[:, j]
            cols.append(b)
    return torch.from_numpy(np.stack(cols, 1))


def fit_weights(flux: np.ndarray, flux_err: np.ndarray, pix_mask: np.ndarray | None) -> np.ndarray:
    """Inverse-variance pixel weights (N, P) float32: 1/σ² capped at :data:`MAX_WEIGHT`, 0 for bad,
    masked or non-finite pixels."""
    flux = np.asarray(flux, np.float32)
    err = np.asarray(flux_err, np.float32)
    good = np.isfinite(flux) & np.isfinite(err) & (err > 0)
    if pix_mask is not None:
        good &= np.asarray(pix_mask).astype(bool)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        w = np.where(good, np.minimum(1.0 / (err.astype(np.float64) ** 2), MAX_WEIGHT), 0.0)
    return w.astype(np.float32)


def _bad_segments(resid2_w: torch.Tensor, w: torch.Tensor, seg: torch.Tensor, threshold: float) -> torch.Tensor:
    """(N, K) bool: the anomalous segments of each star, reduced χ² of a segment above
    ``max(threshold, 2 × the star's median segment χ²)``; at most half of a star's segments."""
    n_seg = (w > 0).float() @ seg
    chi_seg = (resid2_w @ seg) / n_seg.clamp_min(1.0)
    med = chi_seg.masked_fill(n_seg == 0, float("nan")).nanmedian(dim=1, keepdim=True).values.nan_to_num(1.0)
    bad = (chi_seg > torch.clamp(2.0 * med, min=threshold)) & (n_seg > 0)
    too_many = bad.sum(1) > (n_seg > 0).sum(1) // 2
    bad[too_many] = False
    return bad


def _segment_clip(resid2_w: torch.Tensor, w: torch.Tensor, seg: torch.Tensor, threshold: float) -> torch.Tensor:
    """Weights with the anomalous segments of each star (:func:`_bad_segments`) set to 0."""
    return w * (1.0 - _bad_segments(resid2_w, w, seg, threshold).float() @ seg.T)
