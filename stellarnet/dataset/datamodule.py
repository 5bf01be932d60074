"""LightningDataModule over HDF5 shards.

Rows are read lazily (one open handle per shard per worker process); normalization comes from
the manifest only. Each item is a dict of tensors (see ``docs/architecture.md``, batch dict):
``flux, flux_err, pix_mask, photometry, phot_mask, labels, label_err, label_mask, classes, index``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from stellarnet.dataset.manifest import load_manifest
from stellarnet.dataset.reader import ShardReader
from stellarnet.preparation.photometry import standardize_photometry


class Standardizer:
    """Label and photometry standardization from manifest statistics."""

    def __init__(self, manifest: Mapping[str, Any]):
        self.label_mean = np.asarray(manifest["label_mean"], np.float32)
        self.label_std = np.asarray(manifest["label_std"], np.float32)
        self.phot_mean = np.asarray(manifest["phot_mean"], np.float32)
        self.phot_std = np.asarray(manifest["phot_std"], np.float32)

    def item(self, row: Mapping[str, np.ndarray], index: int) -> dict[str, torch.Tensor]:
        """One standardized sample (see the batch dict in docs/architecture.md)."""
        batch = self.batch({k: np.asarray(v)[None] for k, v in row.items()}, np.array([index]))
        return {k: v[0] for k, v in batch.items()}

    def batch(self, rows: Mapping[str, np.ndarray], indices: np.ndarray) -> dict[str, torch.Tensor]:
        """Standardized tensors for a block of rows (leading axis = sample)."""
        labels = rows["labels"].astype(np.float32)
        err = rows["label_err"].astype(np.float32)
        lmask = np.isfinite(labels)
        z = np.where(lmask, (labels - self.label_mean) / self.label_std, 0.0).astype(np.float32)
        zerr = np.where(lmask & np.isfinite(err), np.abs(err) / self.label_std, 0.0).astype(np.float32)
        pz, pmask = standardize_photometry(rows["photometry"], self.phot_mean, self.phot_std)
        return {
            "flux": torch.from_numpy(np.asarray(rows["flux"], np.float32)),
            "flux_err": torch.from_numpy(np.asarray(rows["flux_err"], np.float32)),
            "pix_mask": torch.from_numpy(np.asarray(rows["pix_mask"], np.float32)),
            "photometry": torch.from_numpy(pz),
            "phot_mask": torch.from_numpy(pmask.astype(np.float32)),
            "labels": torch.from_numpy(z),
            "label_err": torch.from_numpy(zerr),
            "label_mask": torch.from_numpy(lmask.astype(np.float32)),
            "classes": torch.from_numpy(np.asarray(rows["classes"], np.int64)),
            "index": torch.from_numpy(np.asarray(indices, np.int64)),
        }


class ShardDataset(Dataset):
    """Map-style dataset over one split of a shard dataset."""

    def __init__(self, dataset_dir: str | Path, split: str, manifest: Mapping[str, Any] | None = None,
                 verify: bool = True):
        self.reader = ShardReader(dataset_dir, split, manifest=manifest, verify=verify)
        self.standardizer = Standardizer(self.reader.manifest)

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.standardizer.item(self.reader.row(int(i)), int(i))

    def __getitems__(self, indices: list[int]) -> list[dict[str, torch.Tensor]]:
        """Batched fetch used by the DataLoader: one sorted read per shard instead of one per row."""
        idx = np.asarray(indices, dtype=np.int64)
        batch = self.standardizer.batch(self.reader.rows(idx), idx)
        return [{k: v[j] for k, v in batch.items()} for j in range(len(idx))]


class StellarDataModule(L.LightningDataModule):
    """Train/val/test loaders over a shard dataset directory (built by ``build_shards``)."""

    def __init__(self, dataset_dir: str, batch_size: int = 128, num_workers: int = 0,
                 pin_memory: bool = False, verify: bool = True, persistent_workers: bool = True):
        super().__init__()
        self.dataset_dir = Path(dataset_dir)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.verify = verify
        self.persistent_workers = persistent_workers and num_workers > 0
        self._manifest: dict[str, Any] | None = None
        self.datasets: dict[str, ShardDataset] = {}

    @property
    def manifest(self) -> dict[str, Any]:
        if self._manifest is None:
            self._manifest = load_manifest(self.dataset_dir)
        return self._manifest

    def data_spec(self) -> dict[str, Any]:
        """Everything a model needs to predict without the shards (goes into the checkpoint)."""
        m = self.manifest
        keys = ("grid", "n_pixels", "wavelength", "label_names", "label_units", "label_mean", "label_std",
                "phot_features", "phot_mean", "phot_std", "class_tasks", "class_weights")
        return {k: m[k] for k in keys}

    def setup(self, stage: str | None = None) -> None:
        verified = False
        for split in ("train", "val", "test"):
            if split not in self.datasets:
                # verify checksums once for the whole dataset
                self.datasets[split] = ShardDataset(self.dataset_dir, split, self.manifest,
                                                    verify=self.verify and not verified)
                verified = True
        for split in ("train", "val"):
            if len(self.datasets[split]) == 0:
                raise ValueError(f"split {split!r} of {self.dataset_dir} is empty; check the split fractions")

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(self.datasets[split], batch_size=self.batch_size, shuffle=shuffle,
                          num_workers=self.num_workers, pin_memory=self.pin_memory,
                          persistent_workers=self.persistent_workers, drop_last=False)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)
