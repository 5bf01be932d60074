"""Entry point: ``python -m stellarnet.evaluate ckpt_path=... [split=test]`` (library:
:func:`stellarnet.workflows.evaluate.evaluate`, importable from here as well)."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from stellarnet.common.errors import report_errors
from stellarnet.common.paths import CONF_DIR
from stellarnet.workflows.evaluate import evaluate


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="evaluate")
@report_errors
def main(cfg: DictConfig) -> None:
    report, paths = evaluate(cfg)
    print(Path(paths["markdown"]).read_text())


if __name__ == "__main__":
    main()
