"""Torch threads per training process (`stellarnet.common.hardware`): CPUs shared by the local ranks."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import stellarnet.common.hardware as hw

_LAUNCH_VARS = ("LOCAL_WORLD_SIZE", "SLURM_CPUS_PER_TASK", "SLURM_STEP_ID")


@pytest.fixture
def cpus16(monkeypatch):
    """16 CPUs, no launcher variables; torch's thread count restored afterwards."""
    saved = torch.get_num_threads()
    monkeypatch.setattr(hw, "available_cpus", lambda: 16)
    for var in _LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    yield monkeypatch
    torch.set_num_threads(saved)


@pytest.mark.parametrize("workers, ranks, expected", [
    (0, 1, 16), (2, 1, 14),          # one process: CPUs minus one per loader worker
    (0, 2, 8), (2, 2, 6),            # (16 - 2*2) / 2
    (2, 4, 2), (3, 4, 1),            # (16 - 4*3) / 4 = 1
    (4, 4, 1), (8, 16, 1),           # never below 1
    (1, 3, 4),                       # 16 // 3 - 1
])
def test_auto_threads_share_cpus_between_local_ranks(cpus16, workers, ranks, expected):
    assert hw.configure_cpu_threads(workers, "auto", local_ranks=ranks) == expected
    assert torch.get_num_threads() == expected


def test_local_world_size_from_environment(cpus16):
    assert hw.local_world_size() == 1
    cpus16.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun
    assert hw.local_world_size() == 4
    assert hw.configure_cpu_threads(2, "auto") == 2
    # an explicit count wins over the environment
    assert hw.configure_cpu_threads(2, "auto", local_ranks=1) == 14


def test_explicit_threads_are_per_process(cpus16):
    assert hw.configure_cpu_threads(2, 3, local_ranks=4) == 3
    assert hw.configure_cpu_threads(2, "5") == 5


def test_srun_tasks_own_their_cpus(cpus16):
    """srun gives each task --cpus-per-task CPUs: no further division by the local ranks."""
    cpus16.setenv("SLURM_CPUS_PER_TASK", "8")
    assert hw.cpus_per_rank(2) == 8  # not an srun step (e.g. the batch script): 16 // 2
    cpus16.setenv("SLURM_STEP_ID", "0")
    assert hw.cpus_per_rank(2) == 8
    assert hw.cpus_per_rank(4) == 8
    assert hw.configure_cpu_threads(6, "auto", local_ranks=4) == 2
    cpus16.setenv("SLURM_CPUS_PER_TASK", "32")  # never more than the affinity mask
    assert hw.cpus_per_rank(1) == 16


def test_callback_uses_the_trainer_device_count(cpus16):
    cb = hw.CpuThreadsPerRank(num_workers=2)
    cb.setup(SimpleNamespace(num_devices=4, world_size=8, global_rank=5), None, "fit")
    assert cb.n_threads == 2 and torch.get_num_threads() == 2
    cb.setup(SimpleNamespace(num_devices=1, world_size=1, global_rank=0), None, "fit")
    assert cb.n_threads == 14
