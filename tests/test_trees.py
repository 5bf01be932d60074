"""Tests of the PCA features and tree / Cannon baselines (tiny synthetic data, few trees)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest

from stellarnet.baselines import cannon, inputs
from stellarnet.baselines import pca as pca_module
from stellarnet.baselines import trees as T
from stellarnet.common.paths import CONF_DIR
from stellarnet.workflows import baselines as runner

LABELS = ["TEFF", "LOGG", "FE_H", "ALPHA_FE"]
TASKS = ["spectral_type", "luminosity_class", "stage"]
TINY = {
    "n_jobs": 1,
    "seed": 0,
    "pca": {"n_components": 8},
    "xgboost": {"n_estimators": 60, "learning_rate": 0.3, "max_depth": 3, "early_stopping_rounds": 10},
    "lightgbm": {"n_estimators": 60, "learning_rate": 0.3, "num_leaves": 7, "min_child_samples": 5,
                 "early_stopping_rounds": 10},
    "random_forest": {"n_estimators": 25, "min_samples_leaf": 1, "max_features": 0.5},
    "hist_gb": {"max_iter": 60, "learning_rate": 0.3, "max_leaf_nodes": 7, "min_samples_leaf": 5,
                "early_stopping_rounds": 10},
}


def make_split(n: int, seed: int, n_pix: int = 120) -> dict:
    """Labels are linear functions of a few spectral pixels (plus small noise)."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(-1, 1, size=(n, 4))  # latent, scaled labels
    flux = 1.0 + 0.003 * rng.normal(size=(n, n_pix))
    pix = [5, 17, 40, 77]
    for j, p in enumerate(pix):
        flux[:, p] += 0.1 * base[:, j]
        flux[:, p + 1] -= 0.05 * base[:, j]
    labels = base * [800.0, 1.5, 0.6, 0.15] + [5200.0, 3.0, -0.4, 0.1]
    labels[rng.random(n) < 0.1, 2] = np.nan  # missing [Fe/H]
    phot = np.column_stack([base[:, 0] + 0.05 * rng.normal(size=n), rng.normal(size=n)])
    phot[rng.random((n, 2)) < 0.2] = np.nan
    classes = np.column_stack([
        np.digitize(labels[:, 0], [4700, 5200, 5700]),  # 4 "spectral types"
        (labels[:, 1] > 3.0).astype(int) + 2,  # codes 2, 3 only (codes 0, 1 never occur)
        np.where(base[:, 1] + 0.3 * base[:, 3] > 0, 3, 2),  # RGB / RC
    ])
    classes[rng.random(n) < 0.1, 0] = -1
    return {"flux": flux.astype(np.float32), "photometry": phot, "labels": labels, "classes": classes,
            "snr": rng.uniform(30, 400, n), "label_names": LABELS, "class_tasks": TASKS}


def _r2(pred: np.ndarray, true: np.ndarray) -> float:
    ok = np.isfinite(true)
    return 1.0 - np.sum((pred[ok] - true[ok]) ** 2) / np.sum((true[ok] - true[ok].mean()) ** 2)


# ---------------------------------------------------------------------------------------- PCA
def test_pca_state_roundtrip_npz(tmp_path) -> None:
    rng = np.random.default_rng(0)
    flux = (1 + rng.normal(size=(200, 6)) @ rng.normal(size=(6, 90)) * 0.01 + 0.001 * rng.normal(size=(200, 90)))
    pca = pca_module.SpectralPCAFeatures(n_components=6).fit(flux)
    assert pca.components_.shape == (6, 90)
    assert pca.explained_variance_ratio_.sum() > 0.95
    path = pca.save(tmp_path / "pca")
    assert path.suffix == ".npz"
    with np.load(path, allow_pickle=False) as z:  # plain arrays only
        assert all(z[k].dtype != object for k in z.files)
    back = pca_module.SpectralPCAFeatures.load(path)
    np.testing.assert_allclose(back.transform(flux), pca.transform(flux), rtol=1e-6, atol=1e-6)
    assert back.n_components == 6 and not back.whiten
    with pytest.raises(ValueError):
        back.transform(flux[:, :50])
    with pytest.raises(RuntimeError):
        pca_module.SpectralPCAFeatures().transform(flux)


