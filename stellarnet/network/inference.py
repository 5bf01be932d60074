"""Checkpoint -> inference: safe loading, saved model folders and the :class:`Predictor`.

Checkpoints are read with ``torch.load(..., weights_only=True)`` only: a file that needs arbitrary
unpickling is refused (:class:`CheckpointError`), and the module is rebuilt from its plain
``hyper_parameters`` (whose ``_target_``s must lie in the ``stellarnet`` package). Loading is
strict: missing or unexpected weights raise :class:`CheckpointError` listing them.

A *model folder* (astroNN style) holds ``model.pt`` (``{"state_dict", "hyper_parameters"}``),
``data_spec.json`` and ``config.yaml`` (human-readable copies of the data spec and settings), and
optionally ``emulator.pt``: the data-driven spectrum emulator of the χ² refinement stage
(:mod:`stellarnet.refinement.fit`; written by :mod:`stellarnet.refinement`). When it is there the
:class:`Predictor` refines the network's labels by default.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from stellarnet.refinement.fit import CHI2_SCALE_FLOOR, RefineResult, fit_settings, refine_labels
from stellarnet.refinement.emulator import SpectrumEmulator, emulator_from_state
from stellarnet.refinement.calibration import apply_label_calibration
from stellarnet.network.module import StellarNetModule
from stellarnet.common.errors import StellarnetError

__all__ = ["CheckpointError", "Predictor", "load_model", "load_module", "save_model_folder", "fuse_for_inference",
           "precision_name", "resolve_precision", "load_emulator_file", "MODEL_FILE", "EMULATOR_FILE",
           "stellarnet_flags"]

log = logging.getLogger(__name__)

MODEL_FILE = "model.pt"
EMULATOR_FILE = "emulator.pt"
EMULATOR_FORMAT = "stellarnet-emulator/1"
#: refined labels further than this many (network) σ from the network's estimate are not trusted
#: unless the fit explains the spectrum (reduced χ² ≤ FLAG_HIGH_CHI2): then the network is the one
#: misled (e.g. by many flagged pixels), and the disagreement inflates the refined σ instead
REFINE_MAX_SHIFT = 5.0
#: STELLARNET_FLAG thresholds (stellarnet.io.bitmasks.STELLARNET_FLAG)
FLAG_HIGH_CHI2 = 2.0
FLAG_OUTLIER_FRACTION = 0.01
FLAG_DISAGREE_SIGMA = 3.0
FLAG_MIN_PIXEL_FRACTION = 0.7
#: BINARY_CANDIDATE: the refinement's companion score (forward.companion_score, in σ) above this
FLAG_COMPANION = 8.0
FOLDER_FORMAT = "stellarnet-model-folder/1"
# normalized error given to bad / non-finite pixels (same value as stellarnet.preparation.spectra.BAD_PIXEL_ERR;
# the network ignores it anyway because such pixels get pix_mask = 0)
_BAD_PIXEL_ERR = 1.0e3


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
               refine: bool = True) -> Predictor:
    """Load a Lightning ``.ckpt`` file or a saved model folder as a :class:`Predictor` (see
    :func:`load_module`; ``precision`` as in :class:`Predictor`). With ``refine`` and a model folder
    holding ``emulator.pt``, the predictor refines labels with it (:mod:`stellarnet.refinement.fit`)."""
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
    return Predictor(module, precision=precision, emulator=emulator, refine_sigma_scale=extras.get("sigma_scale"),
                     refine_settings=settings, label_calibration=extras.get("label_calibration"),
                     refine_sigma_network_scale=extras.get("sigma_network_scale"),
                     chi2_scaling=extras.get("chi2_scaling", "at_least_one"), label_range=extras.get("label_range"),
                     disagreement_inflation=bool(extras.get("disagreement_inflation", False)))


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


def fuse_for_inference(module: StellarNetModule) -> StellarNetModule:
    """Eval-mode copy of ``module`` with every ``Conv1d -> BatchNorm1d`` pair folded into one conv.

    Same outputs up to float rounding, ~10 % faster on CPU; dropout layers are kept (MC dropout still
    works). The copy is for inference only (its state dict no longer matches checkpoints).
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    fused = copy.deepcopy(module).eval()
    for seq in [m for m in fused.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(seq) - 1):
            if isinstance(seq[i], nn.Conv1d) and isinstance(seq[i + 1], nn.BatchNorm1d):
                seq[i] = fuse_conv_bn_eval(seq[i], seq[i + 1])
                seq[i + 1] = nn.Identity()
    return fused


