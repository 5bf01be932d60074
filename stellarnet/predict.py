"""Entry point: ``python -m stellarnet.predict ckpt_path=... input=...`` (library:
:func:`stellarnet.workflows.predict.predict`, importable from here as well)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from stellarnet.common.errors import report_errors
from stellarnet.common.paths import CONF_DIR
from stellarnet.workflows.predict import predict


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="predict")
@report_errors
def main(cfg: DictConfig) -> None:
    summary, paths = predict(cfg)
    if not paths:  # a DDP rank other than 0: rank 0 merges and reports
        return
    print(f"{summary['stars']} stars ({summary['read_errors']} unreadable, {summary['flagged_bad']} with a bad "
          f"STELLARNET_FLAG bit) → {paths['fits']} and {paths['csv']}")


if __name__ == "__main__":
    main()
