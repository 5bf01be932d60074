"""Data-driven forward model and χ² label refinement (The Payne, Ting et al. 2019, learned from data).

The network (:class:`stellarnet.network.module.StellarNetModule`) maps a spectrum to labels. Its
errors have a floor that does not shrink with S/N (an amortized estimator), so at high S/N it stays
several times above the Cramér–Rao bound. The refinement stage adds the generative direction:

* :class:`SpectrumEmulator` — an MLP ``labels (Teff [K], logg, [Fe/H], [α/Fe] [dex]) ->
  continuum-normalized flux`` on the training grid (4 → H → H → P, SiLU), trained on the
  training split's *observed* spectra (inverse-variance weighted, bad pixels excluded).
* :func:`train_emulator` — its inputs are the network's predictions for the training stars, not the
  catalogue labels: catalogue label noise in the *inputs* of a regression biases it (errors in
  variables), the network's labels are 3–4× less noisy and carry the catalogue's calibration.
  Chip segments with anomalous χ² in a star (persistence, artefacts) are dropped after a first pass.
* :func:`refine_labels` — per star, Gauss–Newton / Levenberg–Marquardt minimization of
  χ² = Σ w (f − model(θ) (1 + continuum correction))² from the network's estimate, with a per-chip
  polynomial continuum correction fitted jointly, segment clipping, the formal σ from (JᵀWJ)⁻¹
  and the reduced χ² of the fit (a per-star quality figure).
* :func:`fit_label_calibration` — the emulator inherits the smooth biases of the network's labels
  it was trained on; a quadratic function of the refined labels, fitted on the training split
  against the reference (catalogue) labels, puts the refined labels back on the reference scale
  (the reference noise is in the dependent variable, so it averages out instead of biasing).

Nothing here knows where the spectra come from; the grid's chips come from
:mod:`stellarnet.io.grids`.
"""

from __future__ import annotations

import logging
import math
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from stellarnet.io import grids

__all__ = ["SpectrumEmulator", "RefineResult", "SpectraBlocks", "chip_segments", "fit_weights", "train_emulator",
           "refine_labels",
           "emulator_state", "emulator_from_state", "fit_label_calibration", "apply_label_calibration", "fit_settings",
           "continuum_basis", "continuum_spline_basis"]

log = logging.getLogger(__name__)

#: the keyword arguments of :func:`refine_labels` a saved refinement stage may set
FIT_KEYS = ("iters", "clip_rounds", "clip_iters", "clip_threshold", "damping", "bound", "continuum_degree",
            "continuum_knots", "pixel_clip", "fit_lsf", "noise_correlation")


def fit_settings(settings: Mapping[str, Any] | None) -> dict[str, Any]:
    """The :func:`refine_labels` keywords (:data:`FIT_KEYS`) among ``settings`` (others are ignored)."""
    return {k: v for k, v in (settings or {}).items() if k in FIT_KEYS}


MAX_WEIGHT = 1.0 / 0.002**2  # inverse-variance cap: no pixel counts as better than S/N 500
SEGMENTS_PER_CHIP = 4


class SpectrumEmulator(nn.Module):
    """MLP ``labels [K, dex, dex, dex] -> continuum-normalized flux (P,)``.

    Args:
        label_names: the labels, in input order.
        n_pixels: output pixels (the training grid, gaps removed).
        hidden: width of the two hidden layers.
        label_mean, label_std: input standardization (physical units).
        grid: the grid name (``"dr12"`` / ``"dr17"``), for segment clipping; None = one segment.
    """

    def __init__(self, label_names: Sequence[str], n_pixels: int, hidden: int = 256,
                 label_mean: Sequence[float] | None = None, label_std: Sequence[float] | None = None,
                 grid: str | None = None) -> None:
        super().__init__()
        self.label_names = list(label_names)
        self.n_pixels = int(n_pixels)
        self.hidden = int(hidden)
        self.grid = grid
        n = len(self.label_names)
        mean = torch.zeros(n) if label_mean is None else torch.as_tensor(label_mean, dtype=torch.float32)
        std = torch.ones(n) if label_std is None else torch.as_tensor(label_std, dtype=torch.float32)
        if mean.shape != (n,) or std.shape != (n,) or not torch.all(std > 0):
            raise ValueError(f"label_mean/label_std must be {n} values with std > 0")
        self.register_buffer("label_mean", mean.clone())
        self.register_buffer("label_std", std.clone())
        self.net = nn.Sequential(nn.Linear(n, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, self.n_pixels))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Flux for *standardized* labels ``z`` (N, L)."""
        return self.net(z)

    def standardize(self, labels: torch.Tensor) -> torch.Tensor:
        return (labels - self.label_mean) / self.label_std

    def flux(self, labels: np.ndarray) -> np.ndarray:
        """Model flux (N, P) float32 for labels in physical units (N, L)."""
        with torch.no_grad():
            x = torch.as_tensor(np.ascontiguousarray(np.atleast_2d(labels)), dtype=torch.float32,
                                device=self.label_mean.device)
            return self(self.standardize(x)).cpu().numpy()

    def config(self) -> dict[str, Any]:
        """Plain constructor arguments (for a weights-only checkpoint)."""
        return {"label_names": self.label_names, "n_pixels": self.n_pixels, "hidden": self.hidden,
                "label_mean": self.label_mean.tolist(), "label_std": self.label_std.tolist(), "grid": self.grid}


def emulator_state(model: SpectrumEmulator, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """``{"config", "state_dict", **extra}`` with tensors and plain containers only (weights_only-safe)."""
    return {"config": model.config(), "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            **(extra or {})}


def emulator_from_state(state: dict[str, Any]) -> SpectrumEmulator:
    """Rebuild a :class:`SpectrumEmulator` (eval mode) from :func:`emulator_state`'s dict (strict)."""
    if not isinstance(state, dict) or "config" not in state or "state_dict" not in state:
        raise ValueError("not a spectrum-emulator state: expected a dict with 'config' and 'state_dict'")
    model = SpectrumEmulator(**state["config"])
    model.load_state_dict(state["state_dict"], strict=True)
    return model.eval()


def _chips(n_pixels: int, grid: str | None) -> list[slice]:
    """The grid's chip slices (the whole spectrum as one chip if the grid is unknown)."""
    slices = grids.chip_slices(grid) if grid is not None else [slice(0, n_pixels)]
    if slices[-1].stop != n_pixels:
        raise ValueError(f"grid {grid!r} has {slices[-1].stop} pixels, spectra have {n_pixels}")
    return slices


