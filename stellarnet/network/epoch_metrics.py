"""The outputs a LightningModule accumulates over an epoch (per-batch dicts of numpy arrays, merged along
the sample axis) and the metrics it logs at the end of a validation or test epoch (``val/*``, ``test/*``,
and ``test_metrics.json`` of a training run): per label MAE, bias, RMSE, z std and 1σ coverage, per
class task the accuracy, in physical units. The evaluation report's fuller metrics are
:mod:`stellarnet.evaluation.metrics`."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from stellarnet.common.stats import residual_stats, z_scores, z_stats


# ----------------------------------------------------------------------------------------------
# metrics on accumulated outputs
# ----------------------------------------------------------------------------------------------
def compute_metrics(outputs: dict[str, Any], data_spec: dict[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    """Summary metrics from accumulated outputs (physical units; see ``StellarNetModule.test_outputs``).

    Returns ``{"labels": {name: {"n", "mae", "bias", "rmse", "z_std", "coverage_68", "unit"}},
    "classes": {task: {"n", "accuracy"}}}`` with plain floats (NaN where no star has the label).
    ``z = (pred - true) / sqrt(sigma_total**2 + label_err**2)``; ``coverage_68`` is the fraction with
    ``|z| ≤ 1`` (0.683 for calibrated Gaussian errors). The definitions are :mod:`stellarnet.common.stats`'
    (the evaluation report's too).
    """
    units = data_spec.get("label_units") or [""] * len(data_spec["label_names"])
    res: dict[str, dict[str, dict[str, float]]] = {"labels": {}, "classes": {}}
    for j, name in enumerate(data_spec["label_names"]):
        m = outputs["label_mask"][:, j].astype(bool)
        pred, true = outputs["labels_pred"][m, j], outputs["labels_true"][m, j]
        basic = residual_stats(pred - true)
        zs = z_stats(z_scores(pred, true, outputs["sigma_total"][m, j], outputs["label_err"][m, j]))
        res["labels"][name] = {"n": basic["n"], "mae": basic["mae"], "bias": basic["bias_mean"], "rmse": basic["rmse"],
                               "z_std": zs["z_std"], "coverage_68": zs["coverage_1sigma"], "unit": units[j]}
    for task in outputs["class_probs"]:
        true = outputs["class_true"][task]
        ok = true >= 0
        n = int(ok.sum())
        pred = outputs["class_probs"][task].argmax(1)
        res["classes"][task] = {"n": n, "accuracy": float(np.mean(pred[ok] == true[ok])) if n else math.nan}
    return res


def merge_outputs(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Concatenate per-batch (or per-rank) output dicts along the sample axis (``{}`` if none);
    nested dicts (per class task) are merged key by key."""
    parts = [p for p in parts if p]
    if not parts:
        return {}
    out: dict[str, Any] = {}
    for k, v in parts[0].items():
        if isinstance(v, dict):
            out[k] = {t: np.concatenate([p[k][t] for p in parts]) for t in v}
        else:
            out[k] = np.concatenate([p[k] for p in parts])
    return out


def take_rows(outputs: dict[str, Any], sel: np.ndarray) -> dict[str, Any]:
    """The rows ``sel`` of every array of merged outputs."""
    return {k: ({t: a[sel] for t, a in v.items()} if isinstance(v, dict) else v[sel]) for k, v in outputs.items()}


def concat_outputs(store: list[dict[str, Any]]) -> dict[str, Any]:
    """An epoch's per-batch outputs as one dict, the predictions under ``labels_pred``."""
    out = merge_outputs(store)
    if out:
        out["labels_pred"] = out.pop("labels")
    return out


def collect_batch(batch: Mapping[str, torch.Tensor], pred: dict[str, Any], label_mean: torch.Tensor,
              label_std: torch.Tensor, class_tasks: Mapping[str, Any]) -> dict[str, Any]:
    """Detach one batch of predictions and truths to CPU numpy, physical units."""
    std, mu = label_std, label_mean
    mask = batch["label_mask"] > 0
    true = torch.where(mask, batch["labels"] * std + mu, torch.full_like(batch["labels"], float("nan")))
    err = batch.get("label_err")
    err = torch.where(mask, err * std, torch.full_like(true, float("nan"))) if err is not None else torch.full_like(true, float("nan"))
    item: dict[str, Any] = {k: pred[k].float().cpu().numpy() for k in ("labels", "sigma_aleatoric", "sigma_epistemic", "sigma_total")}
    item.update(
        labels_true=true.float().cpu().numpy(),
        label_err=err.float().cpu().numpy(),
        label_mask=mask.cpu().numpy(),
        class_probs={t: p.float().cpu().numpy() for t, p in pred["class_probs"].items()},
    )
    classes = batch.get("classes")
    item["class_true"] = {
        t: (classes[:, c].cpu().numpy() if classes is not None else np.full(len(true), -1, dtype=np.int64))
        for c, t in enumerate(class_tasks)
    }
    idx = batch.get("index")
    item["index"] = idx.cpu().numpy() if idx is not None else np.full(len(true), -1, dtype=np.int64)
    return item


def loggable_metrics(metrics: Mapping[str, Any], label_names: Sequence[str], class_tasks: Iterable[str]
                     ) -> list[tuple[str, float]]:
    """``(name, value)`` pairs to log from :func:`compute_metrics`' result: ``<key>_<LABEL>`` for MAE,
    bias, z std and 1σ coverage of each label with stars and a finite value, ``acc_<task>`` per class
    task with stars. Depends only on ``metrics`` (the same on every rank after gathering)."""
    out = []
    for name in label_names:
        m = metrics["labels"].get(name)
        if not m or m["n"] == 0:
            continue
        out += [(f"{key}_{name}", m[key]) for key in ("mae", "bias", "z_std", "coverage_68") if math.isfinite(m[key])]
    for task in class_tasks:
        m = metrics["classes"].get(task)
        if m and m["n"]:
            out.append((f"acc_{task}", m["accuracy"]))
    return out
