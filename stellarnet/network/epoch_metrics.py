"""The outputs a LightningModule accumulates over an epoch (per-batch dicts of numpy arrays, merged along
the sample axis) and the metrics it logs at the end of a validation or test epoch (``val/*``, ``test/*``,
and ``test_metrics.json`` of a training run): per label MAE, bias, RMSE, z std and 1σ coverage, per
class task the accuracy, in physical units. The evaluation report's fuller metrics are
:mod:`stellarnet.evaluation.metrics`."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch


# ----------------------------------------------------------------------------------------------
# metrics on accumulated outputs
# ----------------------------------------------------------------------------------------------
def compute_metrics(outputs: dict[str, Any], data_spec: dict[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    """Summary metrics from accumulated outputs (physical units; see ``StellarNetModule.test_outputs``).

    Returns ``{"labels": {name: {"n", "mae", "bias", "rmse", "z_std", "coverage_68", "unit"}},
    "classes": {task: {"n", "accuracy"}}}`` with plain floats (NaN where no star has the label).
    ``z = (pred - true) / sqrt(sigma_total**2 + label_err**2)``; ``coverage_68`` is the fraction with
    ``|z| < 1`` (0.683 for calibrated Gaussian errors).
    """
    units = data_spec.get("label_units") or [""] * len(data_spec["label_names"])
    res: dict[str, dict[str, dict[str, float]]] = {"labels": {}, "classes": {}}
    for j, name in enumerate(data_spec["label_names"]):
        m = outputs["label_mask"][:, j].astype(bool)
        d = outputs["labels_pred"][m, j] - outputs["labels_true"][m, j]
        s = np.sqrt(outputs["sigma_total"][m, j] ** 2 + np.nan_to_num(outputs["label_err"][m, j]) ** 2)
        z = d / np.where(s > 0, s, np.nan)
        n = int(m.sum())
        res["labels"][name] = {
            "n": n,
            "mae": float(np.mean(np.abs(d))) if n else math.nan,
            "bias": float(np.mean(d)) if n else math.nan,
            "rmse": float(np.sqrt(np.mean(d**2))) if n else math.nan,
            "z_std": float(np.nanstd(z)) if n > 1 else math.nan,
            "coverage_68": float(np.nanmean(np.abs(z) < 1)) if n else math.nan,
            "unit": units[j],
        }
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
