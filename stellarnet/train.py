"""Entry point: ``python -m stellarnet.train +experiment=apogee``.

A thin lightning-hydra-template style entry point: ``train(cfg) -> (metrics, objects)``. When no
real allStar is configured it simulates the embedded survey and builds its shards first.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from stellarnet.hardware import configure_cpu_threads, resolve_cpu_precision
from stellarnet.paths import CONF_DIR
from stellarnet.utils import to_jsonable, to_plain, write_json
from stellarnet.workflow import ensure_shards

log = logging.getLogger(__name__)


def export_calibrated_model(ckpt: str | Path, dataset_dir: str | Path, out: Path) -> Path:
    """Model folder (weights + plain config + data spec) with a σ scale fitted on the val split."""
    from stellarnet.eval.network import validation_sigma_scale
    from stellarnet.models.inference import Predictor, load_module, save_model_folder

    module = load_module(ckpt)
    scale = validation_sigma_scale(Predictor(module), dataset_dir, "val")
    module.hparams["data_spec"]["sigma_scale"] = [float(v) for v in scale]
    module.data_spec["sigma_scale"] = module.hparams["data_spec"]["sigma_scale"]
    return save_model_folder(module, out)


def write_evaluation(model_dir: Path, dataset_dir: str | Path, output_dir: Path) -> dict[str, float]:
    """Full test-split report of the calibrated model (evaluation.md/json + figures); headline metrics."""
    from stellarnet.eval.figures import write_standard_figures
    from stellarnet.eval.network import network_report
    from stellarnet.eval.report import report_to_markdown, write_report
    from stellarnet.models.inference import load_model

    predictor = load_model(model_dir)
    report, pred, data = network_report(predictor, dataset_dir, split="test", calib_split=None)
    write_report(report, output_dir, "evaluation", markdown=report_to_markdown(report, "stellarnet (test split)"))
    write_standard_figures(output_dir / "figures", pred["labels"], data["labels"], predictor.label_names,
                           snr=data["snr"], report=report)
    out: dict[str, float] = {}
    for name, m in (report.get("regression", {}).get("overall") or {}).items():
        out[f"eval/mae_{name}"] = m.get("mae")
    for name, m in (report.get("calibration") or {}).items():
        if isinstance(m, dict):
            out[f"eval/z_std_{name}"] = m.get("z_std")
            out[f"eval/coverage_1sigma_{name}"] = m.get("coverage_1sigma")
    for task, m in (report.get("classification") or {}).items():
        if isinstance(m, dict) and "accuracy" in m:
            out[f"eval/accuracy_{task}"] = m["accuracy"]
    return out


def train(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fit (and test) the model described by ``cfg``; returns (metrics, objects)."""
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    ensure_shards(to_plain(cfg.data))

    trainer_kwargs: dict[str, Any] = {}
    if cfg.trainer.get("accelerator") == "cpu":
        n = configure_cpu_threads(int(cfg.data.datamodule.get("num_workers", 0)), cfg.get("cpu_threads", "auto"))
        trainer_kwargs["precision"] = resolve_cpu_precision(cfg.trainer.get("precision", "32-true"))
        if cfg.trainer.get("sync_batchnorm"):  # SyncBatchNorm needs GPUs
            log.warning("trainer.sync_batchnorm is GPU-only: disabled for CPU training")
            trainer_kwargs["sync_batchnorm"] = False
        log.info("CPU training: %d torch threads, precision %s", n, trainer_kwargs["precision"])

    datamodule = hydra.utils.instantiate(cfg.data.datamodule)
    model = hydra.utils.instantiate(cfg.model, data_spec=datamodule.data_spec(), _convert_="all")
    callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    loggers = [hydra.utils.instantiate(c) for c in (cfg.get("logger") or {}).values()]
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                                                 **trainer_kwargs)
    objects = {"cfg": cfg, "datamodule": datamodule, "model": model, "trainer": trainer}

    if cfg.get("train", True):
        trainer.fit(model=model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics = {k: v for k, v in trainer.callback_metrics.items()}

    if cfg.get("test", True) and trainer.is_global_zero is not None:
        ckpt = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if not ckpt or cfg.trainer.get("fast_dev_run"):
            ckpt = None
        trainer.test(model=model, datamodule=datamodule, ckpt_path=ckpt)
        metrics.update(trainer.callback_metrics)
        if trainer.is_global_zero:
            test_metrics = getattr(model, "test_metrics", None) or {}
            write_json(output_dir / "test_metrics.json", {"checkpoint": ckpt, **test_metrics})
            objects["test_outputs"] = getattr(model, "test_outputs", None)
    if trainer.is_global_zero and trainer.checkpoint_callback is not None and not cfg.trainer.get("fast_dev_run"):
        best = trainer.checkpoint_callback.best_model_path
        if best and cfg.get("export_model", True):
            objects["model_dir"] = export_calibrated_model(best, datamodule.dataset_dir, output_dir / "model")
            log.info("best checkpoint: %s; calibrated model folder: %s", best, objects["model_dir"])
            if cfg.get("test", True):
                metrics.update(write_evaluation(objects["model_dir"], datamodule.dataset_dir, output_dir))
    return {k: to_jsonable(v) for k, v in metrics.items()}, objects


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics, _ = train(cfg)
    value = metrics.get(cfg.get("optimized_metric"))
    return float(value) if value is not None else None


if __name__ == "__main__":
    main()
