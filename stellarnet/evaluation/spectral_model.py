"""The spectral model the Cramér–Rao bound is computed with.

The Kurucz emulator (``stellarnet.physics.kurucz``, a physical model shipped in
``data/reference``) followed by the same continuum normalization the survey files carry
(``continuum_normalize(..., grid="dr12")`` on the Cannon continuum pixels, unit weights — see
``stellarnet.simulate.instrument``; the smooth per-chip instrument throughput of the simulation is
a nuisance the normalization removes and is not modelled).

The Kurucz model is physics (:mod:`stellarnet.physics`), not the simulator: evaluation never imports
``stellarnet.simulate``. :mod:`stellarnet.evaluation.crlb` takes the model function and its label box
as arguments. Used by
``python -m stellarnet.evaluate`` (the ``crlb`` section of the report) and ``scripts/crlb.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from stellarnet.evaluation.fisher import ModelFn
from stellarnet.physics.kurucz import LABEL_NAMES, KuruczEmulator, load_emulator
from stellarnet.preparation.spectra import continuum_normalize

__all__ = ["MODEL_GRID", "SpectralModel", "emulator_model", "make_model_fn"]

MODEL_GRID = "dr12"  # the emulator's 7,214-pixel grid


def make_model_fn(emu: KuruczEmulator) -> ModelFn:
    """``labels (N, 4) [K, dex, dex, dex] -> continuum-normalized model flux (N, 7214)`` float64:
    emulator spectrum divided by its per-chip quadratic Chebyshev continuum fitted on the dr12
    continuum pixels (unit weights), as the simulated survey files are normalized."""

    def model_fn(labels: np.ndarray) -> np.ndarray:
        raw = emu(np.asarray(labels, np.float64), check_box=False).astype(np.float64)
        norm, _, _ = continuum_normalize(raw, np.ones_like(raw), None, grid=MODEL_GRID)
        return norm

    return model_fn


@dataclass(frozen=True)
class SpectralModel:
    """A model function for :mod:`stellarnet.evaluation.crlb` with its labels, label box and grid."""

    fn: ModelFn
    label_names: tuple[str, ...]
    lower: np.ndarray
    upper: np.ndarray
    grid: str
    name: str
    emulator: Any = None

    @property
    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        return self.lower, self.upper


def emulator_model() -> SpectralModel:
    """The reference Kurucz emulator + continuum normalization, box = the emulator's label box."""
    emu = load_emulator()
    return SpectralModel(fn=make_model_fn(emu), label_names=tuple(LABEL_NAMES), lower=np.asarray(emu.x_min),
                         upper=np.asarray(emu.x_max), grid=MODEL_GRID,
                         name="Kurucz emulator + per-chip continuum normalization (dr12 grid)", emulator=emu)
