"""Where the package finds its reference data and configuration."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]
CONF_DIR = PACKAGE_DIR / "conf"
RESOURCES_DIR = PACKAGE_DIR / "resources"


def resource(name: str) -> Path:
    """Path of a reference file shipped with the package (``data/reference`` in a checkout)."""
    p = RESOURCES_DIR / name
    if not p.exists():
        raise FileNotFoundError(f"reference file {name!r} not found in {RESOURCES_DIR}")
    return p


def default_data_root() -> Path:
    """Root for generated data (simulated survey, shards): $STELLARNET_DATA or ./data."""
    return Path(os.environ.get("STELLARNET_DATA", "data")).resolve()
