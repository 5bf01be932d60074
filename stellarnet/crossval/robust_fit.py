"""Robust statistics for survey comparisons: bootstrap medians, binned medians, and linear fits by
iteratively reweighted least squares (Huber / Tukey weights, errors in both variables)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from stellarnet.common.stats import robust_scatter

_MAX_ELEMENTS = 4_000_000  # bootstrap chunk size (replicates × stars)


# --------------------------------------------------------------------------- basic statistics


def _bootstrap_counts(n: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot, n) float array of resampling multiplicities (each row sums to n)."""
    idx = rng.integers(0, n, size=(n_boot, n))
    flat = (idx + (np.arange(n_boot) * n)[:, None]).ravel()
    return np.bincount(flat, minlength=n_boot * n).reshape(n_boot, n).astype(float)


def _chunks(n: int, n_boot: int) -> list[int]:
    size = max(1, _MAX_ELEMENTS // max(n, 1))
    return [min(size, n_boot - k) for k in range(0, n_boot, size)]


def bootstrap_median(
    x: np.ndarray, n_boot: int = 1000, seed: int | np.random.Generator = 0
) -> tuple[float, float]:
    """(median, bootstrap standard error of the median) of the finite values of ``x``.

    Vectorized: replicates are drawn as (chunk, n) index arrays. NaN error for n < 2 or n_boot < 2.
    """
    x = np.asarray(x, dtype=float)
    x = x[np.isfinite(x)]
    n = len(x)
    if n == 0:
        return float("nan"), float("nan")
    med = float(np.median(x))
    if n < 2 or n_boot < 2:
        return med, float("nan")
    rng = np.random.default_rng(seed)
    meds = np.concatenate([
        np.median(x[rng.integers(0, n, size=(b, n))], axis=1) for b in _chunks(n, n_boot)
    ])
    return med, float(np.std(meds, ddof=1))


def binned_medians(
    x: np.ndarray,
    delta: np.ndarray,
    edges: Sequence[float],
    n_boot: int = 500,
    seed: int = 0,
    min_count: int = 10,
) -> pd.DataFrame:
    """Median of ``delta`` in bins of ``x`` with bootstrap errors.

    Returns a DataFrame with one row per bin holding ≥ ``min_count`` finite pairs:
    lo, hi (bin edges, x units), x_median, n, median, median_err, scatter (1.4826·MAD).
    """
    x = np.asarray(x, dtype=float)
    delta = np.asarray(delta, dtype=float)
    ok = np.isfinite(x) & np.isfinite(delta)
    x, delta = x[ok], delta[ok]
    edges = np.asarray(edges, dtype=float)
    which = np.digitize(x, edges) - 1
    rows = []
    for k in range(len(edges) - 1):
        sel = which == k
        if sel.sum() < min_count:
            continue
        med, err = bootstrap_median(delta[sel], n_boot, seed + k)
        rows.append({"lo": edges[k], "hi": edges[k + 1], "x_median": float(np.median(x[sel])),
                     "n": int(sel.sum()), "median": med, "median_err": err,
                     "scatter": robust_scatter(delta[sel])})
    return pd.DataFrame(rows, columns=["lo", "hi", "x_median", "n", "median", "median_err", "scatter"])


# --------------------------------------------------------------------------- robust regression


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Row-wise weighted median of (b, n) arrays (lower weighted median)."""
    order = np.argsort(values, axis=1)
    v = np.take_along_axis(values, order, axis=1)
    w = np.take_along_axis(weights, order, axis=1)
    cw = np.cumsum(w, axis=1)
    k = np.argmax(cw >= 0.5 * cw[:, -1:], axis=1)
    return v[np.arange(len(v)), k]


@dataclass
class _Moments:
    """Per-star normal-equation terms: XX (n, p²) = x xᵀ − Σ_u, Xy (n, p) = x y + c.

    Σ_u: covariance of the noise in the design row; c: covariance between that noise and the
    noise in y (errors-in-variables moment correction; zero for an ordinary fit).
    """

    XX: np.ndarray
    Xy: np.ndarray

    @classmethod
    def build(cls, X: np.ndarray, y: np.ndarray, noise_cov: np.ndarray | None,
              noise_xy: np.ndarray | None) -> "_Moments":
        n, p = X.shape
        XX = (X[:, :, None] * X[:, None, :]).reshape(n, p * p)
        Xy = X * y[:, None]
        if noise_cov is not None:
            XX = XX - np.asarray(noise_cov, dtype=float).reshape(n, p * p)
        if noise_xy is not None:
            Xy = Xy + np.asarray(noise_xy, dtype=float).reshape(n, p)
        return cls(XX, Xy)


def _wls(X: np.ndarray, y: np.ndarray, W: np.ndarray, mom: _Moments | None = None) -> np.ndarray:
    """Batched weighted least squares: X (n, p), y (n,), W (b, n) → beta (b, p)."""
    p = X.shape[1]
    mom = mom or _Moments.build(X, y, None, None)
    A = (W @ mom.XX).reshape(len(W), p, p)
    rhs = W @ mom.Xy
    try:
        return np.linalg.solve(A, rhs[..., None])[..., 0]
    except np.linalg.LinAlgError:
        return np.einsum("bpq,bq->bp", np.linalg.pinv(A), rhs)


def _irls(
    X: np.ndarray,
    y: np.ndarray,
    W0: np.ndarray,
    c: float,
    loss: str = "clip",
    n_huber: int = 6,
    n_final: int = 20,
    beta0: np.ndarray | None = None,
    scale0: np.ndarray | None = None,
    mom: _Moments | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Batched robust fit with base weights W0 (b, n). Returns (beta (b,p), scale (b,), weights).

    The residual scale (1.4826·weighted MAD) is re-estimated during the Huber iterations and
    then frozen for the final iterations (as in MM-estimation), which use ``loss``: "clip" =
    unit weight for |r| < c·scale, else 0; "tukey" = biweight (1 − (r/(c·scale))²)². With
    ``beta0`` and ``scale0`` given (bootstrap replicates), the Huber stage is skipped: the final
    iterations start from ``beta0`` with the scale fixed at ``scale0`` (fast robust bootstrap).
    """
    if loss not in ("clip", "tukey"):
        raise ValueError(f"loss must be 'clip' or 'tukey', got {loss!r}")
    if beta0 is not None and scale0 is not None:
        beta = np.broadcast_to(beta0, (len(W0), X.shape[1])).copy()
        scale = np.broadcast_to(scale0, (len(W0),)).astype(float).copy()
        n_huber = 0
    else:
        beta = _wls(X, y, W0, mom)
        scale = np.ones(len(W0))
    w = np.ones_like(W0)
    for it in range(n_huber + n_final):
        r = y[None, :] - beta @ X.T
        if it < n_huber:
            med = _weighted_median(r, W0)
            scale = 1.4826 * _weighted_median(np.abs(r - med[:, None]), W0)
            tiny = ~(scale > 0)
            if tiny.any():  # perfect fit for half the points: fall back to the weighted RMS
                rms = np.sqrt(np.sum(W0 * r**2, axis=1) / np.maximum(W0.sum(axis=1), 1))
                scale[tiny] = np.where(rms[tiny] > 0, rms[tiny], 1.0)
        if it < n_huber:
            z = np.abs(r / scale[:, None])
            w = np.minimum(1.0, 1.345 / np.maximum(z, 1e-12))
        elif loss == "clip":
            w = (np.abs(r) < c * scale[:, None]).astype(float)
        else:
            r *= 1.0 / (c * scale[:, None])
            np.square(r, out=r)
            np.subtract(1.0, r, out=r)
            np.maximum(r, 0.0, out=r)
            w = np.square(r, out=r)  # Tukey biweight (1 − u²)² for |u| < 1, else 0
        w *= W0
        new = _wls(X, y, w, mom)
        done = np.allclose(new, beta, rtol=1e-9, atol=1e-12) and it >= n_huber
        beta = new
        if done:
            break
    return beta, scale, w


@dataclass
class FitResult:
    """A robust linear-model fit ``Δ = Σ coef_k · term_k`` with bootstrap uncertainties.

    terms: term names; coef, coef_err: values and bootstrap standard errors (units of Δ per unit
    of the term); cov: bootstrap covariance (p, p); scale: robust residual σ (units of Δ);
    n: stars used; n_rejected: stars with zero final weight; n_boot: replicates; x: for
    single-axis polynomial fits, {"column", "center", "scale"} defining the scaled axis.
    """

    terms: list[str]
    coef: np.ndarray
    coef_err: np.ndarray
    cov: np.ndarray
    scale: float
    n: int
    n_rejected: int
    n_boot: int
    x: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return {
            "terms": list(self.terms),
            "coef": {t: float(v) for t, v in zip(self.terms, self.coef)},
            "coef_err": {t: float(v) for t, v in zip(self.terms, self.coef_err)},
            "cov": np.asarray(self.cov, dtype=float).tolist(),
            "scale": float(self.scale), "n": int(self.n), "n_rejected": int(self.n_rejected),
            "n_boot": int(self.n_boot), "x": dict(self.x),
        }

    def predict(self, design: np.ndarray) -> np.ndarray:
        """Model values for a design matrix with the same terms (n, p)."""
        return np.asarray(design, dtype=float) @ self.coef


def robust_linear_fit(
    X: np.ndarray,
    y: np.ndarray,
    terms: Sequence[str] | None = None,
    n_boot: int = 500,
    seed: int | np.random.Generator = 0,
    c: float | None = None,
    noise_cov: np.ndarray | None = None,
    noise_xy: np.ndarray | None = None,
    loss: str = "clip",
) -> FitResult:
    """Robust fit of ``y ≈ X @ coef`` with bootstrap errors.

    Iteratively reweighted least squares: Huber iterations (scale = 1.4826·MAD of the
    residuals), then, with the scale frozen, ``loss`` = "clip" (least squares on the stars with
    |residual| < c·scale, default c = 4) or "tukey" (biweight, default c = 4.685). "clip" is the
    default because its unit weights keep the errors-in-variables correction unbiased (biweights
    correlate with the x noise and over-correct).
    X: (n, p) design; y: (n,); rows with any non-finite X or y are dropped. n_boot = 0 → no
    bootstrap (errors NaN). Errors-in-variables (moment-corrected normal equations): when the
    design is measured with noise u_i, ``noise_cov`` (n, p, p) = Cov(u_i) is subtracted from
    x_i x_iᵀ and ``noise_xy`` (n, p) = Cov(u_i, noise in y_i) is added to x_i y_i (NaN → 0).
    Raises ValueError if fewer than p + 1 usable rows.
    """
    X = np.asarray(X, dtype=float)
    y = np.asarray(y, dtype=float)
    if X.ndim == 1:
        X = X[:, None]
    ok = np.isfinite(y) & np.all(np.isfinite(X), axis=1)
    X, y = X[ok], y[ok]
    n, p = X.shape
    terms = list(terms) if terms is not None else [f"b{k}" for k in range(p)]
    if n < p + 1:
        raise ValueError(f"robust fit needs at least {p + 1} finite rows, got {n}")
    if noise_cov is not None:
        noise_cov = np.nan_to_num(np.asarray(noise_cov, dtype=float).reshape(-1, p, p)[ok])
    if noise_xy is not None:
        noise_xy = np.nan_to_num(np.asarray(noise_xy, dtype=float).reshape(-1, p)[ok])
    mom = _Moments.build(X, y, noise_cov, noise_xy)
    if c is None:
        c = 4.0 if loss == "clip" else 4.685
    beta, scale, w = _irls(X, y, np.ones((1, n)), c, loss, mom=mom)
    if n_boot >= 2:
        rng = np.random.default_rng(seed)
        boots = []
        for b in _chunks(n, n_boot):
            boots.append(_irls(X, y, _bootstrap_counts(n, b, rng), c, loss, beta0=beta[0],
                               scale0=scale[0], mom=mom)[0])
        B = np.concatenate(boots)
        cov = np.atleast_2d(np.cov(B.T, ddof=1))
        err = np.sqrt(np.diag(cov))
    else:
        cov = np.full((p, p), np.nan)
        err = np.full(p, np.nan)
    return FitResult(terms=terms, coef=beta[0], coef_err=err, cov=cov, scale=float(scale[0]),
                     n=int(n), n_rejected=int((w[0] == 0).sum()), n_boot=int(max(n_boot, 0)))


def poly_design(x: np.ndarray, degree: int) -> np.ndarray:
    """(n, degree + 1) design [1, x, x², ...] for a scaled axis x."""
    x = np.asarray(x, dtype=float)
    return np.vander(x, degree + 1, increasing=True)
