"""Entry point: ``python -m stellarnet.build_shards [data.survey.allstar=...] [data.shards.grid=dr17]``.

Builds (or resumes) the HDF5 shard dataset configured under ``data`` and prints the cut report.
``data.shards.n_workers`` reader processes on one machine; ``trainer=ddp trainer.devices=N
[trainer.num_nodes=M]`` (as training and prediction are launched, e.g. ``srun`` on SLURM) builds on
N × M processes with ``Trainer.predict``, each with its own shards (docs/scaling.md).
"""

from __future__ import annotations

import hydra
import hydra.utils
from omegaconf import DictConfig, OmegaConf

from stellarnet.common.errors import report_errors
from stellarnet.common.paths import CONF_DIR
from stellarnet.dataset.ensure import ensure_shards


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
@report_errors
def main(cfg: DictConfig) -> None:
    trainer = None
    if "ddp" in str(cfg.trainer.get("strategy") or ""):  # a multi-process launch: Lightning spreads the shards
        trainer = hydra.utils.instantiate(cfg.trainer, logger=False, callbacks=[], enable_model_summary=False,
                                          enable_checkpointing=False, enable_progress_bar=False)
    manifest = ensure_shards(OmegaConf.to_container(cfg.data, resolve=True), trainer=trainer)
    if manifest is None:  # a rank other than 0: rank 0 wrote the manifest and reports it
        return
    print(f"dataset: {cfg.data.shards.out_dir}")
    print("rows per split:", manifest["split_rows"])
    for row in manifest["cut_report"]:
        print(row)


if __name__ == "__main__":
    main()
