"""Prediction, as a library function: ``predict(cfg) -> (summary, paths)`` (``python -m stellarnet.predict ckpt_path=... input=...``).

``input`` is an allStar-format catalogue (spectra under ``spectra_root``), a shard dataset
directory, or aspcapStar/apStar files (glob, comma list or a .txt list). Writes
``predictions.fits``, ``predictions.csv`` and ``predictions.columns.json`` to the run directory
(or ``output_dir``).

The input is cut into chunks (:class:`stellarnet.dataset.chunks.ChunkDataset`) that ``Trainer.predict``
runs through the model folder (:mod:`stellarnet.network.prediction`): ``num_workers`` DataLoader
processes read and prepare the spectrum files (``auto``: ⌈0.4 × the CPUs⌉) while the model runs
(``torch_threads: auto``: the process's CPUs the readers leave; all of them when refining); each
chunk's rows go to a part file, merged in input order into the catalogue at the end. ``trainer=ddp trainer.devices=N [trainer.num_nodes=M]``
spreads the chunks over processes, GPUs and nodes (docs/scaling.md); ``trainer.accelerator: auto``
uses the GPU when torch sees one. A killed run, rerun with the same command, predicts only the
chunks it had not finished.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from stellarnet.common.errors import StellarnetError
from stellarnet.dataset.sources import resolve_num_workers, source_kind

log = logging.getLogger(__name__)


#: ``batch_size: auto``: the fastest batch sizes of the model-alone benchmark on 2 CPU cores
#: (docs/performance.md: 128 for float32, 256 for bf16 autocast; 1,024 was ~2x slower).
AUTO_BATCH_SIZE = {"32": 128, "bf16": 256}


class PredictionError(StellarnetError, RuntimeError):
    """A prediction run produced nothing usable (e.g. every spectrum failed to read)."""


def catalogue_provenance(ckpt_path: Any, predictor: Any, inp: Any) -> dict[str, Any]:
    """What a catalogue records about how it was made: stellarnet version, the model and the
    SHA-256 of its weights (+ emulator), what it was trained on (the model folder's
    ``provenance.json``, written by training), whether labels are refined, the input, the date."""
    import datetime
    import hashlib
    import json

    from stellarnet.common.version import __version__
    from stellarnet.network.model_folder import EMULATOR_FILE, MODEL_FILE

    path = Path(str(ckpt_path))
    folder = path if path.is_dir() else path.parent
    files = [path / MODEL_FILE] if path.is_dir() else [path]
    if predictor.emulator is not None:
        files.append(folder / EMULATOR_FILE)
    digest = hashlib.sha256()
    for f in files:
        if f.is_file():
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 22), b""):
                    digest.update(block)
    out: dict[str, Any] = {"stellarnet_version": __version__, "model": str(path.resolve()),
                           "model_sha256": digest.hexdigest(), "refined": predictor.emulator is not None,
                           "input": inp if isinstance(inp, str) else f"{len(inp)} file(s)",
                           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")}
    card = folder / "provenance.json"
    if card.is_file():
        try:
            trained = json.loads(card.read_text())
        except (OSError, json.JSONDecodeError):
            trained = {}
        out["training_data"] = trained.get("training_data")
        out["training_cuts"] = trained.get("cuts_summary")
        out["training_data_simulated"] = bool(trained.get("simulated", False))
    return out


def _is_auto(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lower() == "auto"


def _check_count(cfg: DictConfig, key: str, minimum: int, default: Any = None, allow: tuple = ()) -> Any:
    """``cfg[key]`` as an int >= ``minimum``, or one of the special values in ``allow`` ('auto', None)."""
    value = cfg.get(key, default)
    if ("auto" in allow and _is_auto(value)) or (None in allow and value is None):
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        others = " or ".join("null" if a is None else repr(a) for a in allow)
        raise ValueError(f"{key} must be an integer >= {minimum}, got {key}={value!r}"
                         + (f" (or {others})" if others else ""))
    return value


def _plan(cfg: DictConfig, provenance: dict[str, Any], dataset: Any, batch_size: int, mc_samples: int,
          seed: Any, precision: str) -> dict[str, Any]:
    """What the catalogue's rows depend on: a run with the same plan may reuse another's parts."""
    return {"input": provenance["input"] if not isinstance(cfg.input, str) else str(cfg.input),
            "files": dataset.files[:3] + dataset.files[-3:] if dataset.files else None,
            "kind": dataset.kind, "n_stars": dataset.n_stars, "chunk_size": dataset.chunk_size,
            "n_chunks": dataset.n_chunks, "model_sha256": provenance["model_sha256"], "refined": provenance["refined"],
            "mc_samples": mc_samples, "seed": seed, "precision": precision, "batch_size": batch_size,
            "spectra_root": str(cfg.get("spectra_root")), "spectra_kind": str(cfg.get("spectra_kind")),
            "survey_residual": _survey_residual_stars(cfg) if provenance["refined"] else 0,
            "stellarnet_version": provenance["stellarnet_version"]}


def _survey_residual_stars(cfg: DictConfig) -> int:
    """How many stars the survey's shared residual is measured on (0: not measured)."""
    if not cfg.get("survey_residual", False):
        return 0
    return int(_check_count(cfg, "survey_residual_stars", 30, default=2000))


