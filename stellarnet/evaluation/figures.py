"""Evaluation figures (matplotlib, no pyplot: figures are :class:`matplotlib.figure.Figure`
objects rendered with the Agg canvas, so this works headless and in threads).

Every ``*_figure`` function returns the Figure; pass it to :func:`save_figure` to write a PNG
atomically. Inputs are numpy arrays in physical units (Teff in K, logg / [Fe/H] / [α/Fe] in dex)
or the metric dicts of :mod:`stellarnet.evaluation.metrics` / :mod:`stellarnet.evaluation.calibration`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from stellarnet.common.files import atomic_open
from stellarnet.common.labels import LABEL_UNITS
from stellarnet.evaluation.metrics import (
    _as_2d,
    _label_list,
    regression_metrics,
    row_normalize,
    snr_bin_index,
)

LABEL_TEX: dict[str, str] = {
    "TEFF": r"$T_\mathrm{eff}$",
    "LOGG": r"$\log g$",
    "FE_H": "[Fe/H]",
    "M_H": "[M/H]",
    "ALPHA_FE": r"[$\alpha$/Fe]",
    "ALPHA_M": r"[$\alpha$/M]",
}


def _axis_label(name: str) -> str:
    unit = LABEL_UNITS.get(name)
    return f"{LABEL_TEX.get(name, name)}" + (f" [{unit}]" if unit else "")


def _new_figure(ncols: int, nrows: int = 1, panel: tuple[float, float] = (4.0, 3.6)) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(panel[0] * ncols, panel[1] * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    return fig, axes


def _subsample(n: int, max_points: int | None, seed: int = 0) -> np.ndarray:
    if max_points is None or n <= max_points:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_points, replace=False))


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Write ``fig`` to ``path`` (format from the suffix, PNG by default) atomically."""
    path = Path(path)
    if not path.suffix:
        path = path.with_suffix(".png")
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, dpi=dpi, format=path.suffix.lstrip(".") or "png")
    return path


def one_to_one_figure(
    pred: np.ndarray,
    true: np.ndarray,
    label_names: Sequence[str] | None = None,
    *,
    color: np.ndarray | None = None,
    color_label: str = "S/N",
    max_points: int | None = 20000,
    title: str | None = None,
) -> Figure:
    """Predicted vs true per label, with the 1:1 line and MAE / median bias / robust scatter
    annotated (computed on all finite rows, in the label's unit). ``color`` (N,) colours points
    (e.g. S/N)."""
    pred = _as_2d(np.asarray(pred, dtype=float))
    true = _as_2d(np.asarray(true, dtype=float))
    names = _label_list(label_names, pred.shape[1])
    fig, axes = _new_figure(len(names))
    sel = _subsample(len(pred), max_points)
    sc = None
    for j, (ax, name) in enumerate(zip(axes, names)):
        t, p = true[:, j], pred[:, j]
        m = regression_metrics(p, t)
        ok = np.isfinite(t[sel]) & np.isfinite(p[sel])
        ts, ps = t[sel][ok], p[sel][ok]
        c = None if color is None else np.asarray(color, dtype=float)[sel][ok]
        colour = {"c": c, "cmap": "viridis"} if c is not None else {}
        sc = ax.scatter(ts, ps, s=3, alpha=0.5, lw=0, rasterized=True, **colour)
        if ts.size:
            lo = float(np.nanmin([ts.min(), ps.min()]))
            hi = float(np.nanmax([ts.max(), ps.max()]))
            pad = 0.03 * (hi - lo or 1.0)
            ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "k--", lw=0.8)
            ax.set_xlim(lo - pad, hi + pad)
            ax.set_ylim(lo - pad, hi + pad)
        unit = LABEL_UNITS.get(name, "")
        fmt = ".0f" if name == "TEFF" else ".3f"
        txt = (f"n = {m['n']}\nMAE = {m['mae']:{fmt}} {unit}\nbias = {m['bias_median']:{fmt}} {unit}\n"
               f"scatter = {m['scatter']:{fmt}} {unit}")
        ax.text(0.03, 0.97, txt, transform=ax.transAxes, va="top", ha="left", fontsize=8,
                bbox=dict(boxstyle="round", fc="white", alpha=0.8, lw=0.5))
        ax.set_xlabel("true " + _axis_label(name))
        ax.set_ylabel("predicted " + _axis_label(name))
    if color is not None and sc is not None:
        fig.colorbar(sc, ax=list(axes), label=color_label, shrink=0.8)
    if title:
        fig.suptitle(title)
    return fig


