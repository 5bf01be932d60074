"""APOGEE spectrum files: read apStar and aspcapStar (the real DR17 layouts) into a :class:`Spectrum`.

Conventions
-----------
* File spectra live on the 8,575-pixel log-linear vacuum grid (λ in Å, see :mod:`grids`);
  :mod:`stellarnet.preparation.spectra` takes them to a gap-removed, normalized grid.
* Real DR17 apStar files (checked on two files in ``data/reference``): HDU1-3 are ``>f8``/``>i8``
  arrays of shape ``(NVISITS + 2, 8575)``; a one-visit star still has **two** rows, row 0 the
  spectrum and row 1 all zeros. Combined rows have NaN flux *and* NaN error outside the chips;
  visit rows have 0 flux and 0 error there. Some in-chip pixels carry errors up to ~1e13
  (sometimes with pixmask 0), which the preparation treats as bad.
* A damaged file raises :class:`SpectrumFormatError`; a spectrum no pipeline can use (implausible
  flux) :class:`SpectrumQualityError`.
"""

from __future__ import annotations

import functools
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from stellarnet.io import grids
from stellarnet.io.fitsfile import UnsupportedFITS, open_fits

_SPEC_ID_RE = re.compile(r"(2M\d{8}[+-]\d{7})")


class SpectrumFormatError(ValueError):
    """A spectrum file is not in the expected format (missing HDU, wrong shape, corrupt)."""


class SpectrumQualityError(ValueError):
    """A spectrum has no usable pixels (everything masked), or its flux is not what its kind says
    (a "normalized" spectrum whose median is far from 1, negative flux)."""


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
