"""Feature importance: tree baselines (native gain + permutation) and network saliency.

Tree models (:class:`stellarnet.baselines.trees.TreeBaseline`, one estimator per label and per
class task):

* ``gain``: the estimator's native importance, normalized to sum 1 per target — total split gain
  for XGBoost / LightGBM, mean impurity decrease (MDI) for random forests; NaN for
  HistGradientBoosting, which has none.
* ``permutation``: :func:`sklearn.inspection.permutation_importance` on the test split: the
  increase of the MAE in label units (K, dex) for regression targets, the drop in accuracy for
  class tasks, when one feature column is shuffled (mean ± std over ``n_repeats``).

Network (:class:`stellarnet.network.inference.Predictor`): gradient saliency
|∂ label / ∂ flux_p| (label units per unit normalized flux) averaged over stars, per label,
computed on ``Predictor.module`` in eval mode with gradients enabled on the input flux.

Nothing here reads shard files: callers pass arrays (split dicts) and get DataFrames / Figures.
"""

from __future__ import annotations

import fnmatch
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

log = logging.getLogger(__name__)

__all__ = [
    "IMPORTANCE_COLUMNS",
    "feature_group",
    "tree_importance",
    "group_importance",
    "importance_figure",
    "network_saliency",
    "saliency_frame",
    "line_saliency",
    "saliency_figure",
    "load_line_centres",
    "feature_set_comparison",
    "feature_set_markdown",
]

IMPORTANCE_COLUMNS = ("method", "feature_set", "target", "kind", "feature", "group", "gain",
                      "permutation", "permutation_std", "metric")

#: feature-name pattern → group (first match wins); used to sum importance per kind of input
_GROUPS: tuple[tuple[str, str], ...] = (
    ("*_IMPUTED", "flag"),
    ("*_OUTLIER", "flag"),
    ("N_OUTLIERS", "flag"),
    ("PC[0-9]*", "spectra_pca"),
    ("EW_*", "spectral_index"),
    ("DEPTH_*", "spectral_index"),
)
_PHOTOMETRY = {"JH0", "HK0", "JK0", "BPRP0", "M_K", "M_G", "A_K", "H_K"}


def feature_group(name: str) -> str:
    """Kind of input a feature column is: spectra_pca, spectral_index, photometry, flag, other."""
    if name in _PHOTOMETRY or name.startswith("PHOT"):
        return "photometry"
    for pattern, group in _GROUPS:
        if fnmatch.fnmatchcase(name, pattern):
            return group
    return "other"


def _native_importance(method: str, est: Any, n_features: int) -> np.ndarray:
    """Native importances normalized to sum 1 (NaN if the estimator has none)."""
    imp = None
    if method == "lightgbm" and hasattr(est, "booster_"):
        imp = np.asarray(est.booster_.feature_importance(importance_type="gain"), dtype=float)
    elif method == "xgboost" and hasattr(est, "get_booster"):
        score = est.get_booster().get_score(importance_type="total_gain")
        imp = np.zeros(n_features)
        for k, v in score.items():  # keys are "f<index>" when fitted on numpy arrays
            j = int(k[1:]) if k.startswith("f") and k[1:].isdigit() else None
            if j is not None and j < n_features:
                imp[j] = float(v)
    elif hasattr(est, "feature_importances_"):
        try:
            imp = np.asarray(est.feature_importances_, dtype=float)
        except (AttributeError, ValueError):
            imp = None
    if imp is None or imp.size != n_features:
        return np.full(n_features, np.nan)
    total = float(np.nansum(imp))
    return imp / total if total > 0 else np.zeros(n_features)


