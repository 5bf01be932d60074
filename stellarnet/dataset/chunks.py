"""A prediction input as a map-style torch ``Dataset`` of chunks, for ``Trainer.predict``.

Item k is chunk k of the input — stars ``k × chunk_size`` … ``(k + 1) × chunk_size − 1`` in input
order — read and prepared when it is indexed, so the ``DataLoader``'s worker processes do the reading
and Lightning's distributed sampler hands each rank (process, GPU, node) its own chunks. Each item is
the dict of :mod:`stellarnet.dataset.sources` (``apogee_id``, ``flux``, ``flux_err``, ``pix_mask``,
``photometry`` as torch tensors, :data:`SHARED_ARRAYS`; ``error``, ``ra``/``dec``/``snr`` … as numpy
arrays; :func:`as_numpy` turns it back) plus ``chunk_index`` k, which names the part file
the prediction writer writes, so that parts merge back in input order whatever rank made them.

Sources: an allStar-format catalogue with its spectra tree, a shard dataset, or spectrum files
(:func:`stellarnet.dataset.sources.source_kind`). ``indices`` restricts the dataset to some chunks (a
resumed run skips the finished ones).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from stellarnet.dataset.sources import Chunk, expand_files, read_spectrum_files, source_kind
from stellarnet.io import grids

__all__ = ["ChunkDataset", "open_chunks", "pass_through", "as_numpy", "SHARED_ARRAYS"]


#: the chunk's large arrays, handed from a DataLoader worker to the main process as torch tensors:
#: they travel in shared memory and the pipe carries a few hundred bytes. As pickled numpy arrays
#: (~90 kB per star) they fill the pipe, and a worker killed mid-write (out of memory, a signal)
#: would leave the main process blocked on half a message for ever.
SHARED_ARRAYS = ("flux", "flux_err", "pix_mask", "photometry")


def pass_through(item: Chunk) -> Chunk:
    """``collate_fn`` of the prediction ``DataLoader`` (``batch_size=None``): the chunk as it is (the
    default collate would also convert its small arrays)."""
    return item


def as_numpy(chunk: Chunk) -> Chunk:
    """The chunk with :data:`SHARED_ARRAYS` back as numpy arrays (no copy)."""
    return {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in chunk.items()}


@dataclass
class ChunkDataset(torch.utils.data.Dataset):
    """Chunks of one input (see the module doc). Build with :func:`open_chunks`."""

    kind: str
    n_stars: int
    chunk_size: int
    grid: str
    files: list[str] | None = None
    catalog: Any = None  # pandas DataFrame: the catalogue rows (APOGEE_ID, TELESCOPE, FIELD, photometry, RA …)
    spectra_root: str | None = None
    spectra_kind: str = "aspcapStar"
    layout: str | None = None
    shard_ranges: list[tuple[str, str, int, int]] | None = None  # (split, shard file, start, stop) per chunk
    indices: list[int] = field(default_factory=list)

    @property
    def n_chunks(self) -> int:
        if self.kind == "shards":
            return len(self.shard_ranges or [])
        return -(-self.n_stars // self.chunk_size)

    def rows_of(self, k: int) -> int:
        """Stars in chunk k."""
        if self.kind == "shards":
            _, _, start, stop = self.shard_ranges[k]
            return stop - start
        return min(self.chunk_size, self.n_stars - k * self.chunk_size)

    def only(self, indices: Sequence[int]) -> "ChunkDataset":
        """The same input restricted to the chunks ``indices`` (in that order)."""
        bad = [k for k in indices if not 0 <= k < self.n_chunks]
        if bad:
            raise IndexError(f"chunk indices {bad[:5]} out of range 0..{self.n_chunks - 1}")
        return replace(self, indices=[int(k) for k in indices])

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Chunk:
        k = self.indices[i]
        if self.kind == "shards":
            chunk = self._shard_chunk(k)
        elif self.kind == "catalog":
            chunk = self._catalog_chunk(k)
        else:
            chunk = self._files_chunk(k)
        chunk["chunk_index"] = k
        for key in SHARED_ARRAYS:  # (a read-only array, e.g. pandas' copy-on-write view, is copied)
            chunk[key] = torch.from_numpy(np.require(chunk[key], requirements=["C", "W"]))
        return chunk

    def _files_chunk(self, k: int) -> Chunk:
        from stellarnet.preparation.photometry import PHOT_FEATURES

        files = self.files[k * self.chunk_size:(k + 1) * self.chunk_size]
        chunk = read_spectrum_files(files, self.grid, None)
        chunk["photometry"] = np.full((len(files), len(PHOT_FEATURES)), np.nan, np.float32)
        return chunk

    def _catalog_chunk(self, k: int) -> Chunk:
        from stellarnet.io.layout import spectrum_path
        from stellarnet.preparation.photometry import PHOT_FEATURES, photometric_features

        part = self.catalog.iloc[k * self.chunk_size:(k + 1) * self.chunk_size]
        root = Path(self.spectra_root)
        files = [str(spectrum_path(root, self.spectra_kind, t, f, a, self.layout))
                 for t, f, a in zip(part["TELESCOPE"], part["FIELD"], part["APOGEE_ID"])]
        chunk = read_spectrum_files(files, self.grid, self.spectra_kind == "aspcapStar")
        chunk["apogee_id"] = part["APOGEE_ID"].astype(str).to_numpy(dtype=object)
        chunk["photometry"] = photometric_features(part)[list(PHOT_FEATURES)].to_numpy(np.float32)
        for col in ("RA", "DEC", "SNR"):  # the catalogue's values, not the spectrum headers'
            if col in part:
                chunk[col.lower()] = part[col].to_numpy(np.float64)
        for col in ("TELESCOPE", "FIELD"):
            chunk[col.lower()] = part[col].astype(str).to_numpy(dtype=object)
        return chunk

    def _shard_chunk(self, k: int) -> Chunk:
        import h5py

        split, path, start, stop = self.shard_ranges[k]
        sl = slice(start, stop)
        with h5py.File(path, "r") as f:
            return {"apogee_id": np.char.decode(f["apogee_id"][sl]).astype(object),
                    "flux": f["flux"][sl], "flux_err": f["flux_err"][sl],
                    "pix_mask": f["pix_mask"][sl].astype(np.float32), "photometry": f["photometry"][sl],
                    "ra": f["ra"][sl], "dec": f["dec"][sl], "snr": f["snr"][sl],
                    "split": np.array([split] * (stop - start), dtype=object),
                    "error": np.array([""] * (stop - start), dtype=object)}


def _catalog(allstar: str | Path, spectra_root: str | Path | None, spectra_kind: str,
             layout: str | None) -> tuple[Any, Path, str]:
    """The catalogue rows a prediction needs, the checked spectra root and the path template."""
    from stellarnet.io.catalogs import read_allstar
    from stellarnet.io.layout import spectra_layout

    layout = spectra_layout(spectra_kind, layout)
    allstar = Path(allstar)
    root = Path(spectra_root) if spectra_root else allstar.parent
    layout_top = Path(layout).parts[0]
    if not root.is_dir():
        raise FileNotFoundError(f"spectra_root {root} is not a directory: it must hold the spectra tree ({layout})")
    if "{" not in layout_top and not (root / layout_top).is_dir():
        raise FileNotFoundError(f"spectra_root {root} has no {layout_top}/ directory: the spectra are looked for at "
                                f"{root}/{layout}; is spectra_root the directory above {layout_top}/?")
    df = read_allstar(allstar, required=["APOGEE_ID", "TELESCOPE", "FIELD"]).reset_index(drop=True)
    return df, root, layout


def _shard_ranges(dataset_dir: str | Path, grid: str, chunk_size: int) -> tuple[int, list[tuple[str, str, int, int]]]:
    """(stars, chunk ranges) of a verified shard dataset: every split, every shard, in manifest order."""
    from stellarnet.dataset.manifest import load_manifest, verify_dataset

    manifest = load_manifest(dataset_dir)
    # every shard present, complete, of this build and unmodified (SHA-256) before a row is read:
    # a half-rebuilt directory would otherwise give doubled and missing stars
    verify_dataset(dataset_dir, manifest, check_sha=True)
    if manifest["grid"] != grids.grid_name(grid):
        raise ValueError(f"shard dataset {dataset_dir} is on grid {manifest['grid']!r}, the model on {grid!r}")
    ranges = []
    for split in ("train", "val", "test"):
        for sh in manifest["shards"]:
            if sh.get("split") != split:
                continue
            path = str(Path(dataset_dir) / sh["file"])
            ranges += [(split, path, s, min(s + chunk_size, sh["rows"])) for s in range(0, sh["rows"], chunk_size)]
    return sum(s["rows"] for s in manifest["shards"]), ranges


def open_chunks(input: str | Sequence[str], grid: str, chunk_size: int = 1024, spectra_root: str | None = None,
                spectra_kind: str = "aspcapStar", input_kind: str = "auto",
                spectra_layout: str | None = None) -> ChunkDataset:
    """The :class:`ChunkDataset` of ``input`` (every chunk). Checks what can be checked before a
    spectrum is read: the shard dataset's checksums, the spectra root, that the files exist."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    kind = source_kind(input, input_kind)
    if kind == "shards":
        n, ranges = _shard_ranges(input, grid, chunk_size)
        ds = ChunkDataset("shards", n, chunk_size, grid, shard_ranges=ranges)
    elif kind == "catalog":
        df, root, layout = _catalog(input, spectra_root, spectra_kind, spectra_layout)
        ds = ChunkDataset("catalog", len(df), chunk_size, grid, catalog=df, spectra_root=str(root),
                          spectra_kind=spectra_kind, layout=layout)
    else:
        files = [str(f) for f in expand_files(input)]
        ds = ChunkDataset("files", len(files), chunk_size, grid, files=files)
    return ds.only(range(ds.n_chunks))
