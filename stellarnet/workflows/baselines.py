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

import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from stellarnet.baselines.cannon import CannonModel
from stellarnet.baselines.inputs import tabular_features
from stellarnet.baselines.pca import SpectralPCAFeatures, _resolve_jobs
from stellarnet.baselines.trees import DEFAULT_PARAMS, FEATURE_SETS, TreeBaseline
from stellarnet.dataset.ensure import ensure_shards
from stellarnet.dataset.manifest import load_manifest
from stellarnet.dataset.reader import ShardReader
from stellarnet.evaluation.figures import method_comparison_figure, save_figure
from stellarnet.evaluation.metrics import classification_report, default_class_names, regression_report
from stellarnet.evaluation.report import comparison_table, write_report
from stellarnet.evaluation.split_predictions import load_split, network_report

log = logging.getLogger(__name__)


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
        from stellarnet.network.model_folder import load_model

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
    from stellarnet.io.tables import write_table

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


# --------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------
def _to_container(cfg: Any) -> dict[str, Any]:
    if cfg is None:
        return {}
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except ImportError:  # pragma: no cover
        pass
    return dict(cfg)


def _eval_kwargs(cfg: Mapping[str, Any]) -> dict[str, Any]:
    ev = dict(cfg.get("eval") or {})
    edges = ev.get("snr_edges", [0.0, 50.0, 100.0, 200.0, math.inf])
    edges = [math.inf if str(e).lower() in ("inf", ".inf", "+inf") else float(e) for e in edges]
    return {"snr_edges": edges, "outlier_k": ev.get("outlier_k", 3.0), "outlier_abs": ev.get("outlier_abs")}


