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
import logging
from typing import Any

import numpy as np
import torch
from torch import nn

from stellarnet.network.encoders import median_error
from stellarnet.network.flags import (
    FLAG_HIGH_CHI2,
    REFINE_MAX_SHIFT,
    disagreement_factor,
    physical_ranges,
    stellarnet_flags,
)
from stellarnet.network.model_folder import EMULATOR_FILE, CheckpointError
from stellarnet.network.module import StellarNetModule
from stellarnet.preparation.photometry import standardize_photometry
from stellarnet.preparation.spectra import continuum_envelope, mask_unusable_pixels
from stellarnet.refinement.calibration import apply_label_calibration
from stellarnet.refinement.emulator import SpectrumEmulator
from stellarnet.refinement.fit import CHI2_SCALE_FLOOR, RefineResult, fit_settings, refine_labels
from stellarnet.refinement.residuals import COMMON_RESIDUAL_ROUNDS

log = logging.getLogger(__name__)


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
        sigma_scale, sigma_noise_scale: the network's σ model fitted on the validation split (data spec):
            σ = sqrt((s·σ_head)² + (k·n)²), n = 1/SNR, the median error of the good pixels of the
            normalized flux (``flux_noise`` in the predictions); k None (folders before it) = 0.
        emulator: the refinement stage's :class:`~stellarnet.refinement.emulator.SpectrumEmulator`, or None;
            ``refine_sigma_scale`` a and ``refine_sigma_network_scale`` b (per label; refined
            σ = sqrt((a·σ_fit)² + (b·σ_network)²), b None = 0), ``refine_settings`` (``refine_labels``
            keywords) and ``label_calibration`` (:func:`~stellarnet.refinement.calibration.fit_label_calibration`)
            go with it. ``disagreement_inflation``: the refined σ of a label is multiplied by
            :func:`disagreement_factor` (network and refinement inconsistent: σ grows). ``emulator_members``:
            emulators trained on halves of the training stars (:func:`~stellarnet.refinement.training.train_members`);
            the spread of the refined labels over them (``refine_emulator_spread``) is added to the refined σ in
            quadrature — the emulator's own error, which grows at the edges of the training set. ``second_look``:
            the network is run again on the stars whose fit rejected outlier pixels, with those pixels
            masked (:meth:`_second_look`), before the two estimates are combined.
        flux_correction: (P,) the relative residual a survey's spectra share against the emulator
            (:meth:`measure_common_residual`), divided out of every spectrum (flux and errors) before
            the network and the fit see it; None (the default): the spectra as given.
    """

    def __init__(self, module: StellarNetModule, fuse: bool = True, precision: str = "32",
                 emulator: SpectrumEmulator | None = None, refine_sigma_scale: Any = None,
                 refine_settings: dict[str, Any] | None = None,
                 label_calibration: dict[str, Any] | None = None,
                 refine_sigma_network_scale: Any = None, chi2_scaling: str = "two_sided",
                 label_range: Any = None, disagreement_inflation: bool = False, second_look: bool = True,
                 emulator_members: Any = None) -> None:
        if chi2_scaling not in ("two_sided", "at_least_one"):
            raise ValueError(f"chi2_scaling must be 'two_sided' or 'at_least_one', got {chi2_scaling!r}")
        self.chi2_scaling = chi2_scaling
        self.disagreement_inflation = bool(disagreement_inflation)
        self.second_look = bool(second_look)
        self.flux_correction: np.ndarray | None = None
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
        noise_scale = self.data_spec.get("sigma_noise_scale")
        self.sigma_noise_scale = None if noise_scale is None else np.asarray(noise_scale, dtype=np.float32)
        if self.sigma_noise_scale is not None and self.sigma_noise_scale.shape != (len(self.label_names),):
            raise CheckpointError(f"data_spec sigma_noise_scale has shape {self.sigma_noise_scale.shape}, "
                                  "expected one per label")
        self.emulator = None if emulator is None else emulator.eval()
        self.emulator_members = [m.eval() for m in (emulator_members or [])]
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
        return standardize_photometry(x, self._phot_mean, self._phot_std)

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
        if pix_mask is not None:
            pix_mask = np.asarray(pix_mask)
            if pix_mask.shape != flux.shape:
                raise ValueError(f"pix_mask shape {pix_mask.shape} differs from flux shape {flux.shape}")
        flux, flux_err, good = mask_unusable_pixels(flux, flux_err, None if pix_mask is None else pix_mask.astype(bool))
        return self._predict_clean(flux, flux_err, good, photometry, mc_samples, batch_size, seed, prec, refine)[0]

    def _predict_clean(self, flux: np.ndarray, flux_err: np.ndarray, good: np.ndarray, photometry: Any,
                       mc_samples: int, batch_size: int, seed: int | None, prec: str, refine: bool,
                       return_model: bool = False) -> tuple[dict[str, Any], RefineResult | None]:
        """:meth:`predict` on arrays :func:`mask_unusable_pixels` has cleaned; also the χ² fit's result
        (None when not refined; with ``return_model`` holding its model spectra and weights)."""
        if self.flux_correction is not None:  # onto the training survey's convention (measure_common_residual)
            scale = (1.0 + self.flux_correction).astype(np.float32)
            flux, flux_err = flux / scale, flux_err / scale
        mask = good.astype(np.float32)
        n = flux.shape[0]
        phot, phot_mask = self.standardize_photometry(photometry, n)

        res = self._network_pass(flux, flux_err, mask, phot, phot_mask, mc_samples, batch_size, seed, prec)
        _blank_empty_rows(res, mask.sum(1) == 0 if n else np.zeros(0, bool))
        net_factor = None
        fit = None
        if refine and n:
            fit = refine_labels(self.emulator, flux, flux_err, mask, res["labels"].astype(np.float64),
                                batch_size=max(1, min(batch_size, 256)), return_model=return_model,
                                members=self.emulator_members or None, **self.refine_settings)
            if self.second_look and fit.outlier_pixels is not None and fit.outlier_pixels[0].size:
                self._second_look(res, fit.outlier_pixels, flux, flux_err, mask, phot, phot_mask, mc_samples,
                                  batch_size, seed, prec)
            net_factor = self._refine(res, fit)
        level = (continuum_envelope(flux, good, self.grid) if n and self.grid is not None
                 else None)  # the upper envelope per chip segment: a spoiled normalization
        res["stellarnet_flag"] = stellarnet_flags(res, mask.mean(1) if n else np.zeros(0), self.label_range,
                                                  physical_ranges(self.label_names), continuum_level=level)
        if net_factor is not None:  # after the flags, which are judged on the network's own σ
            res["sigma_network"] = (res["sigma_network"] * net_factor).astype(np.float32)
        return res, fit

    def measure_common_residual(self, flux: Any, flux_err: Any, photometry: Any = None, pix_mask: Any = None,
                                batch_size: int = 128, rounds: int = COMMON_RESIDUAL_ROUNDS) -> dict[str, Any]:
        """Measure the relative residual the given spectra (a sample of one survey: a few thousand stars)
        share against the emulator and divide it out of every spectrum predicted from now on
        (:attr:`flux_correction`; :func:`~stellarnet.refinement.residuals.common_residual`): the stars are
        predicted and, against the model spectra of their own χ² fits, the median over the refined stars of
        f / model − 1 is kept per pixel where it is significant; ``rounds`` times, each on the spectra
        corrected by the rounds before (labels that a residual has biased absorb part of it, so one
        round removes only part). Telluric and sky residuals at fixed pixels, another pipeline's
        continuum convention or a flux-calibration ripple — what every star of a survey shares and no
        star's labels explain — stop moving the labels.

        Needs the refinement stage. Returns {stars (refined stars used in the last round),
        pixels_corrected, rms and max_abs of the correction (relative flux), median_error (the median
        standard error of a pixel's correction in the first round), rounds}."""
        if self.emulator is None:
            raise ValueError("measure_common_residual needs the refinement stage (a model folder with "
                             f"{EMULATOR_FILE})")
        rounds = _count("rounds", rounds, minimum=1)
        from stellarnet.refinement.residuals import common_residual

        f = np.asarray(_as_array(flux, "flux"), np.float32)
        f = f[None] if f.ndim == 1 else f
        e = np.asarray(_as_array(flux_err, "flux_err"), np.float32).reshape(f.shape)
        m = None if pix_mask is None else np.asarray(_as_array(pix_mask, "pix_mask")).reshape(f.shape).astype(bool)
        f, e, good = mask_unusable_pixels(f, e, m)
        total = np.zeros(f.shape[1])
        first_error = float("nan")
        self.flux_correction = None
        stars = 0
        for r in range(rounds):  # the fit of the prediction itself gives the model spectra: one fit per round
            res, fit = self._predict_clean(f, e, good, photometry, 0, batch_size, None, self.precision, True,
                                           return_model=True)
            if fit is None:  # no spectra
                break
            rows = np.flatnonzero(res["refine_flag"] == 0)
            stars = int(len(rows))
            corrected = f[rows] / (1.0 + total).astype(np.float32)
            step, err = common_residual(corrected, fit.model_flux[rows], fit.fit_weight[rows])
            if r == 0 and np.isfinite(err).any():
                first_error = float(np.median(err[np.isfinite(err)]))
            total = (1.0 + total) * (1.0 + step) - 1.0
            self.flux_correction = total.astype(np.float32) if total.any() else None
            if not step.any():
                break
        kept = total != 0
        return {"stars": stars, "pixels_corrected": int(kept.sum()),
                "rms": float(np.sqrt(np.mean(total[kept] ** 2))) if kept.any() else 0.0,
                "max_abs": float(np.abs(total).max()) if len(total) else 0.0,
                "median_error": first_error, "rounds": r + 1}

    def _network_pass(self, flux: np.ndarray, flux_err: np.ndarray, mask: np.ndarray, phot: np.ndarray,
                      phot_mask: np.ndarray, mc_samples: int, batch_size: int, seed: int | None,
                      prec: str) -> dict[str, Any]:
        """The network's labels, calibrated σ and class probabilities / names for cleaned arrays."""
        n = flux.shape[0]
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
                good = (t[2] > 0) & torch.isfinite(t[1]) & (t[1] > 0)
                noise = median_error(t[1].float(), good)[:, 0]
                parts.append(
                    {
                        **{k: out[k].float().cpu().numpy() for k in ("labels", "sigma_aleatoric", "sigma_epistemic", "sigma_total")},
                        "flux_noise": noise.float().cpu().numpy(),
                        "class_probs": {k: v.float().cpu().numpy() for k, v in out["class_probs"].items()},
                    }
                )
        L = len(self.label_names)
        res: dict[str, Any] = {}
        for k in ("labels", "sigma_aleatoric", "sigma_epistemic", "sigma_total"):
            res[k] = np.concatenate([p[k] for p in parts]) if parts else np.zeros((0, L), np.float32)
        res["flux_noise"] = np.concatenate([p["flux_noise"] for p in parts]) if parts else np.zeros(0, np.float32)
        if self.sigma_scale is not None:  # post-hoc calibration fitted on the validation split
            sigma = res["sigma_aleatoric"] * self.sigma_scale
            if self.sigma_noise_scale is not None:  # ... with a term that grows with the noise (1/SNR)
                noise = np.nan_to_num(res["flux_noise"], nan=0.0)[:, None]
                sigma = np.sqrt(sigma**2 + (self.sigma_noise_scale * noise) ** 2)
            res["sigma_aleatoric"] = sigma.astype(np.float32)
            res["sigma_total"] = np.sqrt(res["sigma_aleatoric"] ** 2 + res["sigma_epistemic"] ** 2).astype(np.float32)
        res["class_probs"] = {
            t: (np.concatenate([p["class_probs"][t] for p in parts]) if parts else np.zeros((0, len(names)), np.float32))
            for t, names in self.class_tasks.items()
        }
        for t, temperature in (self.data_spec.get("class_temperature") or {}).items():
            if t in res["class_probs"] and n:  # temperature scaling fitted on the validation split
                res["class_probs"][t] = apply_temperature(res["class_probs"][t], temperature).astype(np.float32)
        res["classes"] = {t: np.asarray(names)[res["class_probs"][t].argmax(1)] for t, names in self.class_tasks.items()}
        return res

    def _second_look(self, res: dict[str, Any], outliers: tuple[np.ndarray, np.ndarray], flux: np.ndarray,
                     flux_err: np.ndarray, mask: np.ndarray, phot: np.ndarray, phot_mask: np.ndarray,
                     mc_samples: int, batch_size: int, seed: int | None, prec: str) -> None:
        """The network again, on the stars whose fit rejected outlier pixels, with those pixels masked (in
        place): a corrupted pixel that carries an ordinary error (a cosmic ray, a hot pixel, a fill value)
        is invisible to the network's error-aware inputs, but not to the χ² fit against the emulator; the
        network's labels, σ and classes then come from the spectrum without it."""
        rows = np.unique(outliers[0])
        usable = mask[rows] > 0
        usable[np.searchsorted(rows, outliers[0]), outliers[1]] = False
        f, e, good = mask_unusable_pixels(flux[rows], flux_err[rows], usable)
        again = self._network_pass(f, e, good.astype(np.float32), phot[rows], phot_mask[rows], mc_samples,
                                   batch_size, seed, prec)
        for k in ("labels", "sigma_aleatoric", "sigma_epistemic", "sigma_total", "flux_noise"):
            res[k][rows] = again[k]
        for t in res["class_probs"]:
            res["class_probs"][t][rows] = again["class_probs"][t]
            res["classes"][t][rows] = again["classes"][t]

    def _refine(self, res: dict[str, Any], r: RefineResult) -> np.ndarray | None:
        """Replace ``res``'s labels and σ by the emulator's χ² fit where it is trusted (in place). With
        ``disagreement_inflation`` returns the factor (N, L) for the network's σ as well — the same Birge
        ratio, where the refined labels are kept (1 elsewhere) — for the caller to apply after the flags."""
        refined = apply_label_calibration(r.labels, self.label_calibration)  # onto the training labels' scale
        chi2 = (np.maximum(CHI2_SCALE_FLOOR, r.chi2) if self.chi2_scaling == "two_sided"
                else np.maximum(1.0, r.chi2))
        sigma = r.sigma * np.sqrt(chi2)[:, None]
        if self.refine_sigma_scale is not None:
            sigma = sigma * self.refine_sigma_scale
        net_labels, net_sigma = res["labels"], res["sigma_total"]
        if self.refine_sigma_network_scale is not None:  # the refined labels' error floor
            sigma = np.sqrt(sigma**2 + (self.refine_sigma_network_scale * net_sigma) ** 2)
        if r.emulator_spread is not None:  # the emulator's own error: the labels' spread over its members
            sigma = np.sqrt(sigma**2 + np.nan_to_num(r.emulator_spread) ** 2)
            res["refine_emulator_spread"] = r.emulator_spread
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


def _blank_empty_rows(res: dict[str, Any], empty: np.ndarray) -> None:
    """No numbers for a spectrum without a usable pixel (in place): its labels and σ NaN (so it is not
    refined and its flag says UNPHYSICAL and NOT_REFINED), class probabilities NaN and classes "" — the
    network's output there is its prior, not a measurement."""
    if not empty.any():
        return
    for k in ("labels", "sigma_aleatoric", "sigma_epistemic", "sigma_total"):
        res[k][empty] = np.nan
    for t in res["class_probs"]:
        res["class_probs"][t][empty] = np.nan
        classes = res["classes"][t].astype(object)
        classes[empty] = ""
        res["classes"][t] = classes


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
