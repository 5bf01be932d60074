"""Spectra sources for prediction: an allStar catalogue + spectra tree, a shard dataset, or files.

Every source yields chunks (bounded memory) as dicts with ``apogee_id`` (N,), ``flux``,
``flux_err``, ``pix_mask`` (N, P) on the requested gap-removed grid, ``photometry`` (N, F) raw
features with NaN for missing, and optional ``ra``, ``dec``, ``snr`` and ``error`` (a per-star
read error message, empty when fine).

Spectrum files (allStar and file-list sources) are read and preprocessed by a
:class:`SpectrumFileReader`: in this process (``num_workers=0``) or in a pool of worker processes
that read the next chunk while the caller predicts the current one. The workers receive file
paths and return numpy arrays only; a file that cannot be read or has no usable pixel is reported
in that star's ``error`` exactly as in-process reading reports it, and chunks keep the input order.
"""

from __future__ import annotations

import glob
import math
import os
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import closing, contextmanager
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from stellarnet.data import grids
from stellarnet.data.spectra import prepare_spectrum, read_aspcapstar, read_spectrum

# stellarnet.data.shards (h5py) and .photometry (pandas) are imported where they are used: reader
# worker processes import this module and need only the FITS readers (a faster start)

Chunk = dict[str, Any]

#: Files per task sent to a worker process (a chunk is split into blocks of at most this many files).
BLOCK_SIZE = 64
#: Chunks read ahead by the worker pool while the caller works on the current one.
PREFETCH_CHUNKS = 1


class SpectrumReaderError(RuntimeError):
    """A reader worker process died (killed, out of memory, crashed) while reading spectrum files."""


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


def _read_files(files: Sequence[str], grid: str, normalized: bool | None, mask_dtype: Any = np.float32) -> Chunk:
    """Read and prepare ``files`` in this process; a file that fails gets flux 1, error 1, mask 0
    and its error message (``"<ExceptionType>: <message>"``) in ``error``."""
    n_pix = grids.n_pixels(grid)
    n = len(files)
    flux = np.ones((n, n_pix), np.float32)
    err = np.full((n, n_pix), 1.0, np.float32)
    good = np.zeros((n, n_pix), mask_dtype)
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


# --------------------------------------------------------------------------- worker processes

def _worker_warm_up() -> int:
    """First task of each worker: import the FITS reader now, while the caller loads its model."""
    from astropy.io import fits  # noqa: F401

    return os.getpid()


def _read_block(files: list[str], grid: str, normalized: bool | None) -> tuple[np.ndarray, ...]:
    """Worker task: (flux f32, flux_err f32, good bool, apogee_id str, error str) arrays of ``files``.

    Plain numpy arrays only (no objects) travel back to the parent process.
    """
    c = _read_files(files, grid, normalized, mask_dtype=bool)
    return (c["flux"], c["flux_err"], c["pix_mask"], np.asarray(c["apogee_id"], dtype=str),
            np.asarray(c["error"], dtype=str), np.stack([c["ra"], c["dec"], c["snr"]], 1),
            np.asarray(c["telescope"], dtype=str), np.asarray(c["field"], dtype=str))


#: Share of the CPU time per star that reading + preprocessing an aspcapStar file takes in
#: ``stellarnet.predict`` (the rest: the model with 20 MC-dropout passes, tables, writing): about
#: 2/3, measured with ``scripts/bench_inference.py --e2e-only`` on 2 cores.
READ_CPU_SHARE = 2 / 3


