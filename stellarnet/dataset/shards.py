"""Preprocessed HDF5 shards with a JSON manifest.

A dataset directory holds ``<split>-<nnnnn>.h5`` shards (fixed rows per shard, one split per
shard) and ``manifest.json``. Each shard has uncompressed, contiguous datasets (fast random row
reads; see ``scripts/bench_shards.py``):

=============  ==========  ========================================================
dataset        dtype       meaning
=============  ==========  ========================================================
flux           f4 (n, P)   continuum-normalized flux, bad pixels = 1
flux_err       f4 (n, P)   normalized flux error, bad pixels = ``BAD_PIXEL_ERR``
pix_mask       u1 (n, P)   1 good pixel, 0 bad
labels         f4 (n, L)   catalogue labels in physical units (K, dex), NaN = missing
label_err      f4 (n, L)   catalogue label errors, NaN = missing
classes        i8 (n, C)   class codes per task, −1 = undefined
photometry     f4 (n, F)   photometric features (mag), NaN = missing
snr            f4 (n,)     catalogue S/N per pixel
apogee_id      S (n,)      APOGEE_ID
row_index      i8 (n,)     row of the star in the allStar file
ra, dec        f8 (n,)     degrees
field          S (n,)      FIELD (the sky group used for splitting)
=============  ==========  ========================================================

The manifest records the schema version, sources and checksums, the cut config and report,
label names/units, normalization statistics (train split), class names and weights, the
wavelength grid, and every shard's split, row count and SHA-256. Shards are written to a temp
name and renamed; a rerun skips shards already finished with the same build hash, so a killed
build resumes and ends with the same manifest.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import h5py
import numpy as np
import pandas as pd

from stellarnet.common.files import atomic_path, atomic_write_text, env_global_rank_is_zero, to_plain
from stellarnet.common.labels import LABEL_UNITS
from stellarnet.dataset.build_lock import _build_lock
from stellarnet.dataset.manifest import (
    BUILDING_MARKER,
    ENTRIES_DIR,
    MANIFEST,
    SCHEMA_VERSION,
    ShardError,
    _shards_intact,
    _stable_hash,
    sha256_file,
)
from stellarnet.dataset.sources import read_spectrum_files
from stellarnet.io import grids
from stellarnet.io.layout import SPECTRA_LAYOUT, spectra_layout, spectrum_path
from stellarnet.preparation.splits import SPLITS, assign_splits

log = logging.getLogger(__name__)


#: label name → allStar column (``ALPHA_FE`` is derived: :data:`stellarnet.io.allstar_columns.DERIVED_COLUMNS`,
#: [α/Fe] = ALPHA_M + M_H − FE_H; DR17's ALPHA_M is [α/M])
DEFAULT_LABEL_COLUMNS: dict[str, str] = {"TEFF": "TEFF", "LOGG": "LOGG", "FE_H": "FE_H", "ALPHA_FE": "ALPHA_FE"}


# --------------------------------------------------------------------------- shard writer
@dataclass
class _ShardTask:
    path: str
    build_hash: str
    grid: str
    normalized: bool
    files: list[str]
    columns: dict[str, np.ndarray]


def _write_shard(task: _ShardTask) -> dict[str, Any]:
    """Read, preprocess and write one shard (runs in a worker process)."""
    final = Path(task.path)
    if final.exists():
        try:
            with h5py.File(final, "r") as f:
                if f.attrs.get("build_hash") == task.build_hash and f.attrs.get("complete", False):
                    n = int(f["flux"].shape[0])
                    failures = json.loads(f.attrs.get("failures", "[]"))
                    return {"file": final.name, "rows": n, "sha256": sha256_file(final),
                            "failures": failures, "skipped": True}
        except OSError:
            pass  # truncated or foreign file: rebuild it
    chunk = read_spectrum_files(task.files, task.grid, task.normalized)  # the one file reader (predict uses it too)
    ok = chunk["error"] == ""
    failures = [{"file": os.path.basename(f), "error": e} for f, e in zip(task.files, chunk["error"]) if e]
    flux, err, good = chunk["flux"], chunk["flux_err"], chunk["pix_mask"].astype(np.uint8)
    with atomic_path(final) as tmp, h5py.File(tmp, "w", track_order=True) as f:
        kw = dict(track_times=False)
        f.create_dataset("flux", data=flux[ok], **kw)
        f.create_dataset("flux_err", data=err[ok], **kw)
        f.create_dataset("pix_mask", data=good[ok], **kw)
        for name, values in task.columns.items():
            f.create_dataset(name, data=values[ok], **kw)
        f.attrs["build_hash"] = task.build_hash
        f.attrs["grid"] = task.grid
        f.attrs["failures"] = json.dumps(failures)
        f.attrs["complete"] = True
    return {"file": final.name, "rows": int(ok.sum()), "sha256": sha256_file(final),
            "failures": failures, "skipped": False}


class ShardTasks:
    """Item k: build shard k — read, preprocess and write it (in a ``DataLoader`` worker when there are
    workers) — and return its manifest entry (``file``, ``rows``, ``sha256``, ``failures``, ``skipped``,
    ``stars``). A shard already complete for this build is not rebuilt (``skipped``): a killed build
    resumes. One ``DataLoader`` over it builds on one machine; ``Trainer.predict`` over the same
    ``DataLoader`` spreads the shards over the processes, GPUs and nodes of a DDP launch."""

    def __init__(self, tasks: Sequence[_ShardTask]) -> None:
        self.tasks = list(tasks)

    def __len__(self) -> int:
        return len(self.tasks)

    def __getitem__(self, k: int) -> dict[str, Any]:
        return {**_write_shard(self.tasks[k]), "stars": len(self.tasks[k].files)}


def _entry_path(entries_dir: Path, shard_file: str) -> Path:
    return entries_dir / f"{shard_file}.json"


def _build_on_trainer(trainer: Any, loader: Any, entries_dir: Path, progress: bool) -> None:
    """Build the loader's shards with ``trainer.predict``: Lightning's sampler gives each rank its own
    shards (none twice); each entry is written to ``entries_dir`` as its shard ends; all ranks wait for
    each other at the end (then rank 0 writes the manifest)."""
    import lightning as L
    from lightning.pytorch.callbacks import BasePredictionWriter

    class Entries(BasePredictionWriter):
        def __init__(self) -> None:
            super().__init__(write_interval="batch")
            self.bar = None

        def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            if progress and trainer.is_global_zero:
                from tqdm.auto import tqdm

                self.bar = tqdm(desc=f"shards → {entries_dir.parent.name} (rank 0)", unit="star")

        def write_on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: Any,
                               batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
            atomic_write_text(_entry_path(entries_dir, prediction["file"]), json.dumps(prediction))
            if self.bar is not None:
                self.bar.update(prediction["stars"])

        def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            if self.bar is not None:
                self.bar.close()
            trainer.strategy.barrier("stellarnet-shard-entries")

    class Builder(L.LightningModule):
        def transfer_batch_to_device(self, batch: Any, device: Any, dataloader_idx: int) -> Any:
            return batch

        def predict_step(self, entry: dict[str, Any], batch_idx: int = 0) -> dict[str, Any]:
            return entry

    trainer.callbacks.append(Entries())
    with warnings.catch_warnings():  # shards are not batches of samples: no per-sample indices to track
        warnings.filterwarnings("ignore", message="Couldn't infer the batch indices")
        trainer.predict(Builder(), dataloaders=loader, return_predictions=False)


# --------------------------------------------------------------------------- build
def _check_numeric(df: pd.DataFrame, columns: Sequence[str], path: Path) -> None:
    """Raise ``CatalogFormatError`` naming every column of ``columns`` that is not numeric."""
    from stellarnet.io.catalogs import CatalogFormatError

    bad = [f"{c} ({df[c].dtype})" for c in dict.fromkeys(columns)
           if not (pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c]))]
    if bad:
        raise CatalogFormatError(
            f"{path}: column(s) {', '.join(bad)} must be numeric (float/int FITS columns); "
            "the file stores them as another type (e.g. strings), so it is not a valid allStar table"
        )


def _nan_stats(x: np.ndarray) -> tuple[list[float], list[float]]:
    mean = np.nanmean(x, axis=0)
    std = np.nanstd(x, axis=0)
    mean = np.where(np.isfinite(mean), mean, 0.0)
    std = np.where(np.isfinite(std) & (std > 0), std, 1.0)
    return [float(v) for v in mean], [float(v) for v in std]


def _class_weights(codes: np.ndarray, n_classes: int) -> list[float]:
    """Inverse-frequency class weights (mean 1 over present classes, capped at 10)."""
    codes = codes[codes >= 0]
    counts = np.bincount(codes, minlength=n_classes).astype(float)
    w = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / max((counts > 0).sum(), 1), 0.0)
    w = np.minimum(w, 10.0)
    present = w > 0
    if present.any():
        w[present] /= w[present].mean()
    return [float(v) for v in w]


def build_shards(
    allstar: str | Path,
    out_dir: str | Path,
    cuts: Mapping[str, Any],
    spectra_root: str | Path | None = None,
    spectra_kind: str = "aspcapStar",
    grid: str = "dr12",
    rows_per_shard: int = 2048,
    split: Mapping[str, Any] | None = None,
    label_columns: Mapping[str, str] | None = None,
    classes_cfg: Mapping[str, Any] | None = None,
    n_workers: int = 2,
    progress: bool = True,
    label_ranges: Mapping[str, Sequence[float]] | None = None,
    layout: str | None = None,
    trainer: Any = None,
) -> dict[str, Any] | None:
    """Build (or resume) a shard dataset from an allStar file and its spectra; return the manifest.

    The shards are built by a ``DataLoader`` over :class:`ShardTasks` with ``n_workers`` reader
    processes; with a Lightning ``trainer`` of a DDP launch (``trainer=ddp trainer.devices=N
    [trainer.num_nodes=M]``: every rank calls this) by ``trainer.predict`` over the same loader, each
    rank building its own shards; global rank 0 holds the build lock and writes the manifest, the other
    ranks return None. The manifest is the same whichever way (same shards, same checksums).

    ``allstar``: an allStar-format FITS. ``spectra_root``: root of the SDSS directory tree
    (defaults to the allStar's directory). ``cuts``: ordered mapping of named cuts
    (``conf/data/cuts``). ``grid``: 'dr17' (7,514 px) or 'dr12' (7,214 px).
    ``layout``: the spectra's path template below ``spectra_root`` (default DR17's, :data:`SPECTRA_LAYOUT`).
    ``label_ranges``: physical range per allStar label column (default
    :data:`stellarnet.preparation.cuts.PHYSICAL_LABEL_RANGES`; ``{}`` disables); stars with a label outside
    are removed after ``cuts`` and reported as ``physical_<COLUMN>`` rows of the cut report.

    Raises ``CatalogFormatError`` when a required numeric column (labels, errors, RA/DEC, SNR) is
    not numeric (e.g. TEFF stored as strings), ``MissingColumnError`` / ``EmptySelectionError``
    from the catalogue and cuts, and :class:`ShardError` when no spectrum file is found.
    """
    from tqdm.auto import tqdm

    from stellarnet.io.catalogs import read_allstar
    from stellarnet.preparation.classes import LUMINOSITY_CLASSES, SPECTRAL_TYPES, STAGES, derive_classes
    from stellarnet.preparation.cuts import apply_cuts, physical_range_cuts
    from stellarnet.preparation.photometry import PHOT_FEATURES, photometric_features

    allstar = Path(allstar)
    out_dir = Path(out_dir)
    spectra_root = Path(spectra_root) if spectra_root else allstar.parent
    grid = grids.grid_name(grid)
    label_columns = dict(label_columns or DEFAULT_LABEL_COLUMNS)
    split = to_plain(split or {"by": "FIELD", "fractions": {"train": 0.8, "val": 0.1, "test": 0.1}, "seed": 42})
    cuts = to_plain(cuts)
    if rows_per_shard < 1:
        raise ValueError("rows_per_shard must be >= 1")

    allstar_sha = sha256_file(allstar)
    required = ["APOGEE_ID", "TELESCOPE", "FIELD", "RA", "DEC", "SNR"]
    required += list(label_columns.values()) + [c + "_ERR" for c in label_columns.values()]
    from stellarnet.io.allstar_columns import add_derived_columns, columns_to_read
    from stellarnet.io.catalogs import allstar_columns

    to_read = columns_to_read(required, allstar_columns(allstar))
    df = read_allstar(allstar, required=to_read)
    _check_numeric(df, [c for c in to_read if c not in ("APOGEE_ID", "TELESCOPE", "FIELD")], allstar)
    df = add_derived_columns(df)  # e.g. ALPHA_FE = ALPHA_M + M_H - FE_H
    df["_ROW"] = np.arange(len(df), dtype=np.int64)  # row in the allStar file, kept through the cuts
    # physically impossible labels (e.g. Teff = 99999 K, logg = 9) are removed after the user's cuts
    # and reported like a cut (physical_<COLUMN> rows in the cut report); label_ranges={} disables
    range_cuts = physical_range_cuts(label_columns.values(), label_ranges)
    kept, report = apply_cuts(df, {**cuts, **range_cuts})
    for row in report.rows:
        if row.name in range_cuts and row.removed:
            log.warning("cut %r removed %d star(s): %s", row.name, row.removed, row.reason)

    # Spectra availability is part of the selection, reported like a cut.
    layout = spectra_layout(spectra_kind, layout)
    paths = [spectrum_path(spectra_root, spectra_kind, t, f, a, layout)
             for t, f, a in zip(kept["TELESCOPE"], kept["FIELD"], kept["APOGEE_ID"])]
    exists = np.array([p.exists() for p in paths])
    missing_ids = kept["APOGEE_ID"].to_numpy()[~exists][:20].tolist()
    kept = kept.loc[exists].reset_index(drop=True)
    paths = [str(p) for p, e in zip(paths, exists) if e]
    if len(kept) == 0:
        raise ShardError(
            f"no spectra found under {spectra_root} for the {int(exists.size)} stars that passed the cuts "
            f"(layout {layout!r}; set data.survey.spectra_layout for another release's tree)"
        )

    phot = photometric_features(kept)
    classes = derive_classes(kept, classes_cfg)
    split_names = assign_splits(kept, split["fractions"], by=split.get("by", "FIELD"),
                                seed=int(split.get("seed", 42)))

    label_names = list(label_columns)
    labels = np.stack([kept[c].to_numpy(np.float64) for c in label_columns.values()], 1).astype(np.float32)
    label_err = np.stack([kept[c + "_ERR"].to_numpy(np.float64) for c in label_columns.values()], 1)
    label_err = label_err.astype(np.float32)
    class_tasks = {"spectral_type": list(SPECTRAL_TYPES), "luminosity_class": list(LUMINOSITY_CLASSES),
                   "stage": list(STAGES)}
    class_codes = np.stack([classes[t].to_numpy(np.int64) for t in class_tasks], 1)
    phot_arr = phot[list(PHOT_FEATURES)].to_numpy(np.float32)
    row_index = kept["_ROW"].to_numpy(np.int64)

    columns_all = {
        "labels": labels,
        "label_err": label_err,
        "classes": class_codes,
        "photometry": phot_arr,
        "snr": kept["SNR"].to_numpy(np.float32),
        "apogee_id": kept["APOGEE_ID"].astype(str).to_numpy().astype("S"),
        "row_index": row_index,
        "ra": kept["RA"].to_numpy(np.float64),
        "dec": kept["DEC"].to_numpy(np.float64),
        "field": kept["FIELD"].astype(str).to_numpy().astype("S"),
    }
    build_cfg = {"allstar_sha256": allstar_sha, "cuts": cuts, "label_ranges": range_cuts,
                 "classes": to_plain(classes_cfg), "grid": grid, "rows_per_shard": rows_per_shard,
                 "split": split, "labels": label_columns,
                 "spectra_kind": spectra_kind, "schema_version": SCHEMA_VERSION,
                 **({"spectra_layout": layout} if layout != SPECTRA_LAYOUT[spectra_kind] else {})}
    build_hash = _stable_hash(build_cfg)

    out_dir.mkdir(parents=True, exist_ok=True)
    rank_zero = env_global_rank_is_zero()
    with (_build_lock(out_dir) if rank_zero else contextlib.nullcontext()):
        old = out_dir / MANIFEST
        marker = out_dir / BUILDING_MARKER
        if old.exists() and not marker.exists():
            try:
                prev = json.loads(old.read_text())
            except (OSError, json.JSONDecodeError):
                prev = {}
            if prev.get("build_hash") == build_hash and _shards_intact(out_dir, prev):
                log.info("shards in %s are current (build hash %s)", out_dir, build_hash)
                return prev
        # from here until the new manifest is written the directory is not a usable dataset
        if rank_zero:
            atomic_write_text(marker, json.dumps({"build_hash": build_hash}))

        tasks: list[_ShardTask] = []
        for s in SPLITS:
            idx = np.flatnonzero(split_names == s)
            for k, start in enumerate(range(0, len(idx), rows_per_shard)):
                sel = idx[start:start + rows_per_shard]
                tasks.append(_ShardTask(
                    path=str(out_dir / f"{s}-{k:05d}.h5"), build_hash=build_hash, grid=grid,
                    normalized=(spectra_kind == "aspcapStar"), files=[paths[i] for i in sel],
                    columns={name: arr[sel] for name, arr in columns_all.items()},
                ))
        import torch
        from torch.utils.data import DataLoader

        from stellarnet.dataset.chunks import pass_through

        workers = 0 if n_workers <= 1 or len(tasks) == 1 else min(int(n_workers), len(tasks))
        # its own generator: the loader's worker seed must not come from torch's global RNG, or a
        # training run that builds its shards first would start from other weights than one that finds them
        loader = DataLoader(ShardTasks(tasks), batch_size=None, shuffle=False, num_workers=workers,
                            collate_fn=pass_through, prefetch_factor=1 if workers else None,
                            generator=torch.Generator().manual_seed(0))
        results: dict[str, dict[str, Any]] = {}
        if trainer is None:
            bar = tqdm(total=len(kept), desc=f"shards → {out_dir.name}", unit="star", disable=not progress)
            for r in loader:
                results[r["file"]] = r
                bar.update(r["stars"])
            bar.close()
        else:
            entries_dir = out_dir / ENTRIES_DIR / build_hash
            entries_dir.mkdir(parents=True, exist_ok=True)
            _build_on_trainer(trainer, loader, entries_dir, progress)
            if not trainer.is_global_zero:
                return None
            for t in tasks:
                name = Path(t.path).name
                try:
                    results[name] = json.loads(_entry_path(entries_dir, name).read_text())
                except (OSError, json.JSONDecodeError):
                    raise ShardError(f"no record of shard {name} from the ranks of this build: rerun it "
                                     "(finished shards are kept)") from None

        train = split_names == "train"
        label_mean, label_std = _nan_stats(labels[train])
        phot_mean, phot_std = _nan_stats(phot_arr[train])
        shards = []
        failures = []
        for t in tasks:
            r = results[Path(t.path).name]
            shards.append({"file": r["file"], "split": r["file"].split("-")[0], "rows": r["rows"], "sha256": r["sha256"]})
            failures += r["failures"]
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "build_hash": build_hash,
            "sources": {"allstar": str(allstar), "allstar_sha256": allstar_sha, "spectra_root": str(spectra_root),
                        "spectra_kind": spectra_kind, "spectra_layout": layout},
            "cuts": cuts,
            "label_ranges": range_cuts,
            "cut_report": report.to_frame().to_dict(orient="records"),
            "spectra_missing": {"count": int((~exists).sum()), "first_ids": missing_ids},
            "spectra_failed": failures,
            "grid": grid,
            "n_pixels": grids.n_pixels(grid),
            "wavelength": [float(w) for w in grids.wavelength(grid)],
            "label_names": label_names,
            "label_columns": label_columns,
            "label_units": [LABEL_UNITS.get(n, "") for n in label_names],
            "label_mean": label_mean,
            "label_std": label_std,
            "phot_features": list(PHOT_FEATURES),
            "phot_mean": phot_mean,
            "phot_std": phot_std,
            "class_tasks": class_tasks,
            "class_weights": {t: _class_weights(class_codes[train, j], len(names))
                              for j, (t, names) in enumerate(class_tasks.items())},
            "split": split,
            "split_rows": {s: int(sum(sh["rows"] for sh in shards if sh["split"] == s)) for s in SPLITS},
            "rows_per_shard": rows_per_shard,
            "shards": shards,
        }
        atomic_write_text(out_dir / MANIFEST, json.dumps(manifest, indent=1))
        report.save(out_dir)
        shutil.rmtree(out_dir / ENTRIES_DIR, ignore_errors=True)
        marker.unlink(missing_ok=True)
        return manifest
