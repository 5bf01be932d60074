"""Evaluation reports: one dict of plain Python values, written as JSON + markdown.

``build_report`` computes every metric from numpy arrays (physical units: Teff in K, logg /
[Fe/H] / [α/Fe] in dex); ``write_report`` writes ``<name>.json`` and ``<name>.md`` atomically
(temporary file + ``os.replace``); ``comparison_table`` renders a methods × metrics markdown table
from ``{method: result}`` (the structure :func:`stellarnet.workflows.baselines.run_baselines` returns and
``build_report`` produces).

JSON conventions: NaN / ±inf become ``null``; numpy scalars and arrays become Python numbers and
lists; dict keys starting with ``_`` (e.g. ``_predictions``, in-memory only) are dropped.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stellarnet.common.files import atomic_write_text, to_jsonable
from stellarnet.common.labels import LABEL_UNITS
from stellarnet.evaluation.calibration import apply_sigma_scale, calibration_report
from stellarnet.evaluation.crlb_summary import crlb_table_markdown
from stellarnet.evaluation.metrics import (
    DEFAULT_CLASS_TASKS,
    DEFAULT_SNR_EDGES,
    classification_report,
    default_class_names,
    regression_report,
)


def build_report(
    pred_labels: np.ndarray | None = None,
    true_labels: np.ndarray | None = None,
    label_names: Sequence[str] | None = None,
    *,
    sigma: np.ndarray | None = None,
    label_err: np.ndarray | None = None,
    sigma_scale: np.ndarray | None = None,
    pred_classes: np.ndarray | None = None,
    true_classes: np.ndarray | None = None,
    class_tasks: Sequence[str] | None = None,
    class_names: Mapping[str, Sequence[str]] | None = None,
    class_probs: Mapping[str, np.ndarray] | None = None,
    snr: np.ndarray | None = None,
    snr_edges: Sequence[float] | None = DEFAULT_SNR_EDGES,
    groups: np.ndarray | None = None,
    group_names: Sequence[str] | None = None,
    outlier_k: float | None = 3.0,
    outlier_abs: Mapping[str, float] | None = None,
    train_time_s: float | None = None,
    predict_rate: float | None = None,
    meta: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Compute all metrics for one model on one split and return a JSON-serializable dict.

    Parameters
    ----------
    pred_labels, true_labels
        (N, L) predicted / true labels in physical units (K, dex); NaN truths are excluded.
    sigma
        (N, L) predicted total σ (label units) → a ``calibration`` section. If ``sigma_scale``
        ((L,) factor from :func:`~stellarnet.evaluation.calibration.fit_sigma_scale` on validation) is
        given, calibration is reported both raw (``calibration_raw``) and scaled (``calibration``).
    label_err
        (N, L) catalogue error of the truth, combined with σ in quadrature for z.
    pred_classes, true_classes
        (N, C) integer codes, −1 = undefined; → a ``classification`` section.
    snr, snr_edges
        Per-pixel S/N and bin edges for the per-S/N regression metrics.
    groups, group_names
        (N,) group codes (e.g. true evolutionary stage) for per-group regression metrics; if not
        given but ``true_classes`` has a ``stage`` task, that column is used.
    train_time_s, predict_rate
        Training wall time (s) and inference rate (spectra / s), reported as given.
    meta
        Free-form provenance (model name, split, config, ...).

    Returns
    -------
    ``{"meta", "label_units", "regression", "calibration"?, "calibration_raw"?,
    "sigma_scale"?, "classification"?, "train_time_s", "predict_rate"}`` with plain values.
    """
    rep: dict[str, Any] = {"meta": dict(meta or {})}
    if class_tasks is None and true_classes is not None:
        nt = np.asarray(true_classes).reshape(len(true_classes), -1).shape[1]
        class_tasks = list(DEFAULT_CLASS_TASKS) if nt == len(DEFAULT_CLASS_TASKS) else [f"task{i}" for i in range(nt)]
    if groups is None and true_classes is not None and class_tasks is not None and "stage" in class_tasks:
        groups = np.asarray(true_classes).reshape(len(true_classes), -1)[:, list(class_tasks).index("stage")]
        if group_names is None:
            group_names = {**default_class_names(), **dict(class_names or {})}.get("stage")
    if pred_labels is not None and true_labels is not None:
        reg = regression_report(
            pred_labels, true_labels, label_names, snr=snr, snr_edges=snr_edges if snr is not None else None,
            groups=groups, group_names=group_names, outlier_k=outlier_k, outlier_abs=outlier_abs,
        )
        rep["label_units"] = {lab: LABEL_UNITS.get(lab, "") for lab in reg["overall"]}
        rep["regression"] = reg
        if sigma is not None:
            names = list(reg["overall"])
            if sigma_scale is not None:
                rep["calibration_raw"] = calibration_report(pred_labels, true_labels, sigma, label_err, names)
                rep["sigma_scale"] = dict(zip(names, np.asarray(sigma_scale, dtype=float).tolist()))
                sigma = apply_sigma_scale(sigma, sigma_scale)
            rep["calibration"] = calibration_report(pred_labels, true_labels, sigma, label_err, names)
    if pred_classes is not None and true_classes is not None:
        rep["classification"] = classification_report(pred_classes, true_classes, class_tasks, class_names)
        if class_probs:  # expected calibration error of the class probabilities, beside accuracy
            from stellarnet.evaluation.calibration import expected_calibration_error

            tc = np.asarray(true_classes).reshape(len(true_classes), -1)
            for j, task in enumerate(class_tasks or []):
                if task in class_probs and str(task) in rep["classification"]:
                    rep["classification"][str(task)]["ece"] = expected_calibration_error(class_probs[task], tc[:, j])
    rep["train_time_s"] = train_time_s
    rep["predict_rate"] = predict_rate
    return to_jsonable(rep)


