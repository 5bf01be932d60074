"""From a file spectrum to what the network and the refinement read: bad-pixel masks (APOGEE_PIXMASK
bits, non-finite or non-positive values, errors ≥ :data:`BAD_PIXEL_ERR`), persistence down-weighting,
per-chip Chebyshev continuum normalization on the continuum pixels, the gap-removed grid
(:func:`prepare_spectrum`, which the shard builder and ``predict`` both call).

Spectra are (P,) or (N, P) on a gap-removed grid (``"dr17"`` 7,514 px or ``"dr12"`` 7,214 px) unless
said; ``bad`` / ``good`` arrays are boolean, True = bad / good; flux in the file's units, normalized
flux dimensionless."""

from __future__ import annotations

import warnings
from functools import lru_cache
from typing import Any, Iterable

import numpy as np
from numpy.polynomial import chebyshev

from stellarnet.common.paths import resource
from stellarnet.io import grids
from stellarnet.io.bitmasks import APOGEE_PIXMASK, PIXMASK_ASTRONN_DEFAULT, PIXMASK_PERSIST
from stellarnet.io.spectra import SpectrumQualityError

#: Error (in units of the normalized flux) given to bad pixels by :func:`prepare_spectrum`;
#: bad pixels get flux 1.0. Pixels whose propagated normalized error is ≥ this are bad too.
BAD_PIXEL_ERR: float = 1.0e3


#: Minimum number of good continuum pixels per chip for a continuum fit. With fewer, the chip's
#: continuum is NaN (and so is its normalized flux); real chips have 100-250 continuum pixels.
MIN_CONTINUUM_PIXELS: int = 10


#: Error inflation factor per persistence bit (APOGEE_PIXMASK bit → factor); our choice, not an
#: APOGEE pipeline value. Persistence adds a spurious charge of uncertain size, so these pixels
#: are kept but down-weighted (σ × factor ⇒ weight / factor²). Several bits: the largest wins.
PERSIST_ERR_FACTORS: dict[int, float] = {9: 3.0, 10: 2.0, 11: 1.5}


# lookup table: the three (contiguous) persistence bits as a 3-bit number → largest factor
_PERSIST_LO = min(PIXMASK_PERSIST)


_PERSIST_TABLE = np.array(
    [max([1.0] + [PERSIST_ERR_FACTORS[_PERSIST_LO + j] for j in range(3) if (k >> j) & 1]) for k in range(8)]
)


_PERSIST_VALUE = sum(1 << b for b in PIXMASK_PERSIST)
assert sorted(PIXMASK_PERSIST) == list(range(_PERSIST_LO, _PERSIST_LO + 3))


#: Median of the good pixels a continuum-normalized spectrum may have (a normalized APOGEE
#: spectrum sits at ~0.8–1.0 even for the coolest stars; un-normalized flux is ~10–10⁴).
NORMALIZED_MEDIAN_RANGE = (0.3, 2.0)

#: A pixel whose flux is below zero by more than this many of its own σ is corrupt (a star's flux,
#: normalized or not, cannot be negative: over-subtracted sky, a bad read, a fill value), flagged or not.
NEGATIVE_FLUX_SIGMA = 3.0


def negative_flux(flux: np.ndarray, flux_err: np.ndarray) -> np.ndarray:
    """True where the flux is negative by more than :data:`NEGATIVE_FLUX_SIGMA` × its error: a pixel
    its error does not explain. Noise that dips a faint pixel below zero (within 3 σ) is kept."""
    with np.errstate(invalid="ignore"):
        return np.asarray(flux) < -NEGATIVE_FLUX_SIGMA * np.abs(np.asarray(flux_err))


# ----------------------------------------------------------------------------------------------
# masks and continuum


