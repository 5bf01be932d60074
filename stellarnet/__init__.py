"""stellarnet: stellar parameters and classes from APOGEE spectra.

``stellarnet.load_model(path)`` returns a :class:`~stellarnet.network.inference.Predictor` with
``.predict(flux, flux_err, photometry=None)``.
"""

from __future__ import annotations

from typing import Any

from stellarnet.common.version import __version__

__all__ = ["load_model", "__version__"]


def __getattr__(name: str) -> Any:  # lazy: importing stellarnet must not import torch
    if name == "load_model":
        from stellarnet.network.model_folder import load_model

        return load_model
    raise AttributeError(f"module 'stellarnet' has no attribute {name!r}")