# --------------------------------------------------------------------------------------------
# markdown
# --------------------------------------------------------------------------------------------
def _fmt(v: Any, label: str | None = None, digits: int | None = None) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        if not math.isfinite(float(v)):
            return "—"
        if digits is None:
            digits = 1 if label == "TEFF" else 3
        return f"{float(v):.{digits}f}"
    return str(v)


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


_REG_COLS = ("n", "mae", "bias_mean", "bias_median", "scatter", "rmse", "outlier_frac")


def _reg_table(section: Mapping[str, Mapping[str, Any]], units: Mapping[str, str]) -> str:
    rows = []
    for lab, m in section.items():
        rows.append([f"{lab} [{units.get(lab, '')}]"] + [
            _fmt(m.get(k), lab, 3 if k == "outlier_frac" else None) for k in _REG_COLS])
    return _md_table(["label"] + list(_REG_COLS), rows)


def _binned_table(section: Mapping[str, Mapping[str, Mapping[str, Any]]], what: str) -> str:
    labels: list[str] = []
    for per in section.values():
        labels += [lab for lab in per if lab not in labels]
    header = [what, "n"] + [f"{lab} MAE" for lab in labels] + [f"{lab} scatter" for lab in labels]
    rows = []
    for b, per in section.items():
        n = max((m.get("n") or 0 for m in per.values()), default=0)
        rows.append([b, str(n)] + [_fmt(per.get(lab, {}).get("mae"), lab) for lab in labels]
                    + [_fmt(per.get(lab, {}).get("scatter"), lab) for lab in labels])
    return _md_table(header, rows)


def report_to_markdown(report: Mapping[str, Any], name: str = "report") -> str:
    """Human-readable markdown rendering of a :func:`build_report` dict."""
    out = [f"# {name}", ""]
    meta = report.get("meta") or {}
    if meta:
        out += [_md_table(["key", "value"], [[str(k), _fmt(v)] for k, v in meta.items()]), ""]
    timing = [(k, report.get(k)) for k in ("train_time_s", "predict_rate") if report.get(k) is not None]
    if timing:
        out += [_md_table(["timing", "value"], [["train time [s]" if k == "train_time_s" else "inference [spectra/s]",
                                                  _fmt(v, digits=1)] for k, v in timing]), ""]
    units = {**LABEL_UNITS, **(report.get("label_units") or {})}
    reg = report.get("regression")
    if reg:
        out += ["## Regression (Δ = pred − true)", "", _reg_table(reg["overall"], units), ""]
        if reg.get("by_snr"):
            out += ["### By S/N", "", _binned_table(reg["by_snr"], "S/N"), ""]
        if reg.get("by_group"):
            out += ["### By evolutionary stage (true)", "", _binned_table(reg["by_group"], "group"), ""]
    for key, ttl in (("calibration", "Uncertainty calibration"), ("calibration_raw", "Uncertainty calibration (before σ scaling)")):
        cal = report.get(key)
        if cal:
            cols = ("n", "z_mean", "z_std", "z_robust_std", "coverage_1sigma", "coverage_2sigma", "calibration_error")
            rows = [[lab] + [_fmt(m.get(c), digits=3) for c in cols] for lab, m in cal.items()]
            out += [f"## {ttl}", "", "Expected: z std 1, coverage 0.683 (1σ) and 0.954 (2σ).", "",
                    _md_table(["label"] + list(cols), rows), ""]
    if report.get("sigma_scale"):
        out += [_md_table(["label", "σ scale"], [[k, _fmt(v, digits=3)] for k, v in report["sigma_scale"].items()]), ""]
    cls = report.get("classification")
    if cls:
        out += ["## Classification", ""]
        out += [_md_table(["task", "n", "accuracy", "macro F1", "ECE"],
                          [[t, _fmt(m.get("n")), _fmt(m.get("accuracy")), _fmt(m.get("macro_f1")), _fmt(m.get("ece"))]
                           for t, m in cls.items()]), ""]
        for t, m in cls.items():
            out += [f"### {t}", ""]
            rows = [[c, _fmt(pc.get("precision")), _fmt(pc.get("recall")), _fmt(pc.get("f1")), _fmt(pc.get("support"))]
                    for c, pc in m["per_class"].items()]
            out += [_md_table(["class", "precision", "recall", "F1", "support"], rows), ""]
            names = m["classes"]
            out += ["Confusion matrix (rows true, columns predicted):", "",
                    _md_table(["true \\ pred"] + names, [[names[i]] + [str(v) for v in row] for i, row in enumerate(m["confusion"])]), ""]
            if "red_clump" in m:
                rc = m["red_clump"]
                out += [f"Red clump: purity {_fmt(rc['purity'])}, completeness {_fmt(rc['completeness'])} "
                        f"(true RC {rc['n_true_rc']}, predicted RC {rc['n_pred_rc']})", ""]
    crlb = report.get("crlb")
    if crlb:
        out += [crlb_markdown(crlb), ""]
    return "\n".join(out).rstrip() + "\n"


