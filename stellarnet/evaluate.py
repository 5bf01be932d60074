"""Entry point: ``python -m stellarnet.evaluate ckpt_path=... [split=test]``.

Scores a checkpoint on a split of the shard dataset: regression metrics (overall, per S/N bin,
per stage), σ calibration, classification metrics, and (``crlb.enabled``) the achieved error
relative to the Cramér–Rao bound (MAE/CRLB per label per S/N bin, giants and all stars, against
the catalogue labels; spectral model from :mod:`stellarnet.evaluation.spectral_model`); writes
``evaluation.md/json`` and PNG figures to the run directory and logs the figures to TensorBoard.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from stellarnet.common.errors import report_errors
from stellarnet.dataset.manifest import load_manifest
from stellarnet.evaluation.crlb import CATALOGUE_NOTE, GIANT_STAGES, crlb_report, subset_rows
from stellarnet.evaluation.figures import write_standard_figures
from stellarnet.evaluation.split_predictions import network_report
from stellarnet.evaluation.report import report_to_markdown, write_report
from stellarnet.network.model_folder import load_model
from stellarnet.common.paths import CONF_DIR
from stellarnet.common.files import to_jsonable

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


def evaluate(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Path]]:
    """Evaluate ``cfg.ckpt_path`` on ``cfg.split`` of ``cfg.dataset_dir`` (default: the configured shards)."""
    if not cfg.get("ckpt_path"):
        raise ValueError("ckpt_path is required: python -m stellarnet.evaluate ckpt_path=<.ckpt or model folder>")
    out_dir = Path(cfg.get("output_dir") or cfg.paths.output_dir)
    from stellarnet.io.predictions import check_not_overwriting

    overwrite = cfg.get("overwrite", False)  # checked (a boolean) by check_not_overwriting
    check_not_overwriting([out_dir / "evaluation.json", out_dir / "evaluation.md"], overwrite)
    predictor = load_model(cfg.ckpt_path, refine=bool(cfg.get("refine", True)))
    dataset = cfg.get("dataset_dir") or cfg.data.shards.out_dir
    report, pred, data = network_report(predictor, dataset, split=cfg.split, calib_split=cfg.get("calib_split"),
                                        mc_samples=int(cfg.mc_samples), batch_size=int(cfg.batch_size),
                                        eval_cfg=OmegaConf.to_container(cfg.eval, resolve=True))
    report["meta"].update({"checkpoint": str(cfg.ckpt_path), "dataset": str(dataset)})
    crlb_cfg = OmegaConf.to_container(cfg.crlb, resolve=True) if cfg.get("crlb") is not None else {}
    if crlb_cfg.get("enabled", CRLB_DEFAULTS["enabled"]):
        edges = cfg.eval.get("snr_edges") or (0, 50, 100, 200, float("inf"))
        report["crlb"] = to_jsonable(crlb_section(crlb_cfg, dataset, str(cfg.split), pred["labels"],
                                                  predictor.label_names, data, [float(e) for e in edges]))
    paths = write_report(report, out_dir, "evaluation", markdown=report_to_markdown(report, "stellarnet network"))
    if cfg.get("shifts") is not None and cfg.shifts.get("enabled", False):  # docs/robustness.md
        from stellarnet.benchmarks.shift_suite import shift_table_from_config

        shift_paths = shift_table_from_config(predictor, out_dir, OmegaConf.to_container(cfg.shifts, resolve=True))
        paths.update({f"shift_{k}": v for k, v in (shift_paths or {}).items()})
    figures = write_standard_figures(out_dir / "figures", pred["labels"], data["labels"],
                                     predictor.label_names, snr=data["snr"], report=report)
    try:
        from matplotlib.image import imread
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(str(out_dir / "tensorboard")) as tb:
            for name, path in figures.items():
                tb.add_image(f"evaluation/{name}", imread(path), dataformats="HWC")
    except ImportError:  # pragma: no cover - tensorboard is a dependency
        pass
    return report, {**paths, **figures}


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="evaluate")
@report_errors
def main(cfg: DictConfig) -> None:
    report, paths = evaluate(cfg)
    print(Path(paths["markdown"]).read_text())


if __name__ == "__main__":
    main()
