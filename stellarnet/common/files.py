"""Small helpers shared by every stage: plain-Python configs and atomic file writes."""

from __future__ import annotations

import json
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator, Mapping

import numpy as np


def to_plain(obj: Any) -> Any:
    """OmegaConf nodes, mappings, sequences and numpy values → plain JSON-able Python."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(obj, (DictConfig, ListConfig)):
            return OmegaConf.to_container(obj, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf ships with hydra-core
        pass
    if isinstance(obj, Mapping):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Open a temporary file next to ``path``; on success it is fsynced and renamed onto ``path``.

    A killed process leaves either the old file or the new one, never a truncated one; on an
    exception the temporary file is removed. ``mode``: ``"w"`` (text, UTF-8) or ``"wb"``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        kw = {} if "b" in mode else {"encoding": "utf-8", "newline": ""}
        with os.fdopen(fd, mode, **kw) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_open`)."""
    with atomic_open(path, "w") as fh:
        fh.write(text)
    return Path(path)


def to_jsonable(obj: Any) -> Any:
    """Recursively convert to JSON-safe plain Python (NaN/inf → None, numpy and 1-element tensors →
    Python numbers, arrays → lists, tuples → lists, keys starting with ``_`` dropped, other keys → str)."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "tolist"):  # numpy arrays, torch tensors
        return to_jsonable(obj.tolist())
    return str(obj)


def write_json(path: str | os.PathLike, obj: Any, indent: int = 1) -> Path:
    """Atomic JSON write of :func:`to_jsonable` ``(obj)``."""
    return atomic_write_text(path, json.dumps(to_jsonable(obj), indent=indent))


def env_global_rank_is_zero() -> bool:
    """Whether this process is global rank 0 according to its launcher, before any process group exists.

    A process is rank 0 unless one of the rank variables a launcher sets says otherwise: ``RANK``
    (torchrun), ``SLURM_PROCID`` (srun), ``NODE_RANK`` / ``LOCAL_RANK`` (the ranks that Lightning's
    own ``ddp`` launcher starts: it starts them from ``trainer.fit``, after rank 0 got here). A
    plain single-process run sets none of them.
    """
    for var in ("RANK", "SLURM_PROCID", "NODE_RANK", "LOCAL_RANK"):
        value = os.environ.get(var, "").strip()
        if value.isdigit() and int(value) != 0:
            return False
    return True
