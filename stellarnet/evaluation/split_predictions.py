"""Run a trained network over one split of a shard dataset and score it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from stellarnet.dataset.manifest import load_manifest, verify_dataset
from stellarnet.dataset.reader import ShardReader
from stellarnet.evaluation.calibration import fit_sigma_scale
from stellarnet.evaluation.report import build_report

SPLIT_FIELDS = ("flux", "flux_err", "pix_mask", "photometry", "labels", "label_err", "classes", "snr")


def load_split(dataset_dir: str | Path, split: str, verify: bool = False) -> dict[str, np.ndarray]:
    """Whole split as arrays (labels in physical units, NaN = missing). The dataset is checked
    first: every shard present, readable, of the manifest's build and row count (``verify``: and
    its SHA-256)."""
    manifest = load_manifest(dataset_dir)
    if not verify:
        verify_dataset(dataset_dir, manifest, check_sha=False)
    reader = ShardReader(dataset_dir, split, manifest, verify=verify)
    try:
        return reader.read_all(SPLIT_FIELDS)
    finally:
        reader.close()


def predict_split(predictor: Any, data: Mapping[str, np.ndarray], mc_samples: int = 0,
                  batch_size: int = 1024) -> tuple[dict[str, Any], float]:
    """Predictions for a loaded split and the model rate (spectra/s)."""
    t0 = time.perf_counter()
    pred = predictor.predict(data["flux"], data["flux_err"], photometry=data["photometry"],
                             pix_mask=data["pix_mask"], mc_samples=mc_samples, batch_size=batch_size)
    rate = len(data["flux"]) / max(time.perf_counter() - t0, 1e-9)
    return pred, rate


def _concat(parts: list[Any]) -> Any:
    """Join per-block prediction dicts (arrays along stars; nested dicts key by key; scalars: the first)."""
    first = parts[0]
    if isinstance(first, dict):
        return {k: _concat([p[k] for p in parts]) for k in first}
    if isinstance(first, np.ndarray) and first.ndim >= 1:
        return np.concatenate(parts)
    return first


def predict_rows(predictor: Any, reader: ShardReader, rows: np.ndarray | None = None, block: int = 2048,
                 mc_samples: int = 0, batch_size: int = 1024,
                 keys: tuple[str, ...] | None = None) -> tuple[dict[str, Any], float]:
    """Predictions for ``rows`` (ascending; None: all) of a shard split, read ``block`` stars at a time
    (memory bounded by the block, whatever the split's size), and the model rate (spectra/s). The same
    numbers as :func:`predict_split` on the loaded rows when ``block`` is a multiple of ``batch_size``.
    ``keys``: keep only these entries of the predictions (the rest of each block is dropped at once)."""
    rows = np.arange(len(reader)) if rows is None else np.asarray(rows, np.int64)
    if len(rows) == 0:
        raise ValueError(f"no rows to predict in split {reader.split!r}")
    parts, seconds = [], 0.0
    for _, data in reader.blocks(rows, block, ("flux", "flux_err", "pix_mask", "photometry")):
        pred, rate = predict_split(predictor, data, mc_samples, batch_size)
        seconds += len(data["flux"]) / rate
        parts.append(pred if keys is None else {k: pred[k] for k in keys})
    return _concat(parts), len(rows) / max(seconds, 1e-9)


def class_codes(pred: Mapping[str, Any], tasks: list[str]) -> np.ndarray:
    """(N, C) predicted class codes (argmax of the probabilities), in task order."""
    return np.stack([np.argmax(pred["class_probs"][t], axis=1) for t in tasks], 1)


def validation_sigma_scale(predictor: Any, dataset_dir: str | Path, split: str = "val", mc_samples: int = 0,
                           batch_size: int = 1024) -> np.ndarray:
    """Per-label factor for the predicted aleatoric σ so that z = Δ/sqrt((sσ)² + err²) has unit
    spread on ``split`` (post-hoc calibration; Δ against the catalogue labels, err their errors)."""
    data = load_split(dataset_dir, split)
    pred, _ = predict_split(predictor, data, mc_samples, batch_size)
    return fit_sigma_scale(pred["labels"], data["labels"], pred["sigma_aleatoric"], data["label_err"])


def validation_calibration(predictor: Any, dataset_dir: str | Path, split: str = "val",
                           batch_size: int = 1024, lower_snr: bool = True,
                           seed: int = 0) -> tuple[np.ndarray, np.ndarray | None, dict[str, float]]:
    """The network's σ model and class temperatures, fitted on ``split``.

    Returns ``(s, k, {class task: temperature})``: σ = sqrt((s·σ_head)² + (k·n)²) per label, n = 1/SNR
    (``flux_noise``: the median error of the good pixels). With ``lower_snr`` the split is predicted twice
    — as it is and with every spectrum at a lower S/N, log-uniform between 10 and its own (as the training
    augmentation does it: :func:`~stellarnet.network.augment.lower_snr_copy`) — and (s, k) are the
    Gaussian maximum-likelihood fit to both against the catalogue labels and their errors
    (:func:`~stellarnet.evaluation.calibration.fit_sigma_two_term`): a split cut at S/N > 70 says nothing
    of how the σ must grow below it. Without, k is None and s is :func:`validation_sigma_scale`'s.
    Temperatures (:func:`stellarnet.evaluation.calibration.fit_temperature`) on the split as it is."""
    from stellarnet.evaluation.calibration import fit_sigma_two_term, fit_temperature

    data = load_split(dataset_dir, split)
    pred, _ = predict_split(predictor, data, 0, batch_size)
    tasks = list(predictor.class_tasks)
    temperature = {t: fit_temperature(pred["class_probs"][t], data["classes"][:, j]) for j, t in enumerate(tasks)
                   if t in pred["class_probs"]}
    if not lower_snr:
        return fit_sigma_scale(pred["labels"], data["labels"], pred["sigma_aleatoric"], data["label_err"]), None, temperature
    from stellarnet.network.augment import lower_snr_copy

    flux, err = lower_snr_copy(data["flux"], data["flux_err"], data["pix_mask"], seed=seed)
    low, _ = predict_split(predictor, {**data, "flux": flux, "flux_err": err}, 0, batch_size)
    both = lambda key: np.concatenate([pred[key], low[key]])  # noqa: E731
    cat = np.concatenate([data["labels"], data["labels"]])
    cat_err = np.concatenate([data["label_err"], data["label_err"]])
    noise = np.repeat(both("flux_noise")[:, None], cat.shape[1], axis=1)
    scale, noise_scale = fit_sigma_two_term(both("labels"), cat, both("sigma_aleatoric"), noise, cat_err,
                                            unresolved_floor="ml")
    return np.where(np.isfinite(scale), scale, 1.0), np.where(np.isfinite(noise_scale), noise_scale, 0.0), temperature


def _refine_meta(pred: Mapping[str, Any]) -> dict[str, Any]:
    """Report metadata on the χ² refinement stage (labels = refined ones where ``refine_flag`` is 0)."""
    if "refine_flag" not in pred:
        return {"labels": "network"}
    flag = np.asarray(pred["refine_flag"])
    return {"labels": "network + χ² refinement (spectrum emulator)",
            "refined_fraction": float((flag == 0).mean()) if flag.size else 0.0,
            "median_refine_chi2": float(np.nanmedian(pred["refine_chi2"])) if flag.size else float("nan")}


def network_report(predictor: Any, dataset_dir: str | Path, split: str = "test", calib_split: str | None = "val",
                   mc_samples: int = 0, batch_size: int = 1024, eval_cfg: Mapping[str, Any] | None = None,
                   ) -> tuple[dict[str, Any], dict[str, Any], dict[str, np.ndarray]]:
    """(report, predictions, split data) for the network on ``split``.

    When ``calib_split`` is given, a per-label σ scale is fitted there (post-hoc calibration) and
    the report shows calibration both raw and scaled.
    """
    eval_cfg = dict(eval_cfg or {})
    spec = predictor.data_spec
    tasks = list(spec["class_tasks"])
    scale = None
    if calib_split:
        cal = load_split(dataset_dir, calib_split)
        cpred, _ = predict_split(predictor, cal, mc_samples, batch_size)
        scale = fit_sigma_scale(cpred["labels"], cal["labels"], cpred["sigma_total"], cal["label_err"])
    data = load_split(dataset_dir, split)
    pred, rate = predict_split(predictor, data, mc_samples, batch_size)
    report = build_report(
        pred["labels"], data["labels"], spec["label_names"], sigma=pred["sigma_total"],
        label_err=data["label_err"], sigma_scale=scale, pred_classes=class_codes(pred, tasks),
        true_classes=data["classes"], class_tasks=tasks, class_names=spec["class_tasks"],
        class_probs=pred["class_probs"], snr=data["snr"], snr_edges=eval_cfg.get("snr_edges", (0, 50, 100, 200, float("inf"))),
        outlier_k=eval_cfg.get("outlier_k", 3.0), outlier_abs=eval_cfg.get("outlier_abs"),
        predict_rate=rate, meta={"split": split, "n": int(len(data["flux"])), "mc_samples": mc_samples,
                                 **_refine_meta(pred)},
    )
    return report, pred, data