def default_num_workers(cpus: int | None = None) -> int:
    """Reader processes for ``num_workers: auto``: ``ceil(READ_CPU_SHARE × cpus)`` of the CPUs this
    process may use (the model gets the rest, at least one thread); none on a single CPU.

    2 CPUs → 2 (the model thread shares a core: 541 vs 327 spectra/s for 2 vs 1 readers on an idle
    2-core machine, docs/performance.md), 4 → 3, 8 → 6, 16 → 11.
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


class _Pending:
    """A chunk submitted to a :class:`SpectrumFileReader`: its files and, in a pool, one future per block."""

    def __init__(self, files: list[str], grid: str, normalized: bool | None,
                 blocks: list[tuple[int, int, Future]] | None = None):
        self.files, self.grid, self.normalized, self.blocks = files, grid, normalized, blocks

    def cancel(self) -> None:
        for _, _, fut in self.blocks or ():
            fut.cancel()


class SpectrumFileReader:
    """Read + preprocess spectrum files chunk by chunk, in this process or in worker processes.

    Args:
        num_workers: worker processes (0: read in the calling process). Workers are spawned
            (fresh interpreters that import only the readers), started by :meth:`start` or the
            first :meth:`submit`, and stopped by :meth:`close` (or leaving the ``with`` block).
        block_size: at most this many files per worker task.

    ``read(files, grid, normalized)`` returns one chunk (``apogee_id``, ``flux``, ``flux_err``,
    ``pix_mask`` (float32, 1 good), ``error``) in the order of ``files``, the same arrays whatever
    ``num_workers`` is. ``submit`` + ``collect`` split that in two, so that chunks can be read ahead.
    A worker process that dies raises :class:`SpectrumReaderError` naming the files it was reading.
    """

    def __init__(self, num_workers: int = 0, block_size: int = BLOCK_SIZE):
        self.num_workers = resolve_num_workers(num_workers)
        if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 1:
            raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}")
        self.block_size = int(block_size)
        self._pool: ProcessPoolExecutor | None = None

    @property
    def parallel(self) -> bool:
        return self.num_workers > 0

    def start(self) -> "SpectrumFileReader":
        """Spawn the workers now (no-op in-process or when running); each imports the FITS reader."""
        if self.num_workers and self._pool is None:
            self._pool = ProcessPoolExecutor(max_workers=self.num_workers, mp_context=get_context("spawn"))
            for _ in range(self.num_workers):  # one task per worker: the pool starts them all now
                self._pool.submit(_worker_warm_up)
        return self

    def submit(self, files: Sequence[str], grid: str, normalized: bool | None = None) -> _Pending:
        """Queue ``files`` for reading (in-process: nothing happens until :meth:`collect`)."""
        files = [str(f) for f in files]
        if not self.num_workers:
            return _Pending(files, grid, normalized)
        self.start()
        assert self._pool is not None
        size = max(1, min(self.block_size, math.ceil(len(files) / self.num_workers)))
        try:
            blocks = [(s, s + size, self._pool.submit(_read_block, files[s:s + size], grid, normalized))
                      for s in range(0, len(files), size)]
        except BrokenProcessPool as exc:
            raise SpectrumReaderError(
                f"the spectrum reader worker pool is broken (a worker process died earlier): {exc}; "
                "rerun with num_workers=0 to read in this process"
            ) from exc
        return _Pending(files, grid, normalized, blocks)

    def collect(self, pending: _Pending) -> Chunk:
        """The chunk of a :meth:`submit` (waits for its blocks), in the order of its files."""
        if pending.blocks is None:
            return _read_files(pending.files, pending.grid, pending.normalized)
        parts = []
        for start, stop, fut in pending.blocks:
            try:
                parts.append(fut.result())
            except BrokenProcessPool as exc:
                block = pending.files[start:stop]
                pending.cancel()
                raise SpectrumReaderError(
                    f"a spectrum reader worker process died (killed, out of memory or crashed) while reading "
                    f"{len(block)} file(s) from {block[0]} on; rerun with num_workers=0 to read in this process "
                    f"and have a bad file reported per star"
                ) from exc
        if not parts:
            return _read_files([], pending.grid, pending.normalized)
        flux = np.concatenate([p[0] for p in parts])
        err = np.concatenate([p[1] for p in parts])
        good = np.concatenate([p[2] for p in parts]).astype(np.float32)
        pos = np.concatenate([p[5] for p in parts])
        return {"apogee_id": np.concatenate([p[3] for p in parts]).astype(object), "flux": flux, "flux_err": err,
                "pix_mask": good, "error": np.concatenate([p[4] for p in parts]).astype(object),
                "ra": pos[:, 0], "dec": pos[:, 1], "snr": pos[:, 2],
                "telescope": np.concatenate([p[6] for p in parts]).astype(object),
                "field": np.concatenate([p[7] for p in parts]).astype(object)}

    def read(self, files: Sequence[str], grid: str, normalized: bool | None = None) -> Chunk:
        """Read and prepare ``files`` (see the class doc)."""
        return self.collect(self.submit(files, grid, normalized))

    def close(self) -> None:
        """Stop the workers (queued blocks are cancelled, running ones finish)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "SpectrumFileReader":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()


