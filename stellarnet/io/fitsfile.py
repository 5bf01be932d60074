"""A FITS reader at the speed of the disk for the simple files survey spectra come in.

aspcapStar and apStar files are a primary header and a few plain image extensions (float32/64,
int64 masks), then binary tables: astropy's general machinery (card objects, verification,
lazy HDU classes) costs about as much as reading the data. :func:`open_fits` reads only what a
spectrum reader needs: every header, parsed card by card (FITS standard 4.0, §4: fixed-format
values, quoted strings with ``''`` escapes, ``CONTINUE`` long strings, logical, integer and
floating values), and an image's data read on demand from its offset with one ``pread``.

It **refuses** — raising :class:`UnsupportedFITS`, so the caller falls back to astropy — anything it
does not handle exactly as astropy would: compressed files, ``HIERARCH`` or complex-valued cards,
scaled images (``BSCALE``/``BZERO``), random groups, a header or data that do not fit the file
(truncation), or trailing bytes that are not another HDU. Damaged files therefore still get
astropy's (and the readers') error messages; tests check that the headers and arrays are identical
to astropy's on the real DR17 apStar files in ``data/reference`` and on the simulated survey.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

__all__ = ["UnsupportedFITS", "FITSHeader", "FITSImage", "FITSFile", "open_fits", "BLOCK"]

BLOCK = 2880  # bytes per FITS block
_CARD = 80
_DTYPES = {8: np.dtype("u1"), 16: np.dtype(">i2"), 32: np.dtype(">i4"), 64: np.dtype(">i8"),
           -32: np.dtype(">f4"), -64: np.dtype(">f8")}
_INT_RE = re.compile(r"^[+-]?\d+$")
_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([EeDd][+-]?\d+)?$")
_COMMENTARY = ("COMMENT", "HISTORY", "")
_KEY_RE = re.compile(r"^[A-Z0-9_-]{1,8}$")


class UnsupportedFITS(Exception):
    """The file uses a FITS feature this reader does not handle (or is damaged): use astropy."""


class FITSHeader(Mapping[str, Any]):
    """One HDU's header as an ordered mapping keyword → value (``COMMENT``/``HISTORY`` left out;
    the first of a repeated keyword kept, as astropy's ``header[key]`` returns)."""

    def __init__(self, values: dict[str, Any]):
        self._values = values

    def __getitem__(self, key: str) -> Any:
        return self._values[key.upper()]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key.upper() in self._values

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def get(self, key: str, default: Any = None) -> Any:
        return self._values.get(key.upper(), default)


def _string_value(text: str) -> tuple[str, str]:
    """A quoted string at the start of ``text`` → (value with ``''`` unescaped, rest after the quote)."""
    out = []
    i = 1
    while True:
        j = text.find("'", i)
        if j < 0:
            raise UnsupportedFITS("unterminated string value")
        out.append(text[i:j])
        if text[j + 1:j + 2] == "'":  # escaped quote
            out.append("'")
            i = j + 2
            continue
        return "".join(out), text[j + 1:]


def _value(field: str) -> Any:
    """The value of a card's value field (columns 11–80)."""
    text = field.lstrip()
    if text.startswith("'"):
        value, _ = _string_value(text)
        return value.rstrip()
    token = text.split("/", 1)[0].strip()
    if token == "":
        return None  # undefined value
    if token == "T":
        return True
    if token == "F":
        return False
    if _INT_RE.match(token):
        return int(token)
    if _FLOAT_RE.match(token):
        return float(token.replace("D", "E").replace("d", "e"))
    raise UnsupportedFITS(f"value {token!r} (complex or non-standard)")


def _parse_header(raw: bytes) -> FITSHeader:
    """Header cards (up to END) → the header (keywords in card order). Raises UnsupportedFITS for cards it
    cannot read exactly."""
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise UnsupportedFITS("non-ASCII header") from None
    values: dict[str, Any] = {}
    last_string_key: str | None = None
    for k in range(0, len(text), _CARD):
        card = text[k:k + _CARD]
        key = card[:8].rstrip()
        if key == "END":
            return FITSHeader(values)
        if key == "CONTINUE":
            if last_string_key is None or not isinstance(values[last_string_key], str):
                raise UnsupportedFITS("CONTINUE after a non-string card")
            body = card[8:].lstrip()
            if not body.startswith("'"):
                raise UnsupportedFITS("CONTINUE card without a string")
            prev = values[last_string_key]
            if not prev.endswith("&"):
                raise UnsupportedFITS("CONTINUE without '&'")
            part, _ = _string_value(body)
            values[last_string_key] = prev[:-1] + part.rstrip()
            continue
        if key in _COMMENTARY:
            last_string_key = None
            continue
        if card[8:10] != "= " or not _KEY_RE.match(key):  # HIERARCH, a card without "= ", a bad keyword
            raise UnsupportedFITS(f"non-standard card {card[:20]!r}")
        value = _value(card[10:])
        if key not in values:
            values[key] = value
            last_string_key = key if isinstance(value, str) else None
        else:
            last_string_key = None  # a repeated keyword: astropy keeps the first; its CONTINUE is ignored
    raise UnsupportedFITS("header without END")