def test_pca_incremental_and_mask() -> None:
    rng = np.random.default_rng(1)
    flux = 1 + rng.normal(size=(300, 4)) @ rng.normal(size=(4, 60)) * 0.02 + 0.001 * rng.normal(size=(300, 60))
    full = pca_module.SpectralPCAFeatures(4).fit(flux)
    inc = pca_module.SpectralPCAFeatures(4, incremental=True, batch_size=64).fit(flux)
    # same subspace: projections agree up to sign per component
    a, b = full.transform(flux), inc.transform(flux)
    for k in range(4):
        assert abs(np.corrcoef(a[:, k], b[:, k])[0, 1]) > 0.99
    # a masked pixel is replaced by the training mean flux: its value no longer matters
    mask = np.ones_like(flux, dtype=bool)
    mask[:10, 7] = False
    bad = flux.copy()
    bad[:10, 7] = 50.0
    at_mean = flux.copy()
    at_mean[:10, 7] = full.mean_[7]
    np.testing.assert_allclose(full.transform(bad, mask)[:10], full.transform(at_mean)[:10], atol=1e-5)
    # n_components is capped at the number of training rows
    assert pca_module.SpectralPCAFeatures(50).fit(flux[:20]).components_.shape[0] == 20


def test_impute_medians() -> None:
    x = np.array([[1.0, np.nan], [3.0, np.nan], [np.nan, np.nan], [5.0, np.nan]])
    med = inputs.fit_medians(x)
    assert med.tolist() == [3.0, 0.0]
    assert inputs.impute(x, med)[2].tolist() == [3.0, 0.0]


# ---------------------------------------------------------------------------------- baselines
@pytest.fixture(scope="module")
def splits() -> tuple[dict, dict, dict]:
    return make_split(500, 0), make_split(150, 1), make_split(250, 2)


@pytest.fixture(scope="module")
def baseline_results(splits) -> dict:
    train, val, test = splits
    cfg = {**TINY, "methods": ["xgboost", "lightgbm", "random_forest", "hist_gb"]}
    return run(train, val, test, cfg)


def run(train, val, test, cfg):
    return runner.run_baselines(train, val, test, cfg, return_predictions=True)


@pytest.mark.parametrize("method", ["xgboost", "lightgbm", "random_forest", "hist_gb"])
def test_baselines_learn_linear_labels(baseline_results, splits, method) -> None:
    if method in ("xgboost", "lightgbm"):
        pytest.importorskip(method, reason=f"{method} is in the optional 'baselines' extra")
    _, _, test = splits
    res = baseline_results[method]
    pred = res["_predictions"]
    assert pred["labels"].shape == (250, 4) and pred["classes"].shape == (250, 3)
    for j, lab in enumerate(LABELS):
        r2 = _r2(pred["labels"][:, j], test["labels"][:, j])
        assert r2 > 0.9, f"{method} {lab} R2={r2:.3f}"
    assert res["regression"]["overall"]["FE_H"]["n"] == int(np.isfinite(test["labels"][:, 2]).sum())
    # classes: above chance, and only codes seen in training are predicted
    cls = res["classification"]
    assert cls["spectral_type"]["accuracy"] > 0.75  # 4 classes, chance ~0.25
    assert cls["luminosity_class"]["accuracy"] > 0.85  # 2 classes
    assert cls["stage"]["accuracy"] > 0.85
    assert set(np.unique(pred["classes"][:, 1])) <= {2, 3}
    assert "red_clump" in cls["stage"]
    assert set(res["regression"]["by_snr"]) == {"0-50", "50-100", "100-200", ">=200"}
    assert res["train_time_s"] > 0 and res["predict_rate"] > 0
    assert res["features"]["n_components"] == 8 and res["features"]["n_photometry"] == 2
    assert all(v is not None and v >= 1 for v in res["n_iterations"].values())


def test_gbdt_early_stopping_uses_validation(splits) -> None:
    pytest.importorskip("xgboost", reason="xgboost is in the optional 'baselines' extra")
    train, val, _ = splits
    pca = pca_module.SpectralPCAFeatures(8).fit(train["flux"])
    tb = T.TreeBaseline("xgboost", pca, params={"n_estimators": 400, "learning_rate": 0.5, "max_depth": 3,
                                                "early_stopping_rounds": 5}, n_jobs=1)
    tb.fit(train, val)
    assert all(n < 400 for n in tb.n_iterations.values())


