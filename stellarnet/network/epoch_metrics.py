"""The metrics the LightningModule logs at the end of a validation or test epoch (``val/*``, ``test/*``,
and ``test_metrics.json`` of a training run): per label MAE, bias, RMSE, z std and 1σ coverage, per
class task the accuracy, in physical units. The evaluation report's fuller metrics are
:mod:`stellarnet.evaluation.metrics`."""

from __future__ import annotations
import math
from typing import Any
import numpy as np


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
