"""The pipeline's stages, one adapter each (``pipeline.stages``), in order::

    survey     simulate the survey (no allStar configured) or ingest the configured allStar
    cuts       quality cuts on the allStar → cut report + selected stars
    shards     HDF5 shard dataset (train/val/test split)           [in paths.data_dir]
    features   engineered feature table (parquet)                  [in paths.data_dir]
    train      the network (train(cfg)) → best checkpoint + model folder
    baselines  tree baselines per feature set (baselines(cfg)), feature-set comparison, importances
    evaluate   network on the test split (evaluate(cfg)) + gradient saliency vs wavelength
    predict    network predictions for every star of the shard dataset (predict(cfg))
    crossval   cross-survey offsets and calibrations (run_crossval) per external survey
    export     results catalogue (FITS/CSV/parquet) with calibrated labels and flags

Each adapter calls an entry point's library function and returns its outputs and key numbers.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from stellarnet.common.files import to_plain
from stellarnet.common.paths import CONF_DIR
from stellarnet.pipeline.cache import Context, Stage, _entry_body

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- stages


def _survey_config(ctx: Context) -> Any:
    s = to_plain(ctx.cfg.data.survey)
    if s.get("allstar"):
        p = Path(s["allstar"])
        st = p.stat() if p.exists() else None
        s.pop("simulate", None)
        s.pop("sim_root", None)
        s["fingerprint"] = None if st is None else {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    else:
        s.pop("allstar", None)
        s.pop("spectra_root", None)
    return s


def _run_survey(ctx: Context, d: Path) -> dict[str, Any]:
    from stellarnet.dataset.ensure import resolve_survey
    from stellarnet.io.catalogs import read_allstar

    data = ctx.data()
    allstar, root = resolve_survey(data)
    n = len(read_allstar(allstar, columns=["APOGEE_ID"]))
    outputs = {"allstar": str(allstar), "spectra_root": str(root)}
    return {"outputs": outputs, "numbers": {"allstar_rows": n, "simulated": not data["survey"].get("allstar")}}


def _run_cuts(ctx: Context, d: Path) -> dict[str, Any]:
    from stellarnet.io.catalogs import read_allstar
    from stellarnet.io.tables import write_table
    from stellarnet.preparation.cuts import apply_cuts

    df = read_allstar(ctx.out("survey", "allstar"))
    kept, report = apply_cuts(df, ctx.data()["cuts"])
    csv, md = report.save(d)
    cols = [c for c in ("APOGEE_ID", "TELESCOPE", "FIELD", "RA", "DEC", "SNR") if c in kept.columns]
    sel = write_table(kept[cols].reset_index(names="ALLSTAR_ROW"), d / "selected.csv")
    return {"outputs": {"cut_report": str(csv), "cut_report_md": str(md), "selected": str(sel)},
            "numbers": {"rows": len(df), "kept": len(kept)}}


def _shards_config(ctx: Context) -> Any:
    data = ctx.data()
    sh = {k: v for k, v in data["shards"].items() if k != "n_workers"}
    return {"shards": sh, "classes": data.get("classes"), "spectra_kind": data["survey"].get("spectra_kind")}


def _run_shards(ctx: Context, d: Path) -> dict[str, Any]:
    from stellarnet.dataset.ensure import ensure_shards

    data = ctx.data()
    manifest = ensure_shards(data)
    out = Path(data["shards"]["out_dir"])
    rows = manifest["split_rows"]
    return {"outputs": {"dataset_dir": str(out), "manifest": str(out / "manifest.json")},
            "numbers": {**{s: int(n) for s, n in rows.items()}, "build_hash": manifest["build_hash"][:8]}}


def _features_config(ctx: Context) -> Any:
    return {"features": to_plain(ctx.cfg.features), "path": str(ctx.cfg.features_path)}


def _run_features(ctx: Context, d: Path) -> dict[str, Any]:
    from stellarnet.workflows.features import build_features

    c = OmegaConf.create({"data": ctx.data(), "features": to_plain(ctx.cfg.features), "paths": ctx.paths(d),
                          "seed": int(ctx.cfg.seed), "features_path": str(ctx.cfg.features_path),
                          "dataset_dir": ctx.out("shards", "dataset_dir")})
    table, path = build_features(c)
    n_feat = len((table.attrs.get("feature_stats") or {}).get("features") or [])
    n_out = int((table["N_OUTLIERS"] > 0).sum()) if "N_OUTLIERS" in table.columns else 0
    return {"outputs": {"features": str(path)},
            "numbers": {"stars": len(table), "features": n_feat, "stars_with_outliers": n_out}}


def _train_cfg(ctx: Context, d: Path) -> DictConfig:
    c = copy.deepcopy(ctx.cfg)
    with open_dict(c):
        c.paths.output_dir = str(d)
    return c


def _train_config(ctx: Context) -> Any:
    c = _train_cfg(ctx, ctx.root / "train")
    keys = ("model", "trainer", "callbacks", "seed", "cpu_threads", "train", "test", "ckpt_path", "refine")
    out = {k: to_plain(c.get(k)) for k in keys}
    out["datamodule"] = to_plain(c.data.datamodule)
    out["trainer"].pop("enable_progress_bar", None)
    return out


def _run_train(ctx: Context, d: Path) -> dict[str, Any]:
    from stellarnet.network.model_folder import load_module, save_model_folder
    from stellarnet.workflows.train import train

    metrics, objects = train(_train_cfg(ctx, d))
    trainer = objects["trainer"]
    cb = trainer.checkpoint_callback
    ckpt = (cb.best_model_path or cb.last_model_path) if cb is not None else ""
    if not ckpt:
        raise RuntimeError("training wrote no checkpoint (is the ModelCheckpoint callback configured?)")
    # train() wrote the calibrated model folder (σ scale, refinement stage); a bare copy only if it could not
    folder = objects.get("model_dir") or save_model_folder(load_module(ckpt), d / "model")
    numbers: dict[str, Any] = {"epochs": int(trainer.current_epoch)}
    if cb is not None and cb.best_model_score is not None:
        numbers["best_val_loss"] = round(float(cb.best_model_score), 4)
    tm_path = d / "test_metrics.json"
    if tm_path.exists():
        tm = json.loads(tm_path.read_text())
        for lab, m in (tm.get("labels") or {}).items():
            if isinstance(m, Mapping) and m.get("mae") is not None:
                numbers[f"test_mae_{lab}"] = _round(m["mae"])
    outputs = {"checkpoint": str(ckpt), "model": str(folder)}
    if tm_path.exists():
        outputs["test_metrics"] = str(tm_path)
    return {"outputs": outputs, "numbers": numbers}


def _round(v: Any, digits: int = 3) -> Any:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return v
    if not math.isfinite(f):
        return None
    return round(f, 1) if abs(f) >= 100 else round(f, digits)


def _baselines_optional(ctx: Context) -> tuple[str, ...]:
    """The feature table matters only to the tabular / both feature sets."""
    return ("features",) if any(fs != "spectra_pca" for fs in ctx.cfg.pipeline.baselines.feature_sets) else ()


def _baselines_config(ctx: Context) -> Any:
    return {"baselines": to_plain(ctx.cfg.baselines), "pipeline": to_plain(ctx.cfg.pipeline.baselines)}


def _run_baselines(ctx: Context, d: Path) -> dict[str, Any]:
    from stellarnet.evaluation.importance import feature_set_comparison, feature_set_markdown, group_importance
    from stellarnet.io.tables import write_table
    from stellarnet.workflows.baselines import baselines

    pcfg = ctx.cfg.pipeline.baselines
    sets = list(pcfg.feature_sets)
    imp_set = pcfg.get("importance_feature_set")
    by_set: dict[str, Any] = {}
    outputs: dict[str, str] = {}
    for fs in sets:
        bcfg = to_plain(ctx.cfg.baselines)
        bcfg["features"] = fs
        bcfg.setdefault("importance", {})["enabled"] = fs == imp_set
        # overwrite: the pipeline reruns a stage into its own directory when the stage's inputs changed
        c = ctx.entry_cfg("baselines", d / fs, None, baselines=bcfg, output_dir=str(d / fs), ckpt_path=None, overwrite=True,
                          dataset_dir=ctx.out("shards", "dataset_dir"),
                          features_path=ctx.out("features", "features") if fs != "spectra_pca" else None)
        results, paths = baselines(c)
        by_set[fs] = results
        outputs[f"report_{fs}"] = str(paths["markdown"])
        if "importance_csv" in paths:
            outputs["importance"] = str(paths["importance_csv"])
            outputs["importance_figure"] = str(paths["importance_figure"])
    long, winners = feature_set_comparison(by_set)
    outputs["comparison"] = str(write_table(long, d / "feature_sets.csv"))
    outputs["winners"] = str(write_table(winners, d / "feature_set_winners.csv"))
    md = "# Tree baselines: which feature set wins (test split)\n\n" + feature_set_markdown(long, winners)
    (d / "feature_sets.md").write_text(md)
    outputs["comparison_md"] = str(d / "feature_sets.md")
    numbers: dict[str, Any] = {f"best_{w['target']}": f"{w['winner']} ({w['method']} {_round(w['value'])})"
                               for _, w in winners.iterrows()}
    if "importance" in outputs:
        import pandas as pd

        imp = pd.read_csv(outputs["importance"])
        g = group_importance(imp, "gain").dropna(subset=["gain"])
        if not g.empty:
            share = g.groupby("group")["gain"].mean()
            share = share / share.sum()
            numbers["gain_share"] = ", ".join(f"{k} {v:.2f}" for k, v in share.sort_values(ascending=False).items())
    return {"outputs": outputs, "numbers": numbers}


def _evaluate_config(ctx: Context) -> Any:
    body = OmegaConf.merge(OmegaConf.create(_entry_body("evaluate")), to_plain(ctx.cfg.pipeline.get("evaluate")) or {})
    return {"evaluate": to_plain(body), "saliency": to_plain(ctx.cfg.pipeline.get("saliency")),
            "lines": to_plain((ctx.cfg.features.get("indices") or {}).get("windows"))}


def _run_evaluate(ctx: Context, d: Path) -> dict[str, Any]:
    from stellarnet.dataset.manifest import load_manifest
    from stellarnet.evaluation.figures import save_figure
    from stellarnet.evaluation.importance import (
        line_saliency,
        load_line_centres,
        network_saliency,
        saliency_figure,
        saliency_frame,
    )
    from stellarnet.evaluation.split_predictions import load_split
    from stellarnet.io.tables import write_table
    from stellarnet.network.model_folder import load_model
    from stellarnet.workflows.evaluate import evaluate

    ckpt = ctx.out("train", "checkpoint")
    dataset = ctx.out("shards", "dataset_dir")
    c = ctx.entry_cfg("evaluate", d, ctx.cfg.pipeline.get("evaluate"), ckpt_path=ckpt, dataset_dir=dataset,
                      output_dir=str(d), overwrite=True)  # the stage's own directory, rerun when stale
    report, paths = evaluate(c)
    outputs = {k: str(v) for k, v in paths.items() if k in ("json", "markdown")}
    numbers: dict[str, Any] = {}
    for lab, m in ((report.get("regression") or {}).get("overall") or {}).items():
        numbers[f"mae_{lab}"] = _round(m.get("mae"))
    for task, m in (report.get("classification") or {}).items():
        numbers[f"acc_{task}"] = _round(m.get("accuracy"))
    scfg = to_plain(ctx.cfg.pipeline.get("saliency")) or {}
    if scfg.get("enabled", True):
        predictor = load_model(ckpt)
        data = load_split(dataset, str(c.split))
        sal = network_saliency(predictor, data["flux"], data["flux_err"], data["photometry"], data["pix_mask"],
                               max_stars=scfg.get("max_stars", 512), batch_size=int(scfg.get("batch_size", 64)),
                               seed=int(ctx.cfg.seed))
        lam = predictor.data_spec.get("wavelength") or load_manifest(dataset)["wavelength"]
        frame = saliency_frame(sal, lam, predictor.label_names)
        lines = load_line_centres(to_plain(ctx.cfg.features.get("indices")))
        per_line = line_saliency(frame, lines)
        outputs["saliency"] = str(write_table(frame, d / "saliency.csv"))
        outputs["saliency_lines"] = str(write_table(per_line, d / "saliency_lines.csv"))
        fig = saliency_figure(frame, lines, units=dict(zip(predictor.label_names, predictor.label_units)))
        outputs["saliency_figure"] = str(save_figure(fig, d / "figures" / "saliency.png"))
        for lab in predictor.label_names:
            if lab in per_line and per_line[lab].notna().any():
                top = per_line.sort_values(lab, ascending=False).iloc[0]
                numbers[f"top_line_{lab}"] = f"{top['name']} ({top[lab]:.1f}x)"
    return {"outputs": outputs, "numbers": numbers}


def _predict_config(ctx: Context) -> Any:
    return to_plain(OmegaConf.merge(OmegaConf.create(_entry_body("predict")), to_plain(ctx.cfg.pipeline.get("predict")) or {}))


def _run_predict(ctx: Context, d: Path) -> dict[str, Any]:
    from stellarnet.workflows.predict import predict

    c = ctx.entry_cfg("predict", d, ctx.cfg.pipeline.get("predict"), ckpt_path=ctx.out("train", "checkpoint"),
                      input=ctx.out("shards", "dataset_dir"), output_dir=str(d), overwrite=True)
    summary, paths = predict(c)
    return {"outputs": {"csv": str(paths["csv"]), "fits": str(paths["fits"])},
            "numbers": {"stars": summary["stars"], "read_errors": summary["read_errors"]}}


def _crossval_config(ctx: Context) -> Any:
    cc = to_plain(ctx.cfg.pipeline.crossval)
    body = to_plain(OmegaConf.merge(OmegaConf.create(_entry_body("crossval")), cc.get("overrides") or {}))
    for k in ("survey_root", "apogee_catalog", "predictions", "output_dir"):
        body.pop(k, None)  # set from the other stages
    specs = {s: to_plain(OmegaConf.load(CONF_DIR / "survey" / f"{s}.yaml")) for s in cc.get("surveys") or []}
    return {"crossval": body, "surveys": specs}


def _run_crossval(ctx: Context, d: Path) -> dict[str, Any]:
    from stellarnet.crossval.run import run_crossval
    from stellarnet.preparation.surveys import survey_spec

    cfgs = _crossval_config(ctx)
    allstar = Path(ctx.out("survey", "allstar"))
    root = Path(ctx.out("survey", "spectra_root"))
    overrides = to_plain(ctx.cfg.pipeline.crossval.get("overrides")) or {}
    outputs: dict[str, str] = {}
    numbers: dict[str, Any] = {}
    for name, spec in cfgs["surveys"].items():
        c = {**cfgs["crossval"], "survey": spec, "survey_root": str(overrides.get("survey_root") or root),
             "apogee_catalog": str(overrides.get("apogee_catalog") or allstar),
             "predictions": ctx.out("predict", "csv")}
        catalog = Path(c.get("survey_catalog") or Path(c["survey_root"]) / survey_spec(spec).path)
        if not catalog.exists():
            log.warning("crossval: no %s catalogue at %s; skipped", name, catalog)
            numbers[name] = "skipped (no catalogue)"
            continue
        report = run_crossval(c, d / name)
        outputs[f"report_{name}"] = str(d / name / "crossval_report.md")
        for ref, res in report["references"].items():
            cal = res.get("calibration")
            if cal:
                outputs[f"calibration_{name}_{ref}"] = str(d / name / cal["file"])
        sn = report["references"].get("stellarnet") or {}
        m = sn.get("match") or {}
        off = {r["label"]: r for r in (sn.get("comparison") or {}).get("offsets", [])}
        t = off.get("teff") or {}
        numbers[name] = (f"{m.get('n_matched', 0)} matched, ΔTeff {_round(t.get('median'))} ± "
                         f"{_round(t.get('median_err'))} K (scatter {_round(t.get('scatter'))})")
    return {"outputs": outputs, "numbers": numbers}


def _export_config(ctx: Context) -> Any:
    return to_plain(ctx.cfg.pipeline.export)


def _run_export(ctx: Context, d: Path) -> dict[str, Any]:
    import pandas as pd

    from stellarnet.features.tabular import read_features
    from stellarnet.workflows.catalogue import build_catalogue, write_catalogue

    ecfg = to_plain(ctx.cfg.pipeline.export)
    pred = pd.read_csv(ctx.out("predict", "csv"), dtype={"APOGEE_ID": str, "READ_ERROR": str, "SPLIT": str},
                       keep_default_na=False, na_values=[""])
    ref = ecfg.get("calibration_reference", "stellarnet")
    calibs = {}
    if ctx.has("crossval"):
        for key, path in ctx.records["crossval"]["outputs"].items():
            if key.startswith("calibration_") and key.endswith(f"_{ref}"):
                calibs[key[len("calibration_"):-len(ref) - 1]] = path
    feats = read_features(ctx.out("features", "features")) if ctx.has("features") else None
    cat = build_catalogue(pred, calibs, feats)
    paths = write_catalogue(cat, d, stem=str(ecfg.get("stem", "stellarnet_catalogue")),
                            formats=list(ecfg.get("formats") or ("fits", "csv")))
    n_flag = int(cat["FLAG_FEATURE_OUTLIER"].sum()) if "FLAG_FEATURE_OUTLIER" in cat.columns else 0
    return {"outputs": {f: str(p) for f, p in paths.items()},
            "numbers": {"stars": len(cat), "columns": cat.shape[1], "calibrations": ",".join(calibs) or "none",
                        "feature_outlier_stars": n_flag, "read_errors": int(cat["FLAG_READ_ERROR"].sum())}}


STAGES: tuple[Stage, ...] = (
    Stage("survey", (), _survey_config, _run_survey, clean=False),
    Stage("cuts", ("survey",), lambda ctx: ctx.data()["cuts"], _run_cuts),
    Stage("shards", ("survey", "cuts"), _shards_config, _run_shards, clean=False),
    Stage("features", ("shards",), _features_config, _run_features, clean=False),
    Stage("train", ("shards",), _train_config, _run_train),
    Stage("baselines", ("shards",), _baselines_config, _run_baselines, optional=_baselines_optional),
    Stage("evaluate", ("train", "shards"), _evaluate_config, _run_evaluate),
    Stage("predict", ("train", "shards"), _predict_config, _run_predict),
    Stage("crossval", ("survey", "predict"), _crossval_config, _run_crossval),
    Stage("export", ("predict",), _export_config, _run_export, optional=("crossval", "features")),
)


STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)