def chip_segments(n_pixels: int, grid: str | None, per_chip: int = SEGMENTS_PER_CHIP) -> torch.Tensor:
    """(P, K) float32 one-hot matrix of the pixels' segment: each chip cut into ``per_chip`` equal
    parts (one segment for the whole spectrum if the grid is unknown)."""
    seg = np.zeros(n_pixels, np.int64)
    k = 0
    for sl in _chips(n_pixels, grid):
        edges = np.linspace(sl.start, sl.stop, per_chip + 1).astype(int)
        for a, b in zip(edges[:-1], edges[1:]):
            seg[a:b] = k
            k += 1
    return torch.from_numpy(np.eye(k, dtype=np.float32)[seg])


def continuum_basis(n_pixels: int, grid: str | None, degree: int | None) -> torch.Tensor:
    """(P, K) float32 basis of a multiplicative continuum correction: per chip, Chebyshev polynomials
    T₀…T_degree of x ∈ [−1, 1] across the chip (zero outside it), i.e. the space in which the
    per-chip continuum normalization (:func:`stellarnet.io.spectra.continuum_normalize`) errs.
    One segment for the whole spectrum if the grid is unknown; ``degree`` None or < 0: K = 0."""
    if degree is None or int(degree) < 0:
        return torch.zeros(n_pixels, 0)
    cols = []
    for sl in _chips(n_pixels, grid):
        x = np.linspace(-1.0, 1.0, sl.stop - sl.start)
        for k in range(int(degree) + 1):
            b = np.zeros(n_pixels, np.float32)
            b[sl] = np.polynomial.chebyshev.chebval(x, [0.0] * k + [1.0])
            cols.append(b)
    return torch.from_numpy(np.stack(cols, 1))


def continuum_spline_basis(n_pixels: int, grid: str | None, spacing: float) -> torch.Tensor:
    """(P, K) float32 basis of a multiplicative continuum correction: per chip, cubic B-splines in
    wavelength with knots about every ``spacing`` Å (zero outside the chip). Where a per-chip
    polynomial only absorbs continuum errors on the chip's scale (~500 Å), these follow any
    smooth normalization error on scales above ~``spacing`` — e.g. a pseudo-continuum that tracks
    the line blanketing (a running mean under a 50 Å kernel, Ho et al. 2017) — at the price of
    the information in broader spectral features. Needs a known grid (its wavelengths)."""
    from scipy.interpolate import BSpline

    if grid is None:
        raise ValueError("a spline continuum needs the spectra's grid (wavelengths); use continuum_degree instead")
    if not spacing or float(spacing) <= 0:
        raise ValueError(f"continuum_knots must be a positive spacing in Å, got {spacing!r}")
    wave = grids.wavelength(grid)
    cols = []
    for sl in _chips(n_pixels, grid):
        w = wave[sl]
        lo, hi = float(w[0]), float(w[-1])
        inner = np.linspace(lo, hi, max(1, int(round((hi - lo) / float(spacing)))) + 1)
        knots = np.r_[[lo] * 3, inner, [hi] * 3]
        design = BSpline.design_matrix(np.clip(w, lo, hi), knots, 3).toarray()
        for j in range(design.shape[1]):
            b = np.zeros(n_pixels, np.float32)
            b[sl] = design[:, j]
            cols.append(b)
    return torch.from_numpy(np.stack(cols, 1))


def fit_weights(flux: np.ndarray, flux_err: np.ndarray, pix_mask: np.ndarray | None) -> np.ndarray:
    """Inverse-variance pixel weights (N, P) float32: 1/σ² capped at :data:`MAX_WEIGHT`, 0 for bad,
    masked or non-finite pixels."""
    flux = np.asarray(flux, np.float32)
    err = np.asarray(flux_err, np.float32)
    good = np.isfinite(flux) & np.isfinite(err) & (err > 0)
    if pix_mask is not None:
        good &= np.asarray(pix_mask).astype(bool)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        w = np.where(good, np.minimum(1.0 / (err.astype(np.float64) ** 2), MAX_WEIGHT), 0.0)
    return w.astype(np.float32)


def _bad_segments(resid2_w: torch.Tensor, w: torch.Tensor, seg: torch.Tensor, threshold: float) -> torch.Tensor:
    """(N, K) bool: the anomalous segments of each star, reduced χ² of a segment above
    ``max(threshold, 2 × the star's median segment χ²)``; at most half of a star's segments."""
    n_seg = (w > 0).float() @ seg
    chi_seg = (resid2_w @ seg) / n_seg.clamp_min(1.0)
    med = chi_seg.masked_fill(n_seg == 0, float("nan")).nanmedian(dim=1, keepdim=True).values.nan_to_num(1.0)
    bad = (chi_seg > torch.clamp(2.0 * med, min=threshold)) & (n_seg > 0)
    too_many = bad.sum(1) > (n_seg > 0).sum(1) // 2
    bad[too_many] = False
    return bad


def _segment_clip(resid2_w: torch.Tensor, w: torch.Tensor, seg: torch.Tensor, threshold: float) -> torch.Tensor:
    """Weights with the anomalous segments of each star (:func:`_bad_segments`) set to 0."""
    return w * (1.0 - _bad_segments(resid2_w, w, seg, threshold).float() @ seg.T)


@dataclass(frozen=True)
class SpectraBlocks:
    """Training spectra that stay on disk, for :func:`train_emulator` with bounded memory.

    ``read(positions)`` returns ``(flux, flux_err, pix_mask)``, each (len(positions), ``n_pixels``), for
    ascending positions in 0 … ``n`` − 1 (``pix_mask`` may be None); the emulator reads ``block`` stars
    at a time, every epoch (e.g. rows of a shard split: :meth:`stellarnet.dataset.shards.ShardReader.rows`).
    """

    n: int
    n_pixels: int
    read: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray | None]]
    block: int = 2048
    #: read once into memory as (flux, weight) tensors (8 bytes per pixel per star) instead of every epoch
    cache: bool = False

    def __post_init__(self) -> None:
        if self.block < 1:
            raise ValueError(f"SpectraBlocks.block must be >= 1, got {self.block}")

    def __len__(self) -> int:
        return self.n

    @classmethod
    def of_arrays(cls, flux: np.ndarray, flux_err: np.ndarray, pix_mask: np.ndarray | None,
                  block: int = 2048) -> "SpectraBlocks":
        """Spectra already in memory, as a cached source (the emulator's tensors filled block by block)."""
        return cls(len(flux), np.shape(flux)[1],
                   lambda pos: (flux[pos], flux_err[pos], None if pix_mask is None else pix_mask[pos]), block,
                   cache=True)