#: the survey's shared residual in a run's parts directory, and beside the catalogue
SURVEY_RESIDUAL_FILE = "survey_residual.npy"


def _survey_residual(predictor: Any, dataset: Any, n_stars: int, parts_dir: Path) -> dict[str, Any]:
    """Measure the relative residual the input's spectra share (:meth:`Predictor.measure_common_residual`)
    on ``n_stars`` of them (whole chunks spread evenly through the input) and set it on ``predictor``;
    a resumed run reads the one its first start measured (``parts_dir``), so every part is corrected alike."""
    import numpy as np

    from stellarnet.common.files import atomic_open
    from stellarnet.dataset.chunks import as_numpy

    path = parts_dir / SURVEY_RESIDUAL_FILE
    if path.is_file():
        correction = np.load(path, allow_pickle=False)
        if correction.shape != (predictor.n_pixels,):
            raise PredictionError(f"{path} holds {correction.shape} values, not one per pixel of the model's grid; "
                                  "delete it to measure the residual again")
        predictor.flux_correction = correction if np.any(correction != 0) else None
        return {"pixels_corrected": int(np.count_nonzero(correction)), "resumed": True}
    n_chunks = max(1, min(dataset.n_chunks, -(-n_stars // max(1, dataset.chunk_size))))
    picks = np.unique(np.linspace(0, dataset.n_chunks - 1, n_chunks).round().astype(int))
    chunks = [as_numpy(dataset[int(k)]) for k in picks]
    arrays = {key: np.concatenate([c[key] for c in chunks]) for key in ("flux", "flux_err", "pix_mask")}
    phot = (None if any(c.get("photometry") is None for c in chunks)
            else np.concatenate([c["photometry"] for c in chunks]))
    log.info("survey residual: measuring what %d stars (%d chunk(s)) share against the emulator",
             len(arrays["flux"]), len(picks))
    info = predictor.measure_common_residual(arrays["flux"], arrays["flux_err"], phot, arrays["pix_mask"])
    correction = (np.zeros(predictor.n_pixels, np.float32) if predictor.flux_correction is None
                  else predictor.flux_correction)
    with atomic_open(path, "wb") as fh:
        np.save(fh, correction, allow_pickle=False)
    log.info("survey residual: %d pixels corrected (rms %.4f, largest %.4f) from %d refined stars",
             info["pixels_corrected"], info["rms"], info["max_abs"], info["stars"])
    return info


def parts_directory(out_dir: Path, plan: dict[str, Any]) -> Path:
    """``<out_dir>/predictions.parts/<plan hash>``: a rerun with the same plan resumes there."""
    import hashlib
    import json

    digest = hashlib.sha256(json.dumps(plan, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return out_dir / PARTS_DIR / digest


#: where the part files of a run live (removed once merged into the catalogue)
PARTS_DIR = "predictions.parts"


def predict(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Predict the configured input with ``Trainer.predict`` (one chunk per step, a part file per chunk,
    merged in input order into ``predictions.fits``/``.csv`` by rank 0). ``trainer=ddp
    trainer.devices=N`` (``trainer.num_nodes=M`` under SLURM) spreads the chunks over N × M processes;
    a killed run resumes where it stopped (the finished parts are kept until the merge).

    Returns ({stars, read_errors, flagged_bad, num_workers, torch_threads, batch_size, precision,
    refined, chunks_skipped}, output paths); on ranks other than 0 the paths are empty.
    """
    if not cfg.get("ckpt_path"):
        raise ValueError("ckpt_path is required: python -m stellarnet.predict ckpt_path=<.ckpt or model folder> input=...")
    if not cfg.get("input"):
        raise ValueError("input is required: an allStar FITS, a shard dataset directory, or spectrum files")
    batch_size = _check_count(cfg, "batch_size", 1, allow=("auto",))
    chunk_size = int(_check_count(cfg, "chunk_size", 1))
    mc_samples = int(_check_count(cfg, "mc_samples", 0))
    torch_threads = _check_count(cfg, "torch_threads", 1, default="auto", allow=("auto", None))
    num_workers = resolve_num_workers(cfg.get("num_workers", "auto"))
    precision = str(cfg.get("precision", "32"))
    seed = _check_count(cfg, "seed", 0, allow=(None,))
    inp = cfg.input if isinstance(cfg.input, str) else list(cfg.input)
    input_kind = str(cfg.get("input_kind", "auto"))
    kind = source_kind(inp, input_kind)
    out_dir = Path(cfg.get("output_dir") or cfg.paths.output_dir)
    overwrite = cfg.get("overwrite", False)  # checked (a boolean) by check_not_overwriting
    if kind == "shards":  # already preprocessed: little for reader processes to do
        num_workers = 0

    import json
    import shutil

    import hydra.utils
    import torch
    from torch.utils.data import DataLoader

    from stellarnet.common.files import atomic_write_text
    from stellarnet.common.hardware import CpuThreadsPerRank
    from stellarnet.dataset.chunks import open_chunks, pass_through
    from stellarnet.io.bitmasks import STELLARNET_FLAG
    from stellarnet.io.predictions import PredictionWriter, check_not_overwriting, finished_parts, iter_parts
    from stellarnet.network.inference import precision_name
    from stellarnet.network.model_folder import load_model
    from stellarnet.network.prediction import PartWriter, PredictionModule
    from stellarnet.refinement.residuals import COMMON_RESIDUAL_MIN_STARS

    precision_name(precision)  # a bad spelling fails before anything starts
    check_not_overwriting([out_dir / "predictions.fits", out_dir / "predictions.csv",
                           out_dir / "predictions.columns.json"], overwrite)
    threads_before = torch.get_num_threads()
    try:
        predictor = load_model(cfg.ckpt_path, precision=precision, refine=bool(cfg.get("refine", True)))
        if _is_auto(batch_size):
            batch_size = AUTO_BATCH_SIZE[predictor.precision]
        # torch threads per process, set in each rank once it runs (CpuThreadsPerRank): auto = the
        # process's share of the CPUs less the reader processes (network alone); with the χ²
        # refinement, reading is ~10 % of the work and the model gets the whole share
        threads_cb = (None if torch_threads is None else
                      CpuThreadsPerRank(0 if predictor.emulator is not None else num_workers, torch_threads))
        dataset = open_chunks(inp, predictor.grid, chunk_size, spectra_root=cfg.get("spectra_root"),
                              spectra_kind=cfg.spectra_kind, input_kind=kind, spectra_layout=cfg.get("spectra_layout"))
        if dataset.n_stars == 0:
            raise PredictionError(f"the input {inp} holds no stars: nothing to predict")
        provenance = catalogue_provenance(cfg.ckpt_path, predictor, inp)
        plan = _plan(cfg, provenance, dataset, int(batch_size), mc_samples, seed, predictor.precision)
        parts_dir = parts_directory(out_dir, plan)
        parts_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(parts_dir / "plan.json", json.dumps(plan, indent=1, default=str))
        shared = _survey_residual(predictor, dataset, plan["survey_residual"], parts_dir) \
            if plan["survey_residual"] and dataset.n_stars >= COMMON_RESIDUAL_MIN_STARS else None
        if shared is not None:
            provenance["survey_residual"] = shared
        done = finished_parts(parts_dir)  # every rank lists them before any rank writes one
        todo = [k for k in range(dataset.n_chunks) if k not in done]
        log.info("predicting %d stars (%d chunks, %d already done) from %s input %s (%d reader process(es), "
                 "batch %d, %s)", dataset.n_stars, dataset.n_chunks, len(done), kind, inp, num_workers, batch_size,
                 "bf16 autocast" if predictor.precision == "bf16" else "float32")
        if provenance.get("training_data_simulated"):
            log.warning("this model was trained on simulated spectra (%s): its labels and σ on real survey "
                        "spectra are not validated", provenance.get("training_data"))
        writer_cb = PartWriter(parts_dir)
        trainer = hydra.utils.instantiate(cfg.trainer, callbacks=[writer_cb] + ([threads_cb] if threads_cb else []),
                                          logger=False,
                                          enable_model_summary=False, enable_checkpointing=False,
                                          default_root_dir=str(out_dir))
        if todo:
            loader = DataLoader(dataset.only(todo), batch_size=None, shuffle=False, num_workers=num_workers,
                                collate_fn=pass_through, prefetch_factor=2 if num_workers else None)
            module = PredictionModule(predictor, mc_samples=mc_samples, batch_size=int(batch_size), seed=seed)
            try:
                with warnings.catch_warnings():  # chunks are not batches of samples: no per-sample indices to track
                    warnings.filterwarnings("ignore", message="Couldn't infer the batch indices")
                    trainer.predict(module, dataloaders=loader, return_predictions=False)
            except (ConnectionError, EOFError, RuntimeError) as exc:
                if isinstance(exc, RuntimeError) and "DataLoader worker" not in str(exc):
                    raise
                raise PredictionError(
                    f"a reader process died while reading spectra (killed or out of memory?): {exc}. The "
                    f"finished chunks are kept in {parts_dir}: rerun the same command to predict the rest "
                    f"(num_workers=0 reads in this process)") from exc
        summary: dict[str, Any] = {"num_workers": num_workers, "torch_threads": torch.get_num_threads(),
                                   "batch_size": int(batch_size), "precision": predictor.precision,
                                   "refined": predictor.emulator is not None, "chunks_skipped": len(done),
                                   "chunks_written_here": writer_cb.written, "survey_residual": shared}
        if not trainer.is_global_zero:
            return summary, {}
        writer = PredictionWriter(out_dir, dataset.n_stars, overwrite=overwrite, label_names=predictor.label_names,
                                  label_units=predictor.label_units, provenance=provenance)
        counts: dict[str, Any] = {"read_errors": 0, "flagged": 0, "first_error": None}
        try:
            for frame in iter_parts(parts_dir, dataset.n_chunks):
                bad = frame["READ_ERROR"] != ""
                counts["read_errors"] += int(bad.sum())
                if counts["first_error"] is None and bad.any():
                    counts["first_error"] = str(frame.loc[bad, "READ_ERROR"].iloc[0])
                counts["flagged"] += int(STELLARNET_FLAG.any_set(frame["STELLARNET_FLAG"].to_numpy(),
                                                                 STELLARNET_FLAG.bad_bits).sum())
                writer.write(frame)
            paths = writer.close()
        except BaseException:
            writer.abort()
            raise
        if shared is not None:  # beside the catalogue: what was divided out of every spectrum
            shutil.copyfile(parts_dir / SURVEY_RESIDUAL_FILE, out_dir / SURVEY_RESIDUAL_FILE)
            paths["survey_residual"] = out_dir / SURVEY_RESIDUAL_FILE
        shutil.rmtree(out_dir / PARTS_DIR, ignore_errors=True)  # merged: the parts (of any plan) are done
        summary.update(stars=writer.written, read_errors=counts["read_errors"], flagged_bad=counts["flagged"])
    finally:
        torch.set_num_threads(threads_before)
    if summary["stars"] and summary["read_errors"] == summary["stars"]:
        raise PredictionError(
            f"every one of the {summary['read_errors']} spectra failed to read (the catalogue {paths['fits']} lists "
            f"why); the first: {counts['first_error']}. Check input, spectra_root and spectra_kind"
        )
    return summary, paths
