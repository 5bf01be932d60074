"""Observation model: emulator spectrum → noisy, flagged, continuum-normalized APOGEE spectrum.

Steps for each star (vectorized over chunks of stars):

1. ``model = emulator(labels)`` — un-normalized Kurucz flux on the 7,214-pixel DR12-era grid. It
   is *not* normalized (≈ 3–9 arbitrary units with the Teff-dependent stellar continuum slope).
2. Instrument throughput: per chip, level (blue 0.85, green 1.0, red 0.9) × (1 + a₁x + a₂(x² − ⅓))
   with x ∈ [−1, 1] across the chip and a₁ ~ N(0, 0.08), a₂ ~ N(0, 0.05) per star and chip (a
   smooth blaze/flat-field residual). ``raw = model × throughput``.
3. True continuum ``C``: the survey's normalization convention (:func:`stellarnet.simulate.shifts.normalize_convention`
   ``"cannon"``: per-chip Chebyshev of degree 2 on The Cannon's continuum pixels, the simulator's own
   implementation, independent of the pipeline's) fitted to the noiseless ``raw`` (smooth and positive). Noise σ = C / SNR per pixel.
4. Model-mismatch pixels (``apogee_bad_model_pixels_7214.npz``, where Kurucz models fit real
   spectra poorly): a systematic deviation δ = 0.01 C × s × p (p a fixed per-pixel N(0,1)
   pattern, s ~ U(0.5, 1.5) per star) is added and the reported error is inflated to
   sqrt(σ² + (0.01 C)²).
5. Persistence (APO blue chip, STARFLAG PERSIST_HIGH / MED / LOW): an additive spurious charge of
   8% / 4% / 2% of C on the first half of the blue chip.
6. ``noisy = raw + δ + persistence + σ·N(0, 1)``.
7. Bad-pixel runs (dead columns, cosmic rays; positions given by the caller): flux replaced by
   garbage (U(0, 2) × C), error set to :data:`BAD_ERR` (≥ the pipeline's ``BAD_PIXEL_ERR``), and
   excluded from the continuum fit.
8. Normalization by the same convention (``normalize_convention(noisy, err, bad, "cannon")``);
   the noiseless model (HDU3) is ``raw / continuum`` with the same continuum.
9. Optional perturbations (:class:`stellarnet.simulate.shifts.Shift`, the robustness suite): LSF width
   and radial-velocity residual on the model (before step 2), pixel-correlated noise (step 6), unflagged
   outlier pixels with finite inflated errors (after step 7), another normalization convention (step 8), a smooth continuum
   residual and another error-array convention (after step 8). ``shift=None`` changes nothing.
10. :func:`stellarnet.io.grids.gap_insert` places the spectra on the 8,575 grid with zeros in the
   chip gaps and outside the DR12-era chips.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator

import numpy as np

from stellarnet.common.paths import resource
from stellarnet.io import grids
from stellarnet.physics.kurucz import KuruczEmulator, load_emulator
from stellarnet.simulate.shifts import (
    Shift,
    add_companion,
    add_detector_defects,
    broaden_lsf,
    continuum_residual,
    correlate_noise,
    corrupt_pixels,
    flag_pixels,
    normalize_convention,
    shared_residual_lines,
    shift_velocity,
)

__all__ = ["BAD_ERR", "SpectraBatch", "observe_spectra", "iter_spectra", "bad_model_pixels", "MAX_BAD_RUNS"]

BAD_ERR: float = 1.0e10  # error given to bad pixels (raw and hence normalized units)
MAX_BAD_RUNS = 8
GRID = "dr12"
_CHIP_LEVEL = (0.85, 1.0, 0.9)
_PERSIST_FRAC = {"high": 0.08, "med": 0.04, "low": 0.02}


@lru_cache(maxsize=1)
def bad_model_pixels() -> np.ndarray:
    """Boolean (7214,) pixels where models fit APOGEE spectra poorly (The Payne mask)."""
    with np.load(resource("apogee_bad_model_pixels_7214.npz")) as z:
        m = np.asarray(z["apogee_mask"]).astype(bool)
    if m.shape != (grids.n_pixels(GRID),):
        raise ValueError(f"bad model pixel mask has shape {m.shape}")
    return m


@lru_cache(maxsize=1)
def _mismatch_pattern() -> np.ndarray:
    """Fixed per-pixel N(0,1) pattern at the bad model pixels (zero elsewhere), float32."""
    p = np.random.default_rng(20180528).standard_normal(grids.n_pixels(GRID)).astype(np.float32)
    return np.where(bad_model_pixels(), p, 0.0).astype(np.float32)


@lru_cache(maxsize=1)
def _chip_x() -> tuple[np.ndarray, np.ndarray]:
    """x ∈ [−1, 1] per chip and chip index, on the 7,214 grid."""
    x = np.empty(grids.n_pixels(GRID), np.float32)
    chip = np.empty(grids.n_pixels(GRID), np.int8)
    for i, sl in enumerate(grids.chip_slices(GRID)):
        x[sl] = np.linspace(-1, 1, sl.stop - sl.start)
        chip[sl] = i
    return x, chip


@dataclass
class SpectraBatch:
    """Simulated spectra on the 8,575 grid (float32): ``flux`` and ``flux_err`` normalized,
    ``model`` the normalized noiseless model; ``start`` = index of the first row of the batch."""

    start: int
    flux: np.ndarray
    flux_err: np.ndarray
    model: np.ndarray


def observe_spectra(
    labels: np.ndarray,
    snr: np.ndarray,
    rng: np.random.Generator,
    bad_start: np.ndarray | None = None,
    bad_len: np.ndarray | None = None,
    persist: np.ndarray | None = None,
    emulator: KuruczEmulator | None = None,
    full_grid: bool = True,
    shift: Shift | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Simulate normalized spectra for labels (N, 4) at per-pixel ``snr`` (N,).

    ``bad_start``/``bad_len`` (N, :data:`MAX_BAD_RUNS`) int: pixel runs on the 7,214 grid
    (length 0 = unused). ``persist`` (N,) int: 0 none, 1 low, 2 med, 3 high. Returns
    ``(flux, flux_err, model)`` float32 of shape (N, 8575) (``full_grid``) or (N, 7214).
    """
    emu = load_emulator() if emulator is None else emulator
    labels = np.atleast_2d(np.asarray(labels, np.float64))
    n = labels.shape[0]
    snr = np.broadcast_to(np.asarray(snr, np.float32), (n,))
    raw = emu(labels, chunk=max(1, n))  # (n, 7214) float32, multiplied in place below
    shift = None if shift is None or shift.is_null else shift
    if shift is not None and shift.companion_flux_ratio is not None:  # before the LSF: the pair shares it
        raw = add_companion(raw, labels, shift.companion_flux_ratio, shift.companion_velocity_kms, rng,
                            lambda x: emu(x, chunk=max(1, n)))
    if shift is not None and shift.lsf is not None:
        raw = broaden_lsf(raw, rng.uniform(shift.lsf[0], shift.lsf[1], (n, 3) if shift.lsf_per_chip else n))
    if shift is not None and shift.rv_kms:
        raw = shift_velocity(raw, rng.uniform(-shift.rv_kms, shift.rv_kms, n))
    coef = np.empty((n, 9), np.float32)  # per chip: level, level·a₁, level·a₂
    level = np.asarray(_CHIP_LEVEL, np.float32)
    coef[:, 0::3] = level
    coef[:, 1::3] = level * rng.normal(0.0, 0.08, (n, 3))
    coef[:, 2::3] = level * rng.normal(0.0, 0.05, (n, 3))
    raw *= coef @ _throughput_basis()
    _, _, cont = normalize_convention(raw, np.ones_like(raw), None, "cannon")
    # noisy = raw + mismatch + persistence + σ·N(0,1), σ = C / SNR
    noisy = rng.standard_normal(raw.shape, dtype=np.float32)
    if shift is not None and shift.noise_correlation is not None:
        noisy = correlate_noise(noisy, rng.uniform(*shift.noise_correlation, n))
    noisy *= cont
    noisy *= (1.0 / snr)[:, None]
    err = cont * (1.0 / snr)[:, None]
    bm = bad_model_pixels()
    s = rng.uniform(0.5, 1.5, (n, 1)).astype(np.float32)
    noisy += raw
    noisy += np.float32(0.01) * s * _mismatch_pattern() * cont
    err[:, bm] = np.sqrt(err[:, bm] ** 2 + (np.float32(0.01) * cont[:, bm]) ** 2)
    if persist is not None and np.any(persist):
        frac = np.array([0.0, _PERSIST_FRAC["low"], _PERSIST_FRAC["med"], _PERSIST_FRAC["high"]], np.float32)
        blue = grids.chip_slices(GRID)[0]
        half = slice(blue.start, blue.start + (blue.stop - blue.start) // 2)
        noisy[:, half] += frac[np.asarray(persist)][:, None] * cont[:, half]
    bad = None
    if bad_start is not None and bad_len is not None:
        rows, cols = _run_indices(bad_start, bad_len, raw.shape[1])
        if rows.size:
            bad = np.zeros(raw.shape, bool)
            bad[rows, cols] = True
            _spoil(noisy, err, cont, rows, cols, rng)
    if shift is not None and shift.masked_fraction is not None:
        extra = flag_pixels(raw.shape, shift.masked_fraction, rng)
        bad = extra if bad is None else bad | extra
        _spoil(noisy, err, cont, *np.nonzero(extra), rng)
    if shift is not None and shift.outlier_fraction is not None:
        corrupt_pixels(noisy, err, shift.outlier_fraction, shift.outlier_err_factor, rng, protect=bad)
    if shift is not None and shift.defects is not None:
        add_detector_defects(noisy, err, shift.defects, rng, protect=bad)
    if shift is not None and shift.normalization is not None:
        flux, flux_err, c_data = normalize_convention(noisy, err, bad, shift.normalization)
    else:
        flux, flux_err, c_data = normalize_convention(noisy, err, bad, "cannon")
    raw /= c_data  # the noiseless model seen through the data's continuum
    if shift is not None:
        flux, flux_err = _report(flux, flux_err, bad, shift, rng)
    if full_grid:
        out = grids.gap_insert(np.stack([flux, flux_err, raw]), GRID, 0.0)
        return out[0], out[1], out[2]
    return flux, flux_err, raw


def _spoil(noisy: np.ndarray, err: np.ndarray, cont: np.ndarray, rows: np.ndarray, cols: np.ndarray,
           rng: np.random.Generator) -> None:
    """A flagged pixel (in place): flux anywhere in 0–2 × the continuum, error :data:`BAD_ERR`."""
    noisy[rows, cols] = rng.uniform(0.0, 2.0, rows.size).astype(np.float32) * cont[rows, cols]
    err[rows, cols] = BAD_ERR


def _report(flux: np.ndarray, err: np.ndarray, bad: np.ndarray | None, shift: Shift,
            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The normalized spectrum as another pipeline would report it: a smooth continuum residual, residuals
    every spectrum shares, errors rescaled or flattened (bad pixels keep their error)."""
    n = flux.shape[0]
    if shift.continuum_tilt:
        res = continuum_residual(n, shift.continuum_tilt, rng)
        flux, err = flux * res, err * res
    good = np.ones(flux.shape, bool) if bad is None else ~bad
    if shift.shared_residual:  # the same dips in every spectrum, the errors as they were
        flux = np.where(good, flux * shared_residual_lines(shift.shared_residual), flux)
    if shift.err_scale is not None:
        err = np.where(good, err * rng.uniform(shift.err_scale[0], shift.err_scale[1], (n, 1)), err)
    if shift.err_flat:
        med = np.nanmedian(np.where(good, err, np.nan), axis=1, keepdims=True)
        err = np.where(good, med, err)
    return flux.astype(np.float32), err.astype(np.float32)


@lru_cache(maxsize=1)
def _throughput_basis() -> np.ndarray:
    """(9, 7214) float32: per chip the terms 1, x, x² − ⅓ (zero outside the chip)."""
    x, chip = _chip_x()
    b = np.zeros((9, x.size), np.float32)
    for i in range(3):
        m = chip == i
        b[3 * i, m] = 1.0
        b[3 * i + 1, m] = x[m]
        b[3 * i + 2, m] = x[m] ** 2 - 1.0 / 3.0
    return b


def _run_indices(start: np.ndarray, length: np.ndarray, n_pix: int) -> tuple[np.ndarray, np.ndarray]:
    start = np.asarray(start)
    length = np.asarray(length)
    rows_l, cols_l = [], []
    r, k = np.nonzero(length > 0)
    for ri, ki in zip(r, k):
        s0 = int(start[ri, ki])
        c = np.arange(s0, min(s0 + int(length[ri, ki]), n_pix))
        rows_l.append(np.full(c.size, ri))
        cols_l.append(c)
    if not rows_l:
        return np.empty(0, int), np.empty(0, int)
    return np.concatenate(rows_l), np.concatenate(cols_l)


def iter_spectra(
    labels: np.ndarray,
    snr: np.ndarray,
    seed: int,
    bad_start: np.ndarray | None = None,
    bad_len: np.ndarray | None = None,
    persist: np.ndarray | None = None,
    chunk: int = 256,
    threads: int = 2,
    shift: Shift | None = None,
) -> Iterator[SpectraBatch]:
    """Yield :class:`SpectraBatch` objects in row order, chunk by chunk (observed with ``shift``'s
    perturbations when one is given: :func:`observe_spectra`).

    Chunk ``i`` uses ``np.random.default_rng([seed, i])``, so results do not depend on
    ``threads`` (chunks are computed ``threads`` at a time in a thread pool; numpy releases the
    GIL in its kernels).
    """
    labels = np.asarray(labels, np.float64)
    n = labels.shape[0]
    emu = load_emulator()

    def work(i: int) -> SpectraBatch:
        sl = slice(i * chunk, min((i + 1) * chunk, n))
        rng = np.random.default_rng([int(seed), i])
        f, e, m = observe_spectra(
            labels[sl], np.asarray(snr)[sl], rng,
            None if bad_start is None else bad_start[sl],
            None if bad_len is None else bad_len[sl],
            None if persist is None else persist[sl],
            emulator=emu, shift=shift,
        )
        return SpectraBatch(sl.start, f, e, m)

    n_chunks = (n + chunk - 1) // chunk
    if threads <= 1:
        for i in range(n_chunks):
            yield work(i)
        return
    with ThreadPoolExecutor(max_workers=threads) as pool:
        pending = [pool.submit(work, i) for i in range(min(threads, n_chunks))]
        nxt = len(pending)
        while pending:
            fut = pending.pop(0)
            if nxt < n_chunks:
                pending.append(pool.submit(work, nxt))
                nxt += 1
            yield fut.result()
