"""APOGEE spectra: read apStar / aspcapStar files, mask bad pixels, continuum-normalize.

Conventions
-----------
* File spectra live on the 8,575-pixel log-linear vacuum grid (λ in Å, see :mod:`grids`).
  Everything after :func:`prepare_spectrum` lives on a gap-removed grid (``"dr17"``, 7,514 px,
  or ``"dr12"``, 7,214 px).
* ``bad`` / ``good`` arrays are boolean, True = bad / good.
* Real DR17 apStar files (checked on two files in ``data/reference``): HDU1-3 are ``>f8``/``>i8``
  arrays of shape ``(NVISITS + 2, 8575)``; a one-visit star still has **two** rows, row 0 the
  spectrum and row 1 all zeros. Combined rows have NaN flux *and* NaN error outside the chips;
  visit rows have 0 flux and 0 error there. Some in-chip pixels carry errors up to ~1e13
  (sometimes with pixmask 0), so :func:`prepare_spectrum` also treats pixels whose normalized
  error reaches :data:`BAD_PIXEL_ERR` as bad.
"""

from __future__ import annotations

import functools
import re
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
from numpy.polynomial import chebyshev

from stellarnet.io import grids
from stellarnet.io.fitsfile import UnsupportedFITS, open_fits
from stellarnet.io.bitmasks import APOGEE_PIXMASK, PIXMASK_ASTRONN_DEFAULT, PIXMASK_PERSIST
from stellarnet.common.paths import resource

__all__ = [
    "BAD_PIXEL_ERR",
    "MIN_CONTINUUM_PIXELS",
    "PERSIST_ERR_FACTORS",
    "Spectrum",
    "SpectrumFormatError",
    "SpectrumQualityError",
    "bad_pixel_mask",
    "continuum_normalize",
    "continuum_pixels",
    "persistence_weight",
    "prepare_spectrum",
    "read_apstar",
    "read_aspcapstar",
    "read_spectrum",
]

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
assert sorted(PIXMASK_PERSIST) == list(range(_PERSIST_LO, _PERSIST_LO + 3))
_PERSIST_TABLE = np.array(
    [max([1.0] + [PERSIST_ERR_FACTORS[_PERSIST_LO + j] for j in range(3) if (k >> j) & 1]) for k in range(8)]
)
_PERSIST_VALUE = sum(1 << b for b in PIXMASK_PERSIST)

_SPEC_ID_RE = re.compile(r"(2M\d{8}[+-]\d{7})")


class SpectrumFormatError(ValueError):
    """A spectrum file is not in the expected format (missing HDU, wrong shape, corrupt)."""


class SpectrumQualityError(ValueError):
    """A spectrum has no usable pixels (everything masked), or its flux is not what its kind says
    (a "normalized" spectrum whose median is far from 1, negative flux)."""


#: Median of the good pixels a continuum-normalized spectrum may have (a normalized APOGEE
#: spectrum sits at ~0.8–1.0 even for the coolest stars; un-normalized flux is ~10–10⁴).
NORMALIZED_MEDIAN_RANGE = (0.3, 2.0)


@dataclass
class Spectrum:
    """One spectrum on the 8,575-pixel combined grid as read from a file.

    ``flux`` and ``flux_err`` are float64 (apStar: 1e-17 erg/s/cm²/Å; aspcapStar: normalized),
    ``pixmask`` int64 APOGEE_PIXMASK bits (zeros when the file has none), ``wavelength`` in Å
    (vacuum) from the header ``CRVAL1``/``CDELT1``/``NAXIS1``. ``model`` is the ASPCAP best-fit
    model (aspcapStar HDU3) or None.
    """

    flux: np.ndarray
    flux_err: np.ndarray
    pixmask: np.ndarray
    wavelength: np.ndarray
    apogee_id: str
    header: dict[str, Any]
    model: np.ndarray | None = None
    kind: str = ""  # "apStar" or "aspcapStar"
    row: int | None = None  # row of the 2-D apStar arrays that was read (None if 1-D)
    n_visits: int | None = None
    path: str | None = None
    normalized: bool = False  # True for aspcapStar (already continuum-normalized)


# ----------------------------------------------------------------------------------------------
# masks and continuum


