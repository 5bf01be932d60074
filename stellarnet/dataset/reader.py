"""Reading a shard dataset: lazy row access to one split's shards, block by block or all at once
(one open HDF5 handle per shard per process; safe across DataLoader workers)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import h5py
import numpy as np

from stellarnet.dataset.manifest import load_manifest, verify_dataset


class ShardReader:
    """Lazy row access to the shards of one split; one open file handle per shard per process."""

    FIELDS = ("flux", "flux_err", "pix_mask", "labels", "label_err", "classes", "photometry", "snr")

    def __init__(self, dataset_dir: str | Path, split: str, manifest: Mapping[str, Any] | None = None,
                 verify: bool = True):
        self.dataset_dir = Path(dataset_dir)
        self.manifest = dict(manifest or load_manifest(dataset_dir))
        if verify:
            verify_dataset(self.dataset_dir, self.manifest, check_sha=True)
        self.shards = [s for s in self.manifest["shards"] if s["split"] == split]
        self.split = split
        counts = np.array([s["rows"] for s in self.shards], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(counts)])
        self._files: dict[int, h5py.File] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _file(self, k: int) -> h5py.File:
        if self._pid != os.getpid():  # forked into a worker: never share handles
            self._files = {}
            self._pid = os.getpid()
        f = self._files.get(k)
        if f is None:
            f = h5py.File(self.dataset_dir / self.shards[k]["file"], "r")
            self._files[k] = f
        return f

    def locate(self, i: int) -> tuple[int, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} out of range for split {self.split!r} with {len(self)} rows")
        k = int(np.searchsorted(self.offsets, i, side="right") - 1)
        return k, int(i - self.offsets[k])

    def row(self, i: int, fields: Sequence[str] = FIELDS) -> dict[str, np.ndarray]:
        k, j = self.locate(i)
        f = self._file(k)
        return {name: f[name][j] for name in fields}

    def rows(self, indices: Sequence[int], fields: Sequence[str] = FIELDS) -> dict[str, np.ndarray]:
        """Many rows at once (one sorted h5py read per shard and field), in the order given."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"rows out of range for split {self.split!r} with {len(self)} rows")
        shard = np.searchsorted(self.offsets, idx, side="right") - 1
        out: dict[str, np.ndarray] = {}
        for k in np.unique(shard):
            sel = np.flatnonzero(shard == k)
            local = idx[sel] - self.offsets[k]
            uniq, inverse = np.unique(local, return_inverse=True)
            f = self._file(int(k))
            contiguous = uniq[-1] - uniq[0] + 1 == len(uniq)  # one hyperslab instead of a point list
            for name in fields:
                if contiguous:
                    block = f[name][int(uniq[0]):int(uniq[-1]) + 1][inverse]
                else:
                    block = f[name][uniq][inverse]
                if name not in out:
                    out[name] = np.empty((len(idx),) + block.shape[1:], dtype=block.dtype)
                out[name][sel] = block
        return out

    def blocks(self, indices: Sequence[int], block: int,
               fields: Sequence[str] = FIELDS) -> Iterator[tuple[slice, dict[str, np.ndarray]]]:
        """:meth:`rows` ``block`` at a time (memory bounded by the block): (the positions in ``indices``, the rows)."""
        for s in range(0, len(indices), block):
            yield slice(s, s + block), self.rows(indices[s:s + block], fields)

    def read_all(self, fields: Sequence[str] = FIELDS) -> dict[str, np.ndarray]:
        """Concatenate whole fields over the split (for baselines / evaluation; uses memory)."""
        out: dict[str, list[np.ndarray]] = {name: [] for name in fields}
        for k in range(len(self.shards)):
            f = self._file(k)
            for name in fields:
                out[name].append(f[name][...])
        return {name: np.concatenate(v) if v else np.empty(0) for name, v in out.items()}

    def close(self) -> None:
        for f in self._files.values():
            try:
                f.close()
            except Exception:  # pragma: no cover
                pass
        self._files = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_files"] = {}
        return state
