"""Systematic offsets, trends and calibration between a reference (APOGEE) and another survey.

Conventions
-----------
* Differences are ``Δ = survey − reference`` in the label's unit (Teff in K; logg, [Fe/H],
  [α/Fe] in dex). Inputs are two *row-aligned* DataFrames (e.g. from
  :meth:`stellarnet.crossval.crossmatch.MatchResult.matched_frames`).
* A label is ``name → (reference column(s), survey column)``; the reference side may list
  candidates (first present wins), e.g. ``("ALPHA_FE", "ALPHA_M")``: [α/Fe] from stellarnet
  predictions or derived from the allStar (``ALPHA_M + M_H − FE_H``), [α/M] only as a fallback.
* Trend axes are *reference* labels, scaled as ``x = (value − center) / scale``
  (:data:`TREND_AXES`: Teff → (Teff − 5000 K)/1000 K, logg → logg − 2.5 dex, [Fe/H] → [Fe/H]).
* Robust statistics: scatter = 1.4826 · MAD; fits use iteratively reweighted least squares
  (Huber start, then least squares on the stars within 4 robust σ of the fit; a Tukey biweight
  is available). Uncertainties come from a seeded, vectorized bootstrap over stars (resampling
  weights as multinomial counts; replicates start from the full-sample fit and scale).
* Errors-in-variables: noise in the reference label on the x axis dilutes slopes, and when x is
  the reference value of the compared label the same noise enters Δ with a minus sign (bias
  ≈ −σ_ref²/var(x)). Linear fits (trend degree 1 and the joint fit) correct for this with
  moment-corrected normal equations using the reference error columns ``<COL>_ERR`` (assumed
  independent between labels); binned medians are not corrected.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stellarnet.common.labels import LABEL_UNITS
from stellarnet.evaluation.metrics import robust_scatter
import pandas as pd

__all__ = [
    "DEFAULT_LABELS",
    "TREND_AXES",
    "UNITS",
    "FitResult",
    "Comparison",
    "Calibration",
    "robust_scatter",
    "bootstrap_median",
    "binned_medians",
    "robust_linear_fit",
    "poly_design",
    "resolve_labels",
    "label_offsets",
    "trend_fit",
    "joint_fit",
    "compare",
    "fit_calibration",
    "apply_calibration",
]

LabelMap = Mapping[str, tuple[str | Sequence[str], str]]

#: name → (reference column candidates, survey column), common schema on the survey side.
DEFAULT_LABELS: dict[str, tuple[tuple[str, ...], str]] = {
    "teff": (("TEFF",), "TEFF"),
    "logg": (("LOGG",), "LOGG"),
    "fe_h": (("FE_H",), "FE_H"),
    "alpha_fe": (("ALPHA_FE", "ALPHA_M"), "ALPHA_FE"),  # [α/Fe] (derived from ALPHA_M + M_H − FE_H) first
}
#: trend axis name → (reference label name, center, scale): x = (value − center) / scale.
TREND_AXES: dict[str, tuple[str, float, float]] = {
    "teff": ("teff", 5000.0, 1000.0),
    "logg": ("logg", 2.5, 1.0),
    "fe_h": ("fe_h", 0.0, 1.0),
}
#: unit by lower-case label name (the offsets tables' convention)
UNITS: dict[str, str] = {name.lower(): unit for name, unit in LABEL_UNITS.items()}

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


# --------------------------------------------------------------------------- comparisons


def resolve_labels(
    reference: pd.DataFrame, survey: pd.DataFrame, labels: LabelMap = DEFAULT_LABELS
) -> dict[str, tuple[str, str]]:
    """name → (reference column, survey column) for labels present (and not all-NaN) on both sides."""
    out: dict[str, tuple[str, str]] = {}
    for name, (ref_cols, sur_col) in labels.items():
        cands = [ref_cols] if isinstance(ref_cols, str) else list(ref_cols)
        ref_col = next((c for c in cands if c in reference.columns), None)
        if ref_col is None or sur_col not in survey.columns:
            continue
        if not np.isfinite(pd.to_numeric(survey[sur_col], errors="coerce").to_numpy(float)).any():
            continue
        if not np.isfinite(pd.to_numeric(reference[ref_col], errors="coerce").to_numpy(float)).any():
            continue
        out[name] = (ref_col, sur_col)
    return out


def _values(df: pd.DataFrame, col: str) -> np.ndarray:
    return pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=float)


def _check_aligned(reference: pd.DataFrame, survey: pd.DataFrame) -> None:
    if len(reference) != len(survey):
        raise ValueError(
            f"reference and survey frames must be row-aligned (same length), got "
            f"{len(reference)} and {len(survey)}"
        )


def label_offsets(
    reference: pd.DataFrame,
    survey: pd.DataFrame,
    labels: LabelMap = DEFAULT_LABELS,
    n_boot: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """Offset statistics of Δ = survey − reference per label.

    Returns a DataFrame indexed by label name with: reference_column, survey_column, unit, n,
    median, median_err (bootstrap), scatter (1.4826·MAD), mean, std.
    """
    _check_aligned(reference, survey)
    rows = []
    for k, (name, (rc, sc)) in enumerate(resolve_labels(reference, survey, labels).items()):
        d = _values(survey, sc) - _values(reference, rc)
        d = d[np.isfinite(d)]
        med, err = bootstrap_median(d, n_boot, seed + 1000 * k)
        rows.append({"label": name, "reference_column": rc, "survey_column": sc,
                     "unit": UNITS.get(name, ""), "n": int(len(d)), "median": med,
                     "median_err": err, "scatter": robust_scatter(d),
                     "mean": float(np.mean(d)) if len(d) else float("nan"),
                     "std": float(np.std(d, ddof=1)) if len(d) > 1 else float("nan")})
    cols = ["label", "reference_column", "survey_column", "unit", "n", "median", "median_err",
            "scatter", "mean", "std"]
    return pd.DataFrame(rows, columns=cols).set_index("label")


def trend_fit(
    x_values: np.ndarray,
    delta: np.ndarray,
    center: float = 0.0,
    scale: float = 1.0,
    degree: int = 1,
    n_boot: int = 500,
    seed: int = 0,
    x_err: np.ndarray | None = None,
    x_noise_in_delta: bool = False,
) -> FitResult:
    """Robust polynomial Δ = Σ_k c_k · ((x − center)/scale)^k with bootstrap errors.

    Terms are named "1", "x", "x^2", ...; coefficients are in units of Δ per scaled-x unit
    (e.g. K per 1000 K for Teff with scale 1000).

    x_err: per-star 1σ error of x (x units). For ``degree == 1`` it switches on the
    errors-in-variables correction (regression dilution); ``x_noise_in_delta`` says that the same
    noise enters Δ = survey − reference with a minus sign (x is the reference value of the label
    being compared), which biases the slope by ≈ −σ²/var(x) without the correction.
    Ignored (no correction) for degree ≠ 1.
    """
    if degree < 0:
        raise ValueError(f"degree must be >= 0, got {degree}")
    xs = (np.asarray(x_values, dtype=float) - center) / scale
    terms = ["1", "x"] + [f"x^{k}" for k in range(2, degree + 1)]
    cov = cxy = None
    eiv = x_err is not None and degree == 1
    if eiv:
        var = (np.asarray(x_err, dtype=float) / scale) ** 2
        n = len(xs)
        cov = np.zeros((n, 2, 2))
        cov[:, 1, 1] = var
        if x_noise_in_delta:
            cxy = np.zeros((n, 2))
            cxy[:, 1] = var * scale  # Cov(u/scale, −(−u)) in Δ·x units
    fit = robust_linear_fit(poly_design(xs, degree), delta, terms[: degree + 1], n_boot, seed,
                            noise_cov=cov, noise_xy=cxy)
    fit.x = {"center": float(center), "scale": float(scale), "degree": int(degree),
             "errors_in_variables": bool(eiv)}
    return fit


JOINT_TERMS = ("const", "teff_slope_per_1000K", "feh_slope")


def joint_fit(
    reference: pd.DataFrame,
    survey: pd.DataFrame,
    label: tuple[str, str],
    teff_column: str = "TEFF",
    feh_column: str = "FE_H",
    n_boot: int = 500,
    seed: int = 0,
    errors_in_variables: bool = True,
    error_suffix: str = "_ERR",
) -> FitResult:
    """Robust joint fit Δ = const + teff_slope_per_1000K·(Teff − 5000)/1000 + feh_slope·[Fe/H].

    label: (reference column, survey column); Teff (K) and [Fe/H] (dex) from the reference.
    Coefficients: const in the label unit, slopes in label unit per 1000 K and per dex.
    errors_in_variables: correct for the reference noise on the Teff / [Fe/H] axes using the
    reference error columns ``<column><error_suffix>`` where present (see :func:`trend_fit`);
    the noise of the compared label itself is taken to enter Δ with a minus sign.
    """
    _check_aligned(reference, survey)
    rc, sc = label
    d = _values(survey, sc) - _values(reference, rc)
    t = (_values(reference, teff_column) - 5000.0) / 1000.0
    f = _values(reference, feh_column)
    X = np.column_stack([np.ones(len(d)), t, f])
    cov = cxy = None
    used = []
    if errors_in_variables:
        n = len(d)
        cov = np.zeros((n, 3, 3))
        cxy = np.zeros((n, 3))
        for k, (col, sc_) in ((1, (teff_column, 1000.0)), (2, (feh_column, 1.0))):
            ecol = col + error_suffix
            if ecol not in reference.columns:
                continue
            used.append(ecol)
            var = (_values(reference, ecol) / sc_) ** 2
            cov[:, k, k] = var
            if col == rc:
                cxy[:, k] = var * sc_
    fit = robust_linear_fit(X, d, JOINT_TERMS, n_boot, seed, noise_cov=cov, noise_xy=cxy)
    fit.x = {"teff_column": teff_column, "feh_column": feh_column,
             "teff_center": 5000.0, "teff_scale": 1000.0, "errors_in_variables": used}
    return fit


@dataclass
class Comparison:
    """Everything :func:`compare` measured (see :meth:`as_dict` for the JSON layout).

    labels: name → (reference column, survey column); offsets: :func:`label_offsets` frame;
    trends[label][axis] = {"fit": FitResult, "bins": DataFrame}; joint[label] = FitResult.
    """

    labels: dict[str, tuple[str, str]]
    offsets: pd.DataFrame
    trends: dict[str, dict[str, dict[str, Any]]]
    joint: dict[str, FitResult]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready nested dict."""
        return {
            "labels": {k: list(v) for k, v in self.labels.items()},
            "offsets": _records(self.offsets.reset_index()),
            "trends": {
                lab: {ax: {"fit": t["fit"].as_dict(), "bins": _records(t["bins"])}
                      for ax, t in axes.items()}
                for lab, axes in self.trends.items()
            },
            "joint": {lab: f.as_dict() for lab, f in self.joint.items()},
        }


