"""The engineered feature table of a shard dataset, as a library function (``python -m stellarnet.build_features``)."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from stellarnet.dataset.ensure import ensure_shards, resolve_survey
from stellarnet.features.tabular import build_feature_table, default_output_path, write_features
from stellarnet.io.catalogs import read_allstar

log = logging.getLogger(__name__)


def features_output_path(cfg: DictConfig) -> Path:
    """Where the table goes: ``features_path``, else ``features.output``, else the default."""
    explicit = cfg.get("features_path") or cfg.features.get("output")
    if explicit:
        return Path(explicit)
    return default_output_path(str(cfg.features.get("survey", "apogee")), cfg.paths.data_dir)


def build_features(cfg: DictConfig) -> tuple[pd.DataFrame, Path]:
    """Build (shards if needed, then) the feature table; returns (table, parquet path)."""
    data = OmegaConf.to_container(cfg.data, resolve=True)
    if cfg.get("dataset_dir"):
        dataset = Path(cfg.dataset_dir)
    else:
        ensure_shards(data)
        dataset = Path(cfg.data.shards.out_dir)
    allstar, _ = resolve_survey(data)
    table = build_feature_table(read_allstar(allstar), dataset, OmegaConf.to_container(cfg.features, resolve=True))
    path = write_features(table, features_output_path(cfg))
    log.info("feature table: %d stars x %d columns -> %s", len(table), table.shape[1], path)
    return table, path