class FITSImage:
    """One HDU: ``header``, ``is_image`` and ``data`` (the image as a big-endian numpy array, read on
    first access; None for an image without data or for a table, which this reader does not decode)."""

    def __init__(self, header: FITSHeader, is_image: bool, fd: int, offset: int, shape: tuple[int, ...],
                 dtype: np.dtype | None):
        self.header = header
        self.is_image = is_image
        self._fd = fd
        self._offset = offset
        self._shape = shape
        self._dtype = dtype
        self._data: np.ndarray | None = None

    @property
    def data(self) -> np.ndarray | None:
        if not self.is_image or self._dtype is None or not self._shape:
            return None
        if self._data is None:
            n = int(np.prod(self._shape)) * self._dtype.itemsize
            buf = os.pread(self._fd, n, self._offset)
            if len(buf) != n:
                raise UnsupportedFITS("data shorter than the header says")
            self._data = np.frombuffer(buf, self._dtype).reshape(self._shape)
        return self._data


class FITSFile:
    """The HDUs of one file (a sequence of :class:`FITSImage`); a context manager closing the file."""

    def __init__(self, path: Path, fd: int, hdus: list[FITSImage]):
        self.path = path
        self._fd = fd
        self._hdus = hdus

    def __len__(self) -> int:
        return len(self._hdus)

    def __getitem__(self, i: int) -> FITSImage:
        return self._hdus[i]

    def __iter__(self) -> Iterator[FITSImage]:
        return iter(self._hdus)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "FITSFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _read_header(fd: int, offset: int, size: int) -> tuple[bytes, int]:
    """Header bytes from ``offset`` up to and including the block holding END → (bytes, data offset)."""
    chunks = []
    pos = offset
    while True:
        if pos + BLOCK > size:
            raise UnsupportedFITS("header runs past the end of the file")
        block = os.pread(fd, BLOCK, pos)
        chunks.append(block)
        pos += BLOCK
        for k in range(0, BLOCK, _CARD):
            if block[k:k + 8] == b"END     ":
                return b"".join(chunks), pos


def _hdu_layout(header: FITSHeader, primary: bool) -> tuple[bool, tuple[int, ...], np.dtype | None, int]:
    """(is_image, numpy shape, dtype, data bytes incl. heap) of an HDU from its mandatory keywords."""
    if primary:
        if header.get("SIMPLE") is not True:
            raise UnsupportedFITS("not a standard FITS file (SIMPLE != T)")
        if header.get("GROUPS") is True:
            raise UnsupportedFITS("random groups")
        kind = "IMAGE"
    else:
        kind = header.get("XTENSION")
        if not isinstance(kind, str):
            raise UnsupportedFITS("extension without XTENSION")
        kind = kind.strip()
    bitpix, naxis = header.get("BITPIX"), header.get("NAXIS")
    if bitpix not in _DTYPES or not isinstance(naxis, int) or not 0 <= naxis <= 999 or isinstance(naxis, bool):
        raise UnsupportedFITS(f"BITPIX={bitpix!r} NAXIS={naxis!r}")
    axes = [header.get(f"NAXIS{i}") for i in range(1, naxis + 1)]
    if any(not isinstance(a, int) or isinstance(a, bool) or a < 0 for a in axes):
        raise UnsupportedFITS(f"NAXISn {axes!r}")
    pcount, gcount = header.get("PCOUNT", 0), header.get("GCOUNT", 1)
    if not isinstance(pcount, int) or not isinstance(gcount, int) or pcount < 0 or gcount < 0:
        raise UnsupportedFITS("PCOUNT/GCOUNT")
    n = int(np.prod(axes)) if axes else 0
    nbytes = abs(bitpix) // 8 * gcount * (pcount + n)
    if kind == "IMAGE":
        if pcount != 0 or gcount != 1:
            raise UnsupportedFITS("image with PCOUNT/GCOUNT")
        if header.get("BSCALE", 1) != 1 or header.get("BZERO", 0) != 0 or "BLANK" in header:
            raise UnsupportedFITS("scaled image (BSCALE/BZERO/BLANK)")
        if "ZIMAGE" in header:
            raise UnsupportedFITS("tile-compressed image")
        return True, tuple(reversed(axes)) if n else (), _DTYPES[bitpix], nbytes
    if kind in ("BINTABLE", "TABLE"):
        if header.get("ZIMAGE") is True:
            raise UnsupportedFITS("tile-compressed image")
        return False, (), None, nbytes
    raise UnsupportedFITS(f"extension type {kind!r}")


def open_fits(path: str | Path) -> FITSFile:
    """Open an uncompressed FITS file of plain images (and tables, not decoded). Raises
    :class:`UnsupportedFITS` for anything else (the caller then uses astropy), ``FileNotFoundError``
    for a missing file."""
    path = Path(path)
    if path.suffix.lower() in (".gz", ".fz", ".bz2", ".z", ".zip"):
        raise UnsupportedFITS("compressed file")
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size < BLOCK or size % BLOCK:
            raise UnsupportedFITS(f"size {size} is not a whole number of {BLOCK}-byte blocks")
        hdus: list[FITSImage] = []
        pos = 0
        while pos < size:
            if hdus and os.pread(fd, 8, pos) != b"XTENSION":
                raise UnsupportedFITS("trailing bytes that are not an extension")
            raw, data_at = _read_header(fd, pos, size)
            header = _parse_header(raw)
            is_image, shape, dtype, nbytes = _hdu_layout(header, primary=not hdus)
            end = data_at + -(-nbytes // BLOCK) * BLOCK
            if end > size:
                raise UnsupportedFITS("data run past the end of the file (truncated)")
            hdus.append(FITSImage(header, is_image, fd, data_at, shape, dtype))
            pos = end
        return FITSFile(path, fd, hdus)
    except BaseException:
        os.close(fd)
        raise
