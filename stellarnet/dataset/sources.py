"""Spectra sources for prediction: an allStar catalogue + spectra tree, a shard dataset, or files.

What kind an input is (:func:`source_kind`), the files of a file-list input (:func:`expand_files`),
and reading + preparing spectrum files into a chunk (:func:`read_spectrum_files`): a dict with
``apogee_id`` (N,), ``flux``, ``flux_err``, ``pix_mask`` (N, P) on the requested gap-removed grid,
``error`` (a per-star read error message, empty when fine), ``ra``, ``dec``, ``snr``,
``telescope``, ``field``. A file that cannot be read or has no usable pixel is reported in that
star's ``error``. :mod:`stellarnet.dataset.chunks` builds the prediction's chunk dataset on these;
``DataLoader`` worker processes (``num_workers``, :func:`resolve_num_workers`) do the reading.
"""

from __future__ import annotations

import glob
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from stellarnet.io import grids
from stellarnet.io.spectra import read_aspcapstar, read_spectrum
from stellarnet.preparation.spectra import prepare_spectrum

Chunk = dict[str, Any]

# --------------------------------------------------------------------------- one file

def _read_file_arrays(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, str, dict[str, Any]]:
    """(flux, flux_err, pixmask, apogee_id, header) of any spectrum file, as :func:`read_spectrum`
    reads it; ``header`` holds at least the position keywords (RA, DEC, SNR, TELESCOP, FIELD) present."""
    # aspcapStar: skip the header dictionary prediction never uses (the grid check is cached in spectra)
    spec = read_aspcapstar(path, header=False) if Path(path).name.startswith("aspcapStar") else read_spectrum(path)
    return spec.flux, spec.flux_err, spec.pixmask, spec.apogee_id, spec.header


