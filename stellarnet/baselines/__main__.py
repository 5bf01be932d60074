"""``python -m stellarnet.baselines``: the entry point (library: :mod:`stellarnet.workflows.baselines`)."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from stellarnet.common.errors import report_errors
from stellarnet.common.paths import CONF_DIR
from stellarnet.workflows.baselines import baselines


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="baselines")
@report_errors
def main(cfg: DictConfig) -> None:
    results, paths = baselines(cfg)
    print(Path(paths["markdown"]).read_text())


if __name__ == "__main__":
    main()
