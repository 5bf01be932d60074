"""What a fit's residuals tell beyond χ²: the pixel-to-pixel noise correlation (lags 1–2, within chips)
that scales the formal variance, the companion score — the residuals, in units of their own scatter,
correlated with the fitted model's line profile moved by 3–25 px (12–100 km/s): a double-lined binary —,
and, over many stars, the residual every spectrum of a survey shares (:func:`common_residual`)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from stellarnet.refinement.basis import (
    _chips,
)

#: the velocity offsets searched by :func:`companion_score` (pixels; 1 px ≈ 4.1 km/s): from beyond what
#: the line-shape nuisances absorb (a shift of ≤ 1 px, a broader LSF) to 100 km/s
COMPANION_LAGS = (3, 25)


def companion_score(resid: torch.Tensor, lines: torch.Tensor, chips: list[slice],
                    lags: tuple[int, int] = COMPANION_LAGS) -> torch.Tensor:
    """How strongly the fit residuals hold the star's own line pattern at another velocity, (n,):
    max over lags k (|k| in ``lags``, pixels, both signs) of t_k = Σᵢ r̃ᵢ g̃ᵢ₊ₖ / √(Σ g̃²), pairs within one
    chip. ``resid`` (n, P): the normalized residuals (f − model)·√w; ``lines`` (n, P): the fitted
    model's line profile (model − continuum)·√w (negative in the lines).

    For a single star the residuals are noise (t ~ N(0, 1) per lag; the largest of ~46 lags ≈ 2–3): a
    velocity error or an LSF mismatch is fitted by the line-shape nuisances and does not reach |k| ≥ 3.
    An unresolved companion (a double-lined binary) adds its absorption lines — mostly the same
    transitions — at its velocity: residuals negative where the shifted template is, t_k large
    (tens at S/N 100). Computed per chip by FFT (zero-padded, no wrap-around)."""
    lo, hi = int(lags[0]), int(lags[1])
    n = resid.shape[0]
    total = resid.new_zeros(n, 2 * (hi - lo + 1))
    norm = resid.new_zeros(n)
    for sl in chips:
        x, y = resid[:, sl], lines[:, sl]
        size = 1 << int(math.ceil(math.log2(x.shape[1] + hi + 1)))
        corr = torch.fft.irfft(torch.fft.rfft(x, size).conj() * torch.fft.rfft(y, size), size)  # Σ xᵢ yᵢ₊ₖ at k
        total += torch.cat([corr[:, lo:hi + 1], corr[:, size - hi:size - lo + 1]], 1)
        norm += (y * y).sum(1)
    return (total / norm.clamp_min(1e-30).sqrt()[:, None]).amax(1)


#: the residual correlations' lags used by :func:`noise_correlation_factor` (pixels)
NOISE_LAGS = (1, 2)


def _lag_products(x: torch.Tensor, y: torch.Tensor, straddles: dict[int, torch.Tensor]) -> torch.Tensor:
    """Σᵢ xᵢ yᵢ₊ₖ over the pixel pairs of one chip, per lag k of :data:`NOISE_LAGS` → (n, …, len(lags)),
    x and y (n, P, …): the sum over all pairs less the few that straddle a chip boundary
    (:func:`_chip_straddles`)."""
    out = []
    for k in NOISE_LAGS:
        i = straddles[k]
        out.append((x[:, :-k] * y[:, k:]).sum(1) - (x[:, i] * y[:, i + k]).sum(1))
    return torch.stack(out, -1)


def _chip_straddles(n_pixels: int, grid: str | None, device: Any) -> dict[int, torch.Tensor]:
    """For each lag k, the first pixels i (long tensor) of the pairs (i, i + k) that straddle two chips."""
    chip = torch.zeros(n_pixels, dtype=torch.long)
    for j, sl in enumerate(_chips(n_pixels, grid)):
        chip[sl] = j
    return {k: torch.nonzero(chip[:-k] != chip[k:])[:, 0].to(device) for k in NOISE_LAGS}


def noise_correlation_factor(resid: torch.Tensor, influence: torch.Tensor,
                             straddles: dict[int, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Variance factor (n, L) of the labels when the noise is correlated from pixel to pixel, and the
    residual correlations (n, len(:data:`NOISE_LAGS`)).

    ``resid`` (n, P): the normalized residuals (f − model)·√w of the fit (0 where unused);
    ``influence`` (n, P, L): each label's influence vector ṽ = √W J (JᵀWJ)⁻¹ (the label is Σ ṽ r̃);
    ``straddles``: the pixel pairs across chip boundaries, left out (:func:`_chip_straddles`).
    With residual correlations ρₖ (measured per star, negative ones taken as 0) the label variance is
    ṽᵀCṽ = ṽᵀṽ (1 + 2 Σₖ ρₖ aₖ(ṽ)), aₖ the influence vector's own lag-k autocorrelation: white noise
    gives 1; noise shared by neighbouring pixels (resampled, co-added visits) more, the more so for
    labels read from line-wide features. At least 1."""
    power = (resid * resid).sum(1).clamp_min(1e-30)
    rho = (_lag_products(resid, resid, straddles) / power[:, None]).clamp(0.0, 0.9)  # (n, lags)
    vv = (influence * influence).sum(1).clamp_min(1e-30)  # (n, L)
    auto = _lag_products(influence, influence, straddles) / vv[..., None]  # (n, L, lags)
    factor = 1.0 + 2.0 * (rho[:, None, :] * auto).sum(-1)
    return factor.clamp_min(1.0), rho


