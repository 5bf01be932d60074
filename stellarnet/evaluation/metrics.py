"""Regression and classification metrics on plain numpy arrays.

All functions take predictions and truths in physical units (Teff in K, logg / [Fe/H] /
[α/Fe] in dex) and return nested dicts of plain Python floats / ints / lists, so the result is
directly JSON-serializable (see :mod:`stellarnet.evaluation.report`).

Conventions
-----------
* Residual Δ = pred − true (same unit as the label).
* Rows whose truth (or prediction) is NaN are excluded, per label.
* Robust scatter = 1.4826 · MAD(Δ) where MAD is the median absolute deviation from the median of
  Δ (equal to σ for Gaussian residuals).
* Class codes are non-negative integers; −1 means "undefined" and is excluded from both truths
  and predictions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from stellarnet.common.labels import CLASS_NAMES
from stellarnet.common.labels import CLASS_TASKS as DEFAULT_CLASS_TASKS
from stellarnet.common.labels import LABEL_NAMES as DEFAULT_LABEL_NAMES
from stellarnet.common.stats import residual_stats, robust_scatter

DEFAULT_SNR_EDGES: tuple[float, ...] = (0.0, 50.0, 100.0, 200.0, math.inf)


def default_class_names() -> dict[str, tuple[str, ...]]:
    """Class names per task (:data:`stellarnet.common.labels.CLASS_NAMES`), a copy."""
    return dict(CLASS_NAMES)


def _f(x: Any) -> float:
    """Plain Python float (NaN stays NaN)."""
    return float(x)


# --------------------------------------------------------------------------------------------
# regression
# --------------------------------------------------------------------------------------------
def regression_metrics(
    pred: np.ndarray,
    true: np.ndarray,
    *,
    outlier_k: float | None = 3.0,
    outlier_abs: float | None = None,
) -> dict[str, float | int]:
    """Metrics of one label.

    Parameters
    ----------
    pred, true
        1-D arrays in the label's physical unit (K for Teff, dex otherwise). Rows where either is
        non-finite are excluded.
    outlier_k
        A residual is an outlier if ``|Δ − median(Δ)| > outlier_k · robust_scatter``.
        ``None`` disables this criterion.
    outlier_abs
        Absolute threshold in the label's unit (e.g. 500 K, 0.5 dex): ``|Δ| > outlier_abs`` is an
        outlier. If both criteria are given, ``outlier_abs`` is used (it is the explicit one).

    Returns
    -------
    dict with ``n``, ``mae``, ``bias_mean``, ``bias_median``, ``scatter`` (robust, 1.4826·MAD),
    ``std``, ``rmse``, ``outlier_frac`` and ``outlier_threshold`` (all in the label's unit,
    except ``n`` and ``outlier_frac``). With ``n == 0`` every value is NaN.
    """
    pred = np.asarray(pred, dtype=float).ravel()
    true = np.asarray(true, dtype=float).ravel()
    if pred.shape != true.shape:
        raise ValueError(f"pred and true shapes differ: {pred.shape} vs {true.shape}")
    ok = np.isfinite(pred) & np.isfinite(true)
    d = pred[ok] - true[ok]
    n = int(d.size)
    nan = math.nan
    if n == 0:
        return {
            "n": 0, "mae": nan, "bias_mean": nan, "bias_median": nan, "scatter": nan,
            "std": nan, "rmse": nan, "outlier_frac": nan, "outlier_threshold": nan,
        }
    med = float(np.median(d))
    scatter = robust_scatter(d)
    if outlier_abs is not None:
        thr = float(outlier_abs)
        outl = np.abs(d) > thr
    elif outlier_k is not None:
        thr = float(outlier_k) * scatter
        outl = np.abs(d - med) > thr
    else:
        thr = nan
        outl = np.zeros(n, dtype=bool)
    basic = residual_stats(d)
    return {
        "n": n,
        "mae": basic["mae"],
        "bias_mean": basic["bias_mean"],
        "bias_median": med,
        "scatter": scatter,
        "std": _f(np.std(d, ddof=1)) if n > 1 else nan,
        "rmse": basic["rmse"],
        "outlier_frac": _f(np.mean(outl)),
        "outlier_threshold": thr,
    }


def _label_list(label_names: Sequence[str] | None, n: int) -> list[str]:
    if label_names is None:
        if n == len(DEFAULT_LABEL_NAMES):
            return list(DEFAULT_LABEL_NAMES)
        return [f"label{i}" for i in range(n)]
    names = [str(x) for x in label_names]
    if len(names) != n:
        raise ValueError(f"{len(names)} label names for {n} columns")
    return names


def _as_2d(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    return a[:, None] if a.ndim == 1 else a


def multi_label_metrics(
    pred: np.ndarray,
    true: np.ndarray,
    label_names: Sequence[str] | None = None,
    *,
    outlier_k: float | None = 3.0,
    outlier_abs: Mapping[str, float] | None = None,
    rows: np.ndarray | None = None,
) -> dict[str, dict[str, float | int]]:
    """:func:`regression_metrics` for each column of (N, L) arrays, keyed by label name.

    ``outlier_abs`` maps label name → absolute outlier threshold (label unit); labels absent from
    it use the ``outlier_k`` criterion. ``rows`` (bool or index array) restricts the rows.
    """
    pred = _as_2d(np.asarray(pred, dtype=float))
    true = _as_2d(np.asarray(true, dtype=float))
    if pred.shape != true.shape:
        raise ValueError(f"pred and true shapes differ: {pred.shape} vs {true.shape}")
    if rows is not None:
        pred, true = pred[rows], true[rows]
    names = _label_list(label_names, pred.shape[1])
    absd = dict(outlier_abs or {})
    return {
        name: regression_metrics(pred[:, j], true[:, j], outlier_k=outlier_k, outlier_abs=absd.get(name))
        for j, name in enumerate(names)
    }


def snr_bin_names(edges: Sequence[float]) -> list[str]:
    """Readable names of the SNR bins ``[e_i, e_{i+1})``, e.g. ``"50-100"``, ``">=200"``."""
    edges = [float(e) for e in edges]
    names = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        los = f"{lo:g}"
        names.append(f">={los}" if math.isinf(hi) else f"{los}-{hi:g}")
    return names


def snr_bin_index(snr: np.ndarray, edges: Sequence[float]) -> np.ndarray:
    """Bin index of each SNR value for bins ``[e_i, e_{i+1})``; −1 outside or non-finite."""
    snr = np.asarray(snr, dtype=float)
    e = np.asarray([float(x) for x in edges])
    if e.ndim != 1 or e.size < 2 or np.any(np.diff(e) <= 0):
        raise ValueError(f"SNR edges must be strictly increasing with >= 2 entries, got {list(edges)}")
    idx = np.searchsorted(e, snr, side="right") - 1
    idx[(idx < 0) | (idx >= e.size - 1) | ~np.isfinite(snr)] = -1
    return idx


def regression_report(
    pred: np.ndarray,
    true: np.ndarray,
    label_names: Sequence[str] | None = None,
    *,
    snr: np.ndarray | None = None,
    snr_edges: Sequence[float] | None = DEFAULT_SNR_EDGES,
    groups: np.ndarray | None = None,
    group_names: Sequence[str] | None = None,
    outlier_k: float | None = 3.0,
    outlier_abs: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Overall, per-SNR-bin and per-group (e.g. evolutionary stage) regression metrics.

    Parameters
    ----------
    pred, true
        (N, L) arrays in physical units; NaN truths are excluded per label.
    snr
        (N,) per-pixel S/N; binned with ``snr_edges`` (bins ``[e_i, e_{i+1})``, ``inf`` allowed).
    groups
        (N,) integer group codes (e.g. true evolutionary stage, −1 = undefined, excluded);
        ``group_names[code]`` names the group (defaults to the code as a string).

    Returns
    -------
    ``{"overall": {label: metrics}, "by_snr": {bin: {label: metrics}}, "by_group": {group: {label:
    metrics}}, "snr_edges": [...]}`` (``by_snr`` / ``by_group`` empty when not requested).
    """
    kw = dict(outlier_k=outlier_k, outlier_abs=outlier_abs)
    out: dict[str, Any] = {"overall": multi_label_metrics(pred, true, label_names, **kw), "by_snr": {}, "by_group": {}}
    if snr is not None and snr_edges is not None:
        idx = snr_bin_index(snr, snr_edges)
        out["snr_edges"] = [float(e) if math.isfinite(float(e)) else "inf" for e in snr_edges]
        for b, name in enumerate(snr_bin_names(snr_edges)):
            out["by_snr"][name] = multi_label_metrics(pred, true, label_names, rows=idx == b, **kw)
    if groups is not None:
        g = np.asarray(groups).astype(int)
        codes = sorted(int(c) for c in np.unique(g) if c >= 0)
        if group_names is not None:
            codes = sorted(set(codes) | set(range(len(group_names))))
        for c in codes:
            name = str(group_names[c]) if group_names is not None and c < len(group_names) else str(c)
            out["by_group"][name] = multi_label_metrics(pred, true, label_names, rows=g == c, **kw)
    return out


