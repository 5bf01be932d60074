"""Orchestration shared by the entry points: make sure the survey and its shards exist.

This is the only library module (besides the entry points) that may call the simulator, and only
when no real allStar is configured.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

from stellarnet.dataset.shards import build_shards

log = logging.getLogger(__name__)


def resolve_survey(data_cfg: Mapping[str, Any]) -> tuple[Path, Path]:
    """(allStar path, spectra root) of the configured survey, simulating it if none is configured."""
    survey = data_cfg["survey"]
    if survey.get("allstar"):
        allstar = Path(survey["allstar"])
        if not allstar.exists():
            raise FileNotFoundError(f"data.survey.allstar={allstar} does not exist")
        root = Path(survey["spectra_root"]) if survey.get("spectra_root") else allstar.parent
        return allstar, root
    from stellarnet.simulate.survey import simulate_survey  # entry-point-only dependency

    sim = survey["simulate"]
    root = Path(survey["sim_root"])
    log.info("no allStar configured: using the simulated survey in %s", root)
    paths = simulate_survey(root, n_stars=int(sim["n_stars"]), seed=int(sim["seed"]),
                            stars_per_field=int(sim.get("stars_per_field", 300)))
    return Path(paths["allstar"]), root


def _check_int(value: Any, key: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{key} must be an integer >= {minimum}, got {value!r}")


def check_data_config(data_cfg: Mapping[str, Any]) -> None:
    """Fail before any work on values of the ``data`` config that cannot work (the message names
    the full key): split fractions, rows per shard, workers, grid, spectra kind, simulated stars."""
    from stellarnet.io import grids
    from stellarnet.io.layout import SPECTRA_LAYOUT, spectra_layout
    from stellarnet.preparation.splits import check_split_fractions

    sh = data_cfg["shards"]
    check_split_fractions((sh.get("split") or {}).get("fractions"), where="data.shards.split.fractions")
    _check_int(sh.get("rows_per_shard"), "data.shards.rows_per_shard", 1)
    _check_int(sh.get("n_workers", 1), "data.shards.n_workers", 0)
    try:
        grids.grid_name(sh.get("grid"))
    except (ValueError, KeyError) as exc:
        raise ValueError(f"data.shards.grid: {exc}") from exc
    kind = data_cfg["survey"].get("spectra_kind", "aspcapStar")
    if kind not in SPECTRA_LAYOUT:
        raise ValueError(f"data.survey.spectra_kind must be one of {sorted(SPECTRA_LAYOUT)}, got {kind!r}")
    try:
        spectra_layout(kind, data_cfg["survey"].get("spectra_layout"))
    except ValueError as exc:
        raise ValueError(f"data.survey.{exc}") from None
    if not data_cfg["survey"].get("allstar"):
        _check_int(data_cfg["survey"]["simulate"].get("n_stars"), "data.survey.simulate.n_stars", 10)
    dm = data_cfg.get("datamodule") or {}
    if "batch_size" in dm:
        _check_int(dm["batch_size"], "data.datamodule.batch_size", 1)
    if "num_workers" in dm:
        _check_int(dm["num_workers"], "data.datamodule.num_workers", 0)


def ensure_shards(data_cfg: Mapping[str, Any], trainer: Any = None) -> dict[str, Any] | None:
    """Build (or resume, or reuse when current) the shard dataset; returns its manifest. With a
    Lightning ``trainer`` of a DDP launch the ranks build the shards together (rank 0 returns the
    manifest, the others None; :func:`~stellarnet.dataset.shards.build_shards`)."""
    check_data_config(data_cfg)
    allstar, spectra_root = resolve_survey(data_cfg)
    sh = data_cfg["shards"]
    return build_shards(
        allstar=allstar,
        out_dir=sh["out_dir"],
        cuts=data_cfg["cuts"],
        spectra_root=spectra_root,
        spectra_kind=data_cfg["survey"].get("spectra_kind", "aspcapStar"),
        grid=sh["grid"],
        rows_per_shard=int(sh["rows_per_shard"]),
        split=sh["split"],
        label_columns=sh["labels"],
        classes_cfg=data_cfg.get("classes"),
        n_workers=int(sh.get("n_workers", 1)),
        layout=data_cfg["survey"].get("spectra_layout"),
        trainer=trainer,
    )