def test_missing_library_is_skipped(splits, monkeypatch, caplog) -> None:
    train, val, test = splits
    monkeypatch.setitem(sys.modules, "xgboost", None)  # import xgboost -> ImportError
    cfg = {**TINY, "methods": ["xgboost", "random_forest"], "random_forest": {"n_estimators": 5}}
    with caplog.at_level(logging.WARNING, logger="stellarnet.workflows.baselines"):
        res = runner.run_baselines(train, val, test, cfg)
    assert res["xgboost"]["skipped"] and "pip install 'stellarnet[baselines]'" in res["xgboost"]["reason"]
    assert any("xgboost" in r.message for r in caplog.records)
    assert res["random_forest"]["regression"]["overall"]["TEFF"]["n"] == 250
    with pytest.raises(ValueError):
        T.make_estimator("catboost", "regression")


@pytest.mark.parametrize("name", ["default", "fast"])
def test_hydra_baseline_configs_are_valid(splits, name) -> None:
    """Every method and hyper-parameter in conf/baselines/*.yaml builds and fits (few trees)."""
    from omegaconf import OmegaConf

    conf_dir = CONF_DIR / "baselines"
    cfg = OmegaConf.load(conf_dir / f"{name}.yaml")
    small = {"n_jobs": 1, "pca": {"n_components": 5}, "xgboost": {"n_estimators": 3}, "lightgbm": {"n_estimators": 3},
             "random_forest": {"n_estimators": 3}, "hist_gb": {"max_iter": 3}, "cannon": {"n_iter": 3}}
    cfg = OmegaConf.merge(cfg, small)
    assert set(cfg.methods) <= set(T.METHODS) | {"cannon"}
    train, val, test = splits
    res = runner.run_baselines(train, val, test, cfg)
    assert set(res) == set(cfg.methods)
    for method, r in res.items():
        if method in ("xgboost", "lightgbm") and not _installed(method):  # the optional 'baselines' extra
            assert r["skipped"] and "pip install 'stellarnet[baselines]'" in r["reason"]
            continue
        assert not r.get("skipped"), r
        assert r["regression"]["overall"]["LOGG"]["n"] == 250


def _installed(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------------------------- Cannon
def test_cannon_recovers_quadratic_labels() -> None:
    rng = np.random.default_rng(5)
    n, n_pix = 400, 150
    lab = np.column_stack([rng.uniform(4000, 6000, n), rng.uniform(1, 4, n), rng.uniform(-1, 0.3, n)])
    scaled = (lab - lab.mean(0)) / lab.std(0)
    theta = rng.normal(size=(10, n_pix)) * 0.02
    theta[0] = 1.0
    flux = cannon.quadratic_vectorizer(scaled) @ theta + 0.002 * rng.normal(size=(n, n_pix))
    err = np.full_like(flux, 0.002)
    model = cannon.CannonModel(scatter=True).fit(lab[:300], flux[:300], err[:300])
    pred = model.predict(flux[300:], err[300:])
    for j in range(3):
        assert _r2(pred[:, j], lab[300:, j]) > 0.98
    # vectorizer Jacobian agrees with finite differences
    x = rng.normal(size=(2, 3))
    jac = cannon.quadratic_vectorizer_jacobian(x)
    h = 1e-6
    for j in range(3):
        dx = np.zeros(3)
        dx[j] = h
        fd = (cannon.quadratic_vectorizer(x + dx) - cannon.quadratic_vectorizer(x - dx)) / (2 * h)
        np.testing.assert_allclose(jac[:, :, j], fd, atol=1e-6)


def test_cannon_in_run_baselines(splits) -> None:
    train, val, test = splits
    res = runner.run_baselines(train, val, test, {**TINY, "methods": ["cannon"]})["cannon"]
    assert "classification" not in res
    assert res["regression"]["overall"]["TEFF"]["n"] == 250
    assert res["n_train"] == int(np.all(np.isfinite(train["labels"]), axis=1).sum())
    # labels are linear in a few pixels -> the Cannon fits them well
    assert res["regression"]["overall"]["TEFF"]["mae"] < 40.0