def residuals_vs_snr_figure(
    pred: np.ndarray,
    true: np.ndarray,
    snr: np.ndarray,
    label_names: Sequence[str] | None = None,
    *,
    n_bins: int = 12,
    max_points: int | None = 20000,
    title: str | None = None,
) -> Figure:
    """Residual (pred − true, label unit) vs S/N per label (log S/N axis), with the running median
    and ±robust scatter in ``n_bins`` log-spaced S/N bins."""
    pred = _as_2d(np.asarray(pred, dtype=float))
    true = _as_2d(np.asarray(true, dtype=float))
    snr = np.asarray(snr, dtype=float)
    names = _label_list(label_names, pred.shape[1])
    fig, axes = _new_figure(len(names))
    sel = _subsample(len(pred), max_points)
    pos = snr[np.isfinite(snr) & (snr > 0)]
    edges = np.geomspace(pos.min(), pos.max() * 1.0001, n_bins + 1) if pos.size and pos.max() > pos.min() else None
    for j, (ax, name) in enumerate(zip(axes, names)):
        d = pred[:, j] - true[:, j]
        ok = np.isfinite(d) & np.isfinite(snr) & (snr > 0)
        o = ok[sel]
        ax.scatter(snr[sel][o], d[sel][o], s=3, alpha=0.4, lw=0, color="0.4", rasterized=True)
        ax.axhline(0.0, color="k", lw=0.8, ls="--")
        if edges is not None:
            idx = snr_bin_index(snr, edges)
            centers, med, lo, hi = [], [], [], []
            for b in range(n_bins):
                r = d[ok & (idx == b)]
                if r.size >= 5:
                    q = np.median(r)
                    s = 1.4826 * np.median(np.abs(r - q))
                    centers.append(math.sqrt(edges[b] * edges[b + 1]))
                    med.append(q)
                    lo.append(q - s)
                    hi.append(q + s)
            if centers:
                ax.plot(centers, med, "C3-", lw=1.5, label="median")
                ax.fill_between(centers, lo, hi, color="C3", alpha=0.2, label=r"$\pm$robust scatter")
                ax.legend(fontsize=7, loc="upper right")
        ax.set_xscale("log")
        ax.set_xlabel("S/N")
        ax.set_ylabel(r"$\Delta$ " + _axis_label(name))
    if title:
        fig.suptitle(title)
    return fig


def _find(names: Sequence[str], *candidates: str) -> int:
    for c in candidates:
        if c in names:
            return list(names).index(c)
    raise KeyError(f"none of {candidates} in label names {list(names)}")


