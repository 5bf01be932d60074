"""The ``crlb`` block of an evaluation report: the network's error against the Cramér–Rao bound of the
Kurucz spectral model at the catalogue labels, per label and S/N bin, giants and all stars."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stellarnet.dataset.manifest import load_manifest
from stellarnet.evaluation.crlb import CATALOGUE_NOTE, GIANT_STAGES, crlb_report, subset_rows

log = logging.getLogger(__name__)


CRLB_DEFAULTS: dict[str, Any] = {"enabled": True, "max_stars": 2000, "seed": 0, "noise": "flux_err",
                                 "labels_at": "catalogue", "chunk": 128}


def crlb_section(crlb_cfg: Mapping[str, Any], dataset: str | Path, split: str, pred_labels: np.ndarray,
                 pred_names: Sequence[str], data: Mapping[str, np.ndarray],
                 snr_edges: Sequence[float]) -> dict[str, Any]:
    """The ``crlb`` block of the evaluation report: per-star Cramér–Rao bound at the catalogue
    labels (Kurucz emulator + continuum normalization, :func:`stellarnet.evaluation.spectral_model.emulator_model`)
    for a seeded subset (``max_stars``) of the split's stars inside the emulator's label box, and
    the network's MAE/CRLB per label per S/N bin for giants (stage RGB/RC from the shard classes)
    and all stars. ``pred_labels`` (N, len(pred_names)) are the network's predictions for the rows
    of ``data`` (the split as loaded by :func:`stellarnet.evaluation.split_predictions.load_split`)."""
    from stellarnet.evaluation.spectral_model import emulator_model  # entry-point layer: the physical model

    t0 = time.perf_counter()
    c = {**CRLB_DEFAULTS, **dict(crlb_cfg)}
    if c["labels_at"] != "catalogue":
        raise ValueError(f"crlb.labels_at={c['labels_at']!r}: only 'catalogue' (the labels a user has) is supported")
    model = emulator_model()
    manifest = load_manifest(dataset)
    names = list(manifest["label_names"])
    n_split = int(len(data["snr"]))
    head = {"model": model.name, "labels_at": "catalogue", "reference": "catalogue", "split": split,
            "n_split": n_split, "max_stars": c["max_stars"], "seed": int(c["seed"]), "note": CATALOGUE_NOTE}
    missing = [n for n in model.label_names if n not in names]
    if missing:
        return {**head, "skipped": True, "reason": f"dataset has no {missing} labels (the spectral model needs "
                                                   f"{list(model.label_names)})"}
    rows = subset_rows(n_split, c["max_stars"], int(c["seed"]))
    cols = [names.index(n) for n in model.label_names]
    cat = np.asarray(data["labels"], np.float64)[rows][:, cols]
    cat_err = np.asarray(data["label_err"], np.float64)[rows][:, cols] if "label_err" in data else None
    pred = np.full_like(cat, np.nan)
    pred_names = list(pred_names)
    for j, n in enumerate(model.label_names):
        if n in pred_names:
            pred[:, j] = np.asarray(pred_labels, np.float64)[rows, pred_names.index(n)]
    groups: dict[str, np.ndarray] = {}
    tasks = manifest.get("class_tasks") or {}
    if "stage" in tasks and np.ndim(data.get("classes")) == 2:
        stage_names = list(tasks["stage"])
        stage = np.asarray(data["classes"])[rows, list(tasks).index("stage")]
        giant_codes = [stage_names.index(s) for s in GIANT_STAGES if s in stage_names]
        groups["giants"] = np.isin(stage, giant_codes)
    block = crlb_report(model.fn, model.bounds, labels_at=cat, reference=cat, reference_err=cat_err, pred=pred,
                        snr=np.asarray(data["snr"])[rows], flux_err=np.asarray(data["flux_err"])[rows],
                        pix_mask=np.asarray(data["pix_mask"])[rows], grid=manifest["grid"], model_grid=model.grid,
                        label_names=model.label_names, groups=groups, edges=snr_edges, noise=str(c["noise"]),
                        chunk=int(c["chunk"]), progress=log.info)
    block = {**head, "n_selected": int(rows.size), **{k: v for k, v in block.items() if k != "n"},
             "seconds": time.perf_counter() - t0}  # emulator loading included
    log.info("CRLB: %d of %d stars inside the emulator box (%d outside, %d without labels), %.1f s",
             block["n_in_box"], block["n_selected"], block["n_outside_box"], block["n_no_labels"], block["seconds"])
    return block
