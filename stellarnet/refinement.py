"""Entry point: build the χ² refinement stage of a trained model folder.

``python -m stellarnet.refinement ckpt_path=<run>/model`` (also run by ``stellarnet.train`` after
the model folder is written, ``refine.enabled``):

1. the network predicts the training split (a seeded subset of ``refine.max_stars``);
2. a :class:`~stellarnet.models.forward.SpectrumEmulator` is fitted to those spectra with the
   network's labels as inputs (progress bar; χ² per pixel per epoch to TensorBoard);
3. the training stars are refined and a quadratic calibration of the refined labels to the
   catalogue scale is fitted (:func:`~stellarnet.models.forward.fit_label_calibration`);
4. the validation split is refined and the σ model sqrt((a·σ_fit)² + (b·σ_network)²) fitted per
   label against the catalogue labels and their errors (Gaussian maximum likelihood);
5. ``emulator.pt`` (weights + plain settings, read with ``weights_only=True``) is written
   atomically into the model folder, and ``refinement.json`` next to it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Mapping

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from stellarnet.errors import report_errors
from stellarnet.eval.calibration import fit_sigma_two_term
from stellarnet.eval.network import load_split, predict_split
from stellarnet.models.forward import emulator_state, fit_settings, fit_label_calibration, refine_labels, train_emulator
from stellarnet.models.inference import EMULATOR_FILE, EMULATOR_FORMAT, Predictor, load_emulator_file, load_model
from stellarnet.paths import CONF_DIR
from stellarnet.utils import atomic_open, to_plain, write_json

__all__ = ["build_refinement", "REFINE_DEFAULTS"]

log = logging.getLogger(__name__)

REFINE_DEFAULTS: dict[str, Any] = {"enabled": True, "hidden": 256, "epochs": 400, "batch_size": 256, "lr": 5e-3,
                                   "max_stars": 20000, "seed": 0, "clip_after": 0.3, "clip_threshold": 2.0,
                                   "calibration_degree": 2, "device": "auto", "unresolved_sigma_floor": "upper",
                                   "fit": {"iters": 2, "clip_rounds": 1, "clip_iters": 1, "clip_threshold": 2.0,
                                           "continuum_degree": 4, "pixel_clip": 5.0,
                                           "fit_lsf": True}}


def _subset(data: dict[str, np.ndarray], max_stars: int | None, seed: int) -> dict[str, np.ndarray]:
    n = len(data["flux"])
    if max_stars is None or n <= int(max_stars):
        return data
    rows = np.sort(np.random.default_rng(seed).choice(n, int(max_stars), replace=False))
    return {k: (v[rows] if isinstance(v, np.ndarray) and len(v) == n else v) for k, v in data.items()}


def _device(name: Any) -> str:
    """``auto``: the GPU when torch sees one, else the CPU."""
    if name in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(name)


def _mae(a: np.ndarray, b: np.ndarray) -> list[float]:
    return [float(np.nanmean(np.abs(a[:, j] - b[:, j]))) for j in range(a.shape[1])]


def _fit_emulator(cfg: Mapping[str, Any], network: Predictor, train: Mapping[str, np.ndarray], labels: np.ndarray,
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
            labels, train["flux"], train["flux_err"], train["pix_mask"], network.label_names, network.grid,
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
    train = _subset(load_split(dataset_dir, "train"), cfg["max_stars"], int(cfg["seed"]))
    if len(train["flux"]) < 10:
        raise ValueError(f"{dataset_dir}: the training split has {len(train['flux'])} stars; the refinement "
                         "stage needs at least 10")
    pred, _ = predict_split(network, train)
    log.info("refinement: network labels for %d training stars", len(train["flux"]))

    writer = None
    if tensorboard_dir is not None:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(tensorboard_dir))
    if recalibrate:  # keep the emulator, redo the calibration below
        emulator, extras = load_emulator_file(model_dir / EMULATOR_FILE)
        info = dict(extras.get("training") or {})
    else:
        emulator, info = _fit_emulator(cfg, network, train, pred["labels"], writer, progress)
    lab = train["labels"]
    label_range = [[float(np.nanmin(lab[:, j])), float(np.nanmax(lab[:, j]))] for j in range(lab.shape[1])]
    calibration = None
    if cfg.get("calibration_degree"):
        own = refine_labels(emulator, train["flux"], train["flux_err"], train["pix_mask"],
                            pred["labels"].astype(np.float64), **fit_settings(cfg["fit"]))
        calibration = fit_label_calibration(own.labels, train["labels"], train["label_err"],
                                            degree=int(cfg["calibration_degree"]))
    del train, pred

    val = load_split(dataset_dir, "val")
    raw = Predictor(network.module, emulator=emulator, refine_settings=cfg["fit"], label_calibration=calibration,
                    chi2_scaling="two_sided")
    vpred, rate = predict_split(raw, val)
    used = vpred["refine_flag"] == 0
    # σ = sqrt((a σ_fit)² + (b σ_network)²): the fit's σ shrinks with S/N, the refined labels' error
    # does not below the emulator's own (a single scale over-covered at S/N < 100, under-covered at ≥ 200)
    # a floor the validation labels cannot resolve (their errors dwarf it) is taken at its 68 % upper limit
    scale, floor = fit_sigma_two_term(vpred["labels"][used], val["labels"][used], vpred["sigma_aleatoric"][used],
                                      vpred["sigma_network"][used], val["label_err"][used],
                                      unresolved_floor=str(cfg.get("unresolved_sigma_floor", "upper")))
    scale = np.where(np.isfinite(scale), scale, 1.0)
    floor = np.where(np.isfinite(floor), floor, 0.0)
    summary = {"training": info, "sigma_scale": [float(v) for v in scale],
               "sigma_network_scale": [float(v) for v in floor], "val_n": int(len(val["flux"])),
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
                                      "label_range": label_range})
    with atomic_open(model_dir / EMULATOR_FILE, "wb") as fh:
        torch.save(state, fh)
    write_json(model_dir / "refinement.json", summary)
    log.info("refinement: %s (χ²/pixel %.3f, %.0f s); σ scale %s; val refined %.1f%%", model_dir / EMULATOR_FILE,
             info["chi2_per_pixel"], summary["seconds"], np.round(scale, 3), 100 * summary["val_refined_fraction"])
    return summary


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="refinement")
@report_errors
def main(cfg: DictConfig) -> None:
    if not cfg.get("ckpt_path"):
        raise ValueError("ckpt_path is required: python -m stellarnet.refinement ckpt_path=<model folder>")
    dataset = cfg.get("dataset_dir") or cfg.data.shards.out_dir
    summary = build_refinement(cfg.ckpt_path, dataset, cfg.refine, Path(cfg.paths.output_dir) / "tensorboard",
                               recalibrate=bool(cfg.get("recalibrate", False)))
    print({k: summary[k] for k in ("sigma_scale", "sigma_network_scale", "val_refined_fraction", "val_mae_network_vs_catalogue",
                                   "val_mae_refined_vs_catalogue", "seconds")})


if __name__ == "__main__":
    main()
