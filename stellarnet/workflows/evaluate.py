"""Evaluation, as a library function: ``evaluate(cfg) -> (report, paths)`` (``python -m stellarnet.evaluate ckpt_path=... [split=test]``).

Scores a checkpoint on a split of the shard dataset: regression metrics (overall, per S/N bin,
per stage), σ calibration, classification metrics, and (``crlb.enabled``) the achieved error
relative to the Cramér–Rao bound (MAE/CRLB per label per S/N bin, giants and all stars, against
the catalogue labels; spectral model from :mod:`stellarnet.evaluation.spectral_model`); writes
``evaluation.md/json`` and PNG figures to the run directory and logs the figures to TensorBoard.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from stellarnet.common.files import to_jsonable
from stellarnet.evaluation.crlb_section import CRLB_DEFAULTS, crlb_section
from stellarnet.evaluation.figures import write_standard_figures
from stellarnet.evaluation.report import report_to_markdown, write_report
from stellarnet.evaluation.split_predictions import network_report
from stellarnet.network.model_folder import load_model


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
