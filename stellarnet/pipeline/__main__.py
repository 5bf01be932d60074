"""``python -m stellarnet.pipeline +experiment=apogee``: the whole study in one command (library:
:mod:`stellarnet.pipeline.run`)."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from stellarnet.common.errors import report_errors
from stellarnet.common.paths import CONF_DIR
from stellarnet.pipeline.run import run_pipeline


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="pipeline")
@report_errors
def main(cfg: DictConfig) -> None:
    run_pipeline(cfg)
    print()
    print((Path(str(cfg.pipeline_dir)).resolve() / "summary.md").read_text())


if __name__ == "__main__":
    main()
