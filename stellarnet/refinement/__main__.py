"""``python -m stellarnet.refinement``: the entry point (library: :mod:`stellarnet.workflows.refinement`)."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from stellarnet.common.errors import report_errors
from stellarnet.common.paths import CONF_DIR
from stellarnet.workflows.refinement import build_refinement


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="refinement")
@report_errors
def main(cfg: DictConfig) -> None:
    if not cfg.get("ckpt_path"):
        raise ValueError("ckpt_path is required: python -m stellarnet.refinement ckpt_path=<model folder>")
    dataset = cfg.get("dataset_dir") or cfg.data.shards.out_dir
    summary = build_refinement(cfg.ckpt_path, dataset, cfg.refine, Path(cfg.paths.output_dir) / "tensorboard",
                               recalibrate=bool(cfg.get("recalibrate", False)))
    print({k: summary[k] for k in ("sigma_scale", "sigma_network_scale", "val_refined_fraction", "val_mae_network_vs_catalogue",
                                   "val_mae_refined_vs_catalogue", "seconds")})


if __name__ == "__main__":
    main()