def train_emulator(
    labels: np.ndarray,
    flux: np.ndarray | SpectraBlocks,
    flux_err: np.ndarray | None,
    pix_mask: np.ndarray | None,
    label_names: Sequence[str],
    grid: str | None,
    hidden: int = 256,
    epochs: int = 150,
    clip_after: float = 0.3,
    clip_threshold: float = 2.0,
    batch_size: int = 256,
    lr: float = 2e-3,
    seed: int = 0,
    progress: Callable[[int, float], None] | None = None,
    init_model: SpectrumEmulator | None = None,
    device: str | torch.device = "cpu",
) -> tuple[SpectrumEmulator, dict[str, Any]]:
    """Fit a :class:`SpectrumEmulator` to observed spectra by inverse-variance weighted least squares.

    Args:
        labels: (N, L) input labels in physical units (rows with non-finite labels are skipped).
        flux, flux_err, pix_mask: (N, P) continuum-normalized spectra, errors, 1 = good pixel — held
            on ``device`` whole (~2 × 4 bytes × N × P); or ``flux`` a :class:`SpectraBlocks` (then
            ``flux_err`` and ``pix_mask`` None): with ``cache`` read once into the same tensors (the
            same training as from arrays), else read block by block every epoch, memory bounded by the
            block whatever N (minibatches drawn within a block, the blocks in a fresh random order).
        label_names, grid: see :class:`SpectrumEmulator`.
        hidden, epochs, batch_size, lr, seed: MLP width and Adam/one-cycle schedule.
        clip_after: after this fraction of the epochs, segments with anomalous χ² are masked
            (see :func:`_segment_clip`) for the rest of training; 0 or ≥ 1 = never.
        clip_threshold: reduced-χ² threshold of the segment clipping.
        progress: called as ``progress(epoch, chi2_per_pixel)`` after every epoch.
        init_model: continue training this model (a copy; its label standardization is kept).
        device: where to train.

    Returns:
        The model (eval mode, CPU) and a summary dict (stars, epochs, final χ²/pixel, masked segment
        fraction, seconds, ``streamed``: read from a :class:`SpectraBlocks` every epoch).
    """
    source = flux if isinstance(flux, SpectraBlocks) else SpectraBlocks.of_arrays(flux, flux_err, pix_mask)
    streamed = not source.cache
    labels = np.asarray(labels, np.float64)
    n_pixels = source.n_pixels
    if labels.shape[0] != len(source):
        raise ValueError(f"labels have {labels.shape[0]} rows, the spectra {len(source)}")
    ok = np.isfinite(labels).all(1)
    if ok.sum() < 10:
        raise ValueError(f"train_emulator needs at least 10 stars with finite labels, got {int(ok.sum())}")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x_phys = labels[ok]
    if init_model is not None:
        model = emulator_from_state(emulator_state(init_model))
        if model.n_pixels != n_pixels or model.label_names != list(label_names):
            raise ValueError("init_model does not match the spectra's pixels or the label names")
        hidden = model.hidden
    else:
        model = SpectrumEmulator(label_names, n_pixels, hidden, x_phys.mean(0), x_phys.std(0) + 1e-12, grid)
    dev = torch.device(device)
    model = model.to(dev)
    x = model.standardize(torch.as_tensor(x_phys, dtype=torch.float32, device=dev))
    seg = chip_segments(n_pixels, grid).to(dev)
    n = len(x)
    data = (_StreamedSpectra if streamed else _InMemorySpectra)(source, np.flatnonzero(ok), seg, dev)
    if init_model is None:
        with torch.no_grad():  # start at the weighted mean spectrum
            model.net[-1].bias.copy_(data.weighted_mean())
    steps_per_epoch = data.steps_per_epoch(batch_size)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.05)
    clip_epoch = int(round(clip_after * epochs)) if 0 < clip_after < 1 else -1
    chi2 = float("nan")
    masked_fraction = 0.0
    model.train()
    for epoch in range(epochs):
        if epoch == clip_epoch:
            with torch.no_grad():
                masked_fraction = data.clip_segments(model, x, clip_threshold)
        total = 0.0
        good_fraction = 0.0
        for rows, f, w in data.batches(gen, batch_size):
            loss = ((model(x[rows]) - f) ** 2 * w).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(rows)
            good_fraction += float((w > 0).float().mean(1).sum())
        chi2 = total / n * n_pixels / float(good_fraction / n * n_pixels)
        if not math.isfinite(chi2):
            raise FloatingPointError(f"spectrum emulator training diverged at epoch {epoch} (χ² = {chi2})")
        if progress is not None:
            progress(epoch, chi2)
    model = model.eval().cpu()
    return model, {"stars": int(n), "epochs": int(epochs), "hidden": int(hidden), "chi2_per_pixel": chi2,
                   "masked_pixel_fraction": masked_fraction, "seconds": time.perf_counter() - t0,
                   "streamed": streamed}


