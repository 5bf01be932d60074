"""Entry point: build the χ² refinement stage of a trained model folder.

``python -m stellarnet.refinement ckpt_path=<run>/model`` (also run by ``stellarnet.train`` after
the model folder is written, ``refine.enabled``):

1. the network predicts the training split (a seeded subset of ``refine.max_stars``);
2. a :class:`~stellarnet.refinement.emulator.SpectrumEmulator` is fitted to those spectra with the
   network's labels as inputs (progress bar; χ² per pixel per epoch to TensorBoard) — in memory when
   they fit ``refine.memory_gb``, else streamed from the shards block by block;
   ``refine.members`` member emulators are trained further on random halves of them
   (:func:`~stellarnet.refinement.training.train_members`: the emulator's own error);
3. the training stars are refined and a quadratic calibration of the refined labels to the
   catalogue scale is fitted (:func:`~stellarnet.refinement.calibration.fit_label_calibration`);
4. the validation split is refined and the σ model sqrt((a·σ_fit)² + (b·σ_network)²) fitted per
   label against the catalogue labels and their errors (Gaussian maximum likelihood; the members'
   spread, added to σ at prediction time, is a known variance there);
5. ``emulator.pt`` (weights + plain settings, read with ``weights_only=True``) is written
   atomically into the model folder, and ``refinement.json`` next to it.

Every step reads the shards ``refine.block_stars`` stars at a time: the peak memory does not grow
with the size of the splits (``scripts/bench_refinement_memory.py``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from omegaconf import OmegaConf

from stellarnet.common.files import atomic_open, to_plain, write_json
from stellarnet.common.paths import CONF_DIR
from stellarnet.dataset.manifest import load_manifest, verify_dataset
from stellarnet.dataset.reader import ShardReader
from stellarnet.evaluation.calibration import fit_sigma_two_term
from stellarnet.evaluation.split_predictions import predict_rows
from stellarnet.network.inference import Predictor
from stellarnet.network.model_folder import EMULATOR_FILE, EMULATOR_FORMAT, load_emulator_file, load_model
from stellarnet.refinement.calibration import fit_label_calibration
from stellarnet.refinement.emulator import emulator_from_state, emulator_state
from stellarnet.refinement.fit import fit_settings, refine_labels
from stellarnet.refinement.training import SpectraBlocks, train_emulator, train_members

__all__ = ["build_refinement", "REFINE_DEFAULTS"]

log = logging.getLogger(__name__)

#: the stage's settings when a configuration or a saved model folder lacks a key: the one source is
#: ``conf/refine_stage/default.yaml``
REFINE_DEFAULTS: dict[str, Any] = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "refine_stage" / "default.yaml"),
                                                         resolve=True)


def _training_rows(n: int, max_stars: int | None, seed: int) -> np.ndarray:
    """The training stars the stage uses (ascending row numbers): all, or a seeded subset of ``max_stars``."""
    if max_stars is None or n <= int(max_stars):
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, int(max_stars), replace=False))


def _training_spectra(reader: ShardReader, rows: np.ndarray, memory_gb: float | None, block: int) -> SpectraBlocks:
    """The training stars' spectra for :func:`train_emulator`, read from the shards ``block`` stars at a
    time: once into memory when the (flux, weight) tensors need at most ``memory_gb`` (8 bytes per
    pixel per star; None: always), else every epoch."""
    n_pixels = int(reader.manifest["n_pixels"])
    need_gb = 8.0 * len(rows) * n_pixels / 1e9
    cache = memory_gb is None or need_gb <= float(memory_gb)
    if not cache:
        log.info("refinement: the training spectra (%.1f GB) exceed refine.memory_gb = %s: read from the shards, "
                 "%d stars at a time, every epoch", need_gb, memory_gb, block)

    def read(pos: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        d = reader.rows(rows[pos], ("flux", "flux_err", "pix_mask"))
        return d["flux"], d["flux_err"], d["pix_mask"]

    return SpectraBlocks(len(rows), n_pixels, read, block, cache=cache)


def _refine_rows(emulator: Any, reader: ShardReader, rows: np.ndarray, init: np.ndarray, settings: Mapping[str, Any],
                 block: int) -> np.ndarray:
    """Refined labels (N, L) of ``rows`` from ``init``, read and fitted ``block`` stars at a time."""
    return np.concatenate([refine_labels(emulator, d["flux"], d["flux_err"], d["pix_mask"], init[at],
                                         **fit_settings(settings)).labels
                           for at, d in reader.blocks(rows, block, ("flux", "flux_err", "pix_mask"))])


def _device(name: Any) -> str:
    """``auto``: the GPU when torch sees one, else the CPU."""
    if name in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(name)


def _mae(a: np.ndarray, b: np.ndarray) -> list[float]:
    return [float(np.nanmean(np.abs(a[:, j] - b[:, j]))) for j in range(a.shape[1])]


def _fit_emulator(cfg: Mapping[str, Any], network: Predictor, spectra: SpectraBlocks, labels: np.ndarray,
                  writer: Any, progress: bool) -> tuple[Any, dict[str, Any]]:
    """Train the stage's spectrum emulator on the training stars (inputs: the network's ``labels``),
    with a progress bar and χ²/pixel in TensorBoard."""
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=int(cfg["epochs"]), desc="spectrum emulator", unit="epoch")

    def on_epoch(epoch: int, chi2: float) -> None:
        if bar is not None:
            bar.update(1)
            bar.set_postfix(chi2=f"{chi2:.3f}")
        if writer is not None:
            writer.add_scalar("refine/chi2_per_pixel", chi2, epoch)

    try:
        return train_emulator(
            labels, spectra, None, None, network.label_names, network.grid,
            hidden=int(cfg["hidden"]), epochs=int(cfg["epochs"]), clip_after=float(cfg["clip_after"]),
            clip_threshold=float(cfg["clip_threshold"]), batch_size=int(cfg["batch_size"]), lr=float(cfg["lr"]),
            seed=int(cfg["seed"]), progress=on_epoch, device=_device(cfg.get("device", "auto")))
    finally:
        if bar is not None:
            bar.close()


def build_refinement(model_dir: str | Path, dataset_dir: str | Path, settings: Mapping[str, Any] | None = None,
                     tensorboard_dir: str | Path | None = None, progress: bool = True,
                     recalibrate: bool = False) -> dict[str, Any]:
    """Fit the spectrum emulator for the model folder ``model_dir`` on ``dataset_dir``'s training
    split, calibrate the refined σ on its validation split and save ``emulator.pt`` there.

    With ``recalibrate`` the emulator already in ``emulator.pt`` is kept and only the calibration is
    redone (label calibration on the training split, σ model on the validation split) with the
    current ``fit`` settings — a minute instead of the emulator's training, after a change of
    ``refine.fit.*`` (continuum degree, pixel clipping, LSF fit).

    Returns a summary (training χ², seconds, σ scale, validation MAE against the catalogue for the
    network and the refined labels, fraction refined)."""
    cfg = {**REFINE_DEFAULTS, **to_plain(dict(settings or {}))}
    cfg["fit"] = {**REFINE_DEFAULTS["fit"], **(cfg.get("fit") or {})}
    model_dir = Path(model_dir)
    if not (model_dir / "model.pt").is_file():
        raise FileNotFoundError(f"{model_dir} is not a model folder (no model.pt)")
    if recalibrate and not (model_dir / EMULATOR_FILE).is_file():
        raise FileNotFoundError(f"recalibrate=true needs an existing {model_dir / EMULATOR_FILE}; build the stage "
                                "first (python -m stellarnet.refinement ckpt_path=<model folder>)")
    t0 = time.perf_counter()
    network = load_model(model_dir, refine=False)
    block = int(cfg.get("block_stars") or 2048)
    manifest = load_manifest(dataset_dir)
    verify_dataset(dataset_dir, manifest, check_sha=False)
    train = ShardReader(dataset_dir, "train", manifest, verify=False)
    rows = _training_rows(len(train), cfg["max_stars"], int(cfg["seed"]))
    if len(rows) < 10:
        raise ValueError(f"{dataset_dir}: the training split has {len(rows)} stars; the refinement "
                         "stage needs at least 10")
    catalogue = train.rows(rows, ("labels", "label_err"))
    pred_labels = predict_rows(network, train, rows, block, keys=("labels",))[0]["labels"]
    log.info("refinement: network labels for %d training stars", len(rows))

    writer = None
    if tensorboard_dir is not None:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(tensorboard_dir))
    members: list[Any] = []
    n_members = int(cfg.get("members") or 0)
    spectra = None  # the training spectra, read from the shards only if an emulator is trained
    if recalibrate:  # keep the emulator (and its members), redo the calibration below
        emulator, extras = load_emulator_file(model_dir / EMULATOR_FILE)
        info = dict(extras.get("training") or {})
        members = [emulator_from_state(m) for m in extras.get("members") or []][:n_members]
    else:
        spectra = _training_spectra(train, rows, cfg.get("memory_gb"), block)
        emulator, info = _fit_emulator(cfg, network, spectra, pred_labels, writer, progress)
    if len(members) < n_members:  # the emulator's own sampling error (refine_labels' members)
        t1 = time.perf_counter()
        if spectra is None:
            spectra = _training_spectra(train, rows, cfg.get("memory_gb"), block)
        members = train_members(emulator, pred_labels, spectra,
                                n_members=n_members, epochs=int(cfg["member_epochs"]),
                                fraction=float(cfg["member_fraction"]), lr=float(cfg["member_lr"]),
                                batch_size=int(cfg["batch_size"]), seed=int(cfg["seed"]),
                                device=_device(cfg.get("device", "auto")))
        info["members"] = {"n": n_members, "epochs": int(cfg["member_epochs"]),
                           "fraction": float(cfg["member_fraction"]), "seconds": time.perf_counter() - t1}
        log.info("refinement: %d member emulators (%.0f s)", n_members, info["members"]["seconds"])
    lab = catalogue["labels"]
    label_range = [[float(np.nanmin(lab[:, j])), float(np.nanmax(lab[:, j]))] for j in range(lab.shape[1])]
    calibration = None
    if cfg.get("calibration_degree"):
        own = _refine_rows(emulator, train, rows, pred_labels.astype(np.float64), cfg["fit"], block)
        calibration = fit_label_calibration(own, catalogue["labels"], catalogue["label_err"],
                                            degree=int(cfg["calibration_degree"]))
    train.close()
    del catalogue, pred_labels

    val_reader = ShardReader(dataset_dir, "val", manifest, verify=False)
    val = val_reader.rows(np.arange(len(val_reader)), ("labels", "label_err"))
    raw = Predictor(network.module, emulator=emulator, refine_settings=cfg["fit"], label_calibration=calibration,
                    chi2_scaling="two_sided", emulator_members=members)
    keys = ("labels", "labels_network", "sigma_aleatoric", "sigma_network", "refine_flag")
    vpred, rate = predict_rows(raw, val_reader, None, block,
                               keys=keys + (("refine_emulator_spread",) if members else ()))
    val_reader.close()
    used = vpred["refine_flag"] == 0
    # σ = sqrt((a σ_fit)² + (b σ_network)²): the fit's σ shrinks with S/N, the refined labels' error
    # does not below the emulator's own (a single scale over-covered at S/N < 100, under-covered at ≥ 200)
    # a floor the validation labels cannot resolve (their errors dwarf it) is taken at its 68 % upper limit
    # (fitted without the disagreement inflation, which multiplies it at prediction time: fitting the two
    # together against the catalogue drove a → 0.001 for Teff and left σ over-confident ×1.2–1.5 vs truth)
    inflate = bool(cfg.get("disagreement_inflation", True))
    # the members' spread is a σ term of its own (added at prediction time): here a known variance, like the
    # catalogue's; sigma_aleatoric of the raw predictor is the fit's √χ²-scaled formal σ with the spread in it
    known = val["label_err"][used]
    fit_sigma = vpred["sigma_aleatoric"][used]
    if members:
        spread = np.nan_to_num(vpred["refine_emulator_spread"][used])
        known = np.sqrt(np.nan_to_num(known) ** 2 + spread**2)
        fit_sigma = np.sqrt(np.clip(fit_sigma**2 - spread**2, 0.0, None))
    scale, floor = fit_sigma_two_term(vpred["labels"][used], val["labels"][used], fit_sigma,
                                      vpred["sigma_network"][used], known,
                                      unresolved_floor=str(cfg.get("unresolved_sigma_floor", "upper")))
    scale = np.where(np.isfinite(scale), scale, 1.0)
    floor = np.where(np.isfinite(floor), floor, 0.0)
    summary = {"training": info, "sigma_scale": [float(v) for v in scale],
               "sigma_network_scale": [float(v) for v in floor], "val_n": int(len(val["labels"])),
               "val_refined_fraction": float(used.mean()) if len(used) else 0.0,
               "val_mae_network_vs_catalogue": _mae(vpred["labels_network"], val["labels"]),
               "val_mae_refined_vs_catalogue": _mae(vpred["labels"], val["labels"]),
               "val_refine_spectra_per_s": float(rate), "label_names": network.label_names,
               "settings": cfg, "seconds": time.perf_counter() - t0}
    if writer is not None:
        for j, name in enumerate(network.label_names):
            writer.add_scalar(f"refine/sigma_scale_{name}", scale[j], 0)
            writer.add_scalar(f"refine/sigma_network_scale_{name}", floor[j], 0)
        writer.close()
    summary["label_calibration"] = calibration
    state = emulator_state(emulator, {"format": EMULATOR_FORMAT, "sigma_scale": summary["sigma_scale"],
                                      "sigma_network_scale": summary["sigma_network_scale"],
                                      "refine": cfg["fit"], "training": to_plain(info),
                                      "label_calibration": calibration, "chi2_scaling": "two_sided",
                                      "label_range": label_range,
                                      "disagreement_inflation": inflate,
                                      "members": [emulator_state(m) for m in members]})
    with atomic_open(model_dir / EMULATOR_FILE, "wb") as fh:
        torch.save(state, fh)
    write_json(model_dir / "refinement.json", summary)
    log.info("refinement: %s (χ²/pixel %.3f, %.0f s); σ scale %s; val refined %.1f%%", model_dir / EMULATOR_FILE,
             info["chi2_per_pixel"], summary["seconds"], np.round(scale, 3), 100 * summary["val_refined_fraction"])
    return summary
