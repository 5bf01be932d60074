"""One build per dataset directory: an exclusive lock file holding the builder's host and pid (a
stale lock of a dead process on this host is taken over)."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from stellarnet.dataset.manifest import BUILD_LOCK, ShardError


# --------------------------------------------------------------------------- build lock
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


@contextmanager
def _build_lock(out_dir: Path) -> Iterator[Path]:
    """Hold ``out_dir``'s build lock for the block (released on any exit)."""
    lock = _acquire_build_lock(out_dir)
    try:
        yield lock
    finally:
        lock.unlink(missing_ok=True)


def _acquire_build_lock(out_dir: Path) -> Path:
    """Create ``out_dir/BUILD_LOCK`` exclusively; a lock left by a dead process on this host is
    taken over, a live one (or one from another host) refuses the build with :class:`ShardError`."""
    import socket

    lock = out_dir / BUILD_LOCK
    me = {"host": socket.gethostname(), "pid": os.getpid()}
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                owner = json.loads(lock.read_text() or "{}")
            except (OSError, json.JSONDecodeError):
                owner = {}
            stale = owner.get("host") == me["host"] and isinstance(owner.get("pid"), int) \
                and not _pid_alive(owner["pid"])
            if not stale:
                raise ShardError(
                    f"another build is writing {out_dir} (lock {lock}: host {owner.get('host', '?')}, "
                    f"pid {owner.get('pid', '?')}); wait for it to finish, or delete the lock file if no "
                    "build is running"
                ) from None
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(me))
        return lock
    raise ShardError(f"cannot take the build lock {lock}")  # pragma: no cover - raced twice