def _number(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def read_spectrum_files(files: Sequence[str], grid: str, normalized: bool | None) -> Chunk:
    """Read and prepare ``files`` (normalized: aspcapStar-like; None: by file name); a file that fails gets flux 1, error 1, mask 0
    and its error message (``"<ExceptionType>: <message>"``) in ``error``."""
    n_pix = grids.n_pixels(grid)
    n = len(files)
    flux = np.ones((n, n_pix), np.float32)
    err = np.full((n, n_pix), 1.0, np.float32)
    good = np.zeros((n, n_pix), np.float32)
    ids, errors = [], []
    pos = np.full((n, 3), np.nan)  # RA, DEC (deg), SNR from the spectrum's header
    telescope, field = [""] * n, [""] * n
    for i, f in enumerate(files):
        try:
            fl, er, pm, apogee_id, header = _read_file_arrays(f)
            pos[i] = [_number(header.get(k)) for k in ("RA", "DEC", "SNR")]
            telescope[i], field[i] = str(header.get("TELESCOP", "") or ""), str(header.get("FIELD", "") or "")
            norm = normalized if normalized is not None else Path(f).name.startswith("aspcapStar")
            fl, er, gd = prepare_spectrum(fl, er, pm, grid=grid, normalized=norm)
            flux[i], err[i], good[i] = fl, er, gd
            ids.append(apogee_id or Path(f).stem)
            errors.append("")
        except Exception as exc:  # noqa: BLE001 - reported per star in the output
            ids.append(Path(f).stem)
            errors.append(f"{type(exc).__name__}: {exc}")
    return {"apogee_id": np.array(ids, dtype=object), "flux": flux, "flux_err": err, "pix_mask": good,
            "error": np.array(errors, dtype=object), "ra": pos[:, 0], "dec": pos[:, 1], "snr": pos[:, 2],
            "telescope": np.array(telescope, dtype=object), "field": np.array(field, dtype=object)}


#: Share of the CPU time per star that reading + preprocessing an aspcapStar file takes in
#: ``stellarnet.predict`` with the network alone (the rest: the model, tables, writing): about 0.4
#: with the fast FITS reader (0.5 ms of 1.3 ms per star on one core; docs/performance.md); with the
#: χ² refinement much less (~0.1).
READ_CPU_SHARE = 0.4


def default_num_workers(cpus: int | None = None) -> int:
    """Reader processes for ``num_workers: auto``: ``ceil(READ_CPU_SHARE × cpus)`` of the CPUs this
    process may use (the model gets the rest, at least one thread); none on a single CPU.

    2 CPUs → 1 (1,218 vs 1,102 spectra/s for 1 vs 2 readers, network alone, on an idle 2-core
    machine, docs/performance.md), 4 → 2, 8 → 4, 16 → 7.
    """
    if cpus is None:
        try:
            cpus = len(os.sched_getaffinity(0))
        except AttributeError:  # pragma: no cover - non-Linux
            cpus = os.cpu_count() or 1
    return 0 if cpus <= 1 else math.ceil(READ_CPU_SHARE * cpus - 1e-9)


def resolve_num_workers(value: Any) -> int:
    """``"auto"``/None → :func:`default_num_workers`; else an integer >= 0 (ValueError otherwise)."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return default_num_workers()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"num_workers must be an integer >= 0 or 'auto', got num_workers={value!r}")
    return int(value)


# --------------------------------------------------------------------------- sources

def expand_files(spec: str | Sequence[str]) -> list[str]:
    """Files from a glob pattern, a comma-separated list, a text file of paths, or a list."""
    items = [spec] if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for item in items:
        for part in str(item).split(","):
            part = part.strip()
            if not part:
                continue
            if Path(part).is_dir():
                raise IsADirectoryError(
                    f"{part} is a directory but not a shard dataset (no manifest.json): pass its spectrum files, "
                    f"e.g. input='{Path(part) / '*.fits'}', or a .txt list of paths"
                )
            if part.endswith(".txt") and Path(part).is_file():
                out += [ln.strip() for ln in Path(part).read_text().splitlines() if ln.strip()]
            elif any(c in part for c in "*?["):
                out += sorted(glob.glob(part))
            else:
                out.append(part)
    if not out:
        raise FileNotFoundError(f"no spectrum files match {spec!r}")
    missing = [f for f in out if not Path(f).exists()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} spectrum file(s) not found, e.g. {missing[:3]}")
    return out


#: Columns that make a FITS binary table a star catalogue (allStar-like) rather than a spectrum.
CATALOG_COLUMNS = ("APOGEE_ID", "TELESCOPE", "FIELD")
INPUT_KINDS = ("auto", "catalog", "shards", "files")


def _is_catalog_file(path: Path) -> bool:
    """True when ``path`` is a FITS file whose HDU1 is a binary table with :data:`CATALOG_COLUMNS`
    (headers only are read; any file that cannot be read that way is not a catalogue)."""
    try:
        from astropy.io import fits

        with fits.open(path, memmap=True) as hdul:
            if len(hdul) < 2 or not isinstance(hdul[1], fits.BinTableHDU):
                return False
            names = {str(n).upper() for n in hdul[1].columns.names if n}
    except Exception:  # noqa: BLE001 - not a readable FITS table: read as spectrum files (errors per star)
        return False
    return all(c in names for c in CATALOG_COLUMNS)


def source_kind(input: str | Sequence[str], input_kind: str = "auto") -> str:
    """``"shards"``, ``"catalog"`` or ``"files"``: how :func:`stellarnet.dataset.chunks.open_chunks` will read ``input``.

    ``auto``: a directory with a manifest is a shard dataset; a single ``.fits``/``.fits.gz`` file
    whose HDU1 is a table with ``APOGEE_ID``, ``TELESCOPE`` and ``FIELD`` is a catalogue (whatever
    its name; a file named ``allStar*`` too, so that a damaged one gets the catalogue reader's
    message); anything else is spectrum files. ``input_kind`` forces one of them."""
    from stellarnet.dataset.manifest import MANIFEST

    if input_kind not in INPUT_KINDS:
        raise ValueError(f"input_kind must be one of {list(INPUT_KINDS)}, got {input_kind!r}")
    if input_kind != "auto":
        if input_kind == "shards" and not (isinstance(input, str) and (Path(input) / MANIFEST).exists()):
            raise ValueError(f"input_kind=shards but {input} is not a shard dataset (no {MANIFEST})")
        if input_kind == "catalog" and not (isinstance(input, str) and Path(input).is_file()):
            raise ValueError(f"input_kind=catalog but {input} is not a file")
        return input_kind
    if isinstance(input, str) and Path(input).is_dir() and (Path(input) / MANIFEST).exists():
        return "shards"
    if isinstance(input, str) and input.endswith((".fits", ".fit", ".fits.gz")) and Path(input).is_file():
        # by content; an allStar-named file that is not a readable table is read as a catalogue too,
        # so that its error (truncated, wrong HDU, missing columns) is reported as such
        if _is_catalog_file(Path(input)) or Path(input).name.startswith("allStar"):
            return "catalog"
    return "files"