def _records(df: pd.DataFrame) -> list[dict[str, Any]]:
    return json.loads(df.to_json(orient="records"))


def default_edges(axis: str) -> np.ndarray:
    """Default bin edges for a trend axis: Teff 3000–8000 K by 250 K, logg 0–5 by 0.5,
    [Fe/H] −2.5–0.75 by 0.25 dex."""
    return {
        "teff": np.arange(3000.0, 8000.1, 250.0),
        "logg": np.arange(0.0, 5.01, 0.5),
        "fe_h": np.arange(-2.5, 0.76, 0.25),
    }[axis]


def compare(
    reference: pd.DataFrame,
    survey: pd.DataFrame,
    labels: LabelMap = DEFAULT_LABELS,
    axes: Mapping[str, tuple[str, float, float]] = TREND_AXES,
    degree: int = 1,
    bins: Mapping[str, Sequence[float]] | None = None,
    n_boot: int = 500,
    seed: int = 0,
    min_per_bin: int = 10,
    errors_in_variables: bool = True,
    error_suffix: str = "_ERR",
) -> Comparison:
    """Offsets, binned trends, per-axis polynomial fits and the joint (Teff, [Fe/H]) fit.

    reference, survey: row-aligned frames; labels: label map; axes: trend axis → (label name,
    center, scale), the axis values taken from the reference column of that label;
    degree: polynomial degree of the per-axis fits; bins: axis → bin edges (default
    :func:`default_edges`); n_boot, seed: bootstrap settings; errors_in_variables: correct
    linear fits for the reference noise on the x axes, from the reference columns
    ``<column><error_suffix>`` where present (binned medians are not corrected).
    """
    _check_aligned(reference, survey)
    lab = resolve_labels(reference, survey, labels)
    offsets = label_offsets(reference, survey, labels, n_boot=n_boot, seed=seed)
    trends: dict[str, dict[str, dict[str, Any]]] = {}
    joint: dict[str, FitResult] = {}
    for li, (name, (rc, sc)) in enumerate(lab.items()):
        d = _values(survey, sc) - _values(reference, rc)
        trends[name] = {}
        for ai, (axis, (axis_label, center, scale)) in enumerate(axes.items()):
            if axis_label not in lab:
                continue
            x = _values(reference, lab[axis_label][0])
            s = seed + 100 * li + 10 * ai
            edges = (bins or {}).get(axis)
            edges = default_edges(axis) if edges is None else np.asarray(edges, dtype=float)
            xcol = lab[axis_label][0]
            ecol = xcol + error_suffix
            x_err = (_values(reference, ecol) if errors_in_variables and ecol in reference.columns
                     else None)
            try:
                fit = trend_fit(x, d, center, scale, degree, n_boot, s, x_err=x_err,
                                x_noise_in_delta=(axis_label == name))
                fit.x["column"] = xcol
            except ValueError:
                continue
            trends[name][axis] = {"fit": fit, "bins": binned_medians(x, d, edges, n_boot, s, min_per_bin)}
        if "teff" in lab and "fe_h" in lab:
            try:
                joint[name] = joint_fit(reference, survey, (rc, sc), lab["teff"][0], lab["fe_h"][0],
                                        n_boot, seed + 7 + li, errors_in_variables, error_suffix)
            except ValueError:
                pass
    return Comparison(labels=lab, offsets=offsets, trends=trends, joint=joint)