def bad_pixel_mask(
    flux: np.ndarray,
    flux_err: np.ndarray,
    pixmask: np.ndarray | None = None,
    bits: Iterable[int | str] = PIXMASK_ASTRONN_DEFAULT,
) -> np.ndarray:
    """Boolean mask, True = bad: any of ``bits`` set in ``pixmask``, flux or error non-finite,
    error ≤ 0, flux == 0 (chip gaps), or flux negative beyond its error (:func:`negative_flux`).
    Persistence bits are not bad (see
    :func:`persistence_weight`). Works on any shape; ``pixmask`` must match ``flux``'s shape.
    """
    flux = np.asarray(flux)
    flux_err = np.asarray(flux_err)
    if flux.shape != flux_err.shape:
        raise ValueError(f"flux shape {flux.shape} != flux_err shape {flux_err.shape}")
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(flux) | ~np.isfinite(flux_err) | (flux_err <= 0) | (flux == 0) | negative_flux(flux, flux_err)
    if pixmask is not None:
        pixmask = np.asarray(pixmask)
        if pixmask.shape != flux.shape:
            raise ValueError(f"pixmask shape {pixmask.shape} != flux shape {flux.shape}")
        if not np.issubdtype(pixmask.dtype, np.integer):
            raise TypeError(f"pixmask must be an integer bitmask array, got dtype {pixmask.dtype}")
        bits = list(bits)
        if bits:
            bad |= APOGEE_PIXMASK.any_set(pixmask, bits)
    return bad