def kiel_diagram_figure(
    true: np.ndarray,
    pred: np.ndarray,
    label_names: Sequence[str] | None = None,
    *,
    max_points: int | None = 30000,
    feh_range: tuple[float, float] = (-2.0, 0.5),
    title: str | None = None,
) -> Figure:
    """Kiel diagrams (Teff [K] vs log g [dex], coloured by [Fe/H] [dex]) of the truth and the
    prediction side by side, both axes inverted (hot / low-gravity stars to the left / top)."""
    true = _as_2d(np.asarray(true, dtype=float))
    pred = _as_2d(np.asarray(pred, dtype=float))
    names = _label_list(label_names, true.shape[1])
    it, ig = _find(names, "TEFF"), _find(names, "LOGG")
    im = _find(names, "FE_H", "M_H")
    fig, axes = _new_figure(2, panel=(4.6, 4.0))
    sel = _subsample(len(true), max_points)
    both = np.concatenate([true[sel][:, [it, ig]], pred[sel][:, [it, ig]]])
    both = both[np.all(np.isfinite(both), axis=1)]
    sc = None
    for ax, arr, ttl in zip(axes, (true, pred), ("truth", "prediction")):
        a = arr[sel]
        ok = np.isfinite(a[:, it]) & np.isfinite(a[:, ig])
        sc = ax.scatter(a[ok, it], a[ok, ig], c=a[ok, im], s=3, lw=0, cmap="viridis",
                        vmin=feh_range[0], vmax=feh_range[1], rasterized=True)
        if both.size:
            tpad = 0.03 * (np.ptp(both[:, 0]) or 1.0)
            gpad = 0.03 * (np.ptp(both[:, 1]) or 1.0)
            ax.set_xlim(both[:, 0].max() + tpad, both[:, 0].min() - tpad)
            ax.set_ylim(both[:, 1].max() + gpad, both[:, 1].min() - gpad)
        else:
            ax.invert_xaxis()
            ax.invert_yaxis()
        ax.set_title(ttl)
        ax.set_xlabel(_axis_label("TEFF"))
        ax.set_ylabel(_axis_label("LOGG"))
    if sc is not None:
        fig.colorbar(sc, ax=list(axes), label=_axis_label(names[im]), shrink=0.85)
    if title:
        fig.suptitle(title)
    return fig


