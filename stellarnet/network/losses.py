"""Loss functions: masked heteroscedastic Gaussian NLL and masked cross-entropy."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["gaussian_nll", "classification_loss", "multitask_loss"]

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def gaussian_nll(
    mean: torch.Tensor,
    log_var: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    label_err: torch.Tensor | None = None,
    full: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked Gaussian negative log-likelihood with catalogue errors added to the variance.

    Per element, with total variance ``v = exp(log_var) + label_err**2``::

        nll = 0.5 * (log v + (target - mean)**2 / v)   (+ 0.5 log 2π if ``full``)

    The catalogue error is added so noisy labels do not force a small predicted σ; the predicted
    σ is then the model's own (aleatoric) scatter. Elements with ``mask == 0`` contribute nothing
    and receive exactly zero gradient, even if their target / error is NaN or inf.

    All inputs are (B, L) in standardized label units.

    Args:
        mean: predicted means.
        log_var: predicted log-variances (log of standardized units squared).
        target: true labels (anything where masked).
        mask: 1 present, 0 missing.
        label_err: catalogue 1σ errors (standardized units) or None (treated as 0).
        full: add the constant ``0.5 log 2π``.

    Returns:
        ``(loss, per_label)``: ``loss`` is the scalar sum of NLL over present elements divided by the
        number of present elements (0 with a gradient graph if none is present); ``per_label`` (L,) is
        the mean NLL over the present elements of each label (0 where a label has none).
    """
    present = mask > 0
    zeros = torch.zeros_like(mean)
    target = torch.where(present, target, zeros)
    var = log_var.exp()
    if label_err is not None:
        err = torch.where(present, label_err, zeros)
        var = var + err * err
    nll = 0.5 * (var.log() + (target - mean) ** 2 / var)
    if full:
        nll = nll + _HALF_LOG_2PI
    nll = torch.where(present, nll, zeros)
    weights = present.to(mean.dtype)
    loss = nll.sum() / weights.sum().clamp_min(1.0)
    per_label = nll.sum(0) / weights.sum(0).clamp_min(1.0)
    return loss, per_label


def classification_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    class_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy with ``ignore_index=-1`` and optional class weights.

    Args:
        logits: (B, K) unnormalized scores.
        target: (B,) int64 class codes, −1 = missing (ignored).
        class_weights: (K,) weights or None.

    Returns:
        Scalar loss (weighted mean over non-ignored stars); 0 with a gradient graph when every
        target is −1 (plain ``F.cross_entropy`` would return NaN there).
    """
    target = target.long()
    if not bool((target >= 0).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits, target, weight=class_weights, ignore_index=-1)


def multitask_loss(out: Mapping[str, Any], batch: Mapping[str, torch.Tensor], loss_weights: Mapping[str, float],
                   class_tasks: Sequence[str], class_weights: Mapping[str, torch.Tensor] | None = None
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """The network's loss: ``w_regression · NLL + Σ_task w_task · CE``.

    ``out`` is the network's output (``mean``, ``log_var`` in standardized units, ``logits`` per task),
    ``batch`` the batch dict (``labels``, ``label_mask``, ``label_err``, ``classes`` (B, C) in
    ``class_tasks`` order), ``class_weights`` optional per-task class weights. Returns
    ``(total, parts, per_label_nll)``: ``parts`` = {"regression": NLL, <task>: CE} (unweighted),
    ``per_label_nll`` (L,)."""
    nll, per_label = gaussian_nll(out["mean"], out["log_var"], batch["labels"], batch["label_mask"], batch.get("label_err"))
    parts = {"regression": nll}
    total = loss_weights["regression"] * nll
    classes = batch.get("classes")
    if classes is not None and class_tasks and (classes.ndim != 2 or classes.shape[1] != len(class_tasks)):
        raise ValueError(
            f"batch['classes'] has shape {tuple(classes.shape)}; expected (B, {len(class_tasks)}) "
            f"for tasks {list(class_tasks)}"
        )
    for c, task in enumerate(class_tasks):
        if classes is None:
            break
        ce = classification_loss(out["logits"][task], classes[:, c], (class_weights or {}).get(task))
        parts[task] = ce
        total = total + loss_weights[task] * ce
    return total, parts, per_label


def nonfinite_loss_message(where: str, parts: Mapping[str, torch.Tensor], out: Mapping[str, Any],
                           batch: Mapping[str, torch.Tensor]) -> str:
    """What went non-finite in a training step (heads, outputs, inputs), for the warning or error."""
    bad_heads = [k for k, v in parts.items() if not bool(torch.isfinite(v))]
    bad_out = [k for k in ("mean", "log_var") if not bool(torch.isfinite(out[k]).all())]
    bad_in = [k for k in ("flux", "flux_err", "pix_mask", "photometry", "labels", "label_err")
              if k in batch and not bool(torch.isfinite(batch[k]).all())]
    return (f"non-finite training loss at {where}; non-finite heads: {bad_heads or ['total']}; "
            f"non-finite outputs: {bad_out}; non-finite inputs: {bad_in}")
