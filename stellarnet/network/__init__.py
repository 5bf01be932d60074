"""The network: encoders, heads, losses, augmentation, the LightningModule, the Predictor and prediction on Lightning.

Models never read survey files; they consume the batch dict documented in ``docs/architecture.md``.
"""

from stellarnet.network.encoders import PhotometryMLP, SpectralConvEncoder
from stellarnet.network.epoch_metrics import compute_metrics
from stellarnet.network.heads import ClassificationHead, HeteroscedasticHead, TrunkMLP
from stellarnet.network.inference import Predictor
from stellarnet.network.losses import classification_loss, gaussian_nll
from stellarnet.network.model_folder import CheckpointError, load_model, load_module, save_model_folder
from stellarnet.network.module import StellarNetModule

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
