"""CLI: ``python -m stellarnet.simulate root=... n_stars=... seed=...`` (Hydra, config
``stellarnet/conf/simulate.yaml``; works from any working directory)."""

from __future__ import annotations

import json

import hydra
from omegaconf import DictConfig, OmegaConf

from stellarnet.common.errors import report_errors
from stellarnet.common.paths import CONF_DIR


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="simulate")
@report_errors
def main(cfg: DictConfig) -> None:
    from stellarnet.simulate.survey import simulate_survey

    c = OmegaConf.to_container(cfg, resolve=True)
    paths = simulate_survey(
        root=c["root"], n_stars=int(c["n_stars"]), seed=int(c["seed"]), spectra=bool(c["spectra"]),
        mix=c["mix"], stars_per_field=int(c["stars_per_field"]), dup_fraction=float(c["dup_fraction"]),
        external=bool(c["external"]), galah_fraction=float(c["galah_fraction"]),
        lamost_fraction=float(c["lamost_fraction"]), offsets=c["offsets"] or None, chunk=int(c["chunk"]),
        threads=int(c["threads"]), write_threads=int(c["write_threads"]), progress=bool(c["progress"]),
        overwrite=bool(c["overwrite"]), shift=c.get("shift") or None,
    )
    info = json.loads(paths["simulation"].read_text())
    print(json.dumps({"root": str(paths["root"]), "counts": info.get("counts"), "timing": info.get("timing")}, indent=2))


if __name__ == "__main__":
    main()
