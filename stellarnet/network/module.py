"""The multitask LightningModule: spectra (+ photometry) -> labels with σ, and stellar classes.

``StellarNetModule`` takes only plain Python containers, so ``save_hyperparameters()`` stores plain
dicts/lists/numbers and every checkpoint loads with ``torch.load(..., weights_only=True)``.
Sub-networks are described by ``_target_`` dicts (Hydra style) and built inside the module with
``hydra.utils.instantiate``; their size arguments (``n_pixels``, ``n_features``, ``in_dim``,
``n_labels``, ``n_classes``) are filled in from ``data_spec``, so configs never repeat them.

Multi-device (DDP) runs: validation and test outputs are gathered from every rank at the end of the
epoch (``torch.distributed.all_gather_object``), the duplicates ``DistributedSampler`` pads the
last ranks with are dropped by the batch ``index`` (row index in the split), and the metrics are
computed once on the whole split, identically on every rank. Every rank therefore logs the same
metric names in the same order (a collective ``sync_dist`` reduction would hang otherwise), and a
non-finite training loss is a collective decision (all ranks skip, or all raise, together).

Inputs are the batch dict of ``docs/architecture.md``; the network works in standardized label
units, and everything it reports (logged metrics, ``test_outputs``, :meth:`predict_batch`) is in
physical units (K for TEFF, dex for LOGG / FE_H / ALPHA_FE) using ``data_spec["label_mean"/"label_std"]``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from stellarnet.common.files import to_plain
from stellarnet.network.components import DEFAULT_NET, _build, dropout_only, has_dropout, validate_data_spec
from stellarnet.network.ddp import all_ranks_agree, gather_outputs, is_distributed
from stellarnet.network.epoch_metrics import collect_batch, compute_metrics, concat_outputs, loggable_metrics
from stellarnet.network.losses import multitask_loss, nonfinite_loss_message
from stellarnet.network.optim import make_optimizer, make_scheduler, restretch_schedule, schedule_steps

log = logging.getLogger(__name__)


NAN_POLICIES = ("skip", "raise")


# ----------------------------------------------------------------------------------------------
# the module
# ----------------------------------------------------------------------------------------------
class StellarNetModule(pl.LightningModule):
    """Multitask network: spectral CNN (+ photometry MLP) -> fusion trunk -> heads.

    Args:
        net: component configs (``_target_`` dicts, targets must be in ``stellarnet``), keys
            ``spectral_encoder``, ``photometry`` (``None``: no photometry branch), ``trunk``,
            ``regression_head``, ``classification_head`` (one head per task is built from it).
            Missing keys fall back to :data:`DEFAULT_NET`. Size arguments are filled in here.
        data_spec: dataset description from the shard manifest: ``grid``, ``n_pixels``,
            ``wavelength`` (Å), ``label_names``, ``label_units``, ``label_mean``/``label_std``
            (physical units), ``phot_features``, ``phot_mean``/``phot_std``, ``class_tasks``
            ({task: [class names]}, key order = column order of ``batch["classes"]``),
            ``class_weights`` ({task: [K floats]}, optional).
        loss_weights: ``{"regression": w, <task>: w, ...}``; missing entries are 1.0.
            Total loss = w_regression · NLL + Σ_task w_task · CE.
        optimizer: AdamW settings ``{"lr", "weight_decay", "betas", "eps"}`` (weight decay is not
            applied to biases and normalization parameters).
        scheduler: ``None`` / ``{"name": "none"}``, ``{"name": "onecycle", "max_lr", "pct_start",
            "div_factor", "final_div_factor"}`` or ``{"name": "cosine", "warmup_steps", "eta_min"}``;
            stepped every optimizer step over ``trainer.estimated_stepping_batches``.
        mc_dropout_samples: MC-dropout passes used in ``test_step``/``predict_step`` for the
            epistemic σ (0: none).
        nan_policy: ``"skip"`` (warn and skip the optimizer step on a non-finite training loss) or
            ``"raise"`` (``FloatingPointError``). A skipped batch leaves the weights and the batch-norm
            statistics untouched (Lightning still counts the optimizer step). With DDP the decision is
            collective: when the loss is non-finite on any rank, every rank skips that batch (or
            raises), so the ranks never disagree about the gradient all-reduce or the logged metrics.
        log_figures: log pred-vs-true and confusion-matrix figures to TensorBoard at the end of
            validation epochs (~0.3 s per epoch; only with a TensorBoardLogger, only on rank 0; drawn by
            the :class:`stellarnet.evaluation.tensorboard.ValidationFigures` callback, ``conf/callbacks``).
        figure_every_n_epochs: log the figures every n-th epoch (and always on the last one).
        augment: keyword arguments of :class:`stellarnet.network.augment.SpectrumAugment` (training-time
            domain randomization of the spectra: continuum, outlier pixels, error convention, radial
            velocity, LSF); None or ``{"enabled": false}``: none. Never applied outside training.

    The learning rate is *not* logged here: add ``LearningRateMonitor(logging_interval="step")``.
    """

    def __init__(
        self,
        net: dict[str, Any] | None = None,
        data_spec: dict[str, Any] | None = None,
        loss_weights: dict[str, float] | None = None,
        optimizer: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
        mc_dropout_samples: int = 0,
        nan_policy: str = "skip",
        log_figures: bool = True,
        figure_every_n_epochs: int = 1,
        augment: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if data_spec is None:
            raise ValueError("StellarNetModule needs data_spec (from the shard manifest)")
        net = to_plain(net or {}, "net")
        data_spec = to_plain(data_spec, "data_spec")
        loss_weights = to_plain(loss_weights or {}, "loss_weights")
        optimizer = to_plain(optimizer or {}, "optimizer")
        scheduler = to_plain(scheduler, "scheduler")
        augment = to_plain(augment, "augment")
        if nan_policy not in NAN_POLICIES:
            raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")
        validate_data_spec(data_spec)
        unknown = set(net) - set(DEFAULT_NET)
        if unknown:
            raise ValueError(f"unknown net components {sorted(unknown)}; expected {sorted(DEFAULT_NET)}")
        self.save_hyperparameters(
            {
                "net": net,
                "data_spec": data_spec,
                "loss_weights": loss_weights,
                "optimizer": optimizer,
                "scheduler": scheduler,
                "mc_dropout_samples": int(mc_dropout_samples),
                "nan_policy": nan_policy,
                "log_figures": bool(log_figures),
                "figure_every_n_epochs": int(figure_every_n_epochs),
                "augment": augment,
            }
        )
        self.data_spec = data_spec
        self.label_names: list[str] = list(data_spec["label_names"])
        self.label_units: list[str] = list(data_spec.get("label_units") or [""] * len(self.label_names))
        self.phot_features: list[str] = list(data_spec.get("phot_features") or [])
        self.class_tasks: dict[str, list[str]] = {t: list(v) for t, v in (data_spec.get("class_tasks") or {}).items()}
        self.n_pixels = int(data_spec["n_pixels"])
        self.grid = data_spec.get("grid")
        self.nan_policy = nan_policy
        self.mc_dropout_samples = int(mc_dropout_samples)
        self.log_figures = bool(log_figures)
        self.figure_every_n_epochs = max(int(figure_every_n_epochs), 1)
        self.optimizer_cfg = optimizer
        self.scheduler_cfg = scheduler
        tasks = set(self.class_tasks)
        bad = set(loss_weights) - tasks - {"regression"}
        if bad:
            raise ValueError(f"loss_weights has unknown keys {sorted(bad)}; use 'regression' and {sorted(tasks)}")
        self.loss_weights = {"regression": float(loss_weights.get("regression", 1.0))}
        self.loss_weights.update({t: float(loss_weights.get(t, 1.0)) for t in self.class_tasks})

        # statistics (not persistent: they are part of the hyper-parameters)
        self.register_buffer("label_mean", torch.tensor(data_spec["label_mean"], dtype=torch.float32), persistent=False)
        self.register_buffer("label_std", torch.tensor(data_spec["label_std"], dtype=torch.float32), persistent=False)
        self._class_weight_names: dict[str, str] = {}
        for task, w in (data_spec.get("class_weights") or {}).items():
            if w is not None:
                name = f"class_weight_{task}"
                self.register_buffer(name, torch.tensor(w, dtype=torch.float32), persistent=False)
                self._class_weight_names[task] = name

        comp = {k: net.get(k, DEFAULT_NET[k]) for k in DEFAULT_NET}
        self.spectral_encoder = _build(comp["spectral_encoder"], "net.spectral_encoder", n_pixels=self.n_pixels)
        feat_dim = self.spectral_encoder.out_dim
        self.photometry_encoder: nn.Module | None = None
        if comp["photometry"] is not None and self.phot_features:
            self.photometry_encoder = _build(comp["photometry"], "net.photometry", n_features=len(self.phot_features))
            feat_dim += self.photometry_encoder.out_dim
        self.trunk = _build(comp["trunk"], "net.trunk", in_dim=feat_dim)
        self.regression_head = _build(
            comp["regression_head"], "net.regression_head", in_dim=self.trunk.out_dim, n_labels=len(self.label_names)
        )
        self.class_heads = nn.ModuleDict(
            {
                task: _build(comp["classification_head"], "net.classification_head", in_dim=self.trunk.out_dim, n_classes=len(names))
                for task, names in self.class_tasks.items()
            }
        )

        aug = dict(augment or {})
        self.augment: nn.Module | None = None
        if aug.pop("enabled", True) and augment:
            from stellarnet.network.augment import SpectrumAugment

            self.augment = SpectrumAugment(self.n_pixels, **aug)

        self.n_skipped_batches = 0
        self._val_store: list[dict[str, Any]] = []
        self._test_store: list[dict[str, Any]] = []
        self.val_outputs: dict[str, Any] = {}
        self.test_outputs: dict[str, Any] = {}
        self.test_metrics: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------------
    # forward / prediction
    # ------------------------------------------------------------------------------------------
    def forward(
        self,
        flux: torch.Tensor,
        flux_err: torch.Tensor,
        pix_mask: torch.Tensor,
        photometry: torch.Tensor | None = None,
        phot_mask: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        """Run the network.

        Args:
            flux, flux_err, pix_mask: (B, P) as in the batch dict.
            photometry, phot_mask: (B, F) standardized features and presence mask; ``None`` means no
                photometry for any star (ignored when the model has no photometry branch).

        Returns:
            ``{"mean": (B, L), "log_var": (B, L), "logits": {task: (B, K)}}`` in standardized units.
        """
        return self._heads(self._spectral_stage1(flux, flux_err, pix_mask), photometry, phot_mask)

    def _spectral_stage1(self, flux: torch.Tensor, flux_err: torch.Tensor, pix_mask: torch.Tensor) -> torch.Tensor:
        """Deterministic (dropout-free) spectral features when the encoder splits them out, else the full encoding."""
        enc = self.spectral_encoder
        if hasattr(enc, "conv_features") and hasattr(enc, "project"):
            return enc.conv_features(flux, flux_err, pix_mask)
        return enc(flux, flux_err, pix_mask)

    def _heads(
        self, stage1: torch.Tensor, photometry: torch.Tensor | None, phot_mask: torch.Tensor | None
    ) -> dict[str, Any]:
        enc = self.spectral_encoder
        feats = [enc.project(stage1) if hasattr(enc, "conv_features") and hasattr(enc, "project") else stage1]
        if self.photometry_encoder is not None:
            if photometry is None or phot_mask is None:
                nf = len(self.phot_features)
                photometry = stage1.new_zeros(stage1.shape[0], nf)
                phot_mask = stage1.new_zeros(stage1.shape[0], nf)
            feats.append(self.photometry_encoder(photometry, phot_mask))
        h = self.trunk(torch.cat(feats, dim=1) if len(feats) > 1 else feats[0])
        mean, log_var = self.regression_head(h)
        return {"mean": mean, "log_var": log_var, "logits": {t: head(h) for t, head in self.class_heads.items()}}

    def _forward_batch(self, batch: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        return self(batch["flux"], batch["flux_err"], batch["pix_mask"], batch.get("photometry"), batch.get("phot_mask"))

    def mc_dropout(self) -> contextlib.AbstractContextManager[None]:
        """Context in which only the ``nn.Dropout`` layers are in training mode (MC dropout)."""
        return dropout_only(self)

    @property
    def has_mc_dropout(self) -> bool:
        """Whether MC dropout can sample anything: some ``nn.Dropout`` layer has ``p > 0``."""
        return has_dropout(self)

    def predict_batch(
        self,
        flux: torch.Tensor,
        flux_err: torch.Tensor,
        pix_mask: torch.Tensor,
        photometry: torch.Tensor | None = None,
        phot_mask: torch.Tensor | None = None,
        mc_samples: int = 0,
    ) -> dict[str, Any]:
        """Predictions in physical units for one batch (call in eval mode, under no_grad/inference_mode).

        ``labels`` and ``sigma_aleatoric`` come from the deterministic (eval-mode) pass, so they do
        not depend on ``mc_samples``; ``sigma_epistemic`` is the standard deviation of the predicted
        means over ``mc_samples`` passes with dropout on (zeros if ``mc_samples`` < 2, or if the model
        has no dropout to sample: :attr:`has_mc_dropout`, and then the passes are skipped);
        ``sigma_total = sqrt(ale² + epi²)``. Units: those of ``data_spec["label_units"]``.

        Returns:
            ``{"labels", "sigma_aleatoric", "sigma_epistemic", "sigma_total"}`` (B, L) tensors and
            ``"class_probs"`` ``{task: (B, K)}``.
        """
        stage1 = self._spectral_stage1(flux, flux_err, pix_mask)  # the convolutions run once
        out = self._heads(stage1, photometry, phot_mask)
        std = self.label_std
        labels = out["mean"] * std + self.label_mean
        ale = torch.exp(0.5 * out["log_var"]) * std
        epi = torch.zeros_like(ale)
        if mc_samples >= 2 and self.has_mc_dropout:
            with self.mc_dropout():
                means = torch.stack([self._heads(stage1, photometry, phot_mask)["mean"] for _ in range(mc_samples)])
            epi = means.std(dim=0, unbiased=True) * std
        return {
            "labels": labels,
            "sigma_aleatoric": ale,
            "sigma_epistemic": epi,
            "sigma_total": torch.sqrt(ale**2 + epi**2),
            "class_probs": {t: torch.softmax(lg, dim=1) for t, lg in out["logits"].items()},
        }

    # ------------------------------------------------------------------------------------------
    # losses
    # ------------------------------------------------------------------------------------------
    def compute_loss(
        self, out: dict[str, Any], batch: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """Multitask loss (:func:`stellarnet.network.losses.multitask_loss`): ``(total, parts, per_label_nll)``."""
        weights = {task: getattr(self, name) for task, name in self._class_weight_names.items()}
        return multitask_loss(out, batch, self.loss_weights, list(self.class_tasks), weights)

    def _log_losses(self, stage: str, total: torch.Tensor, parts: dict[str, torch.Tensor], batch_size: int) -> None:
        on_step = stage == "train"
        self.log(f"{stage}/loss", total, on_step=on_step, on_epoch=True, prog_bar=True, batch_size=batch_size, sync_dist=True)
        for name, value in parts.items():
            self.log(f"{stage}/loss_{name}", value, on_step=on_step, on_epoch=True, batch_size=batch_size, sync_dist=True)

    # ------------------------------------------------------------------------------------------
    # training
    # ------------------------------------------------------------------------------------------
    def _norm_buffers(self) -> dict[str, torch.Tensor]:
        """Batch-norm running statistics (a forward pass in training mode updates them)."""
        return {
            n: b for n, b in self.named_buffers()
            if n.endswith(("running_mean", "running_var", "num_batches_tracked"))
        }

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        # snapshot the (small) batch-norm statistics so a skipped non-finite batch cannot poison them
        saved = {n: b.clone() for n, b in self._norm_buffers().items()} if self.nan_policy == "skip" else {}
        if self.augment is not None:  # domain randomization, training batches only
            flux, flux_err, pix_mask = self.augment(batch["flux"], batch["flux_err"], batch["pix_mask"])
            batch = {**batch, "flux": flux, "flux_err": flux_err, "pix_mask": pix_mask}
        out = self._forward_batch(batch)
        total, parts, _ = self.compute_loss(out, batch)
        finite_here = bool(torch.isfinite(total))
        if not self._all_ranks_agree(finite_here):  # with DDP: all ranks skip (or raise) together
            where = f"batch_idx={batch_idx} (epoch {self.current_epoch}, global step {self.global_step})"
            msg = (f"non-finite training loss on another rank at {where}" if finite_here
                   else nonfinite_loss_message(where, parts, out, batch))
            if self.nan_policy == "raise":
                raise FloatingPointError(msg)
            self.n_skipped_batches += 1
            with torch.no_grad():
                for n, b in self._norm_buffers().items():
                    b.copy_(saved[n])
            log.warning("%s; skipping this batch (nan_policy='skip')", msg)
            return None
        bs = batch["flux"].shape[0]
        self._log_losses("train", total, parts, bs)
        return total

    def _distributed(self) -> bool:
        """True inside a multi-process run with an initialized process group."""
        return is_distributed(self._trainer)

    def _all_ranks_agree(self, decision: bool) -> bool:
        """``decision`` AND-ed over all ranks (one small all-reduce; ``decision`` itself when single-process)."""
        return decision if not self._distributed() else all_ranks_agree(self.trainer, decision)

    # ------------------------------------------------------------------------------------------
    # validation / test
    # ------------------------------------------------------------------------------------------
    def _collect(self, batch: Mapping[str, torch.Tensor], pred: dict[str, Any]) -> dict[str, Any]:
        """Detach one batch of predictions and truths to CPU numpy, physical units."""
        return collect_batch(batch, pred, self.label_mean, self.label_std, self.class_tasks)

    def _gather_outputs(self, outputs: dict[str, Any]) -> dict[str, Any]:
        """This epoch's outputs of *all* ranks (:func:`stellarnet.network.ddp.gather_outputs`); single-process:
        ``outputs`` unchanged."""
        return gather_outputs(outputs) if self._distributed() else outputs

    def _eval_step(self, stage: str, batch: Mapping[str, torch.Tensor], mc_samples: int) -> torch.Tensor:
        out = self._forward_batch(batch)
        total, parts, per_label = self.compute_loss(out, batch)
        bs = batch["flux"].shape[0]
        self._log_losses(stage, total, parts, bs)
        for j, name in enumerate(self.label_names):
            self.log(f"{stage}/nll_{name}", per_label[j], on_epoch=True, batch_size=bs, sync_dist=True)
        pred = self.predict_batch(
            batch["flux"], batch["flux_err"], batch["pix_mask"], batch.get("photometry"), batch.get("phot_mask"), mc_samples
        ) if mc_samples >= 2 else self._pred_from_out(out)
        (self._val_store if stage == "val" else self._test_store).append(self._collect(batch, pred))
        return total

    def _pred_from_out(self, out: dict[str, Any]) -> dict[str, Any]:
        std = self.label_std
        ale = torch.exp(0.5 * out["log_var"]) * std
        return {
            "labels": out["mean"] * std + self.label_mean,
            "sigma_aleatoric": ale,
            "sigma_epistemic": torch.zeros_like(ale),
            "sigma_total": ale,
            "class_probs": {t: torch.softmax(lg, dim=1) for t, lg in out["logits"].items()},
        }

    def _log_metrics(self, stage: str, metrics: dict[str, Any]) -> None:
        """Log epoch metrics computed on the gathered outputs (hence identical on every rank).

        The names logged (:func:`stellarnet.network.epoch_metrics.loggable_metrics`) depend only on those
        gathered metrics, so every rank makes the same ``self.log`` calls in the same order, which the
        collective ``sync_dist`` reduction needs. ``reduce_fx="max"`` of equal values returns the value
        exactly (a mean over ranks could differ from it in the last bit).
        """
        for name, value in loggable_metrics(metrics, self.label_names, self.class_tasks):
            self.log(f"{stage}/{name}", value, sync_dist=True, reduce_fx="max")

    def on_validation_epoch_start(self) -> None:
        self._val_store = []

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._eval_step("val", batch, 0)

    def on_validation_epoch_end(self) -> None:
        self.val_outputs = self._gather_outputs(concat_outputs(self._val_store))
        self._val_store = []
        if not self.val_outputs:
            return
        metrics = compute_metrics(self.val_outputs, self.data_spec)
        self._log_metrics("val", metrics)
        # the figures (``log_figures``) are drawn by stellarnet.evaluation.tensorboard.ValidationFigures

    def on_test_epoch_start(self) -> None:
        self._test_store = []
        self.test_outputs = {}
        self.test_metrics = {}

    def test_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._eval_step("test", batch, self.mc_dropout_samples)

    def on_test_epoch_end(self) -> None:
        """Fill ``self.test_outputs`` (numpy, physical units) and ``self.test_metrics``.

        ``test_outputs`` keys: ``index`` (N,), ``labels_pred``, ``sigma_aleatoric``,
        ``sigma_epistemic``, ``sigma_total``, ``labels_true`` (NaN where missing), ``label_err``
        (NaN where missing), ``label_mask`` (bool) - all (N, L) - and ``class_probs`` {task: (N, K)},
        ``class_true`` {task: (N,) int, −1 missing}. On multi-device runs both are gathered from all
        ranks (every rank holds the whole split, each row once, sorted by ``index``).
        """
        self.test_outputs = self._gather_outputs(concat_outputs(self._test_store))
        self._test_store = []
        if self.test_outputs:
            self.test_metrics = compute_metrics(self.test_outputs, self.data_spec)
            self._log_metrics("test", self.test_metrics)

    def predict_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        """Physical-unit predictions (see :meth:`predict_batch`) plus the batch ``index``."""
        pred = self.predict_batch(
            batch["flux"], batch["flux_err"], batch["pix_mask"], batch.get("photometry"), batch.get("phot_mask"),
            self.mc_dropout_samples,
        )
        if "index" in batch:
            pred["index"] = batch["index"]
        return pred

    # ------------------------------------------------------------------------------------------
    # figures
    # ------------------------------------------------------------------------------------------
    # ------------------------------------------------------------------------------------------
    # optimization
    # ------------------------------------------------------------------------------------------
    def _schedule_steps(self) -> int:
        """Optimizer steps the learning-rate schedule spans (``trainer.estimated_stepping_batches``)."""
        return schedule_steps(self.scheduler_cfg, self.trainer)

    def _make_scheduler(self, opt: torch.optim.Optimizer, total: int) -> Any:
        """The learning-rate scheduler of ``scheduler_cfg`` over ``total`` optimizer steps (None: constant lr)."""
        return make_scheduler(opt, self.scheduler_cfg, total)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the schedule length, so a resumed run with another ``max_epochs`` can re-stretch it."""
        total = getattr(self, "_schedule_total", None)
        if total:
            checkpoint["stellarnet_schedule_total"] = int(total)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._restored_schedule_total = checkpoint.get("stellarnet_schedule_total")

    def on_train_start(self) -> None:
        """After a resume with a different run length, rebuild the learning-rate schedule for the new
        length and advance it to the restored step (:func:`stellarnet.network.optim.restretch_schedule`)."""
        restored = getattr(self, "_restored_schedule_total", None)
        self._restored_schedule_total = None
        new_total = restretch_schedule(self.trainer, self.scheduler_cfg, restored, self._schedule_steps())
        if new_total:
            self._schedule_total = new_total

    def configure_optimizers(self) -> Any:
        opt = make_optimizer(self.parameters(), self.optimizer_cfg)
        total = self._schedule_steps()
        scheduler = self._make_scheduler(opt, total)
        if scheduler is None:
            return opt
        self._schedule_total = total
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}
