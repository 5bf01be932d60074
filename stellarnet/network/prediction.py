"""Prediction on Lightning's engine: the same launch that trains predicts (CPU, GPU, DDP on SLURM).

:class:`PredictionModule` wraps a :class:`~stellarnet.network.inference.Predictor` (network, χ²
refinement, calibrated σ, flags) as a ``LightningModule`` whose ``predict_step`` turns one chunk of
:class:`~stellarnet.dataset.chunks.ChunkDataset` into its catalogue rows; :class:`PartWriter` (a
``BasePredictionWriter``) writes them to ``part-<chunk>.npz`` as each chunk ends, in whichever
process made them. ``Trainer.predict(..., return_predictions=False)`` therefore holds one chunk per
process in memory, and a killed run leaves finished parts that the next run skips.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter

from stellarnet.dataset.chunks import as_numpy
from stellarnet.io.predictions import predictions_frame, write_part
from stellarnet.network.inference import Predictor

__all__ = ["PredictionModule", "PartWriter"]


class PredictionModule(L.LightningModule):
    """``predict_step(chunk) -> {"chunk_index", "frame"}`` with a :class:`Predictor`.

    The predictor's modules (network, its fused copy, the emulator) are registered here, so the
    Trainer moves them to its device (``accelerator: auto`` → the GPU when torch sees one).
    Chunk k's MC-dropout seed is ``seed + k``: the same numbers however the chunks are spread."""

    def __init__(self, predictor: Predictor, mc_samples: int = 0, batch_size: int = 128, seed: int | None = None):
        super().__init__()
        self.predictor = predictor
        self.network = predictor.module
        self.fused_network = predictor.net
        self.emulator = predictor.emulator
        self.mc_samples = int(mc_samples)
        self.batch_size = int(batch_size)
        self.seed = seed

    def transfer_batch_to_device(self, batch: Any, device: Any, dataloader_idx: int) -> Any:
        return batch  # the Predictor moves each batch of spectra to its device itself

    def predict_step(self, chunk: dict[str, Any], batch_idx: int = 0) -> dict[str, Any]:
        chunk = as_numpy(chunk)
        k = int(chunk["chunk_index"])
        p = self.predictor
        pred = p.predict(chunk["flux"], chunk["flux_err"], photometry=chunk["photometry"], pix_mask=chunk["pix_mask"],
                         mc_samples=self.mc_samples, batch_size=self.batch_size,
                         seed=None if self.seed is None else self.seed + k)
        return {"chunk_index": k, "frame": predictions_frame(chunk, pred, p.label_names, p.class_tasks)}


class PartWriter(BasePredictionWriter):
    """Write each chunk's rows to ``parts_dir/part-<chunk>.npz`` (atomically) as the chunk ends; at the
    end of the loop every process waits for the others (so that rank 0 can merge)."""

    def __init__(self, parts_dir: str | Path):
        super().__init__(write_interval="batch")
        self.parts_dir = Path(parts_dir)
        self.written = 0

    def write_on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: Any,
                           batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        write_part(self.parts_dir, prediction["chunk_index"], prediction["frame"])
        self.written += 1

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.strategy.barrier("stellarnet-predict-parts")
