"""Neural-network side of stellarnet: encoders, heads, losses, the LightningModule and inference.

Models never read survey files; they consume the batch dict documented in ``docs/architecture.md``.
"""

from stellarnet.models.encoders import PhotometryMLP, SpectralConvEncoder
from stellarnet.models.heads import ClassificationHead, HeteroscedasticHead, TrunkMLP
from stellarnet.models.inference import CheckpointError, Predictor, load_model, load_module, save_model_folder
from stellarnet.models.losses import classification_loss, gaussian_nll
from stellarnet.models.module import StellarNetModule, compute_metrics

__all__ = [
    "SpectralConvEncoder",
    "PhotometryMLP",
    "TrunkMLP",
    "HeteroscedasticHead",
    "ClassificationHead",
    "gaussian_nll",
    "classification_loss",
    "StellarNetModule",
    "compute_metrics",
    "CheckpointError",
    "Predictor",
    "load_model",
    "load_module",
    "save_model_folder",
]
