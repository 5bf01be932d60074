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

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from stellarnet.common.labels import LABEL_UNITS
from stellarnet.common.stats import robust_scatter
from stellarnet.crossval.robust_fit import FitResult, binned_medians, bootstrap_median, poly_design, robust_linear_fit

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