def tree_importance(
    model: Any,
    test: Mapping[str, Any],
    *,
    permutation: bool = True,
    n_repeats: int = 3,
    max_samples: int | None = 1000,
    seed: int = 0,
    n_jobs: int | None = 1,
    feature_set: str | None = None,
) -> pd.DataFrame:
    """Long table (one row per target × feature, columns :data:`IMPORTANCE_COLUMNS`) for a fitted
    :class:`~stellarnet.baselines.trees.TreeBaseline` on the split dict ``test``.

    ``permutation``: also compute permutation importance on at most ``max_samples`` random test
    rows (labelled for that target), ``n_repeats`` shuffles per feature. Regression: increase of
    the MAE in label units; classification: decrease of the accuracy.
    """
    from sklearn.inspection import permutation_importance
    from sklearn.metrics import make_scorer

    x = model.features(test)
    names = list(model.feature_names) or [f"f{i}" for i in range(x.shape[1])]
    if len(names) != x.shape[1]:
        raise ValueError(f"model has {len(names)} feature names but the test matrix {x.shape[1]} columns")
    n = len(x)
    rng = np.random.default_rng(seed)
    labels = np.asarray(test["labels"], dtype=float).reshape(n, -1)
    classes = test.get("classes")
    classes = None if classes is None else np.asarray(classes).astype(int).reshape(n, -1)
    fs = feature_set or getattr(model, "feature_set", "")
    groups = [feature_group(f) for f in names]
    rows: list[pd.DataFrame] = []

    def _rows(target: str, kind: str, gain: np.ndarray, perm: np.ndarray, perm_std: np.ndarray,
              metric: str) -> pd.DataFrame:
        return pd.DataFrame({"method": model.method, "feature_set": fs, "target": target, "kind": kind,
                             "feature": names, "group": groups, "gain": gain, "permutation": perm,
                             "permutation_std": perm_std, "metric": metric})

    def _subset(ok: np.ndarray) -> np.ndarray:
        idx = np.flatnonzero(ok)
        if max_samples is not None and idx.size > max_samples:
            idx = np.sort(rng.choice(idx, size=int(max_samples), replace=False))
        return idx

    nan = np.full(len(names), np.nan)
    mae = make_scorer(lambda yt, yp: float(np.mean(np.abs(yt - yp))), greater_is_better=False)
    for j, (name, est) in enumerate(zip(model.label_names, model.regressors)):
        if est is None:
            continue
        gain = _native_importance(model.method, est, len(names))
        perm, perm_std = nan, nan
        idx = _subset(np.isfinite(labels[:, j]))
        if permutation and idx.size >= 2:
            t0 = time.perf_counter()
            y = (labels[idx, j] - model.target_mean[j]) / model.target_std[j]
            r = permutation_importance(est, x[idx], y, scoring=mae, n_repeats=n_repeats,
                                       random_state=seed, n_jobs=n_jobs)
            perm = r.importances_mean * model.target_std[j]  # ΔMAE in label units
            perm_std = r.importances_std * model.target_std[j]
            log.info("%s %s: permutation importance on %d stars in %.1fs", model.method, name, idx.size,
                     time.perf_counter() - t0)
        rows.append(_rows(name, "regression", gain, perm, perm_std, "delta_mae"))
    for j, (task, est) in enumerate(zip(model.class_tasks, model.classifiers)):
        if est is None or not hasattr(est, "fit") or classes is None:
            continue  # no labelled training rows, or a single class (constant predictor)
        codes = model.class_codes[j]
        gain = _native_importance(model.method, est, len(names))
        perm, perm_std = nan, nan
        idx = _subset(np.isin(classes[:, j], codes))
        if permutation and idx.size >= 2:
            y = np.searchsorted(codes, classes[idx, j])
            r = permutation_importance(est, x[idx], y, scoring="accuracy", n_repeats=n_repeats,
                                       random_state=seed, n_jobs=n_jobs)
            perm, perm_std = r.importances_mean, r.importances_std
        rows.append(_rows(task, "classification", gain, perm, perm_std, "delta_accuracy"))
    if not rows:
        return pd.DataFrame(columns=list(IMPORTANCE_COLUMNS))
    return pd.concat(rows, ignore_index=True)[list(IMPORTANCE_COLUMNS)]


def group_importance(table: pd.DataFrame, value: str = "gain") -> pd.DataFrame:
    """Sum of ``value`` per (method, feature_set, target, group): which kind of input carries the
    model (e.g. the share of the gain held by PCA components vs spectral indices)."""
    if table.empty:
        return pd.DataFrame(columns=["method", "feature_set", "target", "group", value])
    g = table.groupby(["method", "feature_set", "target", "group"], sort=False)[value].sum(min_count=1)
    return g.reset_index()


