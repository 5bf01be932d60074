"""The spectrum emulator of the refinement stage (The Payne's spectral model, learned from the
survey): an MLP labels (Teff [K], logg, [Fe/H], [α/Fe] [dex]) → continuum-normalized flux on the training
grid, and its weights-only state."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import nn


class SpectrumEmulator(nn.Module):
    """MLP ``labels [K, dex, dex, dex] -> continuum-normalized flux (P,)``.

    Args:
        label_names: the labels, in input order.
        n_pixels: output pixels (the training grid, gaps removed).
        hidden: width of the two hidden layers.
        label_mean, label_std: input standardization (physical units).
        grid: the grid name (``"dr12"`` / ``"dr17"``), for segment clipping; None = one segment.
    """

    def __init__(self, label_names: Sequence[str], n_pixels: int, hidden: int = 256,
                 label_mean: Sequence[float] | None = None, label_std: Sequence[float] | None = None,
                 grid: str | None = None) -> None:
        super().__init__()
        self.label_names = list(label_names)
        self.n_pixels = int(n_pixels)
        self.hidden = int(hidden)
        self.grid = grid
        n = len(self.label_names)
        mean = torch.zeros(n) if label_mean is None else torch.as_tensor(label_mean, dtype=torch.float32)
        std = torch.ones(n) if label_std is None else torch.as_tensor(label_std, dtype=torch.float32)
        if mean.shape != (n,) or std.shape != (n,) or not torch.all(std > 0):
            raise ValueError(f"label_mean/label_std must be {n} values with std > 0")
        self.register_buffer("label_mean", mean.clone())
        self.register_buffer("label_std", std.clone())
        self.net = nn.Sequential(nn.Linear(n, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, self.n_pixels))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Flux for *standardized* labels ``z`` (N, L)."""
        return self.net(z)

    def standardize(self, labels: torch.Tensor) -> torch.Tensor:
        return (labels - self.label_mean) / self.label_std

    def flux(self, labels: np.ndarray) -> np.ndarray:
        """Model flux (N, P) float32 for labels in physical units (N, L)."""
        with torch.no_grad():
            x = torch.as_tensor(np.ascontiguousarray(np.atleast_2d(labels)), dtype=torch.float32,
                                device=self.label_mean.device)
            return self(self.standardize(x)).cpu().numpy()

    def config(self) -> dict[str, Any]:
        """Plain constructor arguments (for a weights-only checkpoint)."""
        return {"label_names": self.label_names, "n_pixels": self.n_pixels, "hidden": self.hidden,
                "label_mean": self.label_mean.tolist(), "label_std": self.label_std.tolist(), "grid": self.grid}


def emulator_state(model: SpectrumEmulator, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """``{"config", "state_dict", **extra}`` with tensors and plain containers only (weights_only-safe)."""
    return {"config": model.config(), "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            **(extra or {})}


def emulator_from_state(state: dict[str, Any]) -> SpectrumEmulator:
    """Rebuild a :class:`SpectrumEmulator` (eval mode) from :func:`emulator_state`'s dict (strict)."""
    if not isinstance(state, dict) or "config" not in state or "state_dict" not in state:
        raise ValueError("not a spectrum-emulator state: expected a dict with 'config' and 'state_dict'")
    model = SpectrumEmulator(**state["config"])
    model.load_state_dict(state["state_dict"], strict=True)
    return model.eval()