@contextmanager
def _reader_for(reader: SpectrumFileReader | None, num_workers: Any) -> Iterator[SpectrumFileReader]:
    """``reader`` (left open: its owner closes it), or a new one with ``num_workers`` closed on exit."""
    if reader is not None:
        yield reader
        return
    own = SpectrumFileReader(num_workers)
    try:
        yield own
    finally:
        own.close()


def _read_ahead(jobs: Iterable[tuple[list[str], bool | None, Any]], reader: SpectrumFileReader, grid: str,
                depth: int) -> Iterator[tuple[Chunk, Any]]:
    """(chunk, extra) for each (files, normalized, extra) job, in order, with ``depth`` chunks
    submitted ahead of the one returned (bounded memory: at most ``depth + 1`` chunks in flight)."""
    queue: deque[tuple[_Pending, Any]] = deque()
    try:
        for files, normalized, extra in jobs:
            queue.append((reader.submit(files, grid, normalized), extra))
            if len(queue) > depth:
                pending, ex = queue.popleft()
                yield reader.collect(pending), ex
        while queue:
            pending, ex = queue.popleft()
            yield reader.collect(pending), ex
    finally:
        for pending, _ in queue:
            pending.cancel()


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


def iter_files(files: Sequence[str], grid: str, chunk_size: int = 1024, normalized: bool | None = None,
               num_workers: Any = 0, reader: SpectrumFileReader | None = None) -> Iterator[Chunk]:
    """Chunks from a list of aspcapStar/apStar files (no photometry: features are NaN).

    ``reader``: a :class:`SpectrumFileReader` to use (left open); else one with ``num_workers``
    processes is made for this iteration and closed at its end.
    """
    from stellarnet.data.photometry import PHOT_FEATURES

    files = [str(f) for f in files]
    jobs = ((files[s:s + chunk_size], normalized, None) for s in range(0, len(files), chunk_size))
    with _reader_for(reader, num_workers) as rd, \
            closing(_read_ahead(jobs, rd, grid, PREFETCH_CHUNKS if rd.parallel else 0)) as chunks:
        for chunk, _ in chunks:
            chunk["photometry"] = np.full((len(chunk["flux"]), len(PHOT_FEATURES)), np.nan, np.float32)
            yield chunk


def iter_catalog(allstar: str | Path, spectra_root: str | Path | None, grid: str, spectra_kind: str = "aspcapStar",
                 chunk_size: int = 1024, cuts: Any = None, num_workers: Any = 0,
                 reader: SpectrumFileReader | None = None, layout: str | None = None) -> Iterator[Chunk]:
    """Chunks for the rows of an allStar-format catalogue (optionally cut) with their spectra
    (``num_workers`` / ``reader`` as in :func:`iter_files`)."""
    from stellarnet.data.catalogs import read_allstar
    from stellarnet.data.cuts import apply_cuts
    from stellarnet.data.photometry import PHOT_FEATURES, photometric_features
    from stellarnet.data.shards import spectra_layout, spectrum_path

    layout = spectra_layout(spectra_kind, layout)
    allstar = Path(allstar)
    root = Path(spectra_root) if spectra_root else allstar.parent
    layout_top = Path(layout).parts[0]
    if not root.is_dir():
        raise FileNotFoundError(f"spectra_root {root} is not a directory: it must hold the spectra tree ({layout})")
    if "{" not in layout_top and not (root / layout_top).is_dir():
        raise FileNotFoundError(f"spectra_root {root} has no {layout_top}/ directory: the spectra are looked for at "
                                f"{root}/{layout}; is spectra_root the directory above {layout_top}/?")
    df = read_allstar(allstar, required=["APOGEE_ID", "TELESCOPE", "FIELD"])
    if cuts:
        df, _ = apply_cuts(df, cuts)

    def jobs() -> Iterator[tuple[list[str], bool, Any]]:
        for start in range(0, len(df), chunk_size):
            part = df.iloc[start:start + chunk_size]
            files = [str(spectrum_path(root, spectra_kind, t, f, a, layout))
                     for t, f, a in zip(part["TELESCOPE"], part["FIELD"], part["APOGEE_ID"])]
            yield files, spectra_kind == "aspcapStar", part

    with _reader_for(reader, num_workers) as rd, \
            closing(_read_ahead(jobs(), rd, grid, PREFETCH_CHUNKS if rd.parallel else 0)) as chunks:
        for chunk, part in chunks:
            chunk["apogee_id"] = part["APOGEE_ID"].astype(str).to_numpy(dtype=object)
            chunk["photometry"] = photometric_features(part)[list(PHOT_FEATURES)].to_numpy(np.float32)
            for col in ("RA", "DEC", "SNR"):  # the catalogue's values, not the spectrum headers'
                if col in part:
                    chunk[col.lower()] = part[col].to_numpy(np.float64)
            for col in ("TELESCOPE", "FIELD"):
                chunk[col.lower()] = part[col].astype(str).to_numpy(dtype=object)
            yield chunk


