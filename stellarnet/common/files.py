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


def to_plain(obj: Any, where: str | None = None) -> Any:
    """OmegaConf nodes, mappings, sequences, numpy / torch values and paths → plain Python
    (``dict`` / ``list`` / ``str`` / numbers), e.g. for JSON or a weights-only checkpoint.

    With ``where`` (the name of the value, for the message) anything else raises ``TypeError``
    naming the offending key — what a checkpoint's hyper-parameters need to survive
    ``torch.load(weights_only=True)``; without it such values are returned unchanged."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(obj, (DictConfig, ListConfig)):
            obj = OmegaConf.to_container(obj, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf ships with hydra-core
        pass
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, Mapping):
        return {(str(k) if where is not None else k): to_plain(v, None if where is None else f"{where}.{k}")
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v, None if where is None else f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if type(obj).__module__.startswith("torch") and hasattr(obj, "detach"):  # a tensor (torch not imported here)
        return obj.detach().cpu().tolist()
    if isinstance(obj, Path):
        return str(obj)
    if where is not None:
        raise TypeError(f"{where}: cannot store {type(obj).__name__} as a plain hyper-parameter")
    return obj


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """A temporary path next to ``path`` for a writer that wants a file name (astropy, h5py, pandas,
    numpy); on success the file is fsynced and renamed onto ``path``, on an exception removed.

    The one atomic write of the package: a killed process leaves either the old file or the new
    one, never a truncated one, and two processes never share a temporary file. Parent
    directories are created. ``suffix``: the temporary name's ending (default ``path``'s, for
    writers that choose the format by it; e.g. ``numpy.savez`` adds ``.npz`` otherwise)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    end = path.suffix if suffix is None else suffix
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{end}")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """:func:`atomic_path` as an open file: ``mode`` ``"w"`` (text, UTF-8) or ``"wb"``."""
    kw = {} if "b" in mode else {"encoding": "utf-8", "newline": ""}
    with atomic_path(path, suffix="") as tmp, open(tmp, mode, **kw) as fh:
        yield fh


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
