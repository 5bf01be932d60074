"""Entry point: ``python -m stellarnet.build_features`` (library: :func:`stellarnet.workflows.features.build_features`)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from stellarnet.common.errors import report_errors
from stellarnet.common.paths import CONF_DIR
from stellarnet.workflows.features import build_features


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="build_features")
@report_errors
def main(cfg: DictConfig) -> None:
    table, path = build_features(cfg)
    stats = table.attrs.get("feature_stats") or {}
    n_out = int((table["N_OUTLIERS"] > 0).sum()) if "N_OUTLIERS" in table else 0
    print(f"{len(table)} stars, {len(stats.get('features', []))} features "
          f"({n_out} stars with outlier flags) → {path}")


if __name__ == "__main__":
    main()