def _count(name: str, value: Any, minimum: int) -> int:
    """``value`` as an int >= ``minimum``; ``ValueError`` naming ``name`` otherwise (bools, floats
    with a fraction, strings and negatives are refused)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer, float, np.floating)) \
            or not float(value).is_integer() or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


_PRECISION_ALIASES = {
    "32": "32", "fp32": "32", "float32": "32", "32-true": "32",
    "bf16": "bf16", "bfloat16": "bf16", "bf16-mixed": "bf16", "bf16-autocast": "bf16",
    "auto": "auto",
}


def _bf16_native(device: torch.device) -> bool:
    if device.type == "cpu":
        from stellarnet.common.hardware import cpu_bf16_supported

        return cpu_bf16_supported()
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return False


def precision_name(precision: Any) -> str:
    """``"32"``, ``"bf16"`` or ``"auto"`` for an accepted spelling (see :func:`resolve_precision`),
    else ValueError; does not look at the hardware."""
    key = str(precision).strip().lower()
    if key not in _PRECISION_ALIASES:
        raise ValueError(f"precision must be one of '32', 'bf16' or 'auto', got {precision!r}")
    return _PRECISION_ALIASES[key]


def resolve_precision(precision: Any, device: str | torch.device = "cpu") -> str:
    """``"32"`` (float32) or ``"bf16"`` (bfloat16 autocast) for ``precision`` on ``device``.

    Accepts ``32``/``"32"``/``"fp32"``/``"32-true"``, ``"bf16"``/``"bf16-mixed"`` and ``"auto"``
    (bf16 where the device has native bf16 kernels: CPUs with AVX512-BF16/AMX
    (:func:`stellarnet.common.hardware.cpu_bf16_supported`) and bf16-capable GPUs; else float32). bf16 on a
    device without native support falls back to float32 with a warning (emulated bf16 is slow).
    """
    key = precision_name(precision)
    if key == "32":
        return "32"
    if _bf16_native(torch.device(device)):
        return "bf16"
    if key == "bf16":
        log.warning("no native bf16 on %s: predicting in float32 instead of bf16", device)
    return "32"


class Predictor:
    """Batched inference in physical units for a trained :class:`StellarNetModule`.

    Args:
        module: a trained network.
        fuse: run a conv/batch-norm fused copy (:func:`fuse_for_inference`) for speed.
        precision: ``"32"`` (default, float32), ``"bf16"`` (forward passes under bfloat16 autocast;
            outputs are still float32 arrays) or ``"auto"`` (bf16 where the device supports it
            natively); see :func:`resolve_precision`. On 2 CPU cores with AVX512-BF16, bf16 made the
            model alone 1.1-2.2x faster at batch >= 64 (docs/performance.md), at the cost of
            bfloat16 rounding in the activations (8 mantissa bits).

    Attributes:
        module: the network (eval mode, unfused; ``net`` is the copy actually run).
        data_spec: the training data description (dict).
        grid: ``"dr17"`` / ``"dr12"`` (or None if the spec has none); ``n_pixels`` its length.
        label_names, label_units: regression labels (K for TEFF, dex for the rest).
        phot_features: photometric feature names, in the column order ``predict`` expects.
        class_tasks: ``{task: [class names]}``.
        precision: the resolved precision, ``"32"`` or ``"bf16"``.
        emulator: the refinement stage's :class:`~stellarnet.refinement.emulator.SpectrumEmulator`, or None;
            ``refine_sigma_scale`` a and ``refine_sigma_network_scale`` b (per label; refined
            σ = sqrt((a·σ_fit)² + (b·σ_network)²), b None = 0), ``refine_settings`` (``refine_labels``
            keywords) and ``label_calibration`` (:func:`~stellarnet.refinement.calibration.fit_label_calibration`)
            go with it. ``disagreement_inflation``: the refined σ of a label is multiplied by
            :func:`disagreement_factor` (network and refinement inconsistent: σ grows).
    """

    def __init__(self, module: StellarNetModule, fuse: bool = True, precision: str = "32",
                 emulator: SpectrumEmulator | None = None, refine_sigma_scale: Any = None,
                 refine_settings: dict[str, Any] | None = None,
                 label_calibration: dict[str, Any] | None = None,
                 refine_sigma_network_scale: Any = None, chi2_scaling: str = "two_sided",
                 label_range: Any = None, disagreement_inflation: bool = False) -> None:
        if chi2_scaling not in ("two_sided", "at_least_one"):
            raise ValueError(f"chi2_scaling must be 'two_sided' or 'at_least_one', got {chi2_scaling!r}")
        self.chi2_scaling = chi2_scaling
        self.disagreement_inflation = bool(disagreement_inflation)
        self.label_range = None if label_range is None else np.asarray(label_range, dtype=np.float64)
        if self.label_range is not None and self.label_range.shape != (len(module.label_names), 2):
            raise CheckpointError(f"label_range has shape {self.label_range.shape}, expected ({len(module.label_names)}, 2)")
        self.module = module.eval()
        self.net = fuse_for_inference(module) if fuse else self.module
        self.precision: str = resolve_precision(precision, self.device)
        self.data_spec: dict[str, Any] = module.data_spec
        self.grid: str | None = module.grid
        self.n_pixels: int = module.n_pixels
        self.label_names: list[str] = list(module.label_names)
        self.label_units: list[str] = list(module.label_units)
        self.phot_features: list[str] = list(module.phot_features)
        self.class_tasks: dict[str, list[str]] = dict(module.class_tasks)
        self._phot_mean = np.asarray(self.data_spec.get("phot_mean") or [], dtype=np.float64)
        self._phot_std = np.asarray(self.data_spec.get("phot_std") or [], dtype=np.float64)
        scale = self.data_spec.get("sigma_scale")
        self.sigma_scale = None if scale is None else np.asarray(scale, dtype=np.float32)
        if self.sigma_scale is not None and self.sigma_scale.shape != (len(self.label_names),):
            raise CheckpointError(f"data_spec sigma_scale has shape {self.sigma_scale.shape}, expected one per label")
        self.emulator = None if emulator is None else emulator.eval()
        self.refine_sigma_scale = (None if refine_sigma_scale is None
                                   else np.asarray(refine_sigma_scale, dtype=np.float32).reshape(-1))
        if self.refine_sigma_scale is not None and self.refine_sigma_scale.shape != (len(self.label_names),):
            raise CheckpointError(f"emulator sigma_scale has shape {self.refine_sigma_scale.shape}, expected one per label")
        self.refine_sigma_network_scale = (None if refine_sigma_network_scale is None
                                           else np.asarray(refine_sigma_network_scale, dtype=np.float32).reshape(-1))
        if (self.refine_sigma_network_scale is not None
                and self.refine_sigma_network_scale.shape != (len(self.label_names),)):
            raise CheckpointError(f"emulator sigma_network_scale has shape {self.refine_sigma_network_scale.shape}, "
                                  "expected one per label")
        self.refine_settings: dict[str, Any] = fit_settings(refine_settings)
        self.label_calibration = label_calibration or None

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def _grid_error(self, p: int) -> ValueError:
        try:
            from stellarnet.io.grids import grid_name

            theirs = f"grid {grid_name(p)!r}"
        except (ImportError, ValueError):
            theirs = "an unknown grid"
        return ValueError(
            f"spectra have {p} pixels ({theirs}) but the model was trained on grid {self.grid!r} "
            f"({self.n_pixels} pixels); put them on the model's grid (stellarnet.io.grids.gap_delete / "
            "data.spectra.prepare_spectrum with grid=model.grid)"
        )

    def standardize_photometry(self, photometry: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Raw photometric features (N, F) in ``phot_features`` order (NaN = missing), or a DataFrame with
        those columns -> (standardized values with 0 where missing, presence mask), float32."""
        nf = len(self.phot_features)
        if photometry is None or nf == 0:
            return np.zeros((n, nf), np.float32), np.zeros((n, nf), np.float32)
        if hasattr(photometry, "columns"):
            missing = [c for c in self.phot_features if c not in photometry.columns]
            if missing:
                raise ValueError(f"photometry table lacks columns {missing}")
            photometry = photometry[self.phot_features].to_numpy()
        x = np.asarray(photometry, dtype=np.float64)
        if x.ndim == 1:
            x = x[None, :]
        if x.shape != (n, nf):
            raise ValueError(f"photometry must have shape ({n}, {nf}) (features {self.phot_features}), got {x.shape}")
        present = np.isfinite(x)
        z = np.where(present, (x - self._phot_mean) / self._phot_std, 0.0)
        return z.astype(np.float32), present.astype(np.float32)

    def predict(
        self,
        flux: np.ndarray,
        flux_err: np.ndarray,
        photometry: Any = None,
        pix_mask: np.ndarray | None = None,
        mc_samples: int = 0,
        batch_size: int = 128,
        seed: int | None = None,
        precision: str | None = None,
        refine: bool | None = None,
        output: str = "dict",
    ) -> Any:
        """Predict labels (with σ) and classes.

        Args:
            flux: (N, P) or (P,) continuum-normalized flux on the model's grid (dimensionless): a
                numpy array, a pandas DataFrame (rows = stars), an astropy Table / Column, a
                dimensionless Quantity, or a list.
            flux_err: same shape, normalized flux error (same kinds).
            photometry: raw (unstandardized) features (N, F) in ``phot_features`` order with NaN for
                missing, a DataFrame with those columns, or None (no photometry).
            pix_mask: (N, P) 1/True = good pixel; None: pixels with finite flux and positive finite
                error are good. Non-finite pixels are always treated as bad (flux 1, mask 0).
            mc_samples: MC-dropout passes for ``sigma_epistemic`` (0 or 1: zeros).
            batch_size: spectra per forward pass (128 for float32 and 256 for bf16 were fastest on
                2 CPU cores; 1024 falls out of cache and was ~2x slower).
            seed: seed for the MC-dropout masks (None: torch's global RNG).
            precision: this call's precision (see :func:`resolve_precision`); None: ``self.precision``.
            refine: χ²-refine the labels with the emulator; None: when the predictor has one.
            output: ``"dict"`` (below) or ``"table"``: an astropy ``QTable`` with the catalogue's
                columns (``TEFF``, ``TEFF_ERR``, … as ``predict`` writes them) carrying units.

        Returns:
            dict of numpy arrays in physical units (``label_units``): ``labels``, ``sigma_aleatoric``,
            ``sigma_epistemic``, ``sigma_total`` (N, L) float32; ``class_probs`` {task: (N, K)};
            ``classes`` {task: (N,) class names}. When refined, also ``labels_network`` and
            ``sigma_network`` (the network's estimate and calibrated σ), ``refine_chi2`` (N,) the
            reduced χ² of the fit, and ``refine_flag`` (N,) int: 0 refined, 1 kept the network's
            labels (the fit failed, or moved more than :data:`REFINE_MAX_SHIFT` network σ with a reduced
            χ² above :data:`FLAG_HIGH_CHI2`), 2 not
            tried (non-finite network labels), and ``refine_outlier_fraction`` (N,). ``labels`` /
            ``sigma_aleatoric`` are then the refined labels and their calibrated σ (formal σ × √χ²
            and the validation-fitted two-term model). Always ``stellarnet_flag`` (N,) int32: the
            :data:`stellarnet.io.bitmasks.STELLARNET_FLAG` bits (:func:`stellarnet_flags`).
        """
        if refine and self.emulator is None:
            raise ValueError("refine=True but this predictor has no spectrum emulator (model folder without "
                             f"{EMULATOR_FILE}; build one with python -m stellarnet.refinement)")
        refine = self.emulator is not None if refine is None else bool(refine)
        if output not in ("dict", "table"):
            raise ValueError(f"output must be 'dict' or 'table', got {output!r}")
        if output == "table":
            from stellarnet.io.predictions import to_qtable  # the catalogue's one definition of columns and units

            res = self.predict(flux, flux_err, photometry=photometry, pix_mask=pix_mask, mc_samples=mc_samples,
                               batch_size=batch_size, seed=seed, precision=precision, refine=refine)
            return to_qtable(res, self.label_names, self.label_units, self.class_tasks)
        flux, flux_err = _as_array(flux, "flux"), _as_array(flux_err, "flux_err")
        pix_mask = None if pix_mask is None else _as_array(pix_mask, "pix_mask")
        batch_size = _count("batch_size", batch_size, minimum=1)
        mc_samples = _count("mc_samples", mc_samples, minimum=0)
        prec = self.precision if precision is None else resolve_precision(precision, self.device)
        flux = np.asarray(flux, dtype=np.float32)
        flux_err = np.asarray(flux_err, dtype=np.float32)
        if flux.ndim == 1:
            flux, flux_err = flux[None], flux_err[None]
            pix_mask = None if pix_mask is None else np.asarray(pix_mask)[None]
        if flux.ndim != 2:
            raise ValueError(f"flux must be (N, P) or (P,), got shape {flux.shape}")
        if flux.shape[1] != self.n_pixels:
            raise self._grid_error(flux.shape[1])
        if flux_err.shape != flux.shape:
            raise ValueError(f"flux_err shape {flux_err.shape} differs from flux shape {flux.shape}")
        good = np.isfinite(flux) & np.isfinite(flux_err) & (flux_err > 0)
        if pix_mask is not None:
            pix_mask = np.asarray(pix_mask)
            if pix_mask.shape != flux.shape:
                raise ValueError(f"pix_mask shape {pix_mask.shape} differs from flux shape {flux.shape}")
            good &= pix_mask.astype(bool)
        flux = np.where(good, flux, 1.0).astype(np.float32)
        flux_err = np.where(good, flux_err, _BAD_PIXEL_ERR).astype(np.float32)
        mask = good.astype(np.float32)
        n = flux.shape[0]
        phot, phot_mask = self.standardize_photometry(photometry, n)

        parts: list[dict[str, Any]] = []
        dev = self.device
        autocast = (torch.autocast(device_type=dev.type, dtype=torch.bfloat16) if prec == "bf16"
                    else contextlib.nullcontext())
        with torch.random.fork_rng(devices=[] if dev.type == "cpu" else [dev]), torch.inference_mode(), autocast:
            if seed is not None:
                torch.manual_seed(seed)
            self.net.eval()
            for s in range(0, n, batch_size):
                sl = slice(s, s + batch_size)
                t = [torch.from_numpy(a[sl]).to(dev) for a in (flux, flux_err, mask, phot, phot_mask)]
                out = self.net.predict_batch(*t, mc_samples=mc_samples)
                parts.append(
                    {
                        **{k: out[k].float().cpu().numpy() for k in ("labels", "sigma_aleatoric", "sigma_epistemic", "sigma_total")},
                        "class_probs": {k: v.float().cpu().numpy() for k, v in out["class_probs"].items()},
                    }
                )
        L = len(self.label_names)
        res: dict[str, Any] = {}
        for k in ("labels", "sigma_aleatoric", "sigma_epistemic", "sigma_total"):
            res[k] = np.concatenate([p[k] for p in parts]) if parts else np.zeros((0, L), np.float32)
        if self.sigma_scale is not None:  # post-hoc calibration fitted on the validation split
            res["sigma_aleatoric"] = (res["sigma_aleatoric"] * self.sigma_scale).astype(np.float32)
            res["sigma_total"] = np.sqrt(res["sigma_aleatoric"] ** 2 + res["sigma_epistemic"] ** 2).astype(np.float32)
        res["class_probs"] = {
            t: (np.concatenate([p["class_probs"][t] for p in parts]) if parts else np.zeros((0, len(names)), np.float32))
            for t, names in self.class_tasks.items()
        }
        for t, temperature in (self.data_spec.get("class_temperature") or {}).items():
            if t in res["class_probs"] and n:  # temperature scaling fitted on the validation split
                res["class_probs"][t] = apply_temperature(res["class_probs"][t], temperature).astype(np.float32)
        res["classes"] = {t: np.asarray(names)[res["class_probs"][t].argmax(1)] for t, names in self.class_tasks.items()}
        net_factor = self._refine(res, flux, flux_err, mask, batch_size) if refine and n else None
        res["stellarnet_flag"] = stellarnet_flags(res, mask.mean(1) if n else np.zeros(0), self.label_range,
                                                  physical_ranges(self.label_names))
        if net_factor is not None:  # after the flags, which are judged on the network's own σ
            res["sigma_network"] = (res["sigma_network"] * net_factor).astype(np.float32)
        return res

    def _refine(self, res: dict[str, Any], flux: np.ndarray, flux_err: np.ndarray, mask: np.ndarray,
                batch_size: int) -> np.ndarray | None:
        """Replace ``res``'s labels and σ by the emulator's χ² fit where it is trusted (in place). With
        ``disagreement_inflation`` returns the factor (N, L) for the network's σ as well — the same Birge
        ratio, where the refined labels are kept (1 elsewhere) — for the caller to apply after the flags."""
        assert self.emulator is not None
        r: RefineResult = refine_labels(self.emulator, flux, flux_err, mask, res["labels"].astype(np.float64),
                                        batch_size=max(1, min(batch_size, 256)), **self.refine_settings)
        refined = apply_label_calibration(r.labels, self.label_calibration)  # onto the training labels' scale
        chi2 = (np.maximum(CHI2_SCALE_FLOOR, r.chi2) if self.chi2_scaling == "two_sided"
                else np.maximum(1.0, r.chi2))
        sigma = r.sigma * np.sqrt(chi2)[:, None]
        if self.refine_sigma_scale is not None:
            sigma = sigma * self.refine_sigma_scale
        net_labels, net_sigma = res["labels"], res["sigma_total"]
        if self.refine_sigma_network_scale is not None:  # the refined labels' error floor
            sigma = np.sqrt(sigma**2 + (self.refine_sigma_network_scale * net_sigma) ** 2)
        # the flag NET_REFINE_DISAGREE is judged on the σ model's σ, before the inflation below
        res["sigma_refined"] = sigma.astype(np.float32)
        factor = disagreement_factor(refined, sigma, net_labels, net_sigma) if self.disagreement_inflation else None
        if factor is not None:
            sigma = sigma * factor
        tried = np.isfinite(net_labels).all(1)
        shift = np.abs(refined - net_labels) / np.maximum(net_sigma, 1e-12)
        with np.errstate(invalid="ignore"):
            trusted = (shift <= REFINE_MAX_SHIFT).all(1) | (r.chi2 <= FLAG_HIGH_CHI2)
        ok = tried & np.isfinite(refined).all(1) & np.isfinite(sigma).all(1) & trusted
        flag = np.where(ok, 0, np.where(tried, 1, 2)).astype(np.int8)
        res["labels_network"] = net_labels
        res["sigma_network"] = net_sigma
        res["labels"] = np.where(ok[:, None], refined, net_labels).astype(np.float32)
        res["sigma_aleatoric"] = np.where(ok[:, None], sigma, res["sigma_aleatoric"]).astype(np.float32)
        res["sigma_total"] = np.where(ok[:, None], np.sqrt(sigma**2 + res["sigma_epistemic"] ** 2),
                                      net_sigma).astype(np.float32)
        res["refine_chi2"] = r.chi2.astype(np.float32)
        res["refine_flag"] = flag
        res["refine_outlier_fraction"] = (np.zeros(len(flag), np.float32) if r.outlier_fraction is None
                                          else r.outlier_fraction.astype(np.float32))
        res["refine_masked_segments"] = r.masked_segments
        if r.lsf_variance is not None:  # fitted change of the LSF variance (pixels²)
            res["refine_lsf_variance"] = r.lsf_variance
        if r.companion is not None:  # the residuals' match to the star's own lines at another velocity
            res["refine_companion"] = r.companion
        if r.noise_correlation is not None:  # the fit residuals' lag-1 pixel-to-pixel correlation
            res["refine_noise_correlation"] = r.noise_correlation[:, 0]
        # two inconsistent estimates: neither σ is to be trusted as it stands (the network is the misled one
        # as often as the emulator), so the network's σ grows by the same ratio where the refinement is kept
        return None if factor is None else np.where(ok[:, None], factor, 1.0)


