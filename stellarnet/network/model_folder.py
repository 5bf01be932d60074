"""A model folder on disk: ``model.pt`` (weights + plain hyper-parameters, read with
``torch.load(weights_only=True)`` only: a file that needs arbitrary unpickling is refused),
``data_spec.json``, ``config.yaml`` and optionally ``emulator.pt`` (the refinement stage, written by
:mod:`stellarnet.workflows.refinement`). :func:`load_model` returns a
:class:`~stellarnet.network.inference.Predictor`; Lightning ``.ckpt`` files load the same way."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from stellarnet.common.errors import StellarnetError
from stellarnet.network.module import StellarNetModule
from stellarnet.refinement.emulator import SpectrumEmulator, emulator_from_state

if TYPE_CHECKING:
    from stellarnet.network.inference import Predictor


MODEL_FILE = "model.pt"


EMULATOR_FILE = "emulator.pt"


EMULATOR_FORMAT = "stellarnet-emulator/1"


FOLDER_FORMAT = "stellarnet-model-folder/1"


class CheckpointError(StellarnetError, RuntimeError):
    """A checkpoint or model folder cannot be (safely) loaded."""


def _torch_load_safe(path: Path, map_location: str | torch.device, what: str = "checkpoint") -> Any:
    with open(path, "rb") as fh:
        head = fh.read(4)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # torch zip format / legacy pickle
        raise CheckpointError(
            f"cannot read {what} {path}: not a torch {what} (neither a zip archive nor a pickle "
            f"stream; starts with {head!r}): corrupt, empty or a different kind of file"
        )
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"refusing to unpickle {path}: it contains objects other than tensors and plain containers, "
            f"and only torch.load(weights_only=True) is used. Details: {err}"
        ) from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(f"cannot read {what} {path}: {err}") from err


def load_emulator_file(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[SpectrumEmulator, dict[str, Any]]:
    """``(emulator, extras)`` from an ``emulator.pt`` (weights-only loading; ``extras`` holds the
    plain entries saved with it: ``sigma_scale``, ``sigma_network_scale``, ``training``, ``refine`` settings)."""
    path = Path(path)
    state = _torch_load_safe(path, map_location, "spectrum emulator")
    if not isinstance(state, dict) or state.get("format") != EMULATOR_FORMAT:
        raise CheckpointError(f"{path} is not a stellarnet spectrum emulator (format {EMULATOR_FORMAT!r})")
    try:
        emu = emulator_from_state(state)
    except (TypeError, ValueError, KeyError, RuntimeError) as err:
        raise CheckpointError(f"{path}: cannot rebuild the spectrum emulator: {err}") from err
    return emu.to(map_location), {k: v for k, v in state.items() if k not in ("config", "state_dict")}


def _read_checkpoint(path: Path, map_location: str | torch.device) -> dict[str, Any]:
    ckpt = _torch_load_safe(path, map_location)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint dict")
    missing = [k for k in ("state_dict", "hyper_parameters") if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is not a stellarnet checkpoint: it lacks {missing}")
    return ckpt


def load_module(path: str | Path, map_location: str | torch.device = "cpu") -> StellarNetModule:
    """Rebuild a :class:`StellarNetModule` (eval mode) from a Lightning ``.ckpt`` or a model folder.

    Args:
        path: ``.ckpt`` / ``model.pt`` file, or a folder containing ``model.pt``.
        map_location: device for the weights.

    Raises:
        CheckpointError: unreadable file, pickled objects, bad hyper-parameters, missing or
            unexpected weights, or weight shapes that do not match the rebuilt network.
    """
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: pass ckpt_path=<run>/model (the model folder a training run "
                              "writes) or a Lightning .ckpt file")
    ckpt = _read_checkpoint(path, map_location)
    hp = ckpt["hyper_parameters"]
    if not isinstance(hp, dict):
        raise CheckpointError(f"{path}: hyper_parameters is a {type(hp).__name__}, expected a dict")
    try:
        module = StellarNetModule(**hp)
    except (TypeError, ValueError, KeyError) as err:
        raise CheckpointError(f"{path}: cannot rebuild the model from its hyper_parameters: {err}") from err
    state = ckpt["state_dict"]
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise CheckpointError(f"{path}: weights do not fit the rebuilt network: {err}") from err
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{path}: strict loading failed; missing keys {list(result.missing_keys)}, "
            f"unexpected keys {list(result.unexpected_keys)}"
        )
    _check_finite(module, path)
    return module.to(map_location).eval()


def _check_finite(module: torch.nn.Module, path: Path) -> None:
    """CheckpointError naming the first weights (parameters or buffers) holding NaN or inf: such a
    network turns every spectrum into NaN or garbage (a diverged or corrupted training run)."""
    bad = [name for name, t in list(module.named_parameters()) + list(module.named_buffers())
           if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise CheckpointError(
            f"{path}: {len(bad)} weight tensor(s) hold NaN or inf (e.g. {bad[:3]}): the training diverged or the "
            "file is corrupted; use another checkpoint (e.g. the best one, or retrain with a lower learning rate)"
        )


def load_model(path: str | Path, map_location: str | torch.device = "cpu", precision: str = "32",
               refine: bool = True) -> "Predictor":
    """Load a Lightning ``.ckpt`` file or a saved model folder as a :class:`Predictor` (see
    :func:`load_module`; ``precision`` as in :class:`Predictor`). With ``refine`` and a model folder
    holding ``emulator.pt``, the predictor refines labels with it (:mod:`stellarnet.refinement.fit`)."""
    from stellarnet.network.inference import Predictor  # the predictor uses this module's errors and file names

    module = load_module(path, map_location)
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    emulator, extras = None, {}
    if refine and (folder / EMULATOR_FILE).is_file() and (path.is_dir() or path.name == MODEL_FILE):
        emulator, extras = load_emulator_file(folder / EMULATOR_FILE, map_location)
        if emulator.label_names != list(module.label_names) or emulator.n_pixels != module.n_pixels:
            raise CheckpointError(
                f"{folder / EMULATOR_FILE} does not match the network: labels {emulator.label_names} vs "
                f"{list(module.label_names)}, {emulator.n_pixels} vs {module.n_pixels} pixels")
    settings = dict(extras.get("refine") or {})
    settings.setdefault("continuum_degree", None)  # stages saved before the continuum fit were calibrated without it
    settings.setdefault("pixel_clip", None)  # ... and before the pixel clipping and the LSF fit
    settings.setdefault("continuum_knots", None)  # ... and before the spline continuum
    settings.setdefault("fit_lsf", False)
    settings.setdefault("noise_correlation", False)  # ... and before σ allowed for correlated noise
    members = []
    for k, state in enumerate(extras.get("members") or []):
        try:
            members.append(emulator_from_state(state).to(map_location))
        except (TypeError, ValueError, KeyError, RuntimeError) as err:
            raise CheckpointError(f"{folder / EMULATOR_FILE}: cannot rebuild member emulator {k}: {err}") from err
    return Predictor(module, precision=precision, emulator=emulator, refine_sigma_scale=extras.get("sigma_scale"),
                     refine_settings=settings, label_calibration=extras.get("label_calibration"),
                     refine_sigma_network_scale=extras.get("sigma_network_scale"),
                     chi2_scaling=extras.get("chi2_scaling", "at_least_one"), label_range=extras.get("label_range"),
                     disagreement_inflation=bool(extras.get("disagreement_inflation", False)),
                     emulator_members=members)


def save_model_folder(module: StellarNetModule, directory: str | Path) -> Path:
    """Write ``model.pt`` (weights + plain hyper-parameters), ``data_spec.json`` and ``config.yaml``.

    Returns:
        The folder path (loadable with :func:`load_model`).
    """
    from omegaconf import OmegaConf

    from stellarnet.common.version import __version__

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    hp = dict(module.hparams)
    state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    torch.save(
        {"state_dict": state, "hyper_parameters": hp, "format": FOLDER_FORMAT, "stellarnet_version": __version__},
        directory / MODEL_FILE,
    )
    (directory / "data_spec.json").write_text(json.dumps(hp["data_spec"], indent=1))
    cfg = {k: v for k, v in hp.items() if k != "data_spec"}
    cfg["data_spec"] = {k: v for k, v in hp["data_spec"].items() if k != "wavelength"}  # wavelength: see json
    (directory / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))
    return directory
