"""Entry point: ``python -m stellarnet.build_shards [data.survey.allstar=...] [data.shards.grid=dr17]``.

Builds (or resumes) the HDF5 shard dataset configured under ``data`` and prints the cut report.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from stellarnet.errors import report_errors
from stellarnet.paths import CONF_DIR
from stellarnet.workflow import ensure_shards


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
@report_errors
def main(cfg: DictConfig) -> None:
    manifest = ensure_shards(OmegaConf.to_container(cfg.data, resolve=True))
    print(f"dataset: {cfg.data.shards.out_dir}")
    print("rows per split:", manifest["split_rows"])
    for row in manifest["cut_report"]:
        print(row)


if __name__ == "__main__":
    main()