def evaluate_predictions(pred: Mapping[str, Any], split: Mapping[str, Any], cfg: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Regression (overall / per S/N / per true stage) and classification metrics of predictions
    ``{"labels", "classes"}`` against a split dict."""
    cfg = _to_container(cfg)
    ekw = _eval_kwargs(cfg)
    label_names = list(split.get("label_names") or [])
    tasks = list(split.get("class_tasks") or [])
    cnames = {**default_class_names(), **dict(split.get("class_names") or {})}
    true_cls = split.get("classes")
    groups = group_names = None
    if true_cls is not None and "stage" in tasks:
        groups = np.asarray(true_cls).reshape(len(split["flux"]), -1)[:, tasks.index("stage")]
        group_names = cnames.get("stage")
    out: dict[str, Any] = {
        "regression": regression_report(pred["labels"], split["labels"], label_names or None, snr=split.get("snr"),
                                        snr_edges=ekw["snr_edges"] if split.get("snr") is not None else None,
                                        groups=groups, group_names=group_names,
                                        outlier_k=ekw["outlier_k"], outlier_abs=ekw["outlier_abs"]),
    }
    if true_cls is not None and pred.get("classes") is not None and tasks:
        out["classification"] = classification_report(pred["classes"], true_cls, tasks, cnames)
    return out


def run_baselines(train: Mapping[str, Any], val: Mapping[str, Any] | None, test: Mapping[str, Any],
                  cfg: Any = None, *, return_predictions: bool = False,
                  pca: SpectralPCAFeatures | None = None, return_models: bool = False) -> dict[str, dict[str, Any]]:
    """Fit every configured baseline on ``train`` (early stopping on ``val``) and evaluate on
    ``test``.

    ``cfg`` is the Hydra ``baselines`` group node (see ``conf/baselines/default.yaml``) or a plain
    mapping with keys ``methods``, ``n_jobs``, ``seed``, ``use_photometry``, ``pca``
    (``n_components``, ``incremental``, ``batch_size``, ``whiten``, ``fit_max_samples``),
    ``eval`` (``snr_edges``, ``outlier_k``, ``outlier_abs``) and one params mapping per method
    (optionally with ``regression`` / ``classification`` sub-mappings). A fitted ``pca`` may be
    passed to skip the PCA fit.

    Returns ``{method: result}`` with ``regression`` / ``classification`` metrics (see
    :mod:`stellarnet.evaluation.metrics`), ``train_time_s`` (PCA fit + model fits, s),
    ``model_fit_time_s``, ``feature_time_s``, ``predict_rate`` (test spectra / s including the PCA
    transform), ``n_train`` / ``n_val`` / ``n_test``, ``n_iterations`` per label/task, ``params``
    and ``features``; skipped methods are ``{"skipped": True, "reason": str}``. With
    ``return_predictions`` each result also has ``_predictions`` (numpy arrays; dropped by
    :func:`stellarnet.evaluation.report.to_jsonable`), with ``return_models`` ``_model`` (the fitted
    :class:`TreeBaseline`). ``features`` (:data:`FEATURE_SETS`, default ``spectra_pca``) picks
    the inputs; ``tabular`` / ``both`` need ``tabular`` in the split dicts.
    """
    c = _to_container(cfg)
    from threadpoolctl import threadpool_limits

    # BLAS (PCA) and OpenMP (HistGradientBoosting) pools follow n_jobs too
    with threadpool_limits(limits=_resolve_jobs(c.get("n_jobs", -1))):
        return _run_baselines(train, val, test, c, return_predictions, pca, return_models)


def _run_baselines(train: Mapping[str, Any], val: Mapping[str, Any] | None, test: Mapping[str, Any],
                   c: dict[str, Any], return_predictions: bool, pca: SpectralPCAFeatures | None,
                   return_models: bool = False) -> dict[str, dict[str, Any]]:
    methods = list(c.get("methods") or ["xgboost", "lightgbm", "random_forest"])
    n_jobs = c.get("n_jobs", -1)
    seed = int(c.get("seed", 0))
    use_phot = bool(c.get("use_photometry", True))
    feature_set = str(c.get("features") or "spectra_pca")
    if feature_set not in FEATURE_SETS:
        raise ValueError(f"baselines.features must be one of {FEATURE_SETS}, got {feature_set!r}")
    if feature_set != "spectra_pca" and train.get("tabular") is None:
        raise ValueError(f"baselines.features={feature_set!r} needs 'tabular' features in the split dicts")
    pcfg = dict(c.get("pca") or {})
    # features (shared by all methods; the PCA fit time is charged to each method's train time)
    tr_p = va_p = None
    feat_s = 0.0
    feat_info: dict[str, Any] = {"feature_set": feature_set}
    if feature_set in ("spectra_pca", "both"):
        t0 = time.perf_counter()
        if pca is None or not pca.is_fitted:
            pca = SpectralPCAFeatures(int(pcfg.get("n_components", 50)), incremental=bool(pcfg.get("incremental", False)),
                                      batch_size=int(pcfg.get("batch_size", 4096)), whiten=bool(pcfg.get("whiten", False)),
                                      fit_max_samples=pcfg.get("fit_max_samples", 50000), random_state=seed)
            pca.fit(train["flux"], train.get("pix_mask"))
        pca_fit_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        tr_p = pca.transform(train["flux"], train.get("pix_mask"))
        va_p = pca.transform(val["flux"], val.get("pix_mask")) if val is not None and len(val["flux"]) else None
        feat_s = pca_fit_s + time.perf_counter() - t0
        feat_info.update({"n_components": int(pca.components_.shape[0]),  # type: ignore[union-attr]
                          "explained_variance_ratio": float(np.sum(pca.explained_variance_ratio_))})  # type: ignore[arg-type]
    feat_info["n_photometry"] = (int(np.asarray(train.get("photometry")).reshape(len(train["flux"]), -1).shape[1])
                                 if feature_set == "spectra_pca" and use_phot and train.get("photometry") is not None
                                 else 0)
    feat_info["n_tabular"] = (int(np.asarray(train["tabular"]).reshape(len(train["flux"]), -1).shape[1])
                              if feature_set != "spectra_pca" else 0)
    results: dict[str, dict[str, Any]] = {}
    for method in methods:
        if method == "cannon":
            if feature_set != "spectra_pca":
                results[method] = {"skipped": True, "reason": f"the Cannon models the spectrum itself "
                                                              f"(feature set {feature_set!r} does not apply)"}
                continue
            results[method] = _run_cannon(train, val, test, c, return_predictions)
            continue
        params = dict(c.get(method) or {})
        try:
            tb = TreeBaseline(method, pca, params=params, n_jobs=n_jobs, seed=seed, use_photometry=use_phot,
                              feature_set=feature_set)
            t0 = time.perf_counter()
            tb.fit(train, val, train_pca=tr_p, val_pca=va_p)
            fit_s = time.perf_counter() - t0
        except ImportError as exc:
            msg = (f"{method} unavailable ({exc}): install the optional dependency with "
                   f"pip install 'stellarnet[baselines]' (or pip install {method})")
            log.warning("skipping baseline %s", msg)
            results[method] = {"skipped": True, "reason": msg}
            continue
        t0 = time.perf_counter()
        pred = tb.predict(test)
        pred_s = time.perf_counter() - t0
        n_test = len(test["flux"])
        res = evaluate_predictions(pred, test, c)
        res.update({
            "method": method,
            "train_time_s": feat_s + fit_s,
            "model_fit_time_s": fit_s,
            "feature_time_s": feat_s,
            "predict_rate": n_test / pred_s if pred_s > 0 else math.nan,
            "n_train": len(train["flux"]), "n_val": 0 if val is None else len(val["flux"]), "n_test": n_test,
            "n_iterations": dict(tb.n_iterations),
            "params": {**DEFAULT_PARAMS[method], **params},
            "features": feat_info,
        })
        if return_predictions:
            res["_predictions"] = pred
        if return_models:
            res["_model"] = tb
        log.info("%s: fit %.1fs, predict %.0f spectra/s", method, fit_s, res["predict_rate"])
        results[method] = res
    return results


def _run_cannon(train: Mapping[str, Any], val: Mapping[str, Any] | None, test: Mapping[str, Any],
                cfg: Mapping[str, Any], return_predictions: bool) -> dict[str, Any]:
    """Fit / evaluate the quadratic Cannon (labels only; no classification)."""
    p = dict(cfg.get("cannon") or {})
    model = CannonModel(scatter=bool(p.get("scatter", True)), regularization=float(p.get("regularization", 0.0)),
                        n_iter=int(p.get("n_iter", 30)))
    names = list(train.get("label_names") or [])
    t0 = time.perf_counter()
    model.fit(train["labels"], train["flux"], train.get("flux_err"), train.get("pix_mask"))
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    lab = model.predict(test["flux"], test.get("flux_err"), test.get("pix_mask"))
    pred_s = time.perf_counter() - t0
    pred = {"labels": lab, "classes": None}
    res = evaluate_predictions(pred, {**test, "class_tasks": []}, cfg)
    res.update({"method": "cannon", "train_time_s": fit_s, "model_fit_time_s": fit_s, "feature_time_s": 0.0,
                "predict_rate": len(lab) / pred_s if pred_s > 0 else math.nan, "n_train": int(model.n_train_),
                "n_val": 0 if val is None else len(val["flux"]), "n_test": len(lab), "params": p,
                "label_names": names})
    if return_predictions:
        res["_predictions"] = pred
    return res
