"""Fusion trunk and output heads (regression with per-label uncertainty; classification)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["TrunkMLP", "HeteroscedasticHead", "ClassificationHead"]


class TrunkMLP(nn.Module):
    """Fusion MLP on the concatenated encoder features.

    Each hidden layer is ``Linear -> ReLU -> Dropout``; the dropout layers are the ones switched on
    for Monte-Carlo dropout at inference time.

    Args:
        in_dim: size of the concatenated input features.
        hidden: widths of the hidden layers (``out_dim`` is the last one; ``in_dim`` if empty).
        dropout: dropout probability after each hidden layer.
    """

    def __init__(self, in_dim: int, hidden: Sequence[int] = (256, 128), dropout: float = 0.2) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        d = int(in_dim)
        for h in hidden:
            layers += [nn.Linear(d, h), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            d = int(h)
        self.mlp = nn.Sequential(*layers)
        self.in_dim = int(in_dim)
        self.out_dim = d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_dim) -> (B, out_dim)."""
        return self.mlp(x)


class HeteroscedasticHead(nn.Module):
    """Per-label Gaussian head: mean and log-variance in standardized label units.

    The log-variance is softly bounded to ``[log_var_min, log_var_max]`` with a scaled sigmoid (a
    hard clamp would stop the gradient outside the range). With standardized labels (σ_label ~ 700 K
    for TEFF) the default range -10 .. 4 is σ = 0.0067 .. 7.4 standard deviations.

    Args:
        in_dim: input feature size.
        n_labels: number of regression labels L.
        log_var_min: lower bound of the log-variance (log of standardized units squared).
        log_var_max: upper bound of the log-variance.
    """

    def __init__(self, in_dim: int, n_labels: int, log_var_min: float = -10.0, log_var_max: float = 4.0) -> None:
        super().__init__()
        if not log_var_min < log_var_max:
            raise ValueError(f"log_var_min ({log_var_min}) must be < log_var_max ({log_var_max})")
        self.n_labels = int(n_labels)
        self.log_var_min = float(log_var_min)
        self.log_var_max = float(log_var_max)
        self.mean = nn.Linear(in_dim, self.n_labels)
        self.raw_log_var = nn.Linear(in_dim, self.n_labels)
        # start at log_var = -2 (σ ≈ 0.37 std): neither overconfident nor flat
        start = (-2.0 - self.log_var_min) / (self.log_var_max - self.log_var_min)
        start = min(max(start, 1e-3), 1 - 1e-3)
        nn.init.zeros_(self.raw_log_var.weight)
        nn.init.constant_(self.raw_log_var.bias, float(torch.logit(torch.tensor(start))))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, in_dim) -> (mean (B, L), log_var (B, L)), standardized label units."""
        span = self.log_var_max - self.log_var_min
        log_var = self.log_var_min + span * torch.sigmoid(self.raw_log_var(x))
        return self.mean(x), log_var


class ClassificationHead(nn.Module):
    """Linear classifier producing logits for one task.

    Args:
        in_dim: input feature size.
        n_classes: number of classes K of the task.
    """

    def __init__(self, in_dim: int, n_classes: int) -> None:
        super().__init__()
        if n_classes < 2:
            raise ValueError(f"a classification task needs >= 2 classes, got {n_classes}")
        self.n_classes = int(n_classes)
        self.fc = nn.Linear(in_dim, self.n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_dim) -> logits (B, K)."""
        return self.fc(x)
