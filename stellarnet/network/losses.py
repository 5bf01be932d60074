"""Loss functions: masked heteroscedastic Gaussian NLL and masked cross-entropy."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["gaussian_nll", "classification_loss"]

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
