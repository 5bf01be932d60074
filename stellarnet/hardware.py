"""CPU/GPU settings that depend on the machine: thread counts and bf16 support."""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)


def available_cpus() -> int:
    """CPUs this process may use (affinity-aware)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def cpu_bf16_supported() -> bool:
    """True when the CPU has native bf16 kernels (AVX512-BF16 / AMX); else bf16 is emulated and slow."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover
        return False


def configure_cpu_threads(num_workers: int, threads: int | str | None = "auto") -> int:
    """Set torch's intra-op threads so the model and the data workers do not oversubscribe the CPUs.

    ``auto``: the CPUs left after one per data-loader worker (at least 1). OpenMP threads that
    spin-wait for a busy core slow a small CNN down by 5-10x, which is what oversubscription costs.
    """
    n = max(1, available_cpus() - max(0, num_workers)) if threads in (None, "auto") else int(threads)
    torch.set_num_threads(n)
    return n


def resolve_cpu_precision(precision: str) -> str:
    """Fall back from bf16-mixed to 32-true on CPUs without native bf16."""
    if str(precision).startswith("bf16") and not cpu_bf16_supported():
        log.warning("this CPU has no native bf16 support: training in 32-true instead of %s", precision)
        return "32-true"
    return str(precision)