def crlb_markdown(block: Mapping[str, Any]) -> str:
    """Markdown for the ``crlb`` block of an evaluation report (see
    :func:`stellarnet.evaluation.crlb.crlb_report`): what the ratio is, the goal and whether it is met,
    MAE/CRLB and the median bound per label per S/N bin for giants and all stars."""
    out = ["## Accuracy vs the Cramér–Rao bound (MAE/CRLB)", ""]
    n_sel, n_split = block.get("n_selected"), block.get("n_split")
    of = (f"all {_fmt(n_split)}" if n_sel is None or n_sel == n_split
          else f"a seeded random {_fmt(n_sel)} of {_fmt(n_split)}")
    sel = (f"{_fmt(block.get('n_in_box'))} of {of} {block.get('split', '')} stars inside the model's label box "
           f"({_fmt(block.get('n_outside_box'))} outside it and {_fmt(block.get('n_no_labels'))} without finite "
           "labels excluded)")
    if block.get("skipped"):
        out += [f"Not computed: {block.get('reason', '')}." + (f" ({sel})" if "n_in_box" in block else "")]
        return "\n".join(out)
    out += [f"MAE/CRLB = achieved Gaussian σ (MAE / √(2/π)) over the median per-star bound: 1 is the best any "
            f"unbiased method can do. Bound from {block.get('model', 'the spectral model')} with noise = "
            f"{block.get('noise_description', block.get('noise', ''))}, at the {block.get('labels_at', 'catalogue')} "
            f"labels; {sel}.", "",
            str(block.get("note", "")), ""]
    goal = block.get("goal")
    if goal:
        verdict = {True: "**met**", False: "**not met**", None: "undetermined (no stars)"}[goal.get("met")]
        out += [f"Goal: MAE/CRLB ≤ {_fmt(goal.get('max_ratio'), digits=0)} for {goal.get('group')} at "
                f"S/N ≥ {_fmt(goal.get('snr_min'), digits=0)}: {verdict}.", ""]
        has_floor = any("floor_ratio" in v for v in goal["labels"].values())
        header = ["label", "n", "MAE", "median CRLB", "MAE/CRLB", "≤ 2×"]
        if has_floor:
            header += ["catalogue σ (median)", "floor: bound + catalogue noise"]
        rows = []
        for lab, v in goal["labels"].items():
            unit = LABEL_UNITS.get(lab, "")
            row = [f"{lab} [{unit}]" if unit else lab, _fmt(v.get("n")), _fmt(v.get("mae"), lab, None if lab == "TEFF" else 4),
                   _fmt(v.get("median_crlb"), lab, None if lab == "TEFF" else 4), _fmt(v.get("ratio"), digits=2),
                   {True: "yes", False: "no", None: "—"}[v.get("within_2x")]]
            if has_floor:
                row += [_fmt(v.get("median_reference_err"), lab, None if lab == "TEFF" else 4),
                        _fmt(v.get("floor_ratio"), digits=2)]
            rows.append(row)
        out += [_md_table(header, rows), ""]
        if has_floor:
            out += ["floor = median √(CRLB² + catalogue σ²) / median CRLB: the ratio a method at the bound would get "
                    "against these catalogue labels (if the catalogue errors are right).", ""]
    for g, summ in (block.get("mae_over_crlb") or {}).items():
        out += [crlb_table_markdown(summ, "ratio", title=f"MAE/CRLB — {g}"), ""]
    for g, summ in (block.get("crlb_by_bin") or {}).items():
        out += [crlb_table_markdown(summ, "median", title=f"median CRLB σ — {g}"), ""]
    if block.get("seconds") is not None:
        out += [f"(CRLB computed in {_fmt(block['seconds'], digits=1)} s.)"]
    return "\n".join(out).rstrip()


