"""Entry point: ``python -m stellarnet.evaluate ckpt_path=... [split=test]``.

Scores a checkpoint on a split of the shard dataset: regression metrics (overall, per S/N bin,
per stage), σ calibration, classification metrics; writes ``evaluation.md/json`` and PNG figures
to the run directory and logs the figures to TensorBoard.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from stellarnet.eval.figures import write_standard_figures
from stellarnet.eval.network import network_report
from stellarnet.eval.report import report_to_markdown, write_report
from stellarnet.models.inference import load_model
from stellarnet.paths import CONF_DIR


def evaluate(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Path]]:
    """Evaluate ``cfg.ckpt_path`` on ``cfg.split`` of ``cfg.dataset_dir`` (default: the configured shards)."""
    if not cfg.get("ckpt_path"):
        raise ValueError("ckpt_path is required: python -m stellarnet.evaluate ckpt_path=<.ckpt or model folder>")
    predictor = load_model(cfg.ckpt_path)
    dataset = cfg.get("dataset_dir") or cfg.data.shards.out_dir
    out_dir = Path(cfg.get("output_dir") or cfg.paths.output_dir)
    report, pred, data = network_report(predictor, dataset, split=cfg.split, calib_split=cfg.get("calib_split"),
                                        mc_samples=int(cfg.mc_samples), batch_size=int(cfg.batch_size),
                                        eval_cfg=OmegaConf.to_container(cfg.eval, resolve=True))
    report["meta"].update({"checkpoint": str(cfg.ckpt_path), "dataset": str(dataset)})
    paths = write_report(report, out_dir, "evaluation", markdown=report_to_markdown(report, "stellarnet network"))
    figures = write_standard_figures(out_dir / "figures", pred["labels"], data["labels"],
                                     predictor.label_names, snr=data["snr"], report=report)
    try:
        from matplotlib.image import imread
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(str(out_dir / "tensorboard")) as tb:
            for name, path in figures.items():
                tb.add_image(f"evaluation/{name}", imread(path), dataformats="HWC")
    except ImportError:  # pragma: no cover - tensorboard is a dependency
        pass
    return report, {**paths, **figures}


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="evaluate")
def main(cfg: DictConfig) -> None:
    report, paths = evaluate(cfg)
    print(Path(paths["markdown"]).read_text())


if __name__ == "__main__":
    main()
