"""Robust statistics shared by every stage (evaluation, cross-survey comparison, feature cleaning)."""

from __future__ import annotations

import math

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
