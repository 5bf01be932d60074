"""Entry point: ``python -m stellarnet.train +experiment=apogee`` (library: :func:`stellarnet.workflows.train.train`,
``train(cfg) -> (metrics, objects)``, importable from here as well)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from stellarnet.common.errors import report_errors
from stellarnet.common.paths import CONF_DIR
from stellarnet.workflows.train import train


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
@report_errors
def main(cfg: DictConfig) -> float | None:
    metrics, _ = train(cfg)
    value = metrics.get(cfg.get("optimized_metric"))
    return float(value) if value is not None else None


if __name__ == "__main__":
    main()