def bad_pixel_mask(
    flux: np.ndarray,
    flux_err: np.ndarray,
    pixmask: np.ndarray | None = None,
    bits: Iterable[int | str] = PIXMASK_ASTRONN_DEFAULT,
) -> np.ndarray:
    """Boolean mask, True = bad: any of ``bits`` set in ``pixmask``, flux or error non-finite,
    error ≤ 0, or flux == 0 (chip gaps). Persistence bits are not bad (see
    :func:`persistence_weight`). Works on any shape; ``pixmask`` must match ``flux``'s shape.
    """
    flux = np.asarray(flux)
    flux_err = np.asarray(flux_err)
    if flux.shape != flux_err.shape:
        raise ValueError(f"flux shape {flux.shape} != flux_err shape {flux_err.shape}")
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(flux) | ~np.isfinite(flux_err) | (flux_err <= 0) | (flux == 0)
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
    implausible, why = _implausible_flux(f, bad, normalized)
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
        good = ~bad & np.isfinite(nf) & np.isfinite(ne) & (ne > 0) & (ne < BAD_PIXEL_ERR)
    out_flux = np.where(good, nf, 1.0).astype(np.float32)
    out_err = np.where(good, ne, BAD_PIXEL_ERR).astype(np.float32)
    # float32 overflow of a huge normalized flux: treat as bad as well
    finite = np.isfinite(out_flux)
    if not finite.all():
        good &= finite
        out_flux[~finite] = 1.0
        out_err[~finite] = BAD_PIXEL_ERR
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


# ----------------------------------------------------------------------------------------------
# readers


def _plain(v: Any) -> Any:
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    if isinstance(v, np.generic):
        return v.item()
    return str(v)


#: Primary-header keywords every reader keeps (even ``header=False``): where and how the star was observed.
POSITION_KEYWORDS = ("RA", "DEC", "SNR", "TELESCOP", "FIELD")


def _header_dict_of(header: Any, keys: Iterable[str]) -> dict[str, Any]:
    return {k: _plain(header[k]) for k in keys if k in header}


def _header_dict(header: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in header:
        if key in ("COMMENT", "HISTORY", ""):
            continue
        out[key] = _plain(header[key])
    return out


def _apogee_id(path: Path, header: Any) -> str:
    for key in ("OBJID", "APOGEE_ID", "APOGEEID", "OBJECT"):
        v = header.get(key)
        if isinstance(v, str) and v.strip():
            return v.strip()
    m = _SPEC_ID_RE.search(path.name)
    if m:
        return m.group(1)
    stem = path.name
    for suffix in (".gz", ".fits", ".fit"):
        stem = stem.removesuffix(suffix)
    parts = stem.split("-", 2)  # <prefix>-<release>-<APOGEE_ID>
    return parts[2] if len(parts) == 3 else stem


def _wavelength(path: Path, hdus: Any, n_pix: int) -> np.ndarray:
    """λ (Å) from CRVAL1/CDELT1 (log10 Å) of HDU1, else HDU0; checked against the 8575 grid."""
    src = None
    for h in (hdus[1].header, hdus[0].header):
        if "CRVAL1" in h and "CDELT1" in h:
            src = h
            break
    if src is None:  # documented fallback: the standard combined grid
        return grids.wavelength_full()
    try:
        crval, cdelt = float(src["CRVAL1"]), float(src["CDELT1"])
        crpix = float(src.get("CRPIX1", 1.0))
        naxis1 = int(src.get("NAXIS1", src.get("NWAVE", n_pix)))
    except (TypeError, ValueError) as exc:
        raise SpectrumFormatError(f"{path}: unreadable wavelength keywords ({exc})") from None
    if naxis1 != n_pix:
        raise SpectrumFormatError(f"{path}: header NAXIS1={naxis1} but data have {n_pix} pixels")
    wave = _checked_grid(crval, cdelt, crpix, naxis1)
    if wave is None:
        raise SpectrumFormatError(
            f"{path}: wavelength grid CRVAL1={crval}, CDELT1={cdelt}, CRPIX1={crpix}, "
            f"NAXIS1={naxis1} is not the APOGEE {grids.N_PIX_FULL}-pixel combined grid "
            f"(CRVAL1={grids.LOGLAM0}, CDELT1={grids.DLOGLAM})"
        )
    return wave.copy()


@functools.lru_cache(maxsize=64)
def _checked_grid(crval: float, cdelt: float, crpix: float, naxis1: int) -> np.ndarray | None:
    """λ (Å) of a log-linear header grid if it is the APOGEE combined grid, else None. Cached:
    every file of a survey carries the same keywords, so the grid is computed and compared once."""
    wave = 10.0 ** (crval + cdelt * (np.arange(naxis1) + 1.0 - crpix))
    ref = grids.wavelength_full()
    if wave.shape != ref.shape or not np.allclose(wave, ref, rtol=1e-7, atol=0):
        return None
    wave.flags.writeable = False
    return wave


class VisitIndexError(IndexError):
    """A visit index out of range for the star (:func:`read_apstar` ``row=k``)."""


class _RowArgumentError(ValueError):
    """A ``row`` argument of :func:`read_apstar` that is not 'combined', 'global' or an int."""


def _damaged_file_errors(reader: Callable[..., Spectrum]) -> Callable[..., Spectrum]:
    """Decorate a file reader: any error a damaged file makes astropy or numpy raise (a mangled
    header card: ``VerifyError``, ``KeyError: 'BITPIX'``, ``AttributeError`` …) becomes a
    :class:`SpectrumFormatError` naming the file (original chained); the readers' own errors pass."""

    @functools.wraps(reader)
    def wrapper(path: str | Path, *args: Any, **kwargs: Any) -> Spectrum:
        try:
            return reader(path, *args, **kwargs)
        except (SpectrumFormatError, SpectrumQualityError, FileNotFoundError, VisitIndexError, _RowArgumentError):
            raise
        except Exception as exc:  # noqa: BLE001 - a damaged file can make the FITS library raise anything
            raise SpectrumFormatError(
                f"{path}: damaged FITS file (corrupt header or data, or truncated): {type(exc).__name__}: {exc}"
            ) from exc

    return wrapper


def _open(path: str | Path) -> tuple[Path, Any]:
    """The file's HDUs: by :func:`stellarnet.io.fitsfile.open_fits` (plain images, ~8× faster than
    astropy) when it handles the file exactly, else by astropy (compressed, scaled, non-standard,
    truncated or damaged files: astropy's errors, turned into :class:`SpectrumFormatError`)."""
    from astropy.io import fits

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"spectrum file not found: {path}")
    try:
        return path, open_fits(path)
    except (UnsupportedFITS, OSError):
        pass
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            hdus = fits.open(path, memmap=False, lazy_load_hdus=False)
    except Exception as exc:  # astropy raises OSError/ValueError/TypeError for junk
        raise SpectrumFormatError(f"{path}: not a readable FITS file ({type(exc).__name__}: {exc})") from None
    truncated = [str(w.message) for w in caught if "truncated" in str(w.message).lower()]
    if truncated:
        hdus.close()
        raise SpectrumFormatError(f"{path}: truncated FITS file ({truncated[0]})")
    return path, hdus


