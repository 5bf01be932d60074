"""Entry point: ``python -m stellarnet.baselines +experiment=apogee [ckpt_path=<network checkpoint>]``.

Fits the tree baselines (XGBoost, LightGBM, random forest, ...) on the same shards and splits as
the network and writes one comparison table (markdown + JSON) and a comparison figure to the run
directory. With ``ckpt_path`` the network is scored on the same test split and joins the table.

``baselines.features`` picks the inputs: ``spectra_pca`` (default), ``tabular`` (the engineered
feature table at ``features_path``, written by ``python -m stellarnet.build_features``) or
``both``. With ``baselines.importance.enabled`` the tree models' gain and permutation importances
are written as ``importance.csv`` and ``figures/importance.png``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from stellarnet.common.errors import report_errors
from stellarnet.dataset.shards import ShardReader, load_manifest
from stellarnet.evaluation.figures import method_comparison_figure, save_figure
from stellarnet.evaluation.split_predictions import load_split, network_report
from stellarnet.evaluation.report import comparison_table, write_report
from stellarnet.baselines.trees import run_baselines, tabular_features
from stellarnet.common.paths import CONF_DIR
from stellarnet.dataset.ensure import ensure_shards


def baselines(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Path]]:
    """Fit and score the configured baselines (and the network if ``ckpt_path``)."""
    from stellarnet.io.predictions import check_not_overwriting

    out_dir = Path(cfg.get("output_dir") or cfg.paths.output_dir)
    overwrite = cfg.get("overwrite", False)  # checked (a boolean) by check_not_overwriting
    check_not_overwriting([out_dir / "baselines.json", out_dir / "baselines.md"], overwrite)
    if cfg.get("dataset_dir"):
        dataset = Path(cfg.dataset_dir)
    else:
        ensure_shards(OmegaConf.to_container(cfg.data, resolve=True))
        dataset = Path(cfg.data.shards.out_dir)
    manifest = load_manifest(dataset)
    meta = {"label_names": manifest["label_names"], "class_tasks": list(manifest["class_tasks"]),
            "class_names": manifest["class_tasks"]}
    meta["photometry_names"] = list(manifest.get("phot_features") or [])
    splits = {s: {**load_split(dataset, s), **meta} for s in ("train", "val", "test")}
    bcfg = OmegaConf.to_container(cfg.baselines, resolve=True)
    feature_set = bcfg.get("features") or "spectra_pca"
    if feature_set != "spectra_pca":
        _attach_tabular(splits, dataset, manifest, cfg.get("features_path"), bcfg.get("tabular") or {})
    icfg = dict(bcfg.get("importance") or {})
    results: dict[str, Any] = {}
    if cfg.get("ckpt_path"):
        from stellarnet.network.inference import load_model

        report, _, _ = network_report(load_model(cfg.ckpt_path), dataset, split="test", calib_split=None,
                                      mc_samples=0, eval_cfg=bcfg.get("eval"))
        results["stellarnet"] = report
    results.update(run_baselines(splits["train"], splits["val"], splits["test"], bcfg,
                                 return_models=bool(icfg.get("enabled", False))))
    table = comparison_table(results)
    paths = write_report(results, out_dir, "baselines",
                         markdown=f"# Baselines vs network (test split, features: {feature_set})\n\n" + table)
    fig = method_comparison_figure(results)
    paths["figure"] = save_figure(fig, out_dir / "figures" / "baselines_comparison.png")
    if icfg.get("enabled", False):
        paths.update(_write_importance(results, splits["test"], icfg, feature_set, out_dir, int(bcfg.get("seed", 0))))
    return results, paths


def _attach_tabular(splits: dict[str, dict[str, Any]], dataset: Path, manifest: dict[str, Any],
                    features_path: Any, tcfg: dict[str, Any]) -> None:
    """Add the feature table's columns (``tabular``, ``tabular_names``) to each split dict."""
    from stellarnet.features.tabular import read_features

    if not features_path or not Path(features_path).exists():
        raise FileNotFoundError(f"features_path={features_path} not found: build it with "
                                "`python -m stellarnet.build_features` (or run the pipeline)")
    table = read_features(features_path)
    built_from = (table.attrs.get("feature_stats") or {}).get("build_hash")
    if built_from and built_from != manifest.get("build_hash"):
        raise ValueError(f"{features_path} was built from other shards (build hash {built_from}, "
                         f"{dataset} has {manifest.get('build_hash')}); rebuild the feature table")
    for s, d in splits.items():
        reader = ShardReader(dataset, s, manifest, verify=False)
        try:
            ids = [x.decode() if isinstance(x, bytes) else str(x) for x in reader.read_all(("apogee_id",))["apogee_id"]]
        finally:
            reader.close()
        d["tabular"], d["tabular_names"] = tabular_features(table, ids, split=s, include=tcfg.get("include"),
                                                            exclude=tcfg.get("exclude") or ())


def _write_importance(results: dict[str, Any], test: dict[str, Any], icfg: dict[str, Any], feature_set: str,
                      out_dir: Path, seed: int) -> dict[str, Path]:
    """Gain + permutation importance of every fitted tree model → importance.csv and a figure."""
    import pandas as pd

    from stellarnet.evaluation.importance import IMPORTANCE_COLUMNS, importance_figure, tree_importance
    from stellarnet.io.export import write_table

    perm_methods = icfg.get("permutation_methods")
    frames = []
    for method, res in results.items():
        model = res.get("_model") if isinstance(res, dict) else None
        if model is None:
            continue
        frames.append(tree_importance(
            model, test, feature_set=feature_set, seed=seed,
            permutation=perm_methods is None or method in perm_methods,
            n_repeats=int(icfg.get("n_repeats", 3)), max_samples=icfg.get("max_samples", 1000),
            n_jobs=icfg.get("n_jobs", 1)))
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(IMPORTANCE_COLUMNS))
    csv = write_table(table, out_dir / "importance.csv")
    fig = save_figure(importance_figure(table, top=int(icfg.get("top", 20))), out_dir / "figures" / "importance.png")
    return {"importance_csv": csv, "importance_figure": fig}
