"""Entry point: ``python -m stellarnet.baselines +experiment=apogee [ckpt_path=<network checkpoint>]``.

Fits the tree baselines (XGBoost, LightGBM, random forest, ...) on the same shards and splits as
the network and writes one comparison table (markdown + JSON) and a comparison figure to the run
directory. With ``ckpt_path`` the network is scored on the same test split and joins the table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from stellarnet.data.shards import load_manifest
from stellarnet.eval.figures import method_comparison_figure, save_figure
from stellarnet.eval.network import load_split, network_report
from stellarnet.eval.report import comparison_table, write_report
from stellarnet.models.trees import run_baselines
from stellarnet.paths import CONF_DIR
from stellarnet.workflow import ensure_shards


def baselines(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Path]]:
    """Fit and score the configured baselines (and the network if ``ckpt_path``)."""
    if cfg.get("dataset_dir"):
        dataset = Path(cfg.dataset_dir)
    else:
        ensure_shards(OmegaConf.to_container(cfg.data, resolve=True))
        dataset = Path(cfg.data.shards.out_dir)
    manifest = load_manifest(dataset)
    meta = {"label_names": manifest["label_names"], "class_tasks": list(manifest["class_tasks"]),
            "class_names": manifest["class_tasks"]}
    splits = {s: {**load_split(dataset, s), **meta} for s in ("train", "val", "test")}
    bcfg = OmegaConf.to_container(cfg.baselines, resolve=True)
    results: dict[str, Any] = {}
    if cfg.get("ckpt_path"):
        from stellarnet.models.inference import load_model

        report, _, _ = network_report(load_model(cfg.ckpt_path), dataset, split="test", calib_split=None,
                                      mc_samples=0, eval_cfg=bcfg.get("eval"))
        results["stellarnet"] = report
    results.update(run_baselines(splits["train"], splits["val"], splits["test"], bcfg))
    out_dir = Path(cfg.get("output_dir") or cfg.paths.output_dir)
    table = comparison_table(results)
    paths = write_report(results, out_dir, "baselines", markdown="# Baselines vs network (test split)\n\n" + table)
    fig = method_comparison_figure(results)
    paths["figure"] = save_figure(fig, out_dir / "figures" / "baselines_comparison.png")
    return results, paths


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="baselines")
def main(cfg: DictConfig) -> None:
    results, paths = baselines(cfg)
    print(Path(paths["markdown"]).read_text())


if __name__ == "__main__":
    main()
