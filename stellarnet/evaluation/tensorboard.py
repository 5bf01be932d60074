"""Validation figures in TensorBoard while a network trains: predicted vs true per label and a
confusion matrix per class task, drawn by :mod:`stellarnet.evaluation.figures` (the same figures as
the evaluation report) from the validation outputs the LightningModule gathered over all ranks."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import numpy as np

from stellarnet.evaluation.figures import confusion_matrix_figure, one_to_one_figure
from stellarnet.evaluation.metrics import confusion_matrix


class ValidationFigures(pl.Callback):
    """Logs ``val/pred_vs_true`` and ``val/confusion_<task>`` to the TensorBoard logger on rank 0,
    every ``pl_module.figure_every_n_epochs`` epochs and at the last one, when the module's
    ``log_figures`` is set (both are model hyper-parameters)."""

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        outputs = getattr(pl_module, "val_outputs", None)
        if not outputs or not getattr(pl_module, "log_figures", False) or trainer.sanity_checking:
            return
        last = trainer.max_epochs is not None and pl_module.current_epoch + 1 >= trainer.max_epochs
        due = (pl_module.current_epoch + 1) % int(pl_module.figure_every_n_epochs) == 0 or last
        tb = _tensorboard(trainer)
        if not due or tb is None or not trainer.is_global_zero:
            return
        step = int(pl_module.current_epoch)
        pred = np.where(outputs["label_mask"] > 0, outputs["labels_pred"], np.nan)
        tb.add_figure("val/pred_vs_true", one_to_one_figure(pred, outputs["labels_true"], list(pl_module.label_names),
                                                            max_points=5000), global_step=step)
        for task, names in pl_module.class_tasks.items():
            true = outputs["class_true"][task]
            ok = true >= 0
            cm = confusion_matrix(true[ok], outputs["class_probs"][task].argmax(1)[ok], len(names))
            tb.add_figure(f"val/confusion_{task}", confusion_matrix_figure(cm, names, title=task), global_step=step)


def _tensorboard(trainer: pl.Trainer) -> Any | None:
    from lightning.pytorch.loggers import TensorBoardLogger

    for lg in trainer.loggers or []:
        if isinstance(lg, TensorBoardLogger):
            return lg.experiment
    return None
