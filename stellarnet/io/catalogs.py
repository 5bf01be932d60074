"""Read APOGEE ``allStar`` catalogues (DR17 format) into pandas, memory-mapped and column-selective.

The DR17 file ``allStar-dr17-synspec_rev1.fits`` holds 733,901 rows in HDU1 (~4 GB). Only the
requested columns are read: the table is opened with ``astropy.io.fits.open(memmap=True)`` and
each column is copied out of the memory map on its own, so memory grows with the columns asked
for, not with the file.

Returned schema (:func:`read_allstar`, :func:`read_allstar_chunks`)
---------------------------------------------------------------------
* Index: the 0-based row number in the FITS table (a ``RangeIndex`` for a full read, the
  row range of the chunk for a chunked read). Duplicate ``APOGEE_ID`` rows are legal and kept.
* Numbers are native-endian numpy dtypes with the FITS width kept (``>f4`` → ``float32``,
  ``>i8`` → ``int64``, ...).
* Float columns: the legacy missing-value sentinels −9999 and −999 become NaN (DR17 already
  writes NaN). Integer columns (flags, ids, counts) are never altered.
* String columns (``APOGEE_ID``, ``TELESCOPE``, ``FIELD``, ...): decoded to ``str`` with the
  FITS space/NUL padding stripped.
* ``PARAM``, ``FPARAM`` and ``PARAMFLAG`` (shape (9,) per row) are expanded into one column per
  entry of :data:`stellarnet.io.bitmasks.PARAM_ORDER`: ``PARAM_TEFF``, ``PARAM_LOGG``, ...,
  ``PARAMFLAG_TEFF``, ``PARAMFLAG_LOGG`` (int), ...; the array column itself is not returned.
  An expanded name (e.g. ``PARAMFLAG_LOGG``) may also be requested directly.
* Every other array-valued column (``X_H``, ``PARAM_COV``, ...) is an ``object`` column holding
  one numpy array per row (sentinels → NaN for float arrays).

Units follow the DR17 data model: Teff in K, logg in dex (cgs), abundances in dex, magnitudes
and extinctions in mag, parallaxes in mas, velocities in km/s.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
from astropy.io import fits

from stellarnet.io.allstar_columns import ALLSTAR_COLUMNS
from stellarnet.io.bitmasks import PARAM_ORDER

#: Legacy missing-value markers in float columns (DR16 and earlier); mapped to NaN.
SENTINELS: tuple[float, ...] = (-9999.0, -999.0)


#: Array columns expanded into ``<NAME>_<PARAM>`` scalar columns using ``PARAM_ORDER``.
EXPANDED_ARRAY_COLUMNS: tuple[str, ...] = ("PARAM", "FPARAM", "PARAMFLAG")


class CatalogFormatError(ValueError):
    """The file is not a readable FITS table where one was expected (wrong HDU, truncated...)."""


class MissingColumnError(KeyError, ValueError):
    """Requested/required columns are absent. ``.missing`` lists them, ``.source`` says where."""

    def __init__(self, missing: Sequence[str], source: str, available: Sequence[str] = ()):
        self.missing = list(missing)
        self.source = str(source)
        self.available = list(available)
        msg = f"missing column(s) {', '.join(map(repr, self.missing))} in {self.source}"
        if self.available:
            shown = ", ".join(self.available[:40])
            more = f", ... ({len(self.available)} in all)" if len(self.available) > 40 else ""
            msg += f" (available: {shown}{more})"
        self.message = msg
        super().__init__(msg)

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.message

    def __reduce__(self):  # picklable (e.g. raised inside DataLoader workers)
        return (type(self), (self.missing, self.source, self.available))


# --------------------------------------------------------------------------- helpers


def _table_hdus(hdul: fits.HDUList) -> list[int]:
    """Indices of the (non-empty) table HDUs in an open file; best effort on damaged files."""
    out = []
    try:
        for i, h in enumerate(hdul):
            if isinstance(h, (fits.BinTableHDU, fits.TableHDU)):
                out.append(i)
    except Exception:  # noqa: BLE001 - a damaged tail must not hide the real error
        pass
    return out


def _open(path: Path, memmap: bool) -> fits.HDUList:
    if not path.exists():
        raise FileNotFoundError(f"allStar file not found: {path}")
    if path.is_dir():
        raise CatalogFormatError(f"{path} is a directory, not an allStar FITS file")
    try:
        return fits.open(path, memmap=memmap, mode="readonly")
    except Exception as exc:  # astropy raises OSError/ValueError/TypeError for corrupt files
        raise CatalogFormatError(
            f"cannot open {path} as FITS (corrupt, truncated or not a FITS file): {exc}"
        ) from exc


def _compressed(path: Path) -> bool:
    """True for a gzip/bzip2/zip-compressed file (astropy decompresses it: its size on disk says
    nothing about the FITS blocks inside)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError:
        return False
    return head[:2] == b"\x1f\x8b" or head[:3] == b"BZh" or head == b"PK\x03\x04"