def _as_array(x: Any, name: str) -> np.ndarray:
    """A 1-D/2-D numpy array from numpy, pandas (DataFrame / Series), astropy (Table, Column,
    dimensionless Quantity) or a list."""
    if hasattr(x, "unit") and hasattr(x, "value") and not hasattr(x, "colnames"):  # Quantity
        unit = getattr(x, "unit", None)
        if unit is not None and str(unit) not in ("", "dimensionless"):
            raise ValueError(f"{name} must be dimensionless (continuum-normalized), got unit {unit}")
        return np.asarray(x.value)
    if hasattr(x, "colnames"):  # astropy Table: one column per pixel, or one array column
        cols = [np.asarray(x[c]) for c in x.colnames]
        return cols[0] if len(cols) == 1 and cols[0].ndim == 2 else np.stack(cols, axis=1)
    if hasattr(x, "to_numpy"):  # pandas
        return x.to_numpy()
    return np.asarray(x)


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Class probabilities (N, K) scaled by ``temperature`` T: ``p ** (1/T)`` renormalized, which is
    ``softmax(logits / T)`` (T > 1 softens over-confident probabilities); float64."""
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-300, None)
    logp = np.log(p) / float(temperature)
    logp -= logp.max(axis=1, keepdims=True)
    q = np.exp(logp)
    return q / q.sum(axis=1, keepdims=True)


def physical_ranges(label_names: list[str]) -> np.ndarray:
    """(L, 2) physically possible range of each label (:data:`stellarnet.preparation.cuts.PHYSICAL_LABEL_RANGES`;
    ±inf for a label without one)."""
    from stellarnet.preparation.cuts import PHYSICAL_LABEL_RANGES

    return np.array([PHYSICAL_LABEL_RANGES.get(n, (-np.inf, np.inf)) for n in label_names], np.float64).reshape(-1, 2)


def disagreement_ratio(labels: np.ndarray, sigma: np.ndarray, other_labels: np.ndarray,
                       other_sigma: np.ndarray) -> np.ndarray:
    """|labels − other| / √(σ² + σ_other²) per star and label, (N, L) float64 (NaN where undefined):
    how many combined σ two estimates of the same label are apart."""
    diff = np.abs(np.asarray(labels, np.float64) - np.asarray(other_labels, np.float64))
    comb = np.sqrt(np.asarray(sigma, np.float64) ** 2 + np.asarray(other_sigma, np.float64) ** 2)
    with np.errstate(invalid="ignore", divide="ignore"):
        return diff / comb


def disagreement_factor(labels: np.ndarray, sigma: np.ndarray, other_labels: np.ndarray,
                        other_sigma: np.ndarray) -> np.ndarray:
    """Per star and label, max(1, :func:`disagreement_ratio`): the Birge ratio of two estimates of
    the same label (here the refinement's and the network's). Where they disagree by more than their
    σ allow, one of them carries an error its σ does not describe (an emulator that is wrong for this
    kind of star, a spectrum unlike the training set), and the σ of the reported value is scaled up
    by that ratio, as the Particle Data Group scales the error of inconsistent measurements.
    (N, L) float64; non-finite inputs give 1."""
    ratio = disagreement_ratio(labels, sigma, other_labels, other_sigma)
    return np.where(np.isfinite(ratio), np.maximum(1.0, ratio), 1.0)


def stellarnet_flags(res: dict[str, Any], pixel_fraction: np.ndarray, label_range: np.ndarray | None,
                     physical_range: np.ndarray | None = None) -> np.ndarray:
    """The STELLARNET_FLAG bitmask (N,) int32 of a :meth:`Predictor.predict` result.

    Bits (:data:`stellarnet.io.bitmasks.STELLARNET_FLAG`): REFINE_FAILED (``refine_flag`` 1),
    NOT_REFINED (no refinement, or ``refine_flag`` 2), HIGH_CHI2 (reduced χ² > :data:`FLAG_HIGH_CHI2`),
    OUTSIDE_TRAINING (a label outside ``label_range``), OUTLIER_PIXELS (more than
    :data:`FLAG_OUTLIER_FRACTION` of the usable pixels clipped), NET_REFINE_DISAGREE (refined − network
    more than :data:`FLAG_DISAGREE_SIGMA` × √(σ_net² + σ_fit²) in some label), MASKED_SEGMENTS,
    FEW_PIXELS (usable pixel fraction below :data:`FLAG_MIN_PIXEL_FRACTION`), UNPHYSICAL (a label
    non-finite or outside ``physical_range``, (L, 2)), BINARY_CANDIDATE (companion score above
    :data:`FLAG_COMPANION`).
    """
    from stellarnet.io.bitmasks import STELLARNET_FLAG as F

    n = len(pixel_fraction)
    flag = np.zeros(n, np.int64)

    def set_bit(name: str, where: np.ndarray) -> None:
        nonlocal flag
        flag |= np.where(where, 1 << F.bit(name), 0)

    labels = np.asarray(res["labels"], np.float64)
    if "refine_flag" in res:
        rf = np.asarray(res["refine_flag"])
        set_bit("REFINE_FAILED", rf == 1)
        set_bit("NOT_REFINED", rf == 2)
        with np.errstate(invalid="ignore"):
            set_bit("HIGH_CHI2", np.asarray(res["refine_chi2"]) > FLAG_HIGH_CHI2)
            set_bit("OUTLIER_PIXELS", np.asarray(res["refine_outlier_fraction"]) > FLAG_OUTLIER_FRACTION)
            set_bit("MASKED_SEGMENTS", np.asarray(res["refine_masked_segments"]) > 0)
            apart = disagreement_ratio(labels, res["sigma_refined"], res["labels_network"], res["sigma_network"])
            set_bit("NET_REFINE_DISAGREE", (rf == 0) & (apart > FLAG_DISAGREE_SIGMA).any(1))
            if "refine_companion" in res:
                set_bit("BINARY_CANDIDATE", np.asarray(res["refine_companion"]) > FLAG_COMPANION)
    else:
        set_bit("NOT_REFINED", np.ones(n, bool))
    if label_range is not None:
        with np.errstate(invalid="ignore"):
            out = (labels < label_range[:, 0]) | (labels > label_range[:, 1])
        set_bit("OUTSIDE_TRAINING", out.any(1))
    set_bit("FEW_PIXELS", np.asarray(pixel_fraction) < FLAG_MIN_PIXEL_FRACTION)
    if physical_range is not None and len(labels):
        with np.errstate(invalid="ignore"):
            impossible = ~np.isfinite(labels) | (labels < physical_range[:, 0]) | (labels > physical_range[:, 1])
        set_bit("UNPHYSICAL", impossible.any(1))
    return flag.astype(np.int32)