def iter_shards(dataset_dir: str | Path, splits: Sequence[str] = ("train", "val", "test"),
                chunk_size: int = 1024) -> Iterator[Chunk]:
    """Chunks read from a shard dataset (already preprocessed)."""
    from stellarnet.data.shards import ShardReader, load_manifest

    manifest = load_manifest(dataset_dir)
    for split in splits:
        reader = ShardReader(dataset_dir, split, manifest=manifest, verify=False)
        for k, sh in enumerate(reader.shards):
            f = reader._file(k)
            for start in range(0, sh["rows"], chunk_size):
                sl = slice(start, min(start + chunk_size, sh["rows"]))
                yield {
                    "apogee_id": np.char.decode(f["apogee_id"][sl]).astype(object),
                    "flux": f["flux"][sl], "flux_err": f["flux_err"][sl],
                    "pix_mask": f["pix_mask"][sl].astype(np.float32),
                    "photometry": f["photometry"][sl],
                    "ra": f["ra"][sl], "dec": f["dec"][sl], "snr": f["snr"][sl],
                    "split": np.array([split] * (sl.stop - sl.start), dtype=object),
                    "error": np.array([""] * (sl.stop - sl.start), dtype=object),
                }
        reader.close()


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
    """``"shards"``, ``"catalog"`` or ``"files"``: how :func:`open_source` will read ``input``.

    ``auto``: a directory with a manifest is a shard dataset; a single ``.fits``/``.fits.gz`` file
    whose HDU1 is a table with ``APOGEE_ID``, ``TELESCOPE`` and ``FIELD`` is a catalogue (whatever
    its name; a file named ``allStar*`` too, so that a damaged one gets the catalogue reader's
    message); anything else is spectrum files. ``input_kind`` forces one of them."""
    from stellarnet.data.shards import MANIFEST

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


def open_source(input: str | Sequence[str], grid: str, spectra_root: str | None = None,
                spectra_kind: str = "aspcapStar", chunk_size: int = 1024, num_workers: Any = 0,
                reader: SpectrumFileReader | None = None, input_kind: str = "auto",
                spectra_layout: str | None = None) -> tuple[str, int, Iterator[Chunk]]:
    """Detect the input kind and return (kind, n_stars, chunk iterator).

    ``input``: a shard dataset directory (has manifest.json), an allStar-format ``.fits``
    catalogue (a table in HDU1), or spectrum files (glob, comma list, .txt list).
    Spectrum files are read by ``reader`` or by ``num_workers`` processes (see :func:`iter_files`);
    shards need no reading workers. Close the iterator (``.close()``) to stop early.
    """
    kind = source_kind(input, input_kind)
    if kind == "shards":
        from stellarnet.data.shards import load_manifest, verify_dataset

        manifest = load_manifest(input)
        # every shard present, complete, of this build and unmodified (SHA-256) before a row is read:
        # a half-rebuilt directory would otherwise give doubled and missing stars
        verify_dataset(input, manifest, check_sha=True)
        if manifest["grid"] != grids.grid_name(grid):
            raise ValueError(f"shard dataset {input} is on grid {manifest['grid']!r}, the model on {grid!r}")
        n = sum(s["rows"] for s in manifest["shards"])
        return "shards", n, iter_shards(input, chunk_size=chunk_size)
    if kind == "catalog":
        from stellarnet.data.catalogs import read_allstar

        n = len(read_allstar(input, columns=["APOGEE_ID"]))
        return "catalog", n, iter_catalog(input, spectra_root, grid, spectra_kind, chunk_size,
                                          num_workers=num_workers, reader=reader, layout=spectra_layout)
    files = expand_files(input)
    return "files", len(files), iter_files(files, grid, chunk_size, num_workers=num_workers, reader=reader)