def _flux_and_weights(source: SpectraBlocks, positions: np.ndarray,
                      dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Flux (non-finite → 1) and :func:`fit_weights` of the stars at ``positions`` of ``source``, on ``dev``."""
    flux, err, mask = source.read(positions)
    f = np.nan_to_num(np.asarray(flux, np.float32), nan=1.0, posinf=1.0, neginf=1.0)
    return torch.from_numpy(f).to(dev), torch.from_numpy(fit_weights(flux, err, mask)).to(dev)


def _clip_block(f: torch.Tensor, w: torch.Tensor, model_flux: torch.Tensor, seg: torch.Tensor,
                threshold: float) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Segment clipping of a block of stars: (bad segments (n, K), clipped weights, good pixels dropped,
    good pixels before)."""
    bad = _bad_segments((f - model_flux) ** 2 * w, w, seg, threshold)
    w_new = w * (1.0 - bad.float() @ seg.T)
    return bad, w_new, float(((w > 0) & (w_new == 0)).sum()), float((w > 0).sum())


class _TrainingSpectra:
    """The emulator's training spectra (the stars of ``source`` at ``positions``, ascending) as (flux,
    weights) tensors: minibatches per epoch, the weighted mean spectrum, and segment clipping
    (:func:`_bad_segments`) against the current model."""

    def __init__(self, source: SpectraBlocks, positions: np.ndarray, seg: torch.Tensor, dev: torch.device) -> None:
        self.source, self.seg, self.dev = source, seg, dev
        self.blocks = [positions[s:s + source.block] for s in range(0, len(positions), source.block)]
        self.starts = np.cumsum([0] + [len(b) for b in self.blocks])  # block b is label rows starts[b]…starts[b+1]

    def weighted_mean(self) -> torch.Tensor:
        raise NotImplementedError

    def steps_per_epoch(self, batch_size: int) -> int:
        raise NotImplementedError

    def batches(self, gen: torch.Generator, batch_size: int) -> Any:
        """Yields (rows into the label tensor, flux, weights) minibatches covering every star once."""
        raise NotImplementedError

    def clip_segments(self, model: SpectrumEmulator, x: torch.Tensor, threshold: float) -> float:
        """Drop the anomalous segments for the rest of training; returns the fraction of good pixels dropped."""
        raise NotImplementedError


class _InMemorySpectra(_TrainingSpectra):
    """Read once, block by block, into (N, P) flux and weight tensors (no whole numpy copy at any time)."""

    def __init__(self, source: SpectraBlocks, positions: np.ndarray, seg: torch.Tensor, dev: torch.device) -> None:
        super().__init__(source, positions, seg, dev)
        self.f = torch.empty(len(positions), source.n_pixels, dtype=torch.float32, device=dev)
        self.w = torch.empty_like(self.f)
        for b, pos in enumerate(self.blocks):
            sl = slice(self.starts[b], self.starts[b + 1])
            self.f[sl], self.w[sl] = _flux_and_weights(source, pos, dev)

    def weighted_mean(self) -> torch.Tensor:
        return (self.f * self.w).sum(0) / self.w.sum(0).clamp_min(1e-12)

    def steps_per_epoch(self, batch_size: int) -> int:
        return math.ceil(len(self.f) / batch_size)

    def batches(self, gen: torch.Generator, batch_size: int) -> Any:
        perm = torch.randperm(len(self.f), generator=gen).to(self.f.device)
        for s in range(0, len(self.f), batch_size):
            j = perm[s:s + batch_size]
            yield j, self.f[j], self.w[j]

    def clip_segments(self, model: SpectrumEmulator, x: torch.Tensor, threshold: float) -> float:
        dropped = good = 0.0
        for s in range(0, len(self.f), 1024):  # per star, so block by block (no second (N, P) copy)
            sl = slice(s, s + 1024)
            _, self.w[sl], d, g = _clip_block(self.f[sl], self.w[sl], model(x[sl]), self.seg, threshold)
            dropped, good = dropped + d, good + g
        return dropped / max(good, 1.0)


class _StreamedSpectra(_TrainingSpectra):
    """Blocks read every epoch; the dropped segments kept as an (N, K) mask."""

    def __init__(self, source: SpectraBlocks, positions: np.ndarray, seg: torch.Tensor, dev: torch.device) -> None:
        super().__init__(source, positions, seg, dev)
        self.bad = torch.zeros(len(positions), seg.shape[1], dtype=torch.bool, device=dev)

    def _load(self, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Block b: (its label rows, flux, weights with the dropped segments removed)."""
        rows = torch.arange(int(self.starts[b]), int(self.starts[b + 1]), device=self.dev)
        f, w = _flux_and_weights(self.source, self.blocks[b], self.dev)
        return rows, f, w * (1.0 - self.bad[rows].float() @ self.seg.T)

    def weighted_mean(self) -> torch.Tensor:
        num = den = None
        for b in range(len(self.blocks)):
            _, f, w = self._load(b)
            num = (f * w).sum(0) if num is None else num + (f * w).sum(0)
            den = w.sum(0) if den is None else den + w.sum(0)
        return num / den.clamp_min(1e-12)

    def steps_per_epoch(self, batch_size: int) -> int:
        return sum(math.ceil(len(pos) / batch_size) for pos in self.blocks)

    def batches(self, gen: torch.Generator, batch_size: int) -> Any:
        for b in torch.randperm(len(self.blocks), generator=gen).tolist():
            rows, f, w = self._load(b)
            perm = torch.randperm(len(rows), generator=gen).to(self.dev)
            for s in range(0, len(rows), batch_size):
                j = perm[s:s + batch_size]
                yield rows[j], f[j], w[j]

    def clip_segments(self, model: SpectrumEmulator, x: torch.Tensor, threshold: float) -> float:
        dropped = good = 0.0
        for b in range(len(self.blocks)):
            rows, f, w = self._load(b)
            bad, _, d, g = _clip_block(f, w, model(x[rows]), self.seg, threshold)
            self.bad[rows] |= bad
            dropped, good = dropped + d, good + g
        return dropped / max(good, 1.0)


@dataclass
class RefineResult:
    """Refined labels (N, L) in physical units, their formal σ (from (JᵀWJ)⁻¹, physical units),
    the reduced χ² of the fit (N,), the number of masked segments (N,), the fraction of good
    pixels used (N,), the fraction of the usable pixels rejected as outliers (N,) and, when fitted, the
    change of the LSF variance (N,) in pixels² and the residual shift (N,) in pixels, and the residuals'
    pixel-to-pixel correlations (N, 2) at lags 1 and 2, and the companion score (N,)
    (:func:`companion_score`: the fit residuals' best match to the star's own lines at another velocity)."""

    labels: np.ndarray
    sigma: np.ndarray
    chi2: np.ndarray
    masked_segments: np.ndarray
    pixel_fraction: np.ndarray
    outlier_fraction: np.ndarray | None = None
    lsf_variance: np.ndarray | None = None
    shift: np.ndarray | None = None
    noise_correlation: np.ndarray | None = None
    companion: np.ndarray | None = None


#: lower limit of the reduced χ² by which the fit's σ and residuals are scaled (errors quoted 3x too large at most)
CHI2_SCALE_FLOOR = 0.1

#: the velocity offsets searched by :func:`companion_score` (pixels; 1 px ≈ 4.1 km/s): from beyond what
#: the line-shape nuisances absorb (a shift of ≤ 1 px, a broader LSF) to 100 km/s
COMPANION_LAGS = (3, 25)


def companion_score(resid: torch.Tensor, lines: torch.Tensor, chips: list[slice],
                    lags: tuple[int, int] = COMPANION_LAGS) -> torch.Tensor:
    """How strongly the fit residuals hold the star's own line pattern at another velocity, (n,):
    max over lags k (|k| in ``lags``, pixels, both signs) of t_k = Σᵢ r̃ᵢ g̃ᵢ₊ₖ / √(Σ g̃²), pairs within one
    chip. ``resid`` (n, P): the normalized residuals (f − model)·√w; ``lines`` (n, P): the fitted
    model's line profile (model − continuum)·√w (negative in the lines).

    For a single star the residuals are noise (t ~ N(0, 1) per lag; the largest of ~46 lags ≈ 2–3): a
    velocity error or an LSF mismatch is fitted by the line-shape nuisances and does not reach |k| ≥ 3.
    An unresolved companion (a double-lined binary) adds its absorption lines — mostly the same
    transitions — at its velocity: residuals negative where the shifted template is, t_k large
    (tens at S/N 100). Computed per chip by FFT (zero-padded, no wrap-around)."""
    lo, hi = int(lags[0]), int(lags[1])
    n = resid.shape[0]
    total = resid.new_zeros(n, 2 * (hi - lo + 1))
    norm = resid.new_zeros(n)
    for sl in chips:
        x, y = resid[:, sl], lines[:, sl]
        size = 1 << int(math.ceil(math.log2(x.shape[1] + hi + 1)))
        corr = torch.fft.irfft(torch.fft.rfft(x, size).conj() * torch.fft.rfft(y, size), size)  # Σ xᵢ yᵢ₊ₖ at k
        total += torch.cat([corr[:, lo:hi + 1], corr[:, size - hi:size - lo + 1]], 1)
        norm += (y * y).sum(1)
    return (total / norm.clamp_min(1e-30).sqrt()[:, None]).amax(1)


def _pixel_clip(resid: torch.Tensor, w: torch.Tensor, threshold: float) -> torch.Tensor:
    """Weights with outlier pixels set to 0: ``|f − model| √w`` above ``threshold`` × the star's
    robust scatter of those normalized residuals (1.4826 × MAD, at least 1, so a spectrum whose
    errors are quoted too small is not clipped wholesale). At most 20 % of a star's pixels go."""
    t = resid.abs() * w.sqrt()
    used = w > 0
    mad = torch.where(used, t, torch.full_like(t, float("nan"))).nanmedian(dim=1, keepdim=True).values
    scale = (1.4826 * mad).nan_to_num(1.0).clamp_min(1.0)
    bad = used & (t > threshold * scale)
    too_many = bad.sum(1) > 0.2 * used.sum(1)
    bad[too_many] = False
    return w * (~bad).to(w.dtype)


def _jacobian_and_flux(model: SpectrumEmulator) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Batched ``z (n, L) -> (∂flux/∂z (n, P, L), flux (n, P))`` in one forward-mode pass."""

    def one(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = model(z)
        return y, y

    return torch.func.vmap(torch.func.jacfwd(one, has_aux=True))


#: bounds of the fitted nuisances: the change of the LSF variance (pixels²; APOGEE's σ² ≈ 1.9 px²) and
#: the velocity shift (pixels; 1 px ≈ 4.1 km/s)
LSF_VARIANCE_BOUND = 2.0
SHIFT_BOUND = 1.0
#: Gaussian prior widths of the line-shape nuisances: LSF variance change 0.6 px² (≈ ±15 % in width
#: at 1σ, the spread of APOGEE's fibres), shift 0.25 px (≈ 1 km/s); they keep the marginalization's
#: cost in precision small on spectra that need neither
LINE_SHAPE_PRIOR = (0.6, 0.25)


def _with_prior(A: torch.Tensor, b: torch.Tensor | None, u: torch.Tensor,
                L: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Add the line-shape nuisances' Gaussian prior (:data:`LINE_SHAPE_PRIOR`, centred on 0) to the normal
    equations: precision on the diagonal of their block of A, −precision·u to b."""
    prec = torch.tensor([1.0 / w**2 for w in LINE_SHAPE_PRIOR], dtype=A.dtype, device=A.device)
    U = u.shape[1]
    A = A.clone()
    A[:, L:L + U, L:L + U] += torch.diag(prec[:U])
    if b is not None:
        b = b.clone()
        b[:, L:L + U] -= prec[:U] * u
    return A, b


def _line_shape_mask(n_pixels: int, grid: str | None) -> torch.Tensor:
    """(P,) float32 mask of the pixels where the line-shape nuisances are defined: all but the two ends
    of each chip."""
    inner = torch.zeros(n_pixels)
    for sl in _chips(n_pixels, grid):
        inner[sl.start + 1:sl.stop - 1] = 1.0
    return inner


def _second_difference(m: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """∂²m/∂x² (n, P) by second differences, zero at the chip ends."""
    d = torch.zeros_like(m)
    d[:, 1:-1] = m[:, 2:] - 2.0 * m[:, 1:-1] + m[:, :-2]
    return d * inner


def _first_difference(m: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """∂m/∂x (n, P) by central differences, zero at the chip ends."""
    d = torch.zeros_like(m)
    d[:, 1:-1] = 0.5 * (m[:, 2:] - m[:, :-2])
    return d * inner


def _line_shape(m: torch.Tensor, u: torch.Tensor, inner: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The emulator flux with the line-shape nuisances ``u`` (n, 2) applied to second order, and their
    derivatives (n, P, 2). u[:, 0] = s: LSF variance change (pixels²; the heat equation
    G_s * m = m + (s/2)∇²m + (s²/8)∇⁴m + …); u[:, 1] = δ: a shift (pixels, positive = redward;
    m(x − δ) = m − δ m′ + (δ²/2) m″ + …)."""
    s, dl = u[:, :1], u[:, 1:2]
    m2 = _second_difference(m, inner)
    d1 = 0.5 * m2
    d2 = 0.25 * _second_difference(d1, inner)
    g1 = _first_difference(m, inner)
    flux = m + s * d1 + 0.5 * s * s * d2 - dl * g1 + 0.5 * dl * dl * m2
    return flux, torch.stack([d1 + s * d2, -g1 + dl * m2], 2)


def _emulate(model: SpectrumEmulator, z: torch.Tensor, u: torch.Tensor | None, inner: torch.Tensor | None,
             jacobian: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Emulator flux (n, P) with the line-shape nuisances ``u`` applied (when not None), and with
    ``jacobian`` its Jacobian (n, P, L [+2]): the labels' columns (of the emulator itself), then the
    nuisances' columns."""
    if not jacobian:
        m = model(z)
        return None, m if u is None else _line_shape(m, u, inner)[0]
    J, m = _jacobian_and_flux(model)(z)
    if u is None:
        return J, m
    m_u, d = _line_shape(m, u, inner)
    return torch.cat([J, d], 2), m_u


def _system(model: SpectrumEmulator, z: torch.Tensor, c: torch.Tensor, basis: torch.Tensor, w: torch.Tensor,
            f: torch.Tensor | None, u: torch.Tensor | None, inner: torch.Tensor | None
            ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The normal equations at ``(z, c, u)``: JᵀWJ, JᵀW r (None without ``f``) and the model flux, with
    the line-shape nuisances' prior when ``u`` is fitted; then the emulator's Jacobian (n, P, L + U)
    and flux (n, P) they were built from."""
    J, m = _emulate(model, z, u, inner, jacobian=True)  # (n, P, L + U), (n, P)
    A, b, model_flux = _normal_equations(J, m, c, basis, w, f)
    if u is not None:
        A, b = _with_prior(A, b, u, z.shape[1])
    return A, b, model_flux, J, m


#: the residual correlations' lags used by :func:`noise_correlation_factor` (pixels)
NOISE_LAGS = (1, 2)


def _lag_products(x: torch.Tensor, y: torch.Tensor, straddles: dict[int, torch.Tensor]) -> torch.Tensor:
    """Σᵢ xᵢ yᵢ₊ₖ over the pixel pairs of one chip, per lag k of :data:`NOISE_LAGS` → (n, …, len(lags)),
    x and y (n, P, …): the sum over all pairs less the few that straddle a chip boundary
    (:func:`_chip_straddles`)."""
    out = []
    for k in NOISE_LAGS:
        i = straddles[k]
        out.append((x[:, :-k] * y[:, k:]).sum(1) - (x[:, i] * y[:, i + k]).sum(1))
    return torch.stack(out, -1)


def _chip_straddles(n_pixels: int, grid: str | None, device: Any) -> dict[int, torch.Tensor]:
    """For each lag k, the first pixels i (long tensor) of the pairs (i, i + k) that straddle two chips."""
    chip = torch.zeros(n_pixels, dtype=torch.long)
    for j, sl in enumerate(_chips(n_pixels, grid)):
        chip[sl] = j
    return {k: torch.nonzero(chip[:-k] != chip[k:])[:, 0].to(device) for k in NOISE_LAGS}


def _influence(last: tuple[torch.Tensor, torch.Tensor], A_inv: torch.Tensor, c: torch.Tensor, basis: torch.Tensor,
               sw: torch.Tensor, L: int) -> torch.Tensor:
    """The labels' influence vectors √W Ĵ (JᵀWJ)⁻¹[:, :L] (n, P, L) of the fit model
    ``emulator (1 + basis c)``: Ĵ = [J · (1 + basis c) | emulator flux × basis] from the emulator's
    Jacobian J (n, P, L + U) and flux (n, P) of the last step; ``sw`` = √W (n, P)."""
    J, m = last
    D = J.shape[2]
    cont_w = (1.0 + c @ basis.T) * sw
    v = J @ A_inv[:, :D, :L]
    v.mul_(cont_w[..., None]).add_((m * sw)[..., None] * (basis @ A_inv[:, D:, :L]))
    return v


def noise_correlation_factor(resid: torch.Tensor, influence: torch.Tensor,
                             straddles: dict[int, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Variance factor (n, L) of the labels when the noise is correlated from pixel to pixel, and the
    residual correlations (n, len(:data:`NOISE_LAGS`)).

    ``resid`` (n, P): the normalized residuals (f − model)·√w of the fit (0 where unused);
    ``influence`` (n, P, L): each label's influence vector ṽ = √W J (JᵀWJ)⁻¹ (the label is Σ ṽ r̃);
    ``straddles``: the pixel pairs across chip boundaries, left out (:func:`_chip_straddles`).
    With residual correlations ρₖ (measured per star, negative ones taken as 0) the label variance is
    ṽᵀCṽ = ṽᵀṽ (1 + 2 Σₖ ρₖ aₖ(ṽ)), aₖ the influence vector's own lag-k autocorrelation: white noise
    gives 1; noise shared by neighbouring pixels (resampled, co-added visits) more, the more so for
    labels read from line-wide features. At least 1."""
    power = (resid * resid).sum(1).clamp_min(1e-30)
    rho = (_lag_products(resid, resid, straddles) / power[:, None]).clamp(0.0, 0.9)  # (n, lags)
    vv = (influence * influence).sum(1).clamp_min(1e-30)  # (n, L)
    auto = _lag_products(influence, influence, straddles) / vv[..., None]  # (n, L, lags)
    factor = 1.0 + 2.0 * (rho[:, None, :] * auto).sum(-1)
    return factor.clamp_min(1.0), rho


def _gauss_newton(model: SpectrumEmulator, z: torch.Tensor, c: torch.Tensor, basis: torch.Tensor, f: torch.Tensor,
                  w: torch.Tensor, iters: int, damping: float, bound: float, u: torch.Tensor | None = None,
                  inner: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None,
                             tuple[torch.Tensor, torch.Tensor] | None]:
    """Damped Gauss–Newton steps on χ² = Σ w (f − model(z) (1 + basis c))² for the standardized
    labels ``z`` (n, L), the continuum coefficients ``c`` (n, K) and, when ``u`` is given, the
    line-shape nuisances u (n, 2) together. Returns ``(z, c, A, u, (J, m))`` with the undamped JᵀWJ
    ``A`` of the last step, for the formal covariance, and the emulator's Jacobian and flux it was
    built from (None, None if ``iters`` is 0)."""
    L = z.shape[1]
    U = 0 if u is None else u.shape[1]
    eye = torch.eye(L + U + c.shape[1], dtype=z.dtype, device=z.device)
    A, last = None, None
    for _ in range(iters):
        A, b, _, J, m = _system(model, z, c, basis, w, f, u, inner)
        last = (J, m)
        damped = A + damping * torch.diag_embed(torch.diagonal(A, dim1=1, dim2=2)) + 1e-9 * eye
        step = torch.linalg.solve(damped, b)
        z = (z + step[:, :L]).clamp(-bound, bound)
        if u is not None:
            u = u + step[:, L:L + U]
            u = torch.stack([u[:, 0].clamp(-LSF_VARIANCE_BOUND, LSF_VARIANCE_BOUND),
                             u[:, 1].clamp(-SHIFT_BOUND, SHIFT_BOUND)], 1)
        c = c + step[:, L + U:]
    return z, c, A, u, last


def _model_flux(model: SpectrumEmulator, z: torch.Tensor, c: torch.Tensor, basis: torch.Tensor,
                u: torch.Tensor | None = None, inner: torch.Tensor | None = None) -> torch.Tensor:
    """``model(z) (1 + basis c)`` (n, P): the emulator's flux (with the line-shape nuisances ``u``)
    times the continuum correction."""
    return _emulate(model, z, u, inner, jacobian=False)[1] * (1.0 + c @ basis.T)


_GRAM_PLANS: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # by id(basis), while it lives


def _weighted_gram(basis: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Bᵀ diag(vₙ) B (n, K, K) for a (P, K) basis and per-star pixel weights v (n, P), as one GEMM
    over the basis-function pairs that overlap somewhere (a per-chip basis is block-diagonal, a
    B-spline one banded: ~30 % of the K² pairs), without an (n, P, K) temporary. The pairs' (P, n_pairs)
    products are computed once per basis tensor."""
    plan = _GRAM_PLANS.get(id(basis))
    if plan is None:
        nz = basis != 0
        overlap = (nz.T.float() @ nz.float()) > 0
        k, l = torch.nonzero(torch.triu(overlap), as_tuple=True)
        plan = (basis[:, k] * basis[:, l], k, l)
        _GRAM_PLANS[id(basis)] = plan
        weakref.finalize(basis, _GRAM_PLANS.pop, id(basis), None)
    products, k, l = plan
    K = basis.shape[1]
    values = v @ products  # (n, n_pairs)
    gram = v.new_zeros(v.shape[0], K, K)
    gram[:, k, l] = values
    gram[:, l, k] = values
    return gram


def _normal_equations(J: torch.Tensor, m: torch.Tensor, c: torch.Tensor, basis: torch.Tensor, w: torch.Tensor,
                      f: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """JᵀWJ (n, L+K, L+K), JᵀW r (n, L+K) (None without ``f``) and the model flux (n, P) of
    ``model(z) (1 + basis c)``, from the emulator's Jacobian J (n, P, L) and flux m (n, P).

    The continuum columns m·T_k are never built: their blocks are products with the (P, K) basis,
    so the cost stays that of the L label columns."""
    cont = 1.0 + c @ basis.T
    model_flux = m * cont
    wc = w * cont
    Jt = J.transpose(1, 2)  # (n, L, P)
    A_zz = (Jt * (wc * cont)[:, None, :]) @ J
    A_zc = (Jt * (wc * m)[:, None, :]) @ basis  # (n, L, K)
    A_cc = _weighted_gram(basis, w * m * m)  # (n, K, K)
    A = torch.cat([torch.cat([A_zz, A_zc], 2), torch.cat([A_zc.transpose(1, 2), A_cc], 2)], 1)
    if f is None:
        return A, None, model_flux
    wr = w * (f - model_flux)
    b = torch.cat([(Jt @ (wr * cont)[..., None])[..., 0], (wr * m) @ basis], 1)
    return A, b, model_flux


def refine_labels(
    model: SpectrumEmulator,
    flux: np.ndarray,
    flux_err: np.ndarray,
    pix_mask: np.ndarray | None,
    init: np.ndarray,
    iters: int = 2,
    clip_rounds: int = 1,
    clip_iters: int = 1,
    clip_threshold: float = 2.0,
    damping: float = 1e-3,
    bound: float = 6.0,
    batch_size: int = 256,
    continuum_degree: int | None = 2,
    continuum_knots: float | None = None,
    pixel_clip: float | None = None,
    fit_lsf: bool = False,
    noise_correlation: bool = False,
) -> RefineResult:
    """χ²-fit labels to spectra with ``model``, starting at ``init`` (N, L), physical units.

    ``iters`` damped Gauss–Newton steps, then ``clip_rounds`` × (mask anomalous chip segments,
    ``clip_iters`` more steps). Standardized labels are kept within ±``bound`` training standard
    deviations. Rows whose ``init`` is not finite come back as NaN.

    With ``continuum_degree`` ≥ 0 the model flux is ``model(θ) × (1 + Σ c_k T_k)`` with per-chip
    Chebyshev polynomials (:func:`continuum_basis`) whose coefficients are fitted with the labels:
    the continuum normalization of a noisy spectrum rests on ~180 continuum pixels per chip, and its
    error — coherent across the chip — would otherwise go into the labels. The formal σ are
    marginalized over the coefficients. None: no continuum correction. With ``continuum_knots`` (Å)
    the correction is a per-chip cubic B-spline with knots that far apart instead
    (:func:`continuum_spline_basis`; used when ``continuum_degree`` is not None).

    With ``pixel_clip`` (e.g. 5), each clip round also rejects single pixels whose residual against
    the current model is more than ``pixel_clip`` robust σ (:func:`_pixel_clip`): corrupted pixels that
    carry a finite error (sky-line and telluric residuals, unflagged cosmic rays) leave the fit,
    iteratively, as the model improves. None: no pixel clipping.

    With ``fit_lsf`` the line shape is fitted as well, to second order (:func:`_line_shape`): a change s
    of the line-spread function's variance (pixels², within ±:data:`LSF_VARIANCE_BOUND`) and a residual
    shift δ (pixels, within ±:data:`SHIFT_BOUND`; a radial-velocity zero-point error of 1 km/s is
    0.24 px), each with a Gaussian prior (:data:`LINE_SHAPE_PRIOR`). Spectra from another fibre or
    spectrograph, whose lines are broader or narrower than the training survey's, or slightly off in
    velocity, do not bias the labels; σ is marginalized over both. They are returned in ``lsf_variance`` and ``shift``.

    With ``noise_correlation`` the formal σ also allows for noise that neighbouring pixels share (the
    visits of a combined spectrum are resampled before they are added): each star's residual
    correlations at lags 1 and 2 scale each label's variance by :func:`noise_correlation_factor`
    (1 for white noise). The correlations are returned in ``noise_correlation`` (lag 1, lag 2).
    """
    flux = np.asarray(flux, np.float32)
    if flux.ndim != 2 or flux.shape[1] != model.n_pixels:
        raise ValueError(f"flux must be (N, {model.n_pixels}) on the emulator's grid, got {flux.shape}")
    init = np.asarray(init, np.float64)
    if init.shape != (flux.shape[0], len(model.label_names)):
        raise ValueError(f"init must be ({flux.shape[0]}, {len(model.label_names)}), got {init.shape}")
    n, L = init.shape
    out = RefineResult(np.full((n, L), np.nan, np.float32), np.full((n, L), np.nan, np.float32),
                       np.full(n, np.nan, np.float32), np.zeros(n, np.int16), np.zeros(n, np.float32),
                       np.zeros(n, np.float32), np.full(n, np.nan, np.float32) if fit_lsf else None,
                       np.full(n, np.nan, np.float32) if fit_lsf else None,
                       np.full((n, len(NOISE_LAGS)), np.nan, np.float32) if noise_correlation else None,
                       np.full(n, np.nan, np.float32))
    ok_rows = np.flatnonzero(np.isfinite(init).all(1))
    w_all = fit_weights(flux, flux_err, pix_mask)
    dev = model.label_mean.device
    seg = chip_segments(model.n_pixels, model.grid).to(dev)
    basis = (continuum_spline_basis(model.n_pixels, model.grid, continuum_knots)
             if continuum_knots is not None and continuum_degree is not None
             else continuum_basis(model.n_pixels, model.grid, continuum_degree)).to(dev)
    inner = _line_shape_mask(model.n_pixels, model.grid).to(dev) if fit_lsf else None
    straddles = _chip_straddles(model.n_pixels, model.grid, dev) if noise_correlation else None
    chips = _chips(model.n_pixels, model.grid)
    std = model.label_std.cpu().numpy()
    model = model.eval()
    with torch.no_grad():
        for s in range(0, len(ok_rows), batch_size):
            rows = ok_rows[s:s + batch_size]
            f = torch.from_numpy(np.nan_to_num(flux[rows], nan=1.0, posinf=1.0, neginf=1.0)).to(dev)
            w0 = torch.from_numpy(w_all[rows]).to(dev)
            w = w0
            z = model.standardize(torch.as_tensor(init[rows], dtype=torch.float32, device=dev)).clamp(-bound, bound)
            c = torch.zeros(len(rows), basis.shape[1], dtype=z.dtype, device=dev)
            shape = torch.zeros(len(rows), 2, dtype=z.dtype, device=dev) if fit_lsf else None  # (LSF Δσ², shift)
            z, c, A, shape, last = _gauss_newton(model, z, c, basis, f, w, iters, damping, bound, shape, inner)
            w_seg = w0  # the weights after segment clipping only
            for _ in range(clip_rounds):
                resid = f - _model_flux(model, z, c, basis, shape, inner)
                w_new = _segment_clip(resid**2 * w, w, seg, clip_threshold)
                w_seg = torch.where((w > 0) & (w_new == 0), torch.zeros_like(w_seg), w_seg)  # dropped segments
                w = w_new
                if pixel_clip is not None:
                    w = _pixel_clip(resid, w, float(pixel_clip))
                z, c, A_clip, shape, last = _gauss_newton(model, z, c, basis, f, w, clip_iters, damping, bound,
                                                          shape, inner)
                A = A_clip  # None if clip_iters is 0: the weights changed, recomputed below
            if A is None:
                A, _, m, J_em, m_em = _system(model, z, c, basis, w, None, shape, inner)
                last = (J_em, m_em)
            else:  # JᵀWJ of the last (converged) step: one Jacobian fewer per star
                m = _model_flux(model, z, c, basis, shape, inner)
            A_inv = torch.linalg.pinv(A)
            var = torch.diagonal(A_inv[:, :L, :L], dim1=1, dim2=2)
            sw = w.sqrt()
            resid = (f - m) * sw  # normalized residuals of the fit
            if straddles is not None and last is not None:
                factor, rho = noise_correlation_factor(resid, _influence(last, A_inv, c, basis, sw, L), straddles)
                var = var * factor
                out.noise_correlation[rows] = rho.cpu().numpy()
            n_good = (w > 0).sum(1).clamp_min(1)
            chi2 = (resid * resid).sum(1) / n_good
            # residuals in units of their own scatter: a spectrum the model does not fit anywhere (χ² ≫ 1:
            # another spectral library, errors quoted too small) must not look like a companion
            cont = 1.0 + c @ basis.T
            scale = chi2.clamp_min(CHI2_SCALE_FLOOR).sqrt()[:, None]
            out.companion[rows] = companion_score(resid / scale, (m - cont) * sw, chips).cpu().numpy()
            out.labels[rows] = (z * model.label_std + model.label_mean).cpu().numpy()
            out.sigma[rows] = np.sqrt(np.clip(var.cpu().numpy(), 0, None)) * std
            out.chi2[rows] = chi2.cpu().numpy()
            masked = ((w0 > 0) & (w_seg == 0)).float() @ seg
            out.masked_segments[rows] = (masked > 0).sum(1).cpu().numpy().astype(np.int16)
            # single pixels dropped outside the masked segments: the outlier pixels
            out.outlier_fraction[rows] = (((w_seg > 0) & (w == 0)).sum(1).float()
                                          / (w0 > 0).sum(1).clamp_min(1).float()).cpu().numpy()
            if shape is not None:
                out.lsf_variance[rows] = shape[:, 0].cpu().numpy()
                out.shift[rows] = shape[:, 1].cpu().numpy()
            out.pixel_fraction[rows] = ((w > 0).sum(1).float() / max(1, model.n_pixels)).cpu().numpy()
    return out


def _quadratic_terms(z: np.ndarray, degree: int) -> np.ndarray:
    cols = [np.ones(len(z))] + [z[:, i] for i in range(z.shape[1])]
    if degree >= 2:
        cols += [z[:, i] * z[:, j] for i in range(z.shape[1]) for j in range(i, z.shape[1])]
    return np.stack(cols, 1)


def fit_label_calibration(labels: np.ndarray, reference: np.ndarray, reference_err: np.ndarray | None = None,
                          degree: int = 2, min_stars: int = 50) -> dict[str, Any]:
    """Per-label polynomial (degree 1 or 2 in all standardized labels) for ``reference − labels``,
    weighted least squares with weights 1/err² (unit weights without errors).

    Args:
        labels: (N, L) refined labels; reference: (N, L) reference labels (NaN = missing);
        reference_err: (N, L) their 1-σ errors, or None.
    Returns:
        Plain dict ``{"degree", "mean", "std", "coef" (L lists), "n" (L)}`` for
        :func:`apply_label_calibration`; a label with fewer than ``min_stars`` usable rows gets
        zero coefficients (no correction).
    """
    if degree not in (1, 2):
        raise ValueError(f"degree must be 1 or 2, got {degree}")
    x = np.asarray(labels, np.float64)
    ref = np.asarray(reference, np.float64)
    if ref.shape != x.shape:
        raise ValueError(f"reference shape {ref.shape} differs from labels shape {x.shape}")
    rows = np.isfinite(x).all(1)
    mean = np.nanmean(x[rows], 0) if rows.any() else np.zeros(x.shape[1])
    std = np.nanstd(x[rows], 0) if rows.any() else np.ones(x.shape[1])
    std = np.where(std > 0, std, 1.0)
    design = _quadratic_terms((np.where(rows[:, None], x, mean) - mean) / std, degree)
    coef, n_used = [], []
    for j in range(x.shape[1]):
        y = ref[:, j] - x[:, j]
        w = np.ones(len(y)) if reference_err is None else 1.0 / np.maximum(np.asarray(reference_err, np.float64)[:, j], 1e-12) ** 2
        ok = rows & np.isfinite(y) & np.isfinite(w)
        if ok.sum() < max(min_stars, design.shape[1] + 1):
            coef.append([0.0] * design.shape[1])
            n_used.append(int(ok.sum()))
            continue
        sw = np.sqrt(w[ok] / np.mean(w[ok]))
        c = np.linalg.lstsq(design[ok] * sw[:, None], y[ok] * sw, rcond=None)[0]
        coef.append([float(v) for v in c])
        n_used.append(int(ok.sum()))
    return {"degree": int(degree), "mean": [float(v) for v in mean], "std": [float(v) for v in std],
            "coef": coef, "n": n_used}


def apply_label_calibration(labels: np.ndarray, calibration: dict[str, Any] | None) -> np.ndarray:
    """``labels`` (N, L) + the fitted correction (float64; NaN rows stay NaN; None: unchanged)."""
    x = np.asarray(labels, np.float64)
    if not calibration:
        return x.copy()
    mean, std = np.asarray(calibration["mean"], np.float64), np.asarray(calibration["std"], np.float64)
    coef = np.asarray(calibration["coef"], np.float64)
    if mean.shape != (x.shape[1],) or coef.shape[0] != x.shape[1]:
        raise ValueError(f"label calibration is for {mean.shape[0]} labels, got {x.shape[1]}")
    design = _quadratic_terms((np.nan_to_num(x) - mean) / std, int(calibration["degree"]))
    if design.shape[1] != coef.shape[1]:
        raise ValueError("label calibration coefficients do not match its degree")
    return x + design @ coef.T
