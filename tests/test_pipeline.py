"""The one-command pipeline (stage skipping by config hash) and the results-catalogue export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from stellarnet.common.paths import CONF_DIR

TINY = [
    "+experiment=apogee",
    "data.survey.simulate.n_stars=300",
    "data.survey.simulate.stars_per_field=20",  # 15 plate fields: the FIELD split has stars in every split
    "data.shards.n_workers=1",
    "data.shards.rows_per_shard=64",
    "data.datamodule.num_workers=0",
    "data.datamodule.batch_size=32",
    "model=small",
    "trainer.max_epochs=1",
    "refine.epochs=2",
    "refine.hidden=16",
    "+trainer.limit_train_batches=2",
    "+trainer.limit_val_batches=2",
    "trainer.enable_progress_bar=false",
    "baselines=fast",
    "baselines.methods=[xgboost,random_forest]",
    "baselines.n_jobs=1",
    "baselines.pca.n_components=8",
    "baselines.xgboost.n_estimators=20",
    "baselines.random_forest.n_estimators=20",
    "baselines.importance.n_repeats=2",
    "baselines.importance.max_samples=40",
    "pipeline.evaluate.mc_samples=2",
    "pipeline.predict.mc_samples=2",
    "pipeline.saliency.max_stars=16",
    "pipeline.crossval.overrides.offsets.n_boot=20",
    "+pipeline.crossval.overrides.plots=false",
]


def pipeline_cfg(root: Path, *overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        return compose(config_name="pipeline", overrides=[*TINY, f"paths.data_dir={root / 'data'}",
                                                          f"paths.log_dir={root / 'logs'}", *overrides])


def run(cfg):
    from stellarnet.pipeline.run import run_pipeline

    lines: list[str] = []
    rows = run_pipeline(cfg, echo=lines.append)
    assert len(lines) == len(rows)  # one progress line per stage
    return {r["stage"]: r for r in rows}, lines


def statuses(rows):
    return {k: r["status"] for k, r in rows.items()}


# --------------------------------------------------------------------------- skipping (fast)

DATA_STAGES = "pipeline.stages=[survey,cuts,shards,features]"


def test_stages_skip_when_current_and_rerun_downstream_of_a_change(tmp_path):
    cfg = pipeline_cfg(tmp_path, DATA_STAGES)
    rows, lines = run(cfg)
    assert statuses(rows) == {"survey": "ran", "cuts": "ran", "shards": "ran", "features": "ran",
                              "train": "disabled", "baselines": "disabled", "evaluate": "disabled",
                              "predict": "disabled", "crossval": "disabled", "export": "disabled"}
    assert lines[2].startswith("[ 3/10] shards") and " ran " in lines[2]
    root = tmp_path / "logs" / "pipeline"
    rec = json.loads((root / "shards" / "stage.json").read_text())
    assert rec["status"] == "complete" and len(rec["hash"]) == 16 and rec["duration_s"] > 0
    assert Path(rec["outputs"]["manifest"]).exists()
    man = json.loads(Path(rec["outputs"]["manifest"]).read_text())
    assert all(man["split_rows"][s] > 0 for s in ("train", "val", "test"))
    assert rows["cuts"]["numbers"]["kept"] == sum(man["split_rows"].values())
    feat_rec = json.loads((root / "features" / "stage.json").read_text())
    assert Path(feat_rec["outputs"]["features"]) == tmp_path / "data" / "processed" / "apogee_features.parquet"
    assert rows["features"]["numbers"]["stars"] == rows["cuts"]["numbers"]["kept"]
    summary = (root / "summary.md").read_text()
    assert "| shards | ran |" in summary

    # unchanged config: everything is skipped, the recorded numbers are kept
    rows2, lines2 = run(pipeline_cfg(tmp_path, DATA_STAGES))
    assert {k for k, s in statuses(rows2).items() if s == "skipped"} == {"survey", "cuts", "shards", "features"}
    assert rows2["shards"]["numbers"] == rows["shards"]["numbers"]
    assert all("skipped" in ln for ln in lines2[:4])

    # a cut changes: the cuts stage and everything built from it re-run, the survey does not
    rows3, _ = run(pipeline_cfg(tmp_path, DATA_STAGES, "data.cuts.snr.min=90"))
    assert statuses(rows3)["survey"] == "skipped"
    assert [statuses(rows3)[s] for s in ("cuts", "shards", "features")] == ["ran"] * 3
    assert rows3["cuts"]["numbers"]["kept"] < rows["cuts"]["numbers"]["kept"]
    assert rows3["shards"]["hash"] != rows["shards"]["hash"]

    # a feature setting changes: only the features stage re-runs
    rows4, _ = run(pipeline_cfg(tmp_path, DATA_STAGES, "data.cuts.snr.min=90", "features.outliers.robust_z=4.0"))
    assert [statuses(rows4)[s] for s in ("survey", "cuts", "shards", "features")] == \
        ["skipped", "skipped", "skipped", "ran"]
    assert rows4["features"]["numbers"]["stars_with_outliers"] >= rows3["features"]["numbers"]["stars_with_outliers"]

    # forcing a stage re-runs it; its hash is unchanged so the stages after it stay current
    rows5, _ = run(pipeline_cfg(tmp_path, DATA_STAGES, "data.cuts.snr.min=90", "features.outliers.robust_z=4.0",
                                "pipeline.force=[cuts]"))
    assert [statuses(rows5)[s] for s in ("survey", "cuts", "shards", "features")] == \
        ["skipped", "ran", "skipped", "skipped"]

    # a deleted output makes its stage re-run
    Path(json.loads((root / "cuts" / "stage.json").read_text())["outputs"]["selected"]).unlink()
    rows6, _ = run(pipeline_cfg(tmp_path, DATA_STAGES, "data.cuts.snr.min=90", "features.outliers.robust_z=4.0"))
    assert statuses(rows6)["cuts"] == "ran" and statuses(rows6)["shards"] == "skipped"


def test_pipeline_config_errors(tmp_path):
    from stellarnet.pipeline.run import run_pipeline

    with pytest.raises(ValueError, match="unknown pipeline stage"):
        run_pipeline(pipeline_cfg(tmp_path, "pipeline.stages=[survey,bogus]"), echo=lambda s: None)
    with pytest.raises(RuntimeError, match="needs stage 'survey'"):
        run_pipeline(pipeline_cfg(tmp_path, "pipeline.stages=[cuts]"), echo=lambda s: None)
    # the dependency check happens before the stage writes anything
    assert not (tmp_path / "logs" / "pipeline" / "cuts" / "stage.json").exists()


# --------------------------------------------------------------------------- export (fast)


def _predictions(n: int) -> pd.DataFrame:
    from stellarnet.io.predictions import predictions_frame

    rng = np.random.default_rng(0)
    labels = ["TEFF", "LOGG", "FE_H", "ALPHA_FE"]
    chunk = {"apogee_id": np.array([f"2M{i:08d}" for i in range(n)], dtype=object), "ra": rng.uniform(0, 360, n),
             "dec": rng.uniform(-30, 60, n), "snr": rng.uniform(50, 300, n),
             "split": np.array(["train", "val", "test", "test"] * (n // 4), dtype=object),
             "error": np.array([""] * (n - 1) + ["OSError: truncated"], dtype=object)}
    lab = np.column_stack([rng.uniform(4000, 6000, n), rng.uniform(1, 4.5, n), rng.normal(-0.2, 0.3, n),
                           rng.normal(0.1, 0.1, n)]).astype(np.float32)
    sig = np.full_like(lab, 0.1)
    probs = rng.dirichlet(np.ones(4), n)
    pred = {"labels": lab, "sigma_aleatoric": sig, "sigma_epistemic": sig, "sigma_total": sig * 1.4,
            "class_probs": {"stage": probs}, "classes": {"stage": np.array(["MS", "SG", "RGB", "RC"])[probs.argmax(1)]}}
    return predictions_frame(chunk, pred, labels, {"stage": ["MS", "SG", "RGB", "RC"]})


def test_export_catalogue(tmp_path):
    from astropy.table import Table

    from stellarnet.crossval.calibration import Calibration
    from stellarnet.workflows.catalogue import build_catalogue, write_catalogue

    n = 8
    pred = _predictions(n)
    # TEFF_GALAH = TEFF + 10 + 20·(TEFF−5000)/1000 ; FE_H_GALAH = FE_H − 0.05
    calib = Calibration(
        survey="galah", reference="stellarnet", degree=1,
        features=[{"name": "teff", "column": "TEFF", "center": 5000.0, "scale": 1000.0}],
        exponents=[[0], [1]],
        labels={"teff": {"input_column": "TEFF", "output_column": "TEFF_GALAH", "coefficients": [10.0, 20.0]},
                "fe_h": {"input_column": "FE_H", "output_column": "FE_H_GALAH", "coefficients": [-0.05, 0.0]}})
    cpath = calib.save(tmp_path / "calibration_galah_stellarnet.json")
    feats = pd.DataFrame({"APOGEE_ID": pred["APOGEE_ID"], "split": pred["SPLIT"], "EW_A": 1.0,
                          "EW_A_OUTLIER": [True, False] * (n // 2), "M_K_OUTLIER": [True] + [False] * (n - 1)})
    feats = feats.iloc[:-2]  # the last two stars have no feature-table row
    cat = build_catalogue(pred, {"galah": cpath}, feats)

    assert len(cat) == n and cat["APOGEE_ID"].tolist() == pred["APOGEE_ID"].tolist()
    assert list(cat.columns[:5]) == ["APOGEE_ID", "RA", "DEC", "SNR", "SPLIT"]
    for col in ("TEFF", "TEFF_ERR_ALEATORIC", "TEFF_ERR_EPISTEMIC", "TEFF_ERR", "P_STAGE_RC", "STAGE",
                "TEFF_GALAH", "FE_H_GALAH", "READ_ERROR", "FLAG_READ_ERROR", "N_FEATURE_OUTLIERS",
                "FEATURE_OUTLIERS", "FLAG_FEATURE_OUTLIER"):
        assert col in cat.columns, col
    ok = cat["READ_ERROR"] == ""
    np.testing.assert_allclose(cat.loc[ok, "TEFF_GALAH"],
                               cat.loc[ok, "TEFF"] + 10 + 20 * (cat.loc[ok, "TEFF"] - 5000) / 1000, rtol=1e-6)
    np.testing.assert_allclose(cat.loc[ok, "FE_H_GALAH"], cat.loc[ok, "FE_H"] - 0.05, rtol=1e-5, atol=1e-6)
    assert cat["FLAG_READ_ERROR"].tolist() == [False] * (n - 1) + [True]
    assert np.isnan(cat["TEFF_GALAH"].iloc[-1])  # no numbers for an unreadable spectrum
    assert cat["N_FEATURE_OUTLIERS"].tolist() == [2, 0, 1, 0, 1, 0, -1, -1]
    assert cat["FEATURE_OUTLIERS"].iloc[0] == "EW_A,M_K"
    assert cat["FLAG_FEATURE_OUTLIER"].tolist() == [True, False, True, False, True, False, False, False]

    paths = write_catalogue(cat, tmp_path / "out", formats=("fits", "csv", "parquet"))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == \
        ["catalogue.csv", "catalogue.fits", "catalogue.parquet"]  # no temporary files left
    t = Table.read(paths["fits"])
    assert len(t) == n and "TEFF_GALAH" in t.colnames
    assert len(pd.read_csv(paths["csv"])) == n and pd.read_parquet(paths["parquet"]).shape == cat.shape
    with pytest.raises(ValueError, match="unknown catalogue formats"):
        write_catalogue(cat, tmp_path / "out", formats=("xlsx",))


# --------------------------------------------------------------------------- full tiny pipeline (slow)


@pytest.mark.slow
def test_full_tiny_pipeline_outputs_and_partial_rerun(tmp_path):
    from astropy.table import Table

    pytest.importorskip("xgboost", reason="the run's baselines include xgboost (the optional 'baselines' extra)")

    rows, lines = run(pipeline_cfg(tmp_path))
    assert set(statuses(rows).values()) == {"ran"} and len(lines) == 10
    root = tmp_path / "logs" / "pipeline"
    man = json.loads((tmp_path / "data" / "shards" / "sim_dr12" / "manifest.json").read_text())
    n_stars = sum(man["split_rows"].values())

    # feature-set comparison in the summary
    summary = (root / "summary.md").read_text()
    assert "which feature set wins" in summary and "| TEFF (mae) |" in summary
    long = pd.read_csv(root / "baselines" / "feature_sets.csv")
    assert set(long["feature_set"]) == {"spectra_pca", "tabular", "both"}
    assert set(long["method"]) == {"xgboost", "random_forest"}

    # tree importance (both feature set): gain for both methods, permutation for xgboost only
    imp = pd.read_csv(root / "baselines" / "both" / "importance.csv")
    assert set(imp["target"]) == {"TEFF", "LOGG", "FE_H", "ALPHA_FE", "spectral_type", "luminosity_class", "stage"}
    assert imp.groupby(["method", "target"])["gain"].sum().between(0.999, 1.001).all()
    assert imp.loc[imp["method"] == "xgboost", "permutation"].notna().all()
    assert imp.loc[imp["method"] == "random_forest", "permutation"].isna().all()
    assert {"spectra_pca", "spectral_index", "photometry"} <= set(imp["group"])
    assert (root / "baselines" / "both" / "figures" / "importance.png").stat().st_size > 10000

    # network saliency against wavelength
    sal = pd.read_csv(root / "evaluate" / "saliency.csv")
    assert len(sal) == man["n_pixels"] and list(sal.columns) == ["wavelength", *man["label_names"]]
    np.testing.assert_allclose(sal["wavelength"], man["wavelength"])
    assert (sal[man["label_names"]] >= 0).all().all() and (sal[man["label_names"]].max() > 0).all()
    assert (root / "evaluate" / "figures" / "saliency.png").exists()

    # export: one row per star that passed the cuts, all splits
    cat = pd.read_csv(root / "export" / "stellarnet_catalogue.csv", keep_default_na=False, na_values=[""])
    assert len(cat) == n_stars and cat["APOGEE_ID"].is_unique
    assert set(cat["SPLIT"]) == {"train", "val", "test"}
    for col in ("RA", "DEC", "TEFF", "TEFF_ERR", "TEFF_ERR_EPISTEMIC", "P_STAGE_RC", "STAGE",
                "TEFF_LAMOST", "FLAG_READ_ERROR", "N_FEATURE_OUTLIERS", "FLAG_FEATURE_OUTLIER"):
        assert col in cat.columns, col
    assert len(Table.read(root / "export" / "stellarnet_catalogue.fits")) == n_stars

    # second run: everything current
    rows2, _ = run(pipeline_cfg(tmp_path))
    assert set(statuses(rows2).values()) == {"skipped"}

    # a prediction setting changes: predict and what uses its outputs re-run, nothing else
    rows3, _ = run(pipeline_cfg(tmp_path, "pipeline.predict.mc_samples=3"))
    ran = {k for k, s in statuses(rows3).items() if s == "ran"}
    assert ran == {"predict", "crossval", "export"}