# --------------------------------------------------------------------------- calibration

CALIBRATION_FORMAT = "stellarnet-crossval-calibration"


def _exponents(n_features: int, degree: int) -> list[tuple[int, ...]]:
    """All monomial exponent tuples of total degree ≤ degree (constant first)."""
    out: list[tuple[int, ...]] = []
    for d in range(degree + 1):
        for combo in itertools.combinations_with_replacement(range(n_features), d):
            e = [0] * n_features
            for k in combo:
                e[k] += 1
            out.append(tuple(e))
    return out


@dataclass
class Calibration:
    """Per-label transformation reference → survey scale (plain data, JSON round-trip).

    ``calibrated = reference_value + Σ_k coef_k · Π_f x_f^{e_kf}`` with scaled features
    ``x_f = (column_f − center_f)/scale_f``. survey / reference: names; degree: total polynomial
    degree; features: [{"name", "column", "center", "scale"}]; exponents: one list per term;
    labels: name → {"input_column", "output_column", "coefficients", "n_train"}.
    """

    survey: str
    reference: str
    degree: int
    features: list[dict[str, Any]]
    exponents: list[list[int]]
    labels: dict[str, dict[str, Any]]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict (format tag + version)."""
        return {"format": CALIBRATION_FORMAT, "version": 1, "survey": self.survey,
                "reference": self.reference, "degree": int(self.degree),
                "model": "output = input + sum_k coefficients[k] * prod_f x_f**exponents[k][f]; "
                         "x_f = (column_f - center_f) / scale_f",
                "features": self.features, "exponents": self.exponents, "labels": self.labels}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the calibration as JSON; returns the path."""
        path = Path(path)
        path.write_text(json.dumps(self.as_dict(), indent=2))
        return path

    @classmethod
    def load(cls, src: "str | os.PathLike | Mapping[str, Any] | Calibration") -> "Calibration":
        """From a JSON path, a dict (as written by :meth:`as_dict`) or a Calibration."""
        if isinstance(src, Calibration):
            return src
        d = dict(src) if isinstance(src, Mapping) else json.loads(Path(src).read_text())
        if d.get("format") != CALIBRATION_FORMAT:
            raise ValueError(f"not a {CALIBRATION_FORMAT} file (format={d.get('format')!r})")
        return cls(survey=d["survey"], reference=d["reference"], degree=int(d["degree"]),
                   features=list(d["features"]), exponents=[list(e) for e in d["exponents"]],
                   labels=dict(d["labels"]))

    def design(self, df: pd.DataFrame) -> np.ndarray:
        """(n, n_terms) design matrix of the scaled feature monomials (NaN where inputs are)."""
        missing = [f["column"] for f in self.features if f["column"] not in df.columns]
        if missing:
            raise KeyError(f"calibration needs feature column(s) {missing}; frame has {list(df.columns)}")
        X = np.column_stack([(_values(df, f["column"]) - f["center"]) / f["scale"]
                             for f in self.features]) if self.features else np.zeros((len(df), 0))
        E = np.asarray(self.exponents, dtype=float).reshape(len(self.exponents), len(self.features))
        with np.errstate(invalid="ignore"):
            return np.prod(X[:, None, :] ** E[None, :, :], axis=2)


