"""CPU/GPU settings that depend on the machine: thread counts and bf16 support."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

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


def local_world_size(default: int = 1) -> int:
    """Training processes on this node as the launcher announced it (``LOCAL_WORLD_SIZE``, set by
    torchrun), else ``default``."""
    value = os.environ.get("LOCAL_WORLD_SIZE", "")
    return int(value) if value.isdigit() and int(value) > 0 else max(1, int(default))


def cpus_per_rank(local_ranks: int = 1) -> int:
    """CPUs one training process may use when ``local_ranks`` processes share this node.

    Processes started on one machine by Lightning (``ddp``, ``ddp_spawn``) or torchrun share one
    CPU set: each gets ``available_cpus() // local_ranks``. Tasks started by ``srun`` already own
    ``--cpus-per-task`` CPUs each (``SLURM_CPUS_PER_TASK``): they get ``min(available, that)``
    without a further division (SLURM may or may not pin each task to its own CPUs).
    """
    cpus = available_cpus()
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and int(slurm) > 0 and "SLURM_STEP_ID" in os.environ:
        return max(1, min(cpus, int(slurm)))
    return max(1, cpus // max(1, int(local_ranks)))


def configure_cpu_threads(num_workers: int, threads: int | str | None = "auto",
                          local_ranks: int | None = None) -> int:
    """Set torch's intra-op threads so the model and the data workers do not oversubscribe the CPUs.

    ``auto``: the CPUs of this process's share (:func:`cpus_per_rank`) left after one per
    data-loader worker, at least 1; with N training processes on the node that is about
    ``(cpus - N * num_workers) / N`` per process. ``local_ranks``: N (default
    :func:`local_world_size`, i.e. ``LOCAL_WORLD_SIZE`` or 1). An explicit ``threads`` is used as
    is, per process. OpenMP threads that spin-wait for a busy core slow a small CNN down by 5-10x,
    which is what oversubscription costs.
    """
    if threads in (None, "auto"):
        ranks = local_world_size() if local_ranks is None else max(1, int(local_ranks))
        n = max(1, cpus_per_rank(ranks) - max(0, int(num_workers)))
    else:
        n = max(1, int(threads))
    torch.set_num_threads(n)
    return n


class CpuThreadsPerRank(Callback):
    """Set the torch threads in every training process (:func:`configure_cpu_threads`).

    Runs in Lightning's ``setup`` hook, i.e. inside each rank after it started: processes made by
    ``ddp_spawn`` do not inherit the parent's ``torch.set_num_threads``, and Lightning's own launchers
    set ``cpus // N`` threads without counting the data-loader workers. N = ``trainer.num_devices``
    (processes per node) in a multi-process run, else 1.
    """

    def __init__(self, num_workers: int, threads: int | str | None = "auto"):
        self.num_workers = int(num_workers)
        self.threads = threads
        self.n_threads: int | None = None

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        ranks = int(trainer.num_devices) if trainer.world_size > 1 else 1
        self.n_threads = configure_cpu_threads(self.num_workers, self.threads, local_ranks=ranks)
        log.info("rank %d: %d torch threads (%d CPUs, %d process(es) on this node, %d loader worker(s) each)",
                 trainer.global_rank, self.n_threads, available_cpus(), ranks, self.num_workers)


def resolve_cpu_precision(precision: str) -> str:
    """Fall back from bf16-mixed to 32-true on CPUs without native bf16."""
    if str(precision).startswith("bf16") and not cpu_bf16_supported():
        log.warning("this CPU has no native bf16 support: training in 32-true instead of %s", precision)
        return "32-true"
    return str(precision)
