"""Multi-process (DDP) collectives the LightningModule needs at epoch ends and on a non-finite loss:
whether a process group is up, a decision AND-ed over all ranks, and the epoch's outputs gathered from
every rank with ``DistributedSampler``'s padding duplicates dropped."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch.distributed as dist

from stellarnet.network.epoch_metrics import merge_outputs, take_rows

log = logging.getLogger(__name__)


def is_distributed(trainer: Any) -> bool:
    """True inside a multi-process run with an initialized process group."""
    return (trainer is not None and trainer.world_size > 1 and dist.is_available() and dist.is_initialized()
            and dist.get_world_size() > 1)


def all_ranks_agree(trainer: Any, decision: bool) -> bool:
    """``decision`` AND-ed over all ranks (one small all-reduce)."""
    return bool(trainer.strategy.reduce_boolean_decision(decision, all=True))


def gather_outputs(outputs: dict[str, Any]) -> dict[str, Any]:
    """This epoch's outputs of *all* ranks: padding duplicates dropped, rows sorted by ``index``.

    ``DistributedSampler`` gives each rank an equal share and pads the split with repeats of its
    first rows; a row is kept once per ``index`` (the row index in the split, see the batch dict).
    Collective: every rank calls it from the same epoch-end hook, and every rank gets the same result.
    """
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, outputs)
    merged = merge_outputs(parts)
    if not merged:
        return merged
    index = merged["index"]
    if (index < 0).any():
        log.warning("batches without 'index': cannot drop DistributedSampler padding duplicates; "
                    "metrics of this epoch may count up to world_size-1 rows twice")
        return merged
    _, first = np.unique(index, return_index=True)
    return take_rows(merged, first)
