"""A shard dataset's manifest (``manifest.json``): the constants that name a dataset's files, reading and
checking the manifest, and verifying the shards against it (row counts, build hash, SHA-256)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

import h5py

from stellarnet.common.errors import StellarnetError
from stellarnet.common.files import to_plain
from stellarnet.io import grids

SCHEMA_VERSION = 1


MANIFEST = "manifest.json"


#: Present while a build runs in the directory: a killed build leaves it, and readers refuse the
#: directory until a rerun of the build finishes (a half-rebuilt dataset never looks complete).
BUILDING_MARKER = ".building"


#: per-shard manifest entries written by the ranks of a distributed build (removed with the marker)
ENTRIES_DIR = ".shard_entries"


#: Held (created exclusively, holding the builder's host and pid) by the one build writing the directory.
BUILD_LOCK = ".build.lock"


class ShardError(StellarnetError, RuntimeError):
    """A shard dataset is missing, corrupted, truncated or from an unknown schema."""


# --------------------------------------------------------------------------- helpers
def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """SHA-256 hex digest of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _stable_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(to_plain(obj), sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- reading
def _shards_intact(out_dir: Path, manifest: Mapping[str, Any]) -> bool:
    try:
        verify_dataset(out_dir, manifest, check_sha=False)
        return True
    except ShardError:
        return False


def load_manifest(dataset_dir: str | Path) -> dict[str, Any]:
    """Read and validate ``manifest.json`` of a shard dataset."""
    path = Path(dataset_dir) / MANIFEST
    if (Path(dataset_dir) / BUILDING_MARKER).exists():
        raise ShardError(
            f"{dataset_dir} is being built, or its last build was interrupted ({BUILDING_MARKER} present): its shards "
            "and manifest may not belong together; rerun the build (python -m stellarnet.build_shards, or the "
            "training run that builds it) to finish it"
        )
    if not path.exists():
        raise ShardError(f"no {MANIFEST} in {dataset_dir}: not a shard dataset (build it with stellarnet.build_shards)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ShardError(f"{path} is not valid JSON: {exc}") from None
    version = manifest.get("schema_version")
    if not isinstance(version, int):
        raise ShardError(f"{path} has no integer schema_version")
    if version > SCHEMA_VERSION:
        raise ShardError(
            f"{path} has schema_version {version}, newer than this stellarnet supports ({SCHEMA_VERSION}); "
            "upgrade stellarnet or rebuild the shards"
        )
    for key in ("shards", "label_names", "label_mean", "label_std", "phot_features", "grid", "build_hash"):
        if key not in manifest:
            raise ShardError(f"{path} lacks required key {key!r}")
    _check_manifest_types(manifest, path)
    return manifest


def _check_manifest_types(manifest: Mapping[str, Any], path: Path) -> None:
    """ShardError naming the first manifest entry of the wrong type (a hand-edited or damaged file)."""
    def bad(key: str, expected: str) -> ShardError:
        return ShardError(f"{path}: {key} must be {expected}, got {manifest.get(key)!r:.80}")

    if not isinstance(manifest["build_hash"], str):
        raise bad("build_hash", "a string")
    try:
        grids.grid_name(manifest["grid"]) if isinstance(manifest["grid"], str) else None
    except (ValueError, KeyError):
        raise bad("grid", "a grid name ('dr17' or 'dr12')") from None
    if not isinstance(manifest["grid"], str):
        raise bad("grid", "a grid name ('dr17' or 'dr12')")
    for key in ("label_names", "phot_features"):
        if not isinstance(manifest[key], list) or not all(isinstance(v, str) for v in manifest[key]):
            raise bad(key, "a list of names")
    n_labels = len(manifest["label_names"])
    for key in ("label_mean", "label_std"):
        v = manifest[key]
        if not isinstance(v, list) or len(v) != n_labels or not all(isinstance(x, (int, float)) for x in v):
            raise bad(key, f"a list of {n_labels} numbers")
    shards = manifest["shards"]
    if not isinstance(shards, list) or not all(
            isinstance(sh, dict) and isinstance(sh.get("file"), str) and isinstance(sh.get("rows"), int)
            and isinstance(sh.get("sha256"), str) and isinstance(sh.get("split"), str) for sh in shards):
        raise bad("shards", "a list of {file, split, rows, sha256} entries")


def verify_dataset(dataset_dir: str | Path, manifest: Mapping[str, Any] | None = None, check_sha: bool = True) -> None:
    """Check every shard exists, opens, has the manifest's row count and (optionally) SHA-256."""
    dataset_dir = Path(dataset_dir)
    manifest = manifest or load_manifest(dataset_dir)
    for sh in manifest["shards"]:
        p = dataset_dir / sh["file"]
        if not p.exists():
            raise ShardError(f"shard {p} listed in the manifest is missing")
        if check_sha and sha256_file(p) != sh["sha256"]:
            raise ShardError(f"shard {p} fails its SHA-256 check (corrupted or modified); rebuild the dataset")
        try:
            with h5py.File(p, "r") as f:
                n = f["flux"].shape[0]
                shard_hash = f.attrs.get("build_hash")
                complete = bool(f.attrs.get("complete", False))
        except (OSError, KeyError) as exc:
            raise ShardError(f"shard {p} cannot be read (truncated or corrupted): {exc}") from None
        want = manifest.get("build_hash")
        if isinstance(shard_hash, bytes):
            shard_hash = shard_hash.decode()
        if shard_hash != want or not complete:
            raise ShardError(
                f"shard {p} belongs to another build (build hash {shard_hash}, manifest {want}): the directory "
                "was partly rebuilt with other settings; rerun the build to finish it"
            )
        if n != sh["rows"]:
            raise ShardError(f"shard {p} has {n} rows, manifest says {sh['rows']}")