def importance_figure(table: pd.DataFrame, value: str = "permutation", top: int = 20) -> Figure:
    """One heat-map panel per method: the ``top`` features (by mean importance normalized per
    target) × targets; colour = importance / the target's largest importance. Falls back to
    ``gain`` for methods without ``value``."""
    methods = list(dict.fromkeys(table["method"])) if not table.empty else []
    n = max(1, len(methods))
    fig = Figure(figsize=(4.2 * n + 1.0, 0.28 * top + 2.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(1, n, squeeze=False)).ravel()
    if not methods:
        axes[0].text(0.5, 0.5, "no importances", ha="center", va="center")
        axes[0].set_axis_off()
        return fig
    im = None
    for ax, method in zip(axes, methods):
        sub = table[table["method"] == method]
        col = value if sub[value].notna().any() else "gain"
        piv = sub.pivot_table(index="feature", columns="target", values=col, aggfunc="mean", sort=False)
        targets = list(dict.fromkeys(sub["target"]))
        piv = piv.reindex(columns=targets)
        norm = piv / piv.abs().max(axis=0).replace(0, np.nan)
        order = norm.mean(axis=1).sort_values(ascending=False).index[:top]
        mat = norm.loc[order].to_numpy(dtype=float)
        im = ax.imshow(mat, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        ax.set_yticks(range(len(order)), list(order), fontsize=7)
        ax.set_xticks(range(len(targets)), targets, rotation=45, ha="right", fontsize=7)
        fs = ", ".join(sorted(set(sub["feature_set"].astype(str))))
        ax.set_title(f"{method} ({fs}): {col}", fontsize=9)
    if im is not None:
        fig.colorbar(im, ax=list(axes), shrink=0.6, label="importance / max per target")
    return fig


# --------------------------------------------------------------------------- network saliency


def network_saliency(
    predictor: Any,
    flux: np.ndarray,
    flux_err: np.ndarray,
    photometry: np.ndarray | None = None,
    pix_mask: np.ndarray | None = None,
    *,
    max_stars: int | None = 512,
    batch_size: int = 64,
    seed: int = 0,
) -> np.ndarray:
    """(L, P) mean over stars of |∂ label_j / ∂ flux_p| (label units per unit normalized flux).

    Runs ``predictor.module`` (eval mode: no dropout, batch-norm running statistics, so stars in
    a batch are independent) with ``torch.enable_grad()`` on the flux input. Bad pixels (mask 0,
    non-finite) are set as in :meth:`Predictor.predict` (flux 1, mask 0). At most ``max_stars``
    random stars are used.
    """
    import torch

    module = predictor.module
    flux = np.asarray(flux, dtype=np.float32)
    flux_err = np.asarray(flux_err, dtype=np.float32)
    n, p = flux.shape
    idx = np.arange(n)
    if max_stars is not None and n > max_stars:
        idx = np.sort(np.random.default_rng(seed).choice(n, size=int(max_stars), replace=False))
    good = np.isfinite(flux) & np.isfinite(flux_err) & (flux_err > 0)
    if pix_mask is not None:
        good &= np.asarray(pix_mask).astype(bool)
    phot, phot_mask = predictor.standardize_photometry(None if photometry is None else np.asarray(photometry)[idx],
                                                       len(idx))
    L = len(predictor.label_names)
    total = np.zeros((L, p), dtype=np.float64)
    dev = predictor.device
    std = module.label_std.detach().to(dev)
    was_training = module.training
    module.eval()
    try:
        with torch.enable_grad():
            for s in range(0, len(idx), batch_size):
                rows = idx[s:s + batch_size]
                g = good[rows]
                x = torch.from_numpy(np.where(g, flux[rows], 1.0).astype(np.float32)).to(dev).requires_grad_(True)
                e = torch.from_numpy(np.where(g, flux_err[rows], 1.0e3).astype(np.float32)).to(dev)
                m = torch.from_numpy(g.astype(np.float32)).to(dev)
                ph = torch.from_numpy(phot[s:s + batch_size]).to(dev)
                pm = torch.from_numpy(phot_mask[s:s + batch_size]).to(dev)
                out = module(x, e, m, ph, pm)
                labels = out["mean"] * std  # physical units up to the (constant) mean offset
                for j in range(L):
                    (grad,) = torch.autograd.grad(labels[:, j].sum(), x, retain_graph=j < L - 1)
                    total[j] += grad.abs().sum(0).double().cpu().numpy()
    finally:
        module.train(was_training)
    return total / max(len(idx), 1)


def saliency_frame(saliency: np.ndarray, wavelength: Sequence[float], label_names: Sequence[str]) -> pd.DataFrame:
    """Wide table: ``wavelength`` (Å) and one column per label (|∂label/∂flux|, label units)."""
    sal = np.asarray(saliency, dtype=float)
    lam = np.asarray(wavelength, dtype=float)
    if sal.shape != (len(label_names), lam.size):
        raise ValueError(f"saliency shape {sal.shape} does not match ({len(label_names)}, {lam.size})")
    return pd.DataFrame({"wavelength": lam, **{name: sal[j] for j, name in enumerate(label_names)}})


def load_line_centres(windows: Any = None) -> pd.DataFrame:
    """Line centres (vacuum Å) from the index window table: ``conf/features/default.yaml`` when
    None, else a features config (with ``indices``), an ``indices`` mapping or a window list.
    The centre is the entry's ``vacuum`` wavelength (the line / bandhead position), else the
    middle of its central band. Columns ``name``, ``species``, ``wavelength``, ``band_lo``,
    ``band_hi``."""
    from stellarnet.common.files import to_plain as plain
    from stellarnet.features.tabular import load_features_config

    spec = plain(windows) if windows is not None else load_features_config()
    if isinstance(spec, Mapping) and "indices" in spec:
        spec = spec["indices"]
    if isinstance(spec, Mapping):
        spec = spec.get("windows") or []
    rows = []
    for w in spec or []:
        m = dict(w) if isinstance(w, Mapping) else {"name": w.name, "species": w.species, "band": w.band}
        lo, hi = (float(v) for v in m["band"])
        centre = m.get("vacuum")
        centre = 0.5 * (lo + hi) if centre is None else float(centre)
        rows.append({"name": str(m["name"]), "species": str(m.get("species", "")), "wavelength": centre,
                     "band_lo": lo, "band_hi": hi})
    return pd.DataFrame(rows, columns=["name", "species", "wavelength", "band_lo", "band_hi"])


def line_saliency(frame: pd.DataFrame, lines: pd.DataFrame) -> pd.DataFrame:
    """Mean saliency inside each line's central band relative to the label's median saliency over
    the whole spectrum (> 1: the network looks at that line more than at a typical pixel).
    Columns: ``name``, ``species``, ``wavelength`` and one per label; lines off the grid dropped."""
    lam = frame["wavelength"].to_numpy(float)
    labels = [c for c in frame.columns if c != "wavelength"]
    med = {c: float(np.nanmedian(frame[c])) for c in labels}
    rows = []
    for _, ln in lines.iterrows():
        sel = (lam >= ln["band_lo"]) & (lam <= ln["band_hi"])
        if not sel.any():
            continue
        row = {"name": ln["name"], "species": ln["species"], "wavelength": ln["wavelength"]}
        for c in labels:
            row[c] = float(np.nanmean(frame.loc[sel, c])) / med[c] if med[c] > 0 else np.nan
        rows.append(row)
    return pd.DataFrame(rows, columns=["name", "species", "wavelength", *labels])


def saliency_figure(frame: pd.DataFrame, lines: pd.DataFrame | None = None, units: Mapping[str, str] | None = None,
                    smooth: int = 1) -> Figure:
    """One panel per label: saliency vs wavelength (Å), chip gaps left blank, known line centres
    marked (dashed, coloured by species) and labelled with the species name."""
    labels = [c for c in frame.columns if c != "wavelength"]
    fig = Figure(figsize=(13, 2.3 * max(1, len(labels)) + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(max(1, len(labels)), 1, sharex=True, squeeze=False)).ravel()
    lam = frame["wavelength"].to_numpy(float)
    gaps = np.flatnonzero(np.diff(lam) > 5 * np.median(np.diff(lam))) + 1  # chip gaps
    species_colour: dict[str, str] = {}
    for ax, lab in zip(axes, labels):
        y = frame[lab].to_numpy(float)
        if smooth > 1:
            y = np.convolve(y, np.ones(smooth) / smooth, mode="same")
        for seg_l, seg_y in zip(np.split(lam, gaps), np.split(y, gaps)):
            ax.plot(seg_l, seg_y, lw=0.5, color="k")
        unit = (units or {}).get(lab, "")
        ax.set_ylabel(f"|∂{lab}/∂f|" + (f" [{unit}]" if unit else ""), fontsize=8)
        if lines is not None:
            top = np.nanmax(y) if np.isfinite(y).any() else 1.0
            for _, ln in lines.iterrows():
                if not (lam.min() <= ln["wavelength"] <= lam.max()):
                    continue
                sp = str(ln["species"])
                c = species_colour.setdefault(sp, f"C{len(species_colour) % 10}")
                ax.axvline(ln["wavelength"], color=c, lw=0.6, ls="--", alpha=0.7)
                if lab == labels[0]:
                    ax.text(ln["wavelength"], top, sp, rotation=90, fontsize=5, color=c, va="top", ha="right")
    axes[-1].set_xlabel("vacuum wavelength [Å]")
    axes[0].set_title("network gradient saliency, mean over test stars (dashed: line centres of the index windows)",
                      fontsize=9)
    return fig


# --------------------------------------------------------------------------- feature-set ablation


def feature_set_comparison(results: Mapping[str, Mapping[str, Any]],
                           metric: str = "mae", class_metric: str = "accuracy") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Compare baseline inputs: ``results`` is ``{feature_set: {method: run_baselines result}}``.

    Returns (long table: feature_set, method, target, kind, value — ``metric`` (label units) for
    labels, ``class_metric`` for class tasks; winners: one row per target with the best feature
    set (lowest ``metric`` / highest ``class_metric`` of its best method), that method and value,
    the runner-up set and its value). Skipped / failed methods are left out.
    """
    rows = []
    for fs, by_method in results.items():
        for method, r in by_method.items():
            if not isinstance(r, Mapping) or r.get("skipped"):
                continue
            for lab, m in ((r.get("regression") or {}).get("overall") or {}).items():
                rows.append({"feature_set": fs, "method": method, "target": lab, "kind": "regression",
                             "value": m.get(metric)})
            for task, m in (r.get("classification") or {}).items():
                rows.append({"feature_set": fs, "method": method, "target": task, "kind": "classification",
                             "value": m.get(class_metric)})
    long = pd.DataFrame(rows, columns=["feature_set", "method", "target", "kind", "value"])
    long["value"] = pd.to_numeric(long["value"], errors="coerce")
    win_rows = []
    for target, g in long.dropna(subset=["value"]).groupby("target", sort=False):
        higher = g["kind"].iloc[0] == "classification"
        best_per_set = g.sort_values("value", ascending=not higher).groupby("feature_set", sort=False).head(1)
        best_per_set = best_per_set.sort_values("value", ascending=not higher)
        first = best_per_set.iloc[0]
        second = best_per_set.iloc[1] if len(best_per_set) > 1 else None
        win_rows.append({"target": target, "kind": first["kind"],
                         "metric": class_metric if higher else metric, "winner": first["feature_set"],
                         "method": first["method"], "value": float(first["value"]),
                         "runner_up": None if second is None else second["feature_set"],
                         "runner_up_value": None if second is None else float(second["value"])})
    winners = pd.DataFrame(win_rows, columns=["target", "kind", "metric", "winner", "method", "value",
                                              "runner_up", "runner_up_value"])
    return long, winners


def feature_set_markdown(long: pd.DataFrame, winners: pd.DataFrame) -> str:
    """Markdown: the method × feature-set table (labels: MAE [unit], tasks: accuracy) and the
    winner per target."""
    from stellarnet.common.labels import LABEL_UNITS

    if long.empty:
        return "(no baseline results)\n"
    targets = list(dict.fromkeys(long["target"]))
    piv = long.pivot_table(index=["method", "feature_set"], columns="target", values="value", sort=False)
    kinds = dict(zip(long["target"], long["kind"]))

    def fmt(t: str, v: float) -> str:
        if not np.isfinite(v):
            return "—"
        if kinds[t] == "classification":
            return f"{v:.3f}"
        return f"{v:.1f}" if abs(v) >= 10 else f"{v:.3f}"

    head = ["method", "features"] + [
        f"{t} MAE" + (f" [{LABEL_UNITS[t]}]" if t in LABEL_UNITS else "") if kinds[t] == "regression" else f"{t} acc"
        for t in targets]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (method, fs), row in piv.iterrows():
        lines.append("| " + " | ".join([method, fs] + [fmt(t, float(row.get(t, np.nan))) for t in targets]) + " |")
    lines += ["", "| target | winner | best model | value | runner-up | value |", "|---|---|---|---|---|---|"]
    for _, w in winners.iterrows():
        ru = "—" if w["runner_up"] is None or (isinstance(w["runner_up"], float) and np.isnan(w["runner_up"])) \
            else str(w["runner_up"])
        ruv = "—" if ru == "—" else fmt(w["target"], float(w["runner_up_value"]))
        lines.append(f"| {w['target']} ({w['metric']}) | **{w['winner']}** | {w['method']} | "
                     f"{fmt(w['target'], w['value'])} | {ru} | {ruv} |")
    counts = winners["winner"].value_counts()
    if len(counts):
        lines += ["", "Targets won: " + ", ".join(f"{k} {v}" for k, v in counts.items())]
    return "\n".join(lines) + "\n"
