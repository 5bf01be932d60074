"""Training the spectrum emulator on the training split's observed spectra, with the network's labels
as inputs (catalogue label noise in the inputs would bias it: errors in variables), inverse-variance
weighted, anomalous chip segments dropped after a first pass; spectra in memory or read block by block
(:class:`SpectraBlocks`, bounded memory)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from stellarnet.refinement.basis import _bad_segments, chip_segments, fit_weights
from stellarnet.refinement.emulator import SpectrumEmulator, emulator_from_state, emulator_state


@dataclass(frozen=True)
class SpectraBlocks:
    """Training spectra that stay on disk, for :func:`train_emulator` with bounded memory.

    ``read(positions)`` returns ``(flux, flux_err, pix_mask)``, each (len(positions), ``n_pixels``), for
    ascending positions in 0 … ``n`` − 1 (``pix_mask`` may be None); the emulator reads ``block`` stars
    at a time, every epoch (e.g. rows of a shard split: :meth:`stellarnet.dataset.reader.ShardReader.rows`).
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
    epochs: int = 400,
    clip_after: float = 0.3,
    clip_threshold: float = 2.0,
    batch_size: int = 256,
    lr: float = 5e-3,
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


def train_members(emulator: SpectrumEmulator, labels: np.ndarray, spectra: SpectraBlocks, *, n_members: int = 2,
                  epochs: int = 40, fraction: float = 0.5, lr: float = 2e-3, batch_size: int = 256, seed: int = 0,
                  device: str | torch.device = "cpu") -> list[SpectrumEmulator]:
    """Member emulators for :func:`~stellarnet.refinement.fit.refine_labels` (``members``): each the
    trained ``emulator`` trained ``epochs`` more on its own random ``fraction`` of the stars (the same
    ``labels`` (N, L) and ``spectra`` as it was trained on, e.g. :meth:`SpectraBlocks.of_arrays`; no
    segment clipping). Where many training stars
    shape the model the members agree with it; where a few do — the edges of the training set — what
    half of them say differs, and the refined labels with it: the spread of the labels over the
    members is a (lower) estimate of the emulator's own sampling error. Half-samples (``fraction``
    0.5) differ from the whole about as much as the whole differs from the truth, when each is fitted
    from scratch; members continued from the whole differ less. ``n_members`` 0: []."""
    if n_members < 0 or epochs < 1 or not 0 < fraction < 1:
        raise ValueError(f"train_members needs n_members >= 0, epochs >= 1 and 0 < fraction < 1; got {n_members}, "
                         f"{epochs}, {fraction}")
    labels = np.asarray(labels, np.float64)
    rng = np.random.default_rng([seed, 7])
    members = []
    for k in range(n_members):
        half = labels.copy()
        half[rng.random(len(half)) >= fraction] = np.nan  # train_emulator skips rows without labels
        model, _ = train_emulator(half, spectra, None, None, emulator.label_names, emulator.grid, epochs=epochs,
                                  clip_after=0.0, batch_size=batch_size, lr=lr, seed=seed + 1 + k,
                                  init_model=emulator, device=device)
        members.append(model)
    return members
