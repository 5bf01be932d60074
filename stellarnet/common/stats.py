"""The statistics every stage shares — one definition each: the robust scatter, the z-scores of errors
against their σ (catalogue errors added in quadrature), MAE / bias / RMSE of residuals and the z std /
1σ coverage of z-scores. The evaluation report (:mod:`stellarnet.evaluation.metrics`,
:mod:`stellarnet.evaluation.calibration`) and the metrics a LightningModule logs each epoch
(:mod:`stellarnet.network.epoch_metrics`) both use them."""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

MAD_TO_SIGMA = 1.4826
"""Factor converting a median absolute deviation into a Gaussian-equivalent σ."""


def robust_scatter(x: np.ndarray) -> float:
    """1.4826 · median(|x − median(x)|) of the finite values of ``x`` (NaN if none)."""
    x = np.asarray(x, dtype=float)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return math.nan
    return float(MAD_TO_SIGMA * np.median(np.abs(x - np.median(x))))


#: normalized residuals beyond this many robust σ are outliers to the fits of a calibration against a
#: reference catalogue (its unflagged failed fits): :func:`robust_inliers`
OUTLIER_CLIP_SIGMA = 5.0
#: at most this many rounds of that clipping
OUTLIER_CLIP_ROUNDS = 3


def robust_inliers(z: np.ndarray, usable: np.ndarray, clip_sigma: float = OUTLIER_CLIP_SIGMA) -> np.ndarray:
    """Rows of ``usable`` whose normalized residual ``z`` lies within ``clip_sigma`` robust σ
    (:func:`robust_scatter` of the usable ones) of their median: (N,) bool."""
    z = np.asarray(z, dtype=float)
    usable = np.asarray(usable, dtype=bool) & np.isfinite(z)
    if not usable.any():
        return usable
    centre = float(np.median(z[usable]))
    scale = robust_scatter(z[usable])
    with np.errstate(invalid="ignore"):
        return usable & (np.abs(z - centre) <= clip_sigma * max(scale, 1e-300))


def refit_without_outliers(fit: Callable[[np.ndarray], Any], normalized_residual: Callable[[Any], np.ndarray],
                           usable: np.ndarray, clip_sigma: float | None = OUTLIER_CLIP_SIGMA,
                           min_rows: int = 1) -> tuple[Any, np.ndarray]:
    """``fit(rows)`` on the ``usable`` rows, then refitted without the rows whose
    ``normalized_residual(result)`` (N,) lies beyond ``clip_sigma`` robust σ (:func:`robust_inliers`),
    up to :data:`OUTLIER_CLIP_ROUNDS` times, until the rows stop changing or fewer than ``min_rows``
    would be left (None: no clipping). Returns the last fit and the rows it used (N,) bool."""
    use = np.asarray(usable, dtype=bool)
    result = fit(use)
    for _ in range(OUTLIER_CLIP_ROUNDS if clip_sigma else 0):
        with np.errstate(invalid="ignore", divide="ignore"):
            keep = robust_inliers(normalized_residual(result), usable, clip_sigma)
        if np.array_equal(keep, use) or keep.sum() < min_rows:
            break
        use = keep
        result = fit(use)
    return result, use


def total_sigma(sigma: np.ndarray, err: np.ndarray | None = None) -> np.ndarray:
    """Predicted σ combined in quadrature with the catalogue label error (NaN err → 0)."""
    sigma = np.asarray(sigma, dtype=float)
    if err is None:
        return sigma
    e = np.nan_to_num(np.asarray(err, dtype=float), nan=0.0)
    return np.sqrt(sigma**2 + e**2)


def z_scores(pred: np.ndarray, true: np.ndarray, sigma: np.ndarray, err: np.ndarray | None = None) -> np.ndarray:
    """z = (pred − true) / sqrt(sigma² + err²); NaN where undefined (NaN truth, σ ≤ 0)."""
    pred = np.asarray(pred, dtype=float)
    true = np.asarray(true, dtype=float)
    s = total_sigma(sigma, err)
    with np.errstate(invalid="ignore", divide="ignore"):
        z = (pred - true) / s
    z[~(np.isfinite(s) & (s > 0))] = np.nan
    return z


def residual_stats(d: np.ndarray) -> dict[str, float | int]:
    """``n``, ``mae``, ``bias_mean`` and ``rmse`` of residuals ``d`` (pred − true, the label's unit; only
    finite values count; NaN when none)."""
    d = np.asarray(d, dtype=float).ravel()
    d = d[np.isfinite(d)]
    n = int(d.size)
    if n == 0:
        return {"n": 0, "mae": math.nan, "bias_mean": math.nan, "rmse": math.nan}
    return {"n": n, "mae": float(np.mean(np.abs(d))), "bias_mean": float(np.mean(d)),
            "rmse": float(np.sqrt(np.mean(d**2)))}


def z_stats(z: np.ndarray) -> dict[str, float]:
    """``z_std`` (ddof 1; NaN with fewer than 2) and ``coverage_1sigma`` (share with |z| ≤ 1, 0.683 for
    calibrated Gaussian errors; NaN when none) of the finite z-scores."""
    z = np.asarray(z, dtype=float).ravel()
    z = z[np.isfinite(z)]
    return {"z_std": float(np.std(z, ddof=1)) if z.size > 1 else math.nan,
            "coverage_1sigma": float(np.mean(np.abs(z) <= 1.0)) if z.size else math.nan}