def persistence_weight(pixmask: np.ndarray | None, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Error inflation factor (≥ 1, float64) per pixel from the persistence bits 9-11
    (PERSIST_HIGH ×3, PERSIST_MED ×2, PERSIST_LOW ×1.5; :data:`PERSIST_ERR_FACTORS`).

    Multiply ``flux_err`` by it; the fit weight 1/σ² drops by its square. ``pixmask=None`` gives
    ones of ``shape``.
    """
    if pixmask is None:
        if shape is None:
            raise ValueError("persistence_weight needs a pixmask or a shape")
        return np.ones(shape)
    pm = np.asarray(pixmask)
    if not np.issubdtype(pm.dtype, np.integer):
        raise TypeError(f"pixmask must be an integer bitmask array, got dtype {pm.dtype}")
    return _PERSIST_TABLE[(pm.astype(np.int64) >> _PERSIST_LO) & 0b111]


@lru_cache(maxsize=None)
def _continuum_pixels_cached(grid: str) -> np.ndarray:
    if grid == "dr17":
        path = resource("dr17_continuum_mask_7514.npy")
        arr = np.load(path)
    else:
        path = resource("cannon_continuum_pixels_7214.npz")
        with np.load(path) as z:
            if "pixels_cannon" not in z.files:
                raise KeyError(f"{path}: no key 'pixels_cannon' (keys: {z.files})")
            arr = z["pixels_cannon"]
    n = grids.n_pixels(grid)
    arr = np.asarray(arr)
    if arr.dtype != bool:
        if arr.shape == (n,) and set(np.unique(arr)) <= {0, 1}:
            arr = arr.astype(bool)
        else:  # a list of pixel indices
            mask = np.zeros(n, bool)
            mask[arr.astype(int)] = True
            arr = mask
    if arr.shape != (n,):
        raise ValueError(f"continuum pixel file {path} has shape {arr.shape}, expected ({n},)")
    arr.setflags(write=False)
    return arr


def continuum_pixels(grid: str | int = "dr17") -> np.ndarray:
    """Boolean continuum-pixel mask on a gap-removed grid: ``'dr17'`` (7,514 px, astroNN DR17
    mask, 532 pixels) or ``'dr12'`` (7,214 px, The Cannon's 529 pixels)."""
    return _continuum_pixels_cached(grids.grid_name(grid)).copy()


@lru_cache(maxsize=None)
def _design(grid: str, degree: int) -> tuple[tuple[np.ndarray, ...], ...]:
    """Per chip: (Chebyshev basis on all chip pixels (n, d+1) float64, indices of continuum pixels
    within the chip, basis at those pixels (m, d+1), outer products of the basis at those pixels
    (m, (d+1)²) — so the normal matrices of a batch are one GEMM — and the transposed basis
    (d+1, n) in float32 for float32 continua). x = chip pixel index scaled to [-1, 1]."""
    cont = _continuum_pixels_cached(grid)
    out = []
    for sl in grids.chip_slices(grid):
        n = sl.stop - sl.start
        x = np.linspace(-1.0, 1.0, n)
        v = chebyshev.chebvander(x, degree)
        idx = np.flatnonzero(cont[sl])
        vc = v[idx]
        outer = np.ascontiguousarray((vc[:, :, None] * vc[:, None, :]).reshape(len(idx), -1))
        vt32 = np.ascontiguousarray(v.T, dtype=np.float32)
        vt64 = np.ascontiguousarray(v.T)
        for a in (v, idx, vc, outer, vt32, vt64):
            a.setflags(write=False)
        out.append((v, idx, vc, outer, vt32, vt64))
    return tuple(out)


def _resolve_grid(grid: str | int | None, n_pix: int) -> str:
    if grid is None:
        if n_pix not in grids.GRID_ALIASES:
            raise ValueError(
                f"spectra have {n_pix} pixels; expected a gap-removed grid (7514 'dr17' or "
                f"7214 'dr12'); use grids.gap_delete on {grids.N_PIX_FULL}-pixel spectra first"
            )
        return grids.grid_name(n_pix)
    g = grids.grid_name(grid)
    if n_pix != grids.n_pixels(g):
        hint = " (call grids.gap_delete first)" if n_pix == grids.N_PIX_FULL else ""
        raise ValueError(
            f"spectra have {n_pix} pixels but grid {g!r} has {grids.n_pixels(g)}{hint}"
        )
    return g


def _flux_pair(flux: Any, flux_err: Any) -> tuple[np.ndarray, np.ndarray]:
    """Arrays of one spectrum (P,) or a batch (N, P) with matching error shape, else ValueError."""
    flux = np.asarray(flux)
    flux_err = np.asarray(flux_err)
    if flux.ndim not in (1, 2):
        raise ValueError(f"flux must be (P,) or (N, P), got shape {flux.shape}")
    if flux_err.shape != flux.shape:
        raise ValueError(f"flux_err shape {flux_err.shape} != flux shape {flux.shape}")
    return flux, flux_err


def continuum_normalize(
    flux: np.ndarray,
    flux_err: np.ndarray,
    bad: np.ndarray | None,
    grid: str | int | None = "dr17",
    degree: int = 2,
    continuum: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Continuum-normalize spectra on a gap-removed grid → ``(norm_flux, norm_err, continuum)``.

    ``flux``, ``flux_err``, ``bad``: shape (P,) or (N, P) with P = 7514 (``grid='dr17'``) or 7214
    (``'dr12'``; ``grid=None`` infers it from P). Per chip, a weighted least-squares Chebyshev
    polynomial of ``degree`` (x = pixel index scaled to [−1, 1] per chip, i.e. linear in log λ)
    is fitted to the continuum pixels (:func:`continuum_pixels`) that are not bad, with weights
    1/σ²; non-finite flux/error and σ ≤ 0 are always excluded. The batch is solved at once
    (normal equations of all spectra as one matrix product with precomputed basis outer products,
    then a batched 3×3 solve). ``norm_err = flux_err / continuum``.

    A chip with fewer than :data:`MIN_CONTINUUM_PIXELS` usable continuum pixels (or a singular /
    non-positive fit) gets a NaN continuum, hence NaN normalized flux and error there (masked
    as bad by :func:`prepare_spectrum`). Pass ``continuum`` (same shape as ``flux``) to skip the
    fit and divide by it instead. Outputs are float32 for float32 input, else float64; for
    float32 input only the small fit runs in float64, the continuum and divisions in float32.
    """
    flux, flux_err = _flux_pair(flux, flux_err)
    g = _resolve_grid(grid, flux.shape[-1])
    out_dtype = np.float32 if flux.dtype == np.float32 else np.float64
    # float32 input: the (small) least-squares fit runs in float64, the full-length continuum and
    # the divisions in float32 (relative rounding ~1e-7, far below any noise level)

    if continuum is not None:
        cont = np.asarray(continuum, dtype=out_dtype)
        if cont.shape != flux.shape:
            raise ValueError(f"continuum shape {cont.shape} != flux shape {flux.shape}")
    else:
        if isinstance(degree, bool) or not isinstance(degree, (int, np.integer)) or degree < 0:
            raise ValueError(f"degree must be a non-negative integer, got {degree!r}")
        if degree + 1 > MIN_CONTINUUM_PIXELS:
            raise ValueError(f"degree {degree} too high (at most {MIN_CONTINUUM_PIXELS - 1})")
        if bad is not None:
            bad = np.asarray(bad, dtype=bool)
            if bad.shape != flux.shape:
                raise ValueError(f"bad shape {bad.shape} != flux shape {flux.shape}")
        f2 = np.atleast_2d(flux)
        e2 = np.atleast_2d(flux_err)
        b2 = None if bad is None else np.atleast_2d(bad)
        n_spec = f2.shape[0]
        cont = np.empty(f2.shape, dtype=out_dtype)
        k = int(degree) + 1
        for sl, (_, idx, vc, outer, vt32, vt64) in zip(grids.chip_slices(g), _design(g, int(degree))):
            cols = idx + sl.start  # continuum pixels only: ~180 of ~2,400 chip pixels
            fc = f2[:, cols].astype(np.float64)
            ec = e2[:, cols].astype(np.float64)
            with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
                ok = np.isfinite(fc) & np.isfinite(ec) & (ec > 0)
                if b2 is not None:
                    ok &= ~b2[:, cols]
                w = np.where(ok, 1.0 / np.where(ok, ec, 1.0) ** 2, 0.0)
            # per-spectrum weight scale → well-conditioned normal equations
            wmax = w.max(axis=1, keepdims=True)
            w /= np.where(wmax > 0, wmax, 1.0)
            fc = np.where(ok, fc, 0.0)
            a = (w @ outer).reshape(n_spec, k, k)  # Σ_p w_p v_pi v_pj as one GEMM
            rhs = (w * fc) @ vc
            enough = ok.sum(axis=1) >= MIN_CONTINUUM_PIXELS
            a[~enough] = np.eye(k)
            rhs[~enough] = 0.0
            try:
                coef = np.linalg.solve(a, rhs[..., None])[..., 0]
            except np.linalg.LinAlgError:  # some singular system: solve one by one
                coef = np.zeros_like(rhs)
                for i in range(a.shape[0]):
                    try:
                        coef[i] = np.linalg.solve(a[i], rhs[i])
                    except np.linalg.LinAlgError:
                        enough[i] = False
            if out_dtype == np.float32:
                cont[:, sl] = coef.astype(np.float32) @ vt32  # (N, n_chip)
            else:
                cont[:, sl] = coef @ vt64
            if not enough.all():
                cont[~enough, sl] = np.nan
        with np.errstate(invalid="ignore"):
            nonpos = ~(cont > 0)  # includes NaN; a non-positive continuum is garbage
        if nonpos.any():
            cont[nonpos] = np.nan
        cont = cont.reshape(flux.shape)

    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        norm_flux = np.divide(flux, cont, dtype=out_dtype)
        norm_err = np.divide(flux_err, cont, dtype=out_dtype)
    return norm_flux, norm_err, cont.astype(out_dtype, copy=False)


def continuum_envelope(flux: np.ndarray, good: np.ndarray, grid: str | int, n_segments: int = 4,
                       quantile: float = 0.9, min_pixels: int = 50) -> np.ndarray:
    """Upper envelope of continuum-normalized spectra: the ``quantile`` of the good pixels' flux in each
    of ``n_segments`` equal segments of every chip, (N, n_chips · n_segments); NaN where a segment has
    fewer than ``min_pixels`` good pixels. ≈ 1 (within the noise and the line blanketing) for a spectrum
    whose continuum is where a normalization puts it; far from 1 where the normalization was spoiled."""
    flux = np.atleast_2d(np.asarray(flux, np.float32))
    good = np.atleast_2d(np.asarray(good, bool))
    levels = []
    for sl in grids.chip_slices(grid):
        edges = np.linspace(sl.start, sl.stop, n_segments + 1).astype(int)
        for a, b in zip(edges[:-1], edges[1:]):
            # the quantile of the good pixels (linear interpolation, as np.nanquantile) from one sort with
            # the bad pixels first: nanquantile itself is ~7x slower, and this runs on every prediction
            ranked = np.sort(np.where(good[:, a:b], flux[:, a:b], -np.inf), axis=1)
            n_good = good[:, a:b].sum(1)
            pos = quantile * np.maximum(n_good - 1, 0)
            lo = np.floor(pos).astype(int)
            first = (b - a) - n_good  # index of the lowest good pixel
            low = np.take_along_axis(ranked, (first + lo)[:, None].clip(0, b - a - 1), 1)[:, 0]
            high = np.take_along_axis(ranked, (first + np.minimum(lo + 1, n_good - 1))[:, None].clip(0, b - a - 1),
                                      1)[:, 0]
            with np.errstate(invalid="ignore"):  # segments without a good pixel: −inf − −inf, NaN below
                level = low + (pos - lo) * (high - low)
            levels.append(np.where(n_good >= max(min_pixels, 1), level, np.nan))
    return np.stack(levels, 1)


def mask_unusable_pixels(flux: np.ndarray, flux_err: np.ndarray, usable: np.ndarray | None = None
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normalized spectra → ``(flux, flux_err, good)`` float32 / bool with every unusable pixel set to
    flux 1.0, error :data:`BAD_PIXEL_ERR`, good False: non-finite flux or error, error ≤ 0, a flux
    negative beyond its error (:func:`negative_flux`), a flux that overflows float32, and where
    ``usable`` (same shape, bool) is False. The one place bad pixels are
    cleaned: :func:`prepare_spectrum` (with the flagged pixels) and the ``Predictor`` (arrays given
    directly) both call it."""
    with np.errstate(invalid="ignore", over="ignore"):
        good = np.isfinite(flux) & np.isfinite(flux_err) & (flux_err > 0) & ~negative_flux(flux, flux_err)
        if usable is not None:
            good &= usable
        out_flux = np.where(good, flux, 1.0).astype(np.float32)
        out_err = np.where(good, flux_err, BAD_PIXEL_ERR).astype(np.float32)
    finite = np.isfinite(out_flux)  # float32 overflow of a huge normalized flux: bad as well
    if not finite.all():
        good &= finite
        out_flux[~finite] = 1.0
        out_err[~finite] = BAD_PIXEL_ERR
    return out_flux, out_err, good


def prepare_spectrum(
    flux: np.ndarray,
    flux_err: np.ndarray,
    pixmask: np.ndarray | None,
    grid: str | int = "dr17",
    normalized: bool = False,
    *,
    degree: int = 2,
    bits: Iterable[int | str] = PIXMASK_ASTRONN_DEFAULT,
    inflate_persistence: bool = True,
    allow_empty: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """File spectrum → network input ``(flux, err, good)`` on the gap-removed ``grid``.

    Input shape (8575,) or (N, 8575) (already gap-removed input of the grid's length is
    accepted too). Steps: bad mask (:func:`bad_pixel_mask` with ``bits``), persistence error
    inflation (:func:`persistence_weight`), gap removal, continuum normalization
    (:func:`continuum_normalize`) unless ``normalized`` (aspcapStar flux), then pixels that are
    bad, non-finite after normalization, or with normalized error ≥ :data:`BAD_PIXEL_ERR` get
    flux 1.0, err ``BAD_PIXEL_ERR``, good False. Outputs are finite float32 / bool.

    Raises :class:`SpectrumQualityError` naming the spectra with no good pixel, unless
    ``allow_empty`` (then such rows are all-bad).
    """
    flux, flux_err = _flux_pair(flux, flux_err)
    g = grids.grid_name(grid)
    n_pix = flux.shape[-1]
    if n_pix == grids.N_PIX_FULL:
        gap = lambda a: grids.gap_delete(a, g)  # noqa: E731
    elif n_pix == grids.n_pixels(g):
        gap = lambda a: a  # noqa: E731
    else:
        raise ValueError(
            f"spectra have {n_pix} pixels; expected {grids.N_PIX_FULL} (file grid) or "
            f"{grids.n_pixels(g)} (gap-removed grid {g!r})"
        )
    if pixmask is not None:
        pixmask = np.asarray(pixmask)
        if pixmask.shape != flux.shape:
            raise ValueError(f"pixmask shape {pixmask.shape} != flux shape {flux.shape}")
    f = np.asarray(gap(flux), dtype=np.float64)
    e = np.asarray(gap(flux_err), dtype=np.float64)
    pm = None if pixmask is None else gap(pixmask)
    bad = bad_pixel_mask(f, e, pm, bits=bits)  # elementwise, so gap removal first is equivalent
    # negative pixels count in the median: a negated spectrum is named as such, not as "no good pixel"
    implausible, why = _implausible_flux(f, bad & ~negative_flux(f, e), normalized)
    if implausible.any() and not allow_empty:
        rows = np.flatnonzero(implausible)
        which = "the spectrum" if f.ndim == 1 else f"spectra at rows {rows[:20].tolist()}"
        raise SpectrumQualityError(f"{which}: {why[rows[0]]}")
    if inflate_persistence and pm is not None and (pm & _PERSIST_VALUE).any():
        e = e * persistence_weight(pm)
    if normalized:
        nf, ne = f, e
    else:
        nf, ne, _ = continuum_normalize(f, e, bad, grid=g, degree=degree)
    with np.errstate(invalid="ignore"):
        usable = ~bad & (ne < BAD_PIXEL_ERR)
    out_flux, out_err, good = mask_unusable_pixels(nf, ne, usable)
    if implausible.any():  # allow_empty: such spectra become all-bad rows, never labels
        good.reshape(-1, good.shape[-1])[implausible] = False
        out_flux.reshape(-1, good.shape[-1])[implausible] = 1.0
        out_err.reshape(-1, good.shape[-1])[implausible] = BAD_PIXEL_ERR
    empty = ~good.reshape(-1, good.shape[-1]).any(axis=1)
    if empty.any() and not allow_empty:
        rows = np.flatnonzero(empty)
        which = "the spectrum" if good.ndim == 1 else f"spectra at rows {rows[:20].tolist()}"
        raise SpectrumQualityError(
            f"{which} ha{'s' if good.ndim == 1 else 've'} no good pixel on grid {g!r} "
            f"(all masked, zero/non-finite, or no continuum fit possible)"
        )
    return out_flux, out_err, good


def _implausible_flux(flux: np.ndarray, bad: np.ndarray, normalized: bool) -> tuple[np.ndarray, list[str]]:
    """Per spectrum (rows of ``flux``): is the flux not what its kind says, and why.

    Normalized input must have a median (good pixels) in :data:`NORMALIZED_MEDIAN_RANGE`;
    un-normalized flux a positive median. Spectra with no good pixel are left to the emptiness check.
    """
    f2 = np.asarray(flux, np.float64).reshape(-1, flux.shape[-1])
    b2 = np.asarray(bad).reshape(f2.shape)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows: handled as empty later
        med = np.nanmedian(np.where(b2, np.nan, f2), axis=1)
    lo, hi = NORMALIZED_MEDIAN_RANGE
    with np.errstate(invalid="ignore"):
        out = ((med < lo) | (med > hi)) if normalized else (med <= 0)
    out &= np.isfinite(med)
    why = [(f"median flux {m:.4g} is not that of a continuum-normalized spectrum (~1): the file holds "
            "un-normalized or negated flux; read it as un-normalized (spectra_kind=apStar, normalized=False) "
            "or check the file") if normalized else
           (f"median flux {m:.4g} is not positive: negated or corrupt flux") for m in med]
    return out, why