def _damage_hint(path: Path, caught: list[warnings.WarningMessage]) -> str:
    """Extra text for an error message when the file looks truncated/corrupt."""
    hints = []
    size = path.stat().st_size
    if size % 2880 and not _compressed(path):
        hints.append(
            f"the file size ({size} bytes) is not a multiple of 2880, so it looks truncated"
        )
    for w in caught:
        msg = " ".join(str(w.message).split())
        if msg not in hints:
            hints.append(msg)
    return ("; " + "; ".join(hints)) if hints else ""


def _select_hdu(
    hdul: fits.HDUList, hdu: int | str, path: Path, caught: list | None = None
) -> fits.BinTableHDU:
    """The table HDU ``hdu`` of ``hdul``, with checks for wrong HDUs and truncation."""
    caught = [] if caught is None else caught
    try:
        h = hdul[hdu]
    except (IndexError, KeyError) as exc:
        tables = _table_hdus(hdul)
        raise CatalogFormatError(
            f"{path} has no HDU {hdu!r} ({len(hdul)} HDU(s) readable); "
            f"table HDU(s): {tables or 'none'}{_damage_hint(path, caught)}"
        ) from exc
    except Exception as exc:  # header of that HDU damaged / file ends early
        raise CatalogFormatError(
            f"cannot read HDU {hdu!r} of {path}: the file looks truncated or corrupt ({exc})"
            f"{_damage_hint(path, caught)}"
        ) from exc
    if not isinstance(h, (fits.BinTableHDU, fits.TableHDU)):
        tables = _table_hdus(hdul)
        kind = type(h).__name__
        empty = " (empty, header only)" if h.header.get("NAXIS", 0) == 0 else ""
        if tables:
            where = f"the allStar table is in HDU {tables[0]}"
            if len(tables) > 1:
                where += f" (tables: {tables})"
        else:
            where = "the file holds no table HDU"
        raise CatalogFormatError(
            f"HDU {hdu!r} of {path} is a {kind}{empty}, not a table; {where} (pass hdu=...)"
        )
    # Truncation check: the data block must fit in the file.
    hdr = h.header
    nbytes = int(hdr.get("NAXIS1", 0)) * int(hdr.get("NAXIS2", 0)) + int(hdr.get("PCOUNT", 0))
    try:
        start = int(h.fileinfo()["datLoc"])
    except Exception:  # noqa: BLE001 - fileinfo unavailable: skip the size check
        start = None
    size = path.stat().st_size
    if start is not None and start + nbytes > size and not _compressed(path):  # .gz: astropy reports truncation
        raise CatalogFormatError(
            f"{path} is truncated: HDU {hdu!r} needs {start + nbytes} bytes "
            f"({int(hdr.get('NAXIS2', 0))} rows) but the file has {size}"
        )
    return h