def fit_calibration(
    reference: pd.DataFrame,
    survey: pd.DataFrame,
    labels: LabelMap = DEFAULT_LABELS,
    features: Sequence[str] = ("teff", "logg", "fe_h"),
    degree: int = 1,
    train_fraction: float = 0.5,
    seed: int = 0,
    survey_name: str = "survey",
    reference_name: str = "apogee",
    axes: Mapping[str, tuple[str, float, float]] = TREND_AXES,
) -> tuple[Calibration, pd.DataFrame]:
    """Fit reference → survey transformations on a random training part, validate on the rest.

    Per label, the robust fit models Δ = survey − reference as a polynomial of total degree
    ``degree`` in the scaled reference features (names of :data:`TREND_AXES`), so that
    ``survey ≈ reference + poly(features)``. The split is one seeded random permutation of the
    matched pairs (``train_fraction`` for training). Returns (calibration, validation report)
    with per label: n_train, n_val and, on the validation part, median / robust scatter / RMS of
    survey − reference before and survey − calibrated after (label units).
    """
    _check_aligned(reference, survey)
    if not 0 < train_fraction < 1:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    lab = resolve_labels(reference, survey, labels)
    feats = []
    for fname in features:
        axis_label, center, scale = axes[fname]
        if axis_label not in lab:
            raise KeyError(f"calibration feature {fname!r} needs label {axis_label!r} on both sides")
        feats.append({"name": fname, "column": lab[axis_label][0], "center": float(center),
                      "scale": float(scale)})
    exps = [list(e) for e in _exponents(len(feats), degree)]
    calib = Calibration(survey=survey_name, reference=reference_name, degree=int(degree),
                        features=feats, exponents=exps, labels={})
    n = len(reference)
    perm = np.random.default_rng(seed).permutation(n)
    n_train = int(round(train_fraction * n))
    train = np.zeros(n, dtype=bool)
    train[perm[:n_train]] = True
    X = calib.design(reference)
    rows = []
    for name, (rc, sc) in lab.items():
        ref = _values(reference, rc)
        sur = _values(survey, sc)
        d = sur - ref
        ok = np.isfinite(d) & np.all(np.isfinite(X), axis=1)
        tr, va = ok & train, ok & ~train
        if tr.sum() < X.shape[1] + 1 or va.sum() < 2:
            continue
        fit = robust_linear_fit(X[tr], d[tr], n_boot=0)
        calib.labels[name] = {"input_column": rc, "output_column": f"{name.upper()}_{survey_name.upper()}",
                              "survey_column": sc, "coefficients": [float(c) for c in fit.coef],
                              "n_train": int(tr.sum())}
        after = sur[va] - (ref[va] + X[va] @ fit.coef)
        before = d[va]
        rows.append({"label": name, "unit": UNITS.get(name, ""), "n_train": int(tr.sum()),
                     "n_val": int(va.sum()),
                     "before_median": float(np.median(before)), "before_scatter": robust_scatter(before),
                     "before_rms": float(np.sqrt(np.mean(before**2))),
                     "after_median": float(np.median(after)), "after_scatter": robust_scatter(after),
                     "after_rms": float(np.sqrt(np.mean(after**2)))})
    cols = ["label", "unit", "n_train", "n_val", "before_median", "before_scatter", "before_rms",
            "after_median", "after_scatter", "after_rms"]
    return calib, pd.DataFrame(rows, columns=cols).set_index("label")


def apply_calibration(
    df: pd.DataFrame, calib: "Calibration | Mapping[str, Any] | str | os.PathLike"
) -> pd.DataFrame:
    """Copy of ``df`` with one calibrated column per label (``output_column`` of the JSON,
    e.g. ``TEFF_GALAH``), in the survey's scale and the label's unit; NaN where inputs are NaN.

    calib: a :class:`Calibration`, its dict, or the path of its JSON file.
    """
    cal = Calibration.load(calib)
    missing = [v["input_column"] for v in cal.labels.values() if v["input_column"] not in df.columns]
    if missing:
        raise KeyError(f"calibration needs label column(s) {missing}; frame has {list(df.columns)}")
    X = cal.design(df)
    out = df.copy()
    for spec in cal.labels.values():
        out[spec["output_column"]] = _values(df, spec["input_column"]) + X @ np.asarray(
            spec["coefficients"], dtype=float)
    return out