def write_report(report: Mapping[str, Any], out_dir: str | os.PathLike, name: str = "report",
                 markdown: str | None = None) -> dict[str, Path]:
    """Write ``<out_dir>/<name>.json`` and ``<out_dir>/<name>.md`` atomically.

    ``markdown`` overrides the default rendering (:func:`report_to_markdown`), e.g. for a
    :func:`comparison_table`. Returns ``{"json": path, "markdown": path}``.
    """
    out = Path(out_dir)
    js = json.dumps(to_jsonable(report), indent=2, allow_nan=False)
    md = markdown if markdown is not None else report_to_markdown(to_jsonable(report), name)
    pj, pm = out / f"{name}.json", out / f"{name}.md"
    atomic_write_text(pj, js + "\n")
    atomic_write_text(pm, md)
    return {"json": pj, "markdown": pm}


def comparison_table(
    results: Mapping[str, Mapping[str, Any]],
    *,
    reg_metrics: Sequence[str] = ("mae", "scatter"),
    class_metrics: Sequence[str] = ("accuracy", "macro_f1"),
    red_clump: bool = True,
) -> str:
    """Markdown table, one row per method, from ``{method: result}``.

    ``result`` has ``regression`` (a :func:`~stellarnet.evaluation.metrics.regression_report` with an
    ``overall`` section), ``classification`` (a
    :func:`~stellarnet.evaluation.metrics.classification_report`), ``train_time_s`` (s) and
    ``predict_rate`` (spectra / s); methods with ``skipped`` set get a row with the reason.
    Columns: per label × ``reg_metrics`` (label units), per task × ``class_metrics``, red-clump
    purity/completeness (if a task reports them), train time, inference rate.
    """
    labels: list[str] = []
    tasks: list[str] = []
    has_rc = False
    for r in results.values():
        for lab in ((r.get("regression") or {}).get("overall") or {}):
            if lab not in labels:
                labels.append(lab)
        for t, m in (r.get("classification") or {}).items():
            if t not in tasks:
                tasks.append(t)
            has_rc |= "red_clump" in m
    short = {"mae": "MAE", "scatter": "σ_rob", "bias_median": "bias", "bias_mean": "bias", "rmse": "RMSE",
             "outlier_frac": "out", "accuracy": "acc", "macro_f1": "F1"}
    header = ["method"]
    header += [f"{lab} {short.get(k, k)}" + (f" [{LABEL_UNITS[lab]}]" if lab in LABEL_UNITS else "")
               for lab in labels for k in reg_metrics]
    header += [f"{t} {short.get(k, k)}" for t in tasks for k in class_metrics]
    if has_rc and red_clump:
        header += ["RC purity", "RC completeness"]
    header += ["train [s]", "inference [spectra/s]"]
    rows = []
    for method, r in results.items():
        if r.get("skipped"):
            rows.append([method, f"skipped: {r.get('reason', '')}"] + [""] * (len(header) - 2))
            continue
        overall = (r.get("regression") or {}).get("overall") or {}
        cls = r.get("classification") or {}
        row = [method]
        row += [_fmt(overall.get(lab, {}).get(k), lab, 3 if k == "outlier_frac" else None)
                for lab in labels for k in reg_metrics]
        row += [_fmt(cls.get(t, {}).get(k)) for t in tasks for k in class_metrics]
        if has_rc and red_clump:
            rc = next((m["red_clump"] for m in cls.values() if "red_clump" in m), {})
            row += [_fmt(rc.get("purity")), _fmt(rc.get("completeness"))]
        row += [_fmt(r.get("train_time_s"), digits=1), _fmt(r.get("predict_rate"), digits=0)]
        rows.append(row)
    return _md_table(header, rows) + "\n"
