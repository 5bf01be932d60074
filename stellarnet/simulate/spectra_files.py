"""aspcapStar files in the real DR17 layout, written fast.

Path: ``apogee/spectro/aspcap/dr17/synspec_rev1/<TELESCOPE>/<FIELD>/aspcapStar-dr17-<APOGEE_ID>.fits``.
HDU0: header only (OBJID and APOGEEID = the APOGEE_ID, TELESCOP, FIELD, SNR, NVISITS, CRVAL1 = 4.179,
CDELT1 = 6e-6, NAXIS1-equivalent ``NWAVE`` = 8575); HDU1: continuum-normalized flux (8,575,
``>f4``); HDU2: its error; HDU3: the noiseless model (what ASPCAP's best-fit model is in real
files). HDU1–3 carry CRVAL1/CDELT1/CRPIX1 (log10 Å) like the real files.

The FITS bytes are assembled directly (80-character cards, 2,880-byte blocks, big-endian data),
which is ~10× faster than building an astropy ``HDUList`` per file; the output is checked
against astropy's reader in the tests. Files are written to a temporary name and renamed.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from stellarnet.common.files import atomic_open
from stellarnet.io import grids

__all__ = ["ASPCAP_SUBDIR", "aspcapstar_path", "aspcapstar_bytes", "write_aspcapstar", "write_many"]

ASPCAP_SUBDIR = Path("apogee/spectro/aspcap/dr17/synspec_rev1")
_BLOCK = 2880


def aspcapstar_path(root: str | Path, telescope: str, field: str, apogee_id: str) -> Path:
    """Real-layout path of an aspcapStar file under a survey root."""
    return Path(root) / ASPCAP_SUBDIR / telescope.strip() / field.strip() / f"aspcapStar-dr17-{apogee_id.strip()}.fits"


def _card(key: str, value: Any, comment: str = "") -> str:
    if isinstance(value, bool):
        v = f"{'T' if value else 'F':>20}"
    elif isinstance(value, (int, np.integer)):
        v = f"{int(value):>20d}"
    elif isinstance(value, (float, np.floating)):
        x = float(value)
        s = repr(x) if np.isfinite(x) else "0.0"
        if "e" in s and "." not in s.split("e")[0]:
            s = s.replace("e", ".0E")
        v = f"{s.upper():>20}"
    else:
        sv = str(value).replace("'", "''")
        v = f"'{sv:<8}'"
        v = f"{v:<20}"
    card = f"{key:<8}= {v}"
    if comment:
        card += f" / {comment}"
    if len(card) > 80:
        card = card[:80]
    return f"{card:<80}"


def _header(cards: list[str]) -> bytes:
    text = "".join(cards) + f"{'END':<80}"
    pad = (-len(text)) % _BLOCK
    return (text + " " * pad).encode("ascii")


def _wave_cards() -> list[str]:
    return [
        _card("CRVAL1", grids.LOGLAM0, "log10 wavelength (vacuum A) of first pixel"),
        _card("CDELT1", grids.DLOGLAM, "log10 wavelength step"),
        _card("CRPIX1", 1, "reference pixel"),
        _card("CTYPE1", "LOG-LINEAR"),
        _card("DC-FLAG", 1, "log-linear flag"),
    ]


def _image_hdu(data: np.ndarray, extname: str, bunit: str) -> bytes:
    arr = np.ascontiguousarray(data, dtype=">f4")
    cards = [
        _card("XTENSION", "IMAGE", "Image extension"),
        _card("BITPIX", -32, "array data type"),
        _card("NAXIS", 1, "number of array dimensions"),
        _card("NAXIS1", arr.shape[0]),
        _card("PCOUNT", 0, "number of parameters"),
        _card("GCOUNT", 1, "number of groups"),
        *_wave_cards(),
        _card("BUNIT", bunit),
        _card("EXTNAME", extname),
    ]
    raw = arr.tobytes()
    return _header(cards) + raw + b"\0" * ((-len(raw)) % _BLOCK)


def aspcapstar_bytes(flux: np.ndarray, flux_err: np.ndarray, model: np.ndarray, meta: dict[str, Any]) -> bytes:
    """The bytes of one aspcapStar FITS file. ``flux``/``flux_err``/``model`` (8575,);
    ``meta``: header values (APOGEE_ID, TELESCOP, FIELD, SNR, NVISITS, TEFF, ... — any plain
    scalars; keys are truncated to 8 characters)."""
    for name, a in (("flux", flux), ("flux_err", flux_err), ("model", model)):
        if np.shape(a) != (grids.N_PIX_FULL,):
            raise ValueError(f"{name} must have shape ({grids.N_PIX_FULL},), got {np.shape(a)}")
    apogee_id = str(meta["APOGEE_ID"])
    cards = [
        _card("SIMPLE", True, "conforms to FITS standard"),
        _card("BITPIX", 8, "array data type"),
        _card("NAXIS", 0, "number of array dimensions"),
        _card("EXTEND", True),
        _card("OBJID", apogee_id, "APOGEE object name"),
        _card("APOGEEID", apogee_id, "APOGEE_ID of the allStar row"),
        *[_card(k[:8], v) for k, v in meta.items() if v is not None and k != "APOGEE_ID"],
        _card("NWAVE", grids.N_PIX_FULL, "number of wavelength pixels"),
        *_wave_cards(),
    ]
    return b"".join(
        [
            _header(cards),
            _image_hdu(flux, "FLUX", "Normalized flux"),
            _image_hdu(flux_err, "ERROR", "Normalized flux error"),
            _image_hdu(model, "MODEL", "Normalized best-fit model"),
        ]
    )


def write_aspcapstar(path: str | Path, flux: np.ndarray, flux_err: np.ndarray, model: np.ndarray, meta: dict[str, Any]) -> Path:
    """Write one aspcapStar file atomically (temporary name in the same folder + rename)."""
    path = Path(path)
    data = aspcapstar_bytes(flux, flux_err, model, meta)
    with atomic_open(path, "wb") as fh:
        fh.write(data)
    return path


def write_many(items: Iterable[tuple[Path, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]], threads: int = 4) -> int:
    """Write many files with a thread pool (file I/O releases the GIL). Returns the count."""
    items = list(items)
    if threads <= 1 or len(items) < 8:
        for it in items:
            write_aspcapstar(*it)
        return len(items)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(lambda it: write_aspcapstar(*it), items))
    return len(items)