def _open_table(
    path: Path, hdu: int | str, memmap: bool
) -> tuple[fits.HDUList, fits.BinTableHDU]:
    """Open ``path`` and return (hdul, table HDU); astropy's warnings become part of any error
    message, and are passed on as warnings when the table itself is fine."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hdul = _open(path, memmap)
        try:
            h = _select_hdu(hdul, hdu, path, caught)
        except BaseException:
            hdul.close()
            raise
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return hdul, h


def _table_data(h: fits.BinTableHDU, hdu: int | str, path: Path) -> fits.FITS_rec:
    try:
        data = h.data
    except (OSError, ValueError, TypeError, IndexError) as exc:
        raise CatalogFormatError(
            f"cannot read the table in HDU {hdu!r} of {path} (truncated or corrupt?): {exc}"
        ) from exc
    if data is None:
        raise CatalogFormatError(f"HDU {hdu!r} of {path} is a table HDU without data")
    return data


def _resolve_columns(
    names: Sequence[str], columns: Sequence[str] | None, required: Sequence[str], path: Path
) -> list[tuple[str, str, int | None]]:
    """Plan of (output name, file column, array index or None) for each requested column.

    Array columns in ``EXPANDED_ARRAY_COLUMNS`` are returned as (name, name, -1): expand all.
    """
    if isinstance(columns, str) or isinstance(required, str):
        raise TypeError("columns/required must be sequences of names, not a single string")
    upper = {n.upper(): n for n in names}
    explicit = columns is not None
    wanted = list(ALLSTAR_COLUMNS if columns is None else columns)
    for r in required:
        if r not in wanted:
            wanted.append(r)

    plan: list[tuple[str, str, int | None]] = []
    missing: list[str] = []
    seen: set[str] = set()
    for w in wanted:
        if w in seen:
            continue
        seen.add(w)
        file_name = w if w in names else upper.get(str(w).upper())
        if file_name is not None:
            plan.append((w, file_name, -1 if file_name.upper() in EXPANDED_ARRAY_COLUMNS else None))
            continue
        # expanded element requested directly, e.g. PARAMFLAG_LOGG
        hit = None
        for arr in EXPANDED_ARRAY_COLUMNS:
            for j, p in enumerate(PARAM_ORDER):
                if str(w).upper() == f"{arr}_{p}" and arr in upper:
                    hit = (w, upper[arr], j)
        if hit is not None:
            plan.append(hit)
            continue
        if explicit or w in required:
            missing.append(w)
    if missing:
        raise MissingColumnError(missing, f"FITS table of {path}", available=list(names))
    return plan


def _native(a: np.ndarray) -> np.ndarray:
    """A native-endian copy (always a copy, never a view into the memory map)."""
    a = np.asarray(a)
    if a.dtype.byteorder not in ("=", "|"):
        return a.astype(a.dtype.newbyteorder("="), copy=True)
    return np.array(a, copy=True)


def _clean_float(a: np.ndarray) -> np.ndarray:
    if a.dtype.kind == "f":
        bad = np.isin(a, SENTINELS)
        if bad.any():
            a[bad] = np.nan
    return a


_PAD_CHARS = " \t\r\n\x0b\x0c\x00"


def fits_strings(a: np.ndarray) -> np.ndarray:
    """Fixed-width FITS strings → object array of stripped ``str``."""
    a = np.asarray(a)
    if a.dtype.kind == "S":
        a = np.char.decode(a, "ascii", errors="replace")
    # strip ASCII whitespace and NUL padding from both ends, in any mix ("2M.. \x00", "\x002M..");
    # plain str.strip: np.char.strip stops reading its ``chars`` argument at a NUL
    flat = a.astype(str).ravel().tolist()
    return np.fromiter((v.strip(_PAD_CHARS) for v in flat), dtype=object, count=len(flat)).reshape(a.shape)


def _convert(raw: np.ndarray) -> np.ndarray:
    """One FITS column slice → a native numpy array (object array of arrays if multi-dim)."""
    if raw.dtype.kind in "SU":
        if raw.ndim == 1:
            return fits_strings(raw)
        flat = fits_strings(raw.reshape(len(raw), -1))
        return _object_rows(flat.reshape(raw.shape))
    if raw.dtype.kind == "O":  # variable-length arrays
        return _object_rows([_clean_float(_native(v)) for v in raw])
    arr = _clean_float(_native(raw))
    if arr.ndim == 1:
        return arr
    return _object_rows(arr)


def _object_rows(rows) -> np.ndarray:
    out = np.empty(len(rows), dtype=object)
    for i, r in enumerate(rows):
        out[i] = r
    return out


def _build_frame(
    data: fits.FITS_rec,
    plan: list[tuple[str, str, int | None]],
    start: int,
    stop: int,
) -> pd.DataFrame:
    out: dict[str, np.ndarray] = {}
    # slice rows first: astropy converts (and caches) whole fields, so a chunk must only see
    # its own rows to keep chunked reads bounded in memory
    rows = data if (start == 0 and stop == len(data)) else data[start:stop]
    for out_name, file_name, idx in plan:
        raw = rows.field(file_name)
        if idx is None:
            out[out_name] = _convert(raw)
            continue
        if raw.ndim != 2 or raw.shape[1] != len(PARAM_ORDER):
            if idx == -1:  # unexpected shape: keep as array column rather than guess names
                out[out_name] = _convert(raw)
                continue
            raise CatalogFormatError(
                f"column {file_name} has per-row shape {raw.shape[1:]}, expected "
                f"({len(PARAM_ORDER)},) in PARAM_ORDER; cannot extract {out_name}"
            )
        arr = _clean_float(_native(raw))
        if idx == -1:
            for j, p in enumerate(PARAM_ORDER):
                out[f"{out_name}_{p}"] = np.ascontiguousarray(arr[:, j])
        else:
            out[out_name] = np.ascontiguousarray(arr[:, idx])
    return pd.DataFrame(out, index=pd.RangeIndex(start, stop), copy=False)


# --------------------------------------------------------------------------- public API


def allstar_columns(path: str | os.PathLike, hdu: int | str = 1) -> list[str]:
    """Column names of the table in HDU ``hdu`` of an allStar file (reads headers only)."""
    path = Path(path)
    with damaged_file_errors(path, hdu), _open(path, memmap=True) as hdul:
        return _column_names(_select_hdu(hdul, hdu, path), path)


def _column_names(h: fits.BinTableHDU, path: Path) -> list[str]:
    """The table's column names; CatalogFormatError when one is missing (a damaged TTYPEn card)."""
    names = list(h.columns.names)
    unnamed = [i + 1 for i, n in enumerate(names) if not isinstance(n, str) or not n.strip()]
    if unnamed:
        raise CatalogFormatError(f"{path}: column(s) {unnamed} have no name (TTYPEn card missing or damaged); "
                                 "the file is damaged: download or write it again")
    return names