def _image(path: Path, hdus: Any, i: int, what: str) -> np.ndarray:
    if len(hdus) <= i:
        raise SpectrumFormatError(f"{path}: missing HDU{i} ({what}); the file has {len(hdus)} HDUs")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = hdus[i].data
    except Exception as exc:
        raise SpectrumFormatError(
            f"{path}: HDU{i} ({what}) unreadable, file truncated or corrupt ({type(exc).__name__}: {exc})"
        ) from None
    if data is None or not isinstance(data, np.ndarray) or data.dtype.fields is not None:
        raise SpectrumFormatError(f"{path}: HDU{i} ({what}) holds no image array")
    if data.shape[-1:] != (grids.N_PIX_FULL,) or data.ndim not in (1, 2):
        raise SpectrumFormatError(
            f"{path}: HDU{i} ({what}) has shape {data.shape}; expected ({grids.N_PIX_FULL},) or "
            f"(rows, {grids.N_PIX_FULL})"
        )
    return data


@_damaged_file_errors
def read_apstar(path: str | Path, row: str | int = "combined") -> Spectrum:
    """Read an apStar/asStar file (HDU1 flux, HDU2 error, HDU3 pixmask).

    ``row``: ``"combined"`` = row 0 (pixel-weighted combination), ``"global"`` = row 1
    (global weighting), int k = visit k (0-based, row k+2). For a one-visit star (1-D arrays, or
    DR17's two rows whose row 1 is all zeros) every choice returns the single spectrum (row 0).
    Raises :class:`SpectrumFormatError` for a bad file, ``IndexError`` for a visit out of range.
    """
    if isinstance(row, bool) or not (isinstance(row, (int, np.integer)) or row in ("combined", "global")):
        raise _RowArgumentError(f"row must be 'combined', 'global' or a visit index, got {row!r}")
    path, hdus = _open(path)
    with hdus:
        flux = _image(path, hdus, 1, "flux")
        err = _image(path, hdus, 2, "flux error")
        mask = _image(path, hdus, 3, "pixel mask")
        if not (flux.shape == err.shape == mask.shape):
            raise SpectrumFormatError(
                f"{path}: flux {flux.shape}, error {err.shape} and mask {mask.shape} shapes differ"
            )
        if not np.issubdtype(mask.dtype, np.integer):
            raise SpectrumFormatError(f"{path}: HDU3 pixel mask has non-integer dtype {mask.dtype}")
        header = hdus[0].header
        nrows = 1 if flux.ndim == 1 else flux.shape[0]
        n_visits = 1 if nrows <= 2 else nrows - 2
        hv = header.get("NVISITS")
        if hv is not None and int(hv) != n_visits:
            raise SpectrumFormatError(
                f"{path}: header NVISITS={hv} but the arrays have {nrows} rows "
                f"(expected NVISITS+2, or 1-2 rows for one visit)"
            )
        if flux.ndim == 2 and nrows < 2:
            raise SpectrumFormatError(f"{path}: 2-D arrays with {nrows} row(s); expected ≥ 2")
        if isinstance(row, str):
            r = 1 if (row == "global" and n_visits > 1) else 0
        else:
            k = int(row)
            if not 0 <= k < n_visits:
                raise VisitIndexError(f"{path}: visit index {k} out of range; the star has {n_visits} visit(s)")
            r = 0 if n_visits == 1 else k + 2
        sel = (lambda a: a) if flux.ndim == 1 else (lambda a: a[r])
        wave = _wavelength(path, hdus, grids.N_PIX_FULL)
        return Spectrum(
            flux=np.array(sel(flux), dtype=np.float64),
            flux_err=np.array(sel(err), dtype=np.float64),
            pixmask=np.array(sel(mask), dtype=np.int64),
            wavelength=wave,
            apogee_id=_apogee_id(path, header),
            header=_header_dict(header),
            kind="apStar",
            row=None if flux.ndim == 1 else r,
            n_visits=n_visits,
            path=str(path),
        )


