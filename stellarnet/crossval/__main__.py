"""``python -m stellarnet.crossval``: the entry point (library: :mod:`stellarnet.crossval.run`)."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from stellarnet.common.errors import report_errors
from stellarnet.common.paths import CONF_DIR
from stellarnet.crossval.run import run_crossval


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="crossval")
@report_errors
def main(cfg: DictConfig) -> None:
    out = cfg.get("output_dir") or cfg.paths.output_dir
    report = run_crossval(cfg, out)
    for ref_name, res in report["references"].items():
        m = res["match"]
        print(f"{report['survey']} vs {ref_name}: {m['n_matched']} matched of {m['n_apogee']} APOGEE / "
              f"{m['n_survey']} {report['survey']} stars")
        for r in res["comparison"]["offsets"]:
            print(f"  Δ{r['label']}: median {r['median']:.4g} ± {r['median_err']:.2g} {r['unit']}, "
                  f"scatter {r['scatter']:.3g} (n={r['n']})")
    print(f"report: {Path(out) / 'crossval_report.md'}")


if __name__ == "__main__":
    main()
