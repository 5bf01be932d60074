"""The network's optimizer (AdamW) and learning-rate schedule (one-cycle, cosine with warm-up, or none),
built from the model's ``optimizer`` / ``scheduler`` hyper-parameters."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch

log = logging.getLogger(__name__)


def make_optimizer(parameters: Iterable[torch.nn.Parameter], optimizer_cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    """AdamW over ``parameters`` (``optimizer_cfg``: ``lr``, ``weight_decay``, ``betas``, ``eps``), with no weight
    decay on biases and normalization weights (1-D parameters)."""
    cfg = dict(optimizer_cfg)
    name = str(cfg.pop("name", "adamw")).lower()
    if name != "adamw":
        raise ValueError(f"only the AdamW optimizer is supported, got {name!r}")
    lr = float(cfg.pop("lr", 1e-3))
    wd = float(cfg.pop("weight_decay", 1e-4))
    betas = tuple(cfg.pop("betas", (0.9, 0.999)))
    eps = float(cfg.pop("eps", 1e-8))
    if cfg:
        raise ValueError(f"unknown optimizer options {sorted(cfg)}")
    decay, no_decay = [], []
    for p in parameters:
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=betas, eps=eps
    )
    return opt


def make_scheduler(opt: torch.optim.Optimizer, scheduler_cfg: Mapping[str, Any] | None, total: int) -> Any:
    """The learning-rate scheduler of ``scheduler_cfg`` (``name``: ``onecycle``, ``cosine`` or ``none``, and its
    options) over ``total`` optimizer steps; None: a constant learning rate."""
    sch = dict(scheduler_cfg or {})
    sname = str(sch.pop("name", "none")).lower()
    if sname in ("none", "null", ""):
        return None
    if sname == "onecycle":
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            opt,
            max_lr=float(sch.pop("max_lr", opt.defaults["lr"])),
            total_steps=total,
            pct_start=float(sch.pop("pct_start", 0.3)),
            div_factor=float(sch.pop("div_factor", 25.0)),
            final_div_factor=float(sch.pop("final_div_factor", 1e4)),
        )
    elif sname == "cosine":
        warmup = int(sch.pop("warmup_steps", 0))
        eta_min = float(sch.pop("eta_min", 0.0))
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total - warmup, 1), eta_min=eta_min)
        if warmup > 0:
            ramp = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1e-3, end_factor=1.0, total_iters=warmup)
            scheduler = torch.optim.lr_scheduler.SequentialLR(opt, [ramp, cosine], milestones=[warmup])
        else:
            scheduler = cosine
    else:
        raise ValueError(f"unknown scheduler {sname!r}; use 'onecycle', 'cosine' or 'none'")
    if sch:
        raise ValueError(f"unknown options {sorted(sch)} for scheduler {sname!r}")
    return scheduler


def schedule_steps(scheduler_cfg: Mapping[str, Any] | None, trainer: Any) -> int:
    """Optimizer steps a schedule spans (``trainer.estimated_stepping_batches``; 0 without a schedule)."""
    sname = str((scheduler_cfg or {}).get("name", "none")).lower()
    if sname in ("none", "null", ""):
        return 0
    total = int(trainer.estimated_stepping_batches)
    if total < 1 or total > 10**9:
        raise ValueError(f"cannot schedule over {total} steps; set trainer.max_epochs or max_steps")
    return total


def restretch_schedule(trainer: Any, scheduler_cfg: Mapping[str, Any] | None, restored: int | None,
                       total: int) -> int | None:
    """After a resume with a different run length (e.g. ``max_epochs`` raised to train longer),
    rebuild the trainer's learning-rate schedule for the new length (``total`` steps) and advance it
    to the restored step; returns the new length (None: nothing changed).

    The restored scheduler state keeps the old length: OneCycle would stop with "Tried to step
    N times" and a cosine schedule would climb back up after its end."""
    configs = getattr(trainer, "lr_scheduler_configs", None) or []
    if len(configs) != 1 or len(trainer.optimizers) != 1:
        return None
    old = configs[0].scheduler
    if restored is None:
        restored = getattr(old, "total_steps", None)  # checkpoints written before the key existed
    if restored is None or not total or int(restored) == total:
        return None
    done = int(old.last_epoch)
    if done >= total:
        raise ValueError(
            f"resumed at optimizer step {done}, but the new run spans only {total} steps; "
            "raise trainer.max_epochs (or max_steps) above the checkpoint's"
        )
    opt = trainer.optimizers[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "lr_scheduler.step() before optimizer.step()"
        new = make_scheduler(opt, scheduler_cfg, total)
        for _ in range(done):
            new.step()
    configs[0].scheduler = new
    log.warning("learning-rate schedule re-stretched from %d to %d optimizer steps on resume "
                "(continuing at step %d, lr %.3g)", int(restored), total, done, opt.param_groups[0]["lr"])
    return total
