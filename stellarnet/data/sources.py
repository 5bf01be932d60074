"""Spectra sources for prediction: an allStar catalogue + spectra tree, a shard dataset, or files.

Every source yields chunks (bounded memory) as dicts with ``apogee_id`` (N,), ``flux``,
``flux_err``, ``pix_mask`` (N, P) on the requested gap-removed grid, ``photometry`` (N, F) raw
features with NaN for missing, and optional ``ra``, ``dec``, ``snr`` and ``error`` (a per-star
read error message, empty when fine).
"""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from stellarnet.data import grids
from stellarnet.data.photometry import PHOT_FEATURES, photometric_features
from stellarnet.data.shards import MANIFEST, SPECTRA_LAYOUT, ShardReader, load_manifest, spectrum_path
from stellarnet.data.spectra import prepare_spectrum, read_spectrum

Chunk = dict[str, Any]


def _read_files(files: Sequence[str], grid: str, normalized: bool | None) -> Chunk:
    n_pix = grids.n_pixels(grid)
    n = len(files)
    flux = np.ones((n, n_pix), np.float32)
    err = np.full((n, n_pix), 1.0, np.float32)
    good = np.zeros((n, n_pix), np.float32)
    ids, errors = [], []
    for i, f in enumerate(files):
        try:
            spec = read_spectrum(f)
            norm = normalized if normalized is not None else Path(f).name.startswith("aspcapStar")
            fl, er, gd = prepare_spectrum(spec.flux, spec.flux_err, spec.pixmask, grid=grid, normalized=norm)
            flux[i], err[i], good[i] = fl, er, gd
            ids.append(spec.apogee_id or Path(f).stem)
            errors.append("")
        except Exception as exc:  # noqa: BLE001 - reported per star in the output
            ids.append(Path(f).stem)
            errors.append(f"{type(exc).__name__}: {exc}")
    return {"apogee_id": np.array(ids, dtype=object), "flux": flux, "flux_err": err, "pix_mask": good,
            "error": np.array(errors, dtype=object)}


def expand_files(spec: str | Sequence[str]) -> list[str]:
    """Files from a glob pattern, a comma-separated list, a text file of paths, or a list."""
    items = [spec] if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for item in items:
        for part in str(item).split(","):
            part = part.strip()
            if not part:
                continue
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


def iter_files(files: Sequence[str], grid: str, chunk_size: int = 1024,
               normalized: bool | None = None) -> Iterator[Chunk]:
    """Chunks from a list of aspcapStar/apStar files (no photometry: features are NaN)."""
    for start in range(0, len(files), chunk_size):
        chunk = _read_files(files[start:start + chunk_size], grid, normalized)
        chunk["photometry"] = np.full((len(chunk["flux"]), len(PHOT_FEATURES)), np.nan, np.float32)
        yield chunk


def iter_catalog(allstar: str | Path, spectra_root: str | Path | None, grid: str, spectra_kind: str = "aspcapStar",
                 chunk_size: int = 1024, cuts: Any = None) -> Iterator[Chunk]:
    """Chunks for the rows of an allStar-format catalogue (optionally cut) with their spectra."""
    from stellarnet.data.catalogs import read_allstar
    from stellarnet.data.cuts import apply_cuts

    if spectra_kind not in SPECTRA_LAYOUT:
        raise ValueError(f"unknown spectra_kind {spectra_kind!r}")
    allstar = Path(allstar)
    root = Path(spectra_root) if spectra_root else allstar.parent
    df = read_allstar(allstar, required=["APOGEE_ID", "TELESCOPE", "FIELD"])
    if cuts:
        df, _ = apply_cuts(df, cuts)
    for start in range(0, len(df), chunk_size):
        part = df.iloc[start:start + chunk_size]
        files = [str(spectrum_path(root, spectra_kind, t, f, a))
                 for t, f, a in zip(part["TELESCOPE"], part["FIELD"], part["APOGEE_ID"])]
        chunk = _read_files(files, grid, normalized=(spectra_kind == "aspcapStar"))
        chunk["apogee_id"] = part["APOGEE_ID"].astype(str).to_numpy(dtype=object)
        chunk["photometry"] = photometric_features(part)[list(PHOT_FEATURES)].to_numpy(np.float32)
        for col in ("RA", "DEC", "SNR"):
            if col in part:
                chunk[col.lower()] = part[col].to_numpy(np.float64)
        yield chunk


def iter_shards(dataset_dir: str | Path, splits: Sequence[str] = ("train", "val", "test"),
                chunk_size: int = 1024) -> Iterator[Chunk]:
    """Chunks read from a shard dataset (already preprocessed)."""
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


def open_source(input: str | Sequence[str], grid: str, spectra_root: str | None = None,
                spectra_kind: str = "aspcapStar", chunk_size: int = 1024) -> tuple[str, int, Iterator[Chunk]]:
    """Detect the input kind and return (kind, n_stars, chunk iterator).

    ``input``: a shard dataset directory (has manifest.json), an allStar-format ``.fits``
    catalogue (a table in HDU1), or spectrum files (glob, comma list, .txt list).
    """
    if isinstance(input, str) and Path(input).is_dir() and (Path(input) / MANIFEST).exists():
        manifest = load_manifest(input)
        if manifest["grid"] != grids.grid_name(grid):
            raise ValueError(f"shard dataset {input} is on grid {manifest['grid']!r}, the model on {grid!r}")
        n = sum(s["rows"] for s in manifest["shards"])
        return "shards", n, iter_shards(input, chunk_size=chunk_size)
    if isinstance(input, str) and input.endswith((".fits", ".fit", ".fits.gz")) and "allStar" in Path(input).name:
        from stellarnet.data.catalogs import read_allstar

        n = len(read_allstar(input, columns=["APOGEE_ID"]))
        return "catalog", n, iter_catalog(input, spectra_root, grid, spectra_kind, chunk_size)
    files = expand_files(input)
    return "files", len(files), iter_files(files, grid, chunk_size)