#: the significance (in standard errors of the median) and the number of stars a pixel's shared residual
#: needs before :func:`common_residual` keeps it
COMMON_RESIDUAL_SIGNIFICANCE = 3.0
COMMON_RESIDUAL_MIN_STARS = 30
#: rounds of :meth:`stellarnet.network.inference.Predictor.measure_common_residual`
COMMON_RESIDUAL_ROUNDS = 2


def common_residual(flux: np.ndarray, model_flux: np.ndarray, fit_weight: np.ndarray,
                    significance: float = COMMON_RESIDUAL_SIGNIFICANCE,
                    min_stars: int = COMMON_RESIDUAL_MIN_STARS) -> tuple[np.ndarray, np.ndarray]:
    """The relative residual shared by the stars of a survey, per pixel: (P,) median over the stars of
    f / model − 1 at the pixels their fits used (``fit_weight`` > 0), and its standard error (1.2533 ×
    1.4826 MAD / √n). Pixels with fewer than ``min_stars`` stars, or a median within ``significance``
    standard errors of 0, get 0: only what the stars share beyond their noise is kept.

    A survey's spectra share residuals against any model of another survey's: telluric and sky
    residuals at fixed pixels, another pipeline's continuum convention, a flux-calibration ripple.
    Dividing them out (f / (1 + c), errors likewise) puts the spectra on the convention of the
    survey the model learned from. ``flux``, ``model_flux``, ``fit_weight``: (N, P) arrays (as
    :func:`stellarnet.refinement.fit.refine_labels` returns with ``return_model``)."""
    flux = np.asarray(flux, np.float64)
    if flux.ndim != 2 or np.shape(model_flux) != flux.shape or np.shape(fit_weight) != flux.shape:
        raise ValueError(f"flux, model_flux and fit_weight must be (N, P) arrays of one shape, got {flux.shape}, "
                         f"{np.shape(model_flux)}, {np.shape(fit_weight)}")
    model_flux = np.asarray(model_flux, np.float64)
    used = (np.asarray(fit_weight) > 0) & np.isfinite(flux) & np.isfinite(model_flux) & (model_flux > 0)
    n = used.sum(0)
    correction = np.zeros(flux.shape[1])
    err = np.full(flux.shape[1], np.inf)
    cols = np.flatnonzero(n >= max(1, int(min_stars)))
    if cols.size:
        with np.errstate(invalid="ignore", divide="ignore"):
            rel = np.where(used[:, cols], flux[:, cols] / np.where(used[:, cols], model_flux[:, cols], 1.0) - 1.0,
                           np.nan)
        med = np.nanmedian(rel, 0)
        scatter = 1.4826 * np.nanmedian(np.abs(rel - med), 0)
        se = 1.2533 * scatter / np.sqrt(n[cols])
        keep = np.abs(med) > significance * se
        correction[cols] = np.where(keep, med, 0.0)
        err[cols] = se
    return correction, err