def confusion_matrix_figure(
    cm: np.ndarray | Sequence[Sequence[float]],
    class_names: Sequence[str] | None = None,
    *,
    normalize: bool = True,
    title: str | None = None,
    ax: Any = None,
) -> Figure:
    """Heat map of a confusion matrix (rows = true, columns = predicted). With ``normalize`` the
    colours are row-normalized fractions and cells show fraction and count."""
    cm = np.asarray(cm, dtype=float)
    k = cm.shape[0]
    names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
    if ax is None:
        fig, axes = _new_figure(1, panel=(1.0 + 0.8 * max(k, 3), 0.8 + 0.8 * max(k, 3)))
        ax = axes[0]
    else:
        fig = ax.figure
    val = row_normalize(cm) if normalize else cm
    im = ax.imshow(np.nan_to_num(val), cmap="Blues", vmin=0, vmax=1.0 if normalize else max(cm.max(), 1))
    for i in range(k):
        for j in range(k):
            txt = f"{val[i, j]:.2f}\n({int(cm[i, j])})" if normalize else f"{int(cm[i, j])}"
            bright = np.nan_to_num(val[i, j]) > (0.5 if normalize else 0.5 * max(cm.max(), 1))
            ax.text(j, i, txt, ha="center", va="center", fontsize=7, color="white" if bright else "black")
    ax.set_xticks(range(k), names)
    ax.set_yticks(range(k), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    fig.colorbar(im, ax=ax, shrink=0.8)
    return fig


def confusion_matrices_figure(classification: Mapping[str, Mapping[str, Any]], *, normalize: bool = True) -> Figure:
    """One confusion-matrix panel per task of a :func:`~stellarnet.evaluation.metrics.classification_report`."""
    tasks = list(classification)
    kmax = max((len(classification[t]["classes"]) for t in tasks), default=3)
    side = 1.0 + 0.8 * max(kmax, 3)
    fig, axes = _new_figure(max(len(tasks), 1), panel=(side, side - 0.2))
    for ax, t in zip(axes, tasks):
        m = classification[t]
        confusion_matrix_figure(m["confusion"], m["classes"], normalize=normalize, ax=ax,
                                title=f"{t}: acc {m['accuracy']:.3f}, macro F1 {m['macro_f1']:.3f}")
    return fig


def reliability_figure(calibration: Mapping[str, Mapping[str, Any]], *, title: str | None = None) -> Figure:
    """Observed vs expected coverage of central Gaussian intervals, one line per label of a
    :func:`~stellarnet.evaluation.calibration.calibration_report`; the diagonal is perfect calibration
    (above = σ too large, below = σ too small)."""
    fig, axes = _new_figure(1, panel=(4.6, 4.2))
    ax = axes[0]
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="ideal")
    for name, m in calibration.items():
        rel = m["reliability"]
        ax.plot(rel["expected"], rel["observed"], "o-", ms=3,
                label=f"{LABEL_TEX.get(name, name)} (z std {m['z_std']:.2f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_xlabel("expected coverage")
    ax.set_ylabel("observed coverage")
    ax.legend(fontsize=7, loc="upper left")
    if title:
        ax.set_title(title)
    return fig


def method_comparison_figure(
    results: Mapping[str, Mapping[str, Any]],
    *,
    metric: str = "mae",
    class_metric: str = "macro_f1",
    title: str | None = None,
) -> Figure:
    """Grouped bars comparing methods: one panel per label (regression ``metric``, label unit, from
    ``results[method]["regression"]["overall"]``) and one panel with ``class_metric`` per
    classification task. ``results`` is ``{method: result}`` as returned by
    :func:`stellarnet.workflows.baselines.run_baselines`; skipped methods are left out."""
    methods = [m for m, r in results.items() if not r.get("skipped") and "regression" in r]
    labels: list[str] = []
    tasks: list[str] = []
    for m in methods:
        for lab in results[m]["regression"].get("overall", {}):
            if lab not in labels:
                labels.append(lab)
        for t in results[m].get("classification", {}) or {}:
            if t not in tasks:
                tasks.append(t)
    npan = len(labels) + (1 if tasks else 0)
    fig, axes = _new_figure(max(npan, 1), panel=(3.2, 3.4))
    x = np.arange(len(methods))
    for ax, lab in zip(axes, labels):
        vals = [results[m]["regression"]["overall"].get(lab, {}).get(metric, math.nan) for m in methods]
        ax.bar(x, vals, color=[f"C{i}" for i in range(len(methods))])
        ax.set_xticks(x, methods, rotation=45, ha="right", fontsize=8)
        unit = LABEL_UNITS.get(lab, "")
        ax.set_title(f"{LABEL_TEX.get(lab, lab)} {metric}" + (f" [{unit}]" if unit else ""), fontsize=9)
    if tasks:
        ax = axes[len(labels)]
        w = 0.8 / max(len(methods), 1)
        for i, m in enumerate(methods):
            cls = results[m].get("classification", {}) or {}
            vals = [cls.get(t, {}).get(class_metric, math.nan) for t in tasks]
            ax.bar(np.arange(len(tasks)) + (i - (len(methods) - 1) / 2) * w, vals, width=w, label=m, color=f"C{i}")
        ax.set_xticks(np.arange(len(tasks)), tasks, rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(class_metric, fontsize=9)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return fig


def write_standard_figures(
    out_dir: str | os.PathLike,
    pred: np.ndarray,
    true: np.ndarray,
    label_names: Sequence[str] | None = None,
    *,
    snr: np.ndarray | None = None,
    report: Mapping[str, Any] | None = None,
    prefix: str = "",
    dpi: int = 120,
) -> dict[str, Path]:
    """Write the standard evaluation PNGs to ``out_dir`` and return ``{name: path}``.

    Always: ``one_to_one``; with ``snr``: ``residuals_vs_snr``; with TEFF/LOGG and FE_H (or M_H)
    among the labels: ``kiel``; from a :func:`stellarnet.evaluation.report.build_report` dict:
    ``confusion`` (if it has ``classification``) and ``reliability`` (if it has ``calibration``).
    File names are ``<prefix><name>.png``.
    """
    out = Path(out_dir)
    names = _label_list(label_names, _as_2d(np.asarray(pred)).shape[1])
    made: dict[str, Figure] = {"one_to_one": one_to_one_figure(pred, true, names, color=snr)}
    if snr is not None:
        made["residuals_vs_snr"] = residuals_vs_snr_figure(pred, true, snr, names)
    if {"TEFF", "LOGG"} <= set(names) and ({"FE_H", "M_H"} & set(names)):
        made["kiel"] = kiel_diagram_figure(true, pred, names)
    if report is not None and report.get("classification"):
        made["confusion"] = confusion_matrices_figure(report["classification"])
    if report is not None and report.get("calibration"):
        made["reliability"] = reliability_figure(report["calibration"])
    return {k: save_figure(fig, out / f"{prefix}{k}.png", dpi=dpi) for k, fig in made.items()}