def read_allstar(
    path: str | os.PathLike,
    columns: Sequence[str] | None = None,
    required: Sequence[str] = (),
    hdu: int | str = 1,
    memmap: bool = True,
) -> pd.DataFrame:
    """Read selected columns of an allStar table into a DataFrame (schema: module docstring).

    Parameters
    ----------
    path: allStar FITS file (e.g. ``allStar-dr17-synspec_rev1.fits``).
    columns: columns to read; ``None`` → the :data:`ALLSTAR_COLUMNS` present in the file.
        Explicitly listed columns must exist. Expanded names such as ``PARAMFLAG_LOGG`` work.
    required: columns that must exist (added to ``columns`` if not listed).
    hdu: index or EXTNAME of the table HDU (1 for allStar).
    memmap: memory-map the file (keeps memory bounded by the selected columns).

    Raises
    ------
    FileNotFoundError: no such file.
    MissingColumnError: an explicitly requested or required column is absent (all listed).
    CatalogFormatError: the HDU is not a table, or the file is truncated/corrupt.
    """
    path = Path(path)
    with damaged_file_errors(path, hdu):
        hdul, h = _open_table(path, hdu, memmap)
        try:
            plan = _resolve_columns(_column_names(h, path), columns, required, path)
            data = _table_data(h, hdu, path)
            return _build_frame(data, plan, 0, len(data))
        finally:
            hdul.close()


@contextmanager
def damaged_file_errors(path: Path, hdu: int | str = 1) -> Iterator[None]:
    """Inside the block, any error a damaged FITS file makes astropy or numpy raise (``KeyError:
    'BITPIX'``, ``VerifyError``, ``AttributeError`` on a mangled header card, …) becomes a
    :class:`CatalogFormatError` naming the file (the original is chained); the project's own
    errors and a missing file pass unchanged."""
    try:
        yield
    except (CatalogFormatError, MissingColumnError, FileNotFoundError):
        raise
    except Exception as exc:  # noqa: BLE001 - a damaged file can make the FITS library raise anything
        raise CatalogFormatError(
            f"cannot read the table in HDU {hdu!r} of {path}: the file is damaged (a corrupt header or data block, "
            f"or truncated): {type(exc).__name__}: {exc}; download or write it again"
        ) from exc


def read_allstar_chunks(
    path: str | os.PathLike,
    columns: Sequence[str] | None = None,
    chunk_rows: int = 100_000,
    required: Sequence[str] = (),
    hdu: int | str = 1,
) -> Iterator[pd.DataFrame]:
    """Yield the table in row chunks of at most ``chunk_rows`` rows (same schema as
    :func:`read_allstar`; each chunk's index is its row numbers in the file).

    The file stays memory-mapped while the generator is alive; close it early with
    ``gen.close()``. Errors (missing columns, wrong HDU, truncation) are raised on the first
    ``next()``.
    """
    if int(chunk_rows) <= 0:
        raise ValueError(f"chunk_rows must be a positive number of rows, got {chunk_rows!r}")
    chunk_rows = int(chunk_rows)
    path = Path(path)
    with damaged_file_errors(path, hdu):
        hdul, h = _open_table(path, hdu, memmap=True)
    try:
        with damaged_file_errors(path, hdu):
            plan = _resolve_columns(_column_names(h, path), columns, required, path)
            data = _table_data(h, hdu, path)
            nrows = len(data)
        for start in range(0, nrows, chunk_rows):
            with damaged_file_errors(path, hdu):
                frame = _build_frame(data, plan, start, min(start + chunk_rows, nrows))
            yield frame
    finally:
        hdul.close()