# --------------------------------------------------------------------------------------------
# classification
# --------------------------------------------------------------------------------------------
def confusion_matrix(true: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    """(n_classes, n_classes) counts, rows = true class, columns = predicted class.

    Rows whose true or predicted code is outside ``[0, n_classes)`` (e.g. −1) are ignored.
    """
    t = np.asarray(true).astype(int).ravel()
    p = np.asarray(pred).astype(int).ravel()
    ok = (t >= 0) & (t < n_classes) & (p >= 0) & (p < n_classes)
    cm = np.bincount(t[ok] * n_classes + p[ok], minlength=n_classes * n_classes)
    return cm.reshape(n_classes, n_classes).astype(np.int64)


def row_normalize(cm: np.ndarray) -> np.ndarray:
    """Confusion matrix divided by its row sums (rows with no samples are all NaN)."""
    cm = np.asarray(cm, dtype=float)
    s = cm.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(s > 0, cm / np.where(s > 0, s, 1.0), np.nan)


def _nan_list(a: np.ndarray) -> list:
    return [[_f(v) for v in row] for row in np.asarray(a, dtype=float)]


def classification_metrics(
    pred: np.ndarray,
    true: np.ndarray,
    class_names: Sequence[str] | None = None,
    n_classes: int | None = None,
) -> dict[str, Any]:
    """Accuracy, macro F1, per-class precision/recall/F1/support and confusion matrices.

    Rows with true code −1 are excluded. A prediction of −1 (abstention) on a defined truth counts
    as wrong (it lowers accuracy and recall) but is not attributed to any predicted class.
    Macro F1 averages over the classes that occur in ``true`` or ``pred`` (scikit-learn's default
    label set for ``f1_score(average="macro")``); an undefined precision or recall counts as 0
    (``zero_division=0``). Classes that occur in neither have NaN precision/recall/F1.

    Returns
    -------
    dict with ``n``, ``accuracy``, ``macro_f1``, ``classes`` (names), ``per_class``
    ``{name: {precision, recall, f1, support}}``, ``confusion`` (counts, list of lists, rows =
    true) and ``confusion_normalized`` (row-normalized).
    """
    t = np.asarray(true).astype(int).ravel()
    p = np.asarray(pred).astype(int).ravel()
    if t.shape != p.shape:
        raise ValueError(f"pred and true shapes differ: {p.shape} vs {t.shape}")
    if n_classes is None:
        mx = max(int(t.max(initial=-1)), int(p.max(initial=-1)))
        n_classes = len(class_names) if class_names is not None else mx + 1
        n_classes = max(n_classes, mx + 1)
    names = [str(c) for c in class_names] if class_names is not None else [str(i) for i in range(n_classes)]
    if len(names) < n_classes:
        names += [str(i) for i in range(len(names), n_classes)]
    keep = t >= 0
    t, p = t[keep], p[keep]
    n = int(t.size)
    cm = confusion_matrix(t, p, n_classes)
    tp = np.diag(cm).astype(float)
    support = np.bincount(t[t < n_classes], minlength=n_classes).astype(float)
    predicted = cm.sum(axis=0).astype(float)
    # classes that occur in truth or prediction (scikit-learn's default label set)
    present = (support > 0) | (predicted > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(predicted > 0, tp / np.where(predicted > 0, predicted, 1), 0.0)
        recall = np.where(support > 0, tp / np.where(support > 0, support, 1), 0.0)
        denom = precision + recall
        f1 = np.where(denom > 0, 2 * precision * recall / np.where(denom > 0, denom, 1), 0.0)
    nan = math.nan
    per_class = {
        names[k]: {
            "precision": _f(precision[k]) if present[k] else nan,
            "recall": _f(recall[k]) if present[k] else nan,
            "f1": _f(f1[k]) if present[k] else nan,
            "support": int(support[k]),
        }
        for k in range(n_classes)
    }
    return {
        "n": n,
        "accuracy": _f(np.mean(t == p)) if n else math.nan,
        "macro_f1": _f(np.mean(f1[present])) if present.any() else math.nan,
        "classes": names[:n_classes],
        "per_class": per_class,
        "confusion": cm.tolist(),
        "confusion_normalized": _nan_list(row_normalize(cm)),
    }


def red_clump_purity_completeness(
    pred: np.ndarray, true: np.ndarray, rc_code: int = 3
) -> dict[str, float | int]:
    """Purity (precision) and completeness (recall) of the red-clump (RC) class.

    ``pred`` / ``true`` are evolutionary-stage codes (``rc_code`` = RC, default 3 for
    ``STAGES = (MS, SG, RGB, RC)``); rows with true code −1 are excluded.
    Purity = TP / (predicted RC), completeness = TP / (true RC); NaN when the denominator is 0.
    """
    t = np.asarray(true).astype(int).ravel()
    p = np.asarray(pred).astype(int).ravel()
    keep = t >= 0
    t, p = t[keep], p[keep]
    tp = int(np.sum((t == rc_code) & (p == rc_code)))
    n_pred = int(np.sum(p == rc_code))
    n_true = int(np.sum(t == rc_code))
    return {
        "purity": tp / n_pred if n_pred else math.nan,
        "completeness": tp / n_true if n_true else math.nan,
        "n_true_rc": n_true,
        "n_pred_rc": n_pred,
        "n_true_positive": tp,
    }


def classification_report(
    pred: np.ndarray,
    true: np.ndarray,
    task_names: Sequence[str] | None = None,
    class_names: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, dict[str, Any]]:
    """:func:`classification_metrics` per task for (N, C) integer code arrays.

    ``class_names`` maps task → class names (defaults to :func:`default_class_names` for the
    standard tasks). For a task whose class names contain ``"RC"`` a ``red_clump`` entry with
    purity/completeness is added.
    """
    pred = _as_2d(np.asarray(pred))
    true = _as_2d(np.asarray(true))
    if pred.shape != true.shape:
        raise ValueError(f"pred and true shapes differ: {pred.shape} vs {true.shape}")
    if task_names is None:
        task_names = DEFAULT_CLASS_TASKS if pred.shape[1] == len(DEFAULT_CLASS_TASKS) else [f"task{i}" for i in range(pred.shape[1])]
    names_map = dict(default_class_names())
    names_map.update({k: tuple(v) for k, v in (class_names or {}).items()})
    out: dict[str, dict[str, Any]] = {}
    for j, task in enumerate(task_names):
        cn = names_map.get(task)
        m = classification_metrics(pred[:, j], true[:, j], cn)
        if cn is not None and "RC" in cn:
            m["red_clump"] = red_clump_purity_completeness(pred[:, j], true[:, j], rc_code=list(cn).index("RC"))
        out[str(task)] = m
    return out


def regression_table(overall: Mapping[str, Mapping[str, Any]], keys: Sequence[str] = ("n", "mae", "bias_median", "scatter", "rmse", "outlier_frac")):
    """``{label: metrics}`` → pandas DataFrame (labels × ``keys``)."""
    import pandas as pd

    return pd.DataFrame({lab: {k: m.get(k, math.nan) for k in keys} for lab, m in overall.items()}).T
