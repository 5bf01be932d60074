"""Label calibration of the refined labels: the emulator inherits the smooth biases of the network's
labels it was trained on; a quadratic function of the refined labels, fitted on the training split
against the catalogue labels, puts them back on the catalogue's scale."""

from __future__ import annotations

from typing import Any

import numpy as np

from stellarnet.common.stats import OUTLIER_CLIP_SIGMA, refit_without_outliers


def _quadratic_terms(z: np.ndarray, degree: int) -> np.ndarray:
    cols = [np.ones(len(z))] + [z[:, i] for i in range(z.shape[1])]
    if degree >= 2:
        cols += [z[:, i] * z[:, j] for i in range(z.shape[1]) for j in range(i, z.shape[1])]
    return np.stack(cols, 1)


def fit_label_calibration(labels: np.ndarray, reference: np.ndarray, reference_err: np.ndarray | None = None,
                          degree: int = 2, min_stars: int = 50,
                          clip_sigma: float | None = OUTLIER_CLIP_SIGMA) -> dict[str, Any]:
    """Per-label polynomial (degree 1 or 2 in all standardized labels) for ``reference − labels``,
    weighted least squares with weights 1/err² (unit weights without errors), refitted without the
    references more than ``clip_sigma`` robust σ from it (
    :func:`~stellarnet.common.stats.refit_without_outliers`; None: none left out): a
    catalogue's failed fits (unflagged outliers) would otherwise pull the polynomial over the whole
    label range.

    Args:
        labels: (N, L) refined labels; reference: (N, L) reference labels (NaN = missing);
        reference_err: (N, L) their 1-σ errors, or None.
    Returns:
        Plain dict ``{"degree", "mean", "std", "coef" (L lists), "n" (L), "clipped" (L)}`` for
        :func:`apply_label_calibration`; a label with fewer than ``min_stars`` usable rows gets
        zero coefficients (no correction).
    """
    if degree not in (1, 2):
        raise ValueError(f"degree must be 1 or 2, got {degree}")
    x = np.asarray(labels, np.float64)
    ref = np.asarray(reference, np.float64)
    if ref.shape != x.shape:
        raise ValueError(f"reference shape {ref.shape} differs from labels shape {x.shape}")
    rows = np.isfinite(x).all(1)
    mean = np.nanmean(x[rows], 0) if rows.any() else np.zeros(x.shape[1])
    std = np.nanstd(x[rows], 0) if rows.any() else np.ones(x.shape[1])
    std = np.where(std > 0, std, 1.0)
    design = _quadratic_terms((np.where(rows[:, None], x, mean) - mean) / std, degree)
    coef, n_used, n_clipped = [], [], []
    for j in range(x.shape[1]):
        y = ref[:, j] - x[:, j]
        w = np.ones(len(y)) if reference_err is None else 1.0 / np.maximum(np.asarray(reference_err, np.float64)[:, j], 1e-12) ** 2
        ok = rows & np.isfinite(y) & np.isfinite(w)
        need = max(min_stars, design.shape[1] + 1)
        if ok.sum() < need:
            coef.append([0.0] * design.shape[1])
            n_used.append(int(ok.sum()))
            n_clipped.append(0)
            continue
        def fit(use: np.ndarray) -> np.ndarray:
            sw = np.sqrt(w[use] / np.mean(w[use]))
            return np.linalg.lstsq(design[use] * sw[:, None], y[use] * sw, rcond=None)[0]

        c, use = refit_without_outliers(
            fit, lambda c: np.where(ok, (y - design @ c) * np.sqrt(np.where(ok, w, 0.0)), np.nan), ok, clip_sigma, need)
        coef.append([float(v) for v in c])
        n_used.append(int(use.sum()))
        n_clipped.append(int(ok.sum() - use.sum()))
    return {"degree": int(degree), "mean": [float(v) for v in mean], "std": [float(v) for v in std],
            "coef": coef, "n": n_used, "clipped": n_clipped}


def apply_label_calibration(labels: np.ndarray, calibration: dict[str, Any] | None) -> np.ndarray:
    """``labels`` (N, L) + the fitted correction (float64; NaN rows stay NaN; None: unchanged)."""
    x = np.asarray(labels, np.float64)
    if not calibration:
        return x.copy()
    mean, std = np.asarray(calibration["mean"], np.float64), np.asarray(calibration["std"], np.float64)
    coef = np.asarray(calibration["coef"], np.float64)
    if mean.shape != (x.shape[1],) or coef.shape[0] != x.shape[1]:
        raise ValueError(f"label calibration is for {mean.shape[0]} labels, got {x.shape[1]}")
    design = _quadratic_terms((np.nan_to_num(x) - mean) / std, int(calibration["degree"]))
    if design.shape[1] != coef.shape[1]:
        raise ValueError("label calibration coefficients do not match its degree")
    return x + design @ coef.T
