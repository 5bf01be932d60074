"""Training, as a library function: ``train(cfg) -> (metrics, objects)`` (``python -m stellarnet.train``).

When no real allStar is configured it simulates the embedded survey and builds its shards first.
Multi-device runs (``trainer=ddp``; see ``docs/performance.md``, "Multi-device training"):

* ``ddp`` (Lightning's launcher, ``torchrun``, ``srun``): every rank runs ``train``. Rank 0 alone
  builds the shards (:func:`prepare_shards`; the others wait for it), and only rank 0 does the
  post-fit work: ``test_metrics.json``, the calibrated model folder, the evaluation report.
* ``ddp_spawn``: ``train`` runs once; Lightning spawns the ranks for ``fit`` and ``test`` and sends
  rank 0's gathered test metrics and outputs back to this process (:func:`return_spawn_results`),
  which then does the post-fit work."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Mapping

import hydra
import lightning as L
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from omegaconf import DictConfig

from stellarnet.common.files import env_global_rank_is_zero, to_jsonable, to_plain, write_json
from stellarnet.common.hardware import CpuThreadsPerRank, configure_cpu_threads, resolve_cpu_precision
from stellarnet.dataset.ensure import check_data_config, ensure_shards
from stellarnet.dataset.manifest import MANIFEST, load_manifest

log = logging.getLogger(__name__)


SHARDS_READY = ".ranks_ready.json"  # in the shard directory: rank 0 finished ensure_shards for this launch


DEFAULT_SHARDS_WAIT_S = 7200.0


def launch_id() -> str | None:
    """Identifier of this multi-process launch shared by all its ranks (``None`` when unknown).

    srun: job id + step id (+ restart count). torchrun: run id (``--rdzv-id``) + rendezvous address
    + restart count, and on a single node also the agent's process id (the workers' parent), since
    a plain ``torchrun`` uses the run id "none" and port 29500 every time; give multi-node
    ``torchrun`` launches a unique ``--rdzv-id`` (e.g. the job id).
    """
    env = os.environ
    if env.get("TORCHELASTIC_RUN_ID"):
        parts = ["torchrun", env["TORCHELASTIC_RUN_ID"], env.get("MASTER_ADDR", ""), env.get("MASTER_PORT", ""),
                 env.get("TORCHELASTIC_RESTART_COUNT", "0")]
        if env.get("GROUP_WORLD_SIZE", "1") == "1":
            parts.append(f"agent{os.getppid()}")
        return ":".join(parts)
    if env.get("SLURM_JOB_ID") and env.get("SLURM_STEP_ID") and env.get("SLURM_PROCID"):
        return ":".join(["slurm", env["SLURM_JOB_ID"], env["SLURM_STEP_ID"], env.get("SLURM_RESTART_COUNT", "0")])
    return None


def wait_for_shards(out_dir: str | Path, timeout_s: float = DEFAULT_SHARDS_WAIT_S, poll_s: float = 2.0,
                    launch: str | None = None) -> dict[str, Any]:
    """Block until rank 0 has the shard dataset ready; return its manifest.

    With a ``launch`` id (torchrun, srun: all ranks start together), wait for rank 0's marker
    ``<out_dir>/.ranks_ready.json`` naming this launch, so a manifest left by an older build that
    rank 0 is about to replace is not used; without one (the ranks Lightning's launcher starts after
    rank 0 built the shards), wait for ``manifest.json``. Raises ``TimeoutError`` after
    ``timeout_s`` seconds, naming the usual causes. ``timeout_s <= 0`` means "the shards were
    built before the job" (e.g. on every node's local disk): the manifest is read if it exists,
    without waiting or looking for the marker.
    """
    out_dir = Path(out_dir)
    if timeout_s <= 0:
        if not (out_dir / MANIFEST).exists():
            raise FileNotFoundError(f"{out_dir / MANIFEST} does not exist: with shards_wait_timeout_s <= 0 the "
                                    "shards must be built before the job")
        return load_manifest(out_dir)
    marker = out_dir / SHARDS_READY
    t0 = time.monotonic()
    while True:
        if launch is None:
            ready = (out_dir / MANIFEST).exists()
        else:
            try:
                ready = json.loads(marker.read_text()).get("launch") == launch
            except (OSError, ValueError):
                ready = False
        if ready:
            return load_manifest(out_dir)
        if time.monotonic() - t0 > timeout_s:
            what = f"{marker} for launch {launch!r}" if launch else str(out_dir / MANIFEST)
            raise TimeoutError(
                f"waited {timeout_s:.0f} s for rank 0 to build the shard dataset ({what} never appeared). "
                "Rank 0 may have failed (see its log), or data.shards.out_dir is not on a filesystem that "
                "every node sees: build the shards beforehand (python -m stellarnet.build_shards, or a "
                "single-process run) on shared storage, or raise shards_wait_timeout_s"
            )
        time.sleep(poll_s)


def prepare_shards(data_cfg: Mapping[str, Any], timeout_s: float = DEFAULT_SHARDS_WAIT_S) -> dict[str, Any]:
    """Make sure the shard dataset exists: global rank 0 builds it, every other rank waits for it.

    Called before ``trainer.fit`` because the model is built from the manifest (``data_spec``), so
    no process group exists yet: the rank comes from the launcher's environment
    (:func:`env_global_rank_is_zero`) and the other ranks wait on a file (:func:`wait_for_shards`).
    (The DataModule's ``prepare_data`` hook is too late for that, and would need the whole survey
    config.) Only *global* rank 0 builds, because the shard directory is meant to be on storage
    shared by all nodes (two nodes writing one directory would corrupt it); with node-local
    storage, build the shards on every node before the job and set ``shards_wait_timeout_s=0``.
    """
    check_data_config(data_cfg)  # every rank: a bad value fails here, not as a wait that times out
    out_dir = Path(data_cfg["shards"]["out_dir"])
    launch = launch_id()
    if not env_global_rank_is_zero():
        log.info("waiting for rank 0 to build the shards in %s", out_dir)
        return wait_for_shards(out_dir, timeout_s, launch=launch)
    manifest = ensure_shards(data_cfg)
    if launch is not None:
        write_json(out_dir / SHARDS_READY, {"launch": launch, "build_hash": manifest.get("build_hash")})
    return manifest


_SPAWN_RESULTS = ("test_metrics", "test_outputs")


class _SpawnResultsLauncher(_MultiProcessingLauncher):
    """Lightning's ``ddp_spawn`` launcher that also sends rank 0's module results back (see
    :func:`return_spawn_results`)."""

    def get_extra_results(self, trainer: L.Trainer) -> dict[str, Any]:
        extra = super().get_extra_results(trainer)
        module = trainer.lightning_module
        extra["stellarnet_module_results"] = {k: getattr(module, k) for k in _SPAWN_RESULTS if hasattr(module, k)}
        return extra

    def update_main_process_results(self, trainer: L.Trainer, extra: dict[str, Any]) -> None:
        super().update_main_process_results(trainer, extra)
        for key, value in (extra.get("stellarnet_module_results") or {}).items():
            setattr(trainer.lightning_module, key, value)


def return_spawn_results(trainer: L.Trainer) -> bool:
    """Under ``ddp_spawn``, have rank 0 send the module's ``test_metrics`` / ``test_outputs`` back.

    The spawned ranks run ``fit``/``test`` on copies of the module; Lightning sends back only the
    weights, the best checkpoint path and ``callback_metrics``. This swaps the strategy's launcher
    for :class:`_SpawnResultsLauncher`, which also sends these two attributes (dicts of numbers /
    numpy arrays, already gathered over all ranks by the module). Returns whether it did (False
    for every other strategy). Relies on Lightning's ``_MultiProcessingLauncher`` hooks
    ``get_extra_results`` / ``update_main_process_results`` (``tests/test_ddp.py`` covers it).
    """
    import importlib

    launcher = getattr(trainer.strategy, "launcher", None)
    if type(launcher) is not _MultiProcessingLauncher:
        return False
    # the class from the importable module, not from __main__ (python -m stellarnet.train): the
    # launcher is pickled into the spawned processes, which must be able to import it
    cls = importlib.import_module("stellarnet.train")._SpawnResultsLauncher
    new = cls.__new__(cls)
    new.__dict__.update(launcher.__dict__)
    trainer.strategy._launcher = new
    return True


def export_calibrated_model(ckpt: str | Path, dataset_dir: str | Path, out: Path) -> Path:
    """Model folder (weights + plain config + data spec) with the network's σ model per label (a scale and
    a noise term, :func:`~stellarnet.evaluation.split_predictions.validation_calibration`) and a
    temperature per class task (class probabilities) fitted on the val split."""
    from stellarnet.evaluation.split_predictions import validation_calibration
    from stellarnet.network.inference import Predictor
    from stellarnet.network.model_folder import load_module, save_model_folder

    module = load_module(ckpt)
    scale, noise_scale, temperature = validation_calibration(Predictor(module), dataset_dir, "val")
    for spec in (module.hparams["data_spec"], module.data_spec):
        spec["sigma_scale"] = [float(v) for v in scale]
        if noise_scale is not None:
            spec["sigma_noise_scale"] = [float(v) for v in noise_scale]
        spec["class_temperature"] = temperature
    return save_model_folder(module, out)


def write_evaluation(model_dir: Path, dataset_dir: str | Path, output_dir: Path) -> dict[str, float]:
    """Full test-split report of the calibrated model (evaluation.md/json + figures); headline metrics."""
    from stellarnet.evaluation.figures import write_standard_figures
    from stellarnet.evaluation.report import report_to_markdown, write_report
    from stellarnet.evaluation.split_predictions import network_report
    from stellarnet.network.model_folder import load_model

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
    """Fit (and test) the model described by ``cfg``; returns (metrics, objects).

    Multi-device: every rank returns its ``callback_metrics`` (reduced over the ranks); the
    post-fit work (``test_metrics.json``, the calibrated model folder, the evaluation report and
    its ``eval/*`` metrics) happens on global rank 0 only, in the main process under ``ddp_spawn``.
    ``test_metrics.json`` holds the metrics of the whole test split (each star once), gathered
    over the ranks by the module.
    """
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    prepare_shards(to_plain(cfg.data), float(cfg.get("shards_wait_timeout_s", DEFAULT_SHARDS_WAIT_S)))

    trainer_kwargs: dict[str, Any] = {}
    callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    cpu = cfg.trainer.get("accelerator") == "cpu"
    num_workers = int(cfg.data.datamodule.get("num_workers", 0))
    if cpu:
        # this process now; every training process again once started (ddp_spawn ranks do not inherit it)
        n = configure_cpu_threads(num_workers, cfg.get("cpu_threads", "auto"))
        callbacks.append(CpuThreadsPerRank(num_workers, cfg.get("cpu_threads", "auto")))
        trainer_kwargs["precision"] = resolve_cpu_precision(cfg.trainer.get("precision", "32-true"))
        if cfg.trainer.get("sync_batchnorm"):  # SyncBatchNorm needs GPUs
            log.warning("trainer.sync_batchnorm is GPU-only: disabled for CPU training")
            trainer_kwargs["sync_batchnorm"] = False
        log.info("CPU training: %d torch threads, precision %s", n, trainer_kwargs["precision"])

    datamodule = hydra.utils.instantiate(cfg.data.datamodule)
    model = hydra.utils.instantiate(cfg.model, data_spec=datamodule.data_spec(), _convert_="all")
    loggers = [hydra.utils.instantiate(c) for c in (cfg.get("logger") or {}).values()]
    if not loggers:  # logger=none / ~logger: callbacks that log need a logger (Lightning refuses them)
        from lightning.pytorch.callbacks import LearningRateMonitor

        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
        log.info("no logger configured: learning-rate monitoring is off, no TensorBoard files")
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                                                 **trainer_kwargs)
    return_spawn_results(trainer)
    objects = {"cfg": cfg, "datamodule": datamodule, "model": model, "trainer": trainer}

    if cfg.get("train", True):
        trainer.fit(model=model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics = {k: v for k, v in trainer.callback_metrics.items()}

    ckpt = None
    if cfg.get("test", True):
        ckpt = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if not ckpt or cfg.trainer.get("fast_dev_run"):
            ckpt = None
        trainer.test(model=model, datamodule=datamodule, ckpt_path=ckpt)
        metrics.update(trainer.callback_metrics)
    if not trainer.is_global_zero:  # post-fit work: rank 0 only
        return {k: to_jsonable(v) for k, v in metrics.items()}, objects

    if cpu:  # the loader workers and the other ranks are done: the post-fit work may use this node's CPUs
        configure_cpu_threads(0, cfg.get("cpu_threads", "auto"), local_ranks=1)
    if cfg.get("test", True):
        test_metrics = getattr(model, "test_metrics", None) or {}
        if not test_metrics:
            log.warning("the module produced no test metrics (empty test split?)")
        write_json(output_dir / "test_metrics.json", {"checkpoint": ckpt, **test_metrics})
        objects["test_outputs"] = getattr(model, "test_outputs", None)
    if trainer.checkpoint_callback is not None and not cfg.trainer.get("fast_dev_run"):
        best = trainer.checkpoint_callback.best_model_path
        if best and cfg.get("export_model", True):
            # σ calibration: the best checkpoint predicts the whole val split here, in one process
            # (each star once, the exported predictor's own precision), not a rank's share
            objects["model_dir"] = export_calibrated_model(best, datamodule.dataset_dir, output_dir / "model")
            log.info("best checkpoint: %s; calibrated model folder: %s", best, objects["model_dir"])
            refine_cfg = cfg.get("refine")
            if refine_cfg is not None and refine_cfg.get("enabled", False):
                from stellarnet.workflows.refinement import build_refinement

                objects["refinement"] = build_refinement(objects["model_dir"], datamodule.dataset_dir, refine_cfg,
                                                         tensorboard_dir=output_dir / "tensorboard" / "refinement")
            if cfg.get("test", True):
                metrics.update(write_evaluation(objects["model_dir"], datamodule.dataset_dir, output_dir))
            from stellarnet.dataset.manifest import load_manifest
            from stellarnet.evaluation.card import write_model_card

            write_model_card(objects["model_dir"], load_manifest(datamodule.dataset_dir),
                             simulated=not cfg.data.survey.get("allstar"),
                             metrics={k: to_jsonable(v) for k, v in metrics.items()})
            if cfg.get("shifts") is not None and cfg.shifts.get("enabled", False):
                from stellarnet.benchmarks.shift_suite import shift_table_from_config

                objects["shift_table"] = shift_table_from_config(objects["model_dir"], output_dir, to_plain(cfg.shifts))
                log.info("shift suite: %s", objects["shift_table"]["markdown"])
    return {k: to_jsonable(v) for k, v in metrics.items()}, objects