@_damaged_file_errors
def read_aspcapstar(path: str | Path, header: bool = True) -> Spectrum:
    """Read an aspcapStar file: HDU1 normalized flux, HDU2 error, HDU3 ASPCAP model (optional),
    all (8575,). ``pixmask`` is zeros (the file has none); ``normalized`` is True. With
    ``header=False`` the primary header is not converted to ``Spectrum.header`` (left empty), which
    saves time when only the arrays are needed (prediction)."""
    path, hdus = _open(path)
    with hdus:
        flux = _image(path, hdus, 1, "flux")
        err = _image(path, hdus, 2, "flux error")
        if flux.ndim != 1 or err.shape != flux.shape:
            raise SpectrumFormatError(
                f"{path}: aspcapStar flux/error must be ({grids.N_PIX_FULL},), got {flux.shape} / {err.shape}"
            )
        model = None
        if len(hdus) > 3 and hdus[3].is_image:
            m = _image(path, hdus, 3, "model")
            if m.shape != flux.shape:
                raise SpectrumFormatError(f"{path}: HDU3 model shape {m.shape} != flux shape {flux.shape}")
            model = np.array(m, dtype=np.float64)
        primary = hdus[0].header
        return Spectrum(
            flux=np.array(flux, dtype=np.float64),
            flux_err=np.array(err, dtype=np.float64),
            pixmask=np.zeros(flux.shape, dtype=np.int64),
            wavelength=_wavelength(path, hdus, grids.N_PIX_FULL),
            apogee_id=_apogee_id(path, primary),
            header=_header_dict(primary) if header else _header_dict_of(primary, POSITION_KEYWORDS),
            model=model,
            kind="aspcapStar",
            path=str(path),
            normalized=True,
        )


@_damaged_file_errors
def read_spectrum(path: str | Path, **kwargs: Any) -> Spectrum:
    """Read any APOGEE spectrum file: by filename prefix (``apStar``/``asStar`` →
    :func:`read_apstar`, ``aspcapStar`` → :func:`read_aspcapstar`), else by HDU structure
    (integer HDU3 → apStar, float HDU3 → aspcapStar)."""
    name = Path(path).name
    if name.startswith(("apStar", "asStar")):
        return read_apstar(path, **kwargs)
    if name.startswith("aspcapStar"):
        return read_aspcapstar(path, **kwargs)
    p, hdus = _open(path)
    with hdus:
        if len(hdus) < 3:
            raise SpectrumFormatError(f"{p}: {len(hdus)} HDUs; not an apStar or aspcapStar file")
        hdu3 = _image(p, hdus, 3, "mask or model") if len(hdus) > 3 and hdus[3].is_image else None
        flux = _image(p, hdus, 1, "flux")
    if flux.ndim == 2 or (hdu3 is not None and np.issubdtype(hdu3.dtype, np.integer)):
        return read_apstar(path, **kwargs)
    return read_aspcapstar(path, **kwargs)
