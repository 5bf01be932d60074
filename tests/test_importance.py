"""Feature importance (trees: gain + permutation; network: gradient saliency) and the
feature-set comparison."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from stellarnet.evaluation.figures import save_figure
from stellarnet.evaluation.importance import (
    IMPORTANCE_COLUMNS,
    feature_group,
    feature_set_comparison,
    feature_set_markdown,
    group_importance,
    importance_figure,
    line_saliency,
    load_line_centres,
    network_saliency,
    saliency_figure,
    saliency_frame,
    tree_importance,
)
from stellarnet.baselines.inputs import tabular_features
from stellarnet.baselines.trees import TreeBaseline
from stellarnet.workflows.baselines import run_baselines

LABELS = ["TEFF", "LOGG"]
TASKS = ["stage"]
NAMES = ["EW_FE1_15212", "DEPTH_CO_15586", "JK0", "NOISE"]


def _split(n: int, seed: int) -> dict:
    """Tabular features where TEFF depends on EW_FE1_15212 only, LOGG on JK0 only, and the
    class on DEPTH_CO_15586 only; NOISE is pure noise."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, len(NAMES))).astype(np.float32)
    teff = 4800 + 600 * x[:, 0]
    logg = 2.5 + 1.0 * x[:, 2]
    cls = (x[:, 1] > 0).astype(int)
    return {"flux": np.ones((n, 8), np.float32), "labels": np.stack([teff, logg], 1), "classes": cls[:, None],
            "snr": np.full(n, 100.0), "tabular": x, "tabular_names": NAMES, "label_names": LABELS,
            "class_tasks": TASKS}


@pytest.mark.parametrize("method", ["random_forest", "hist_gb"])
def test_tree_importance_finds_the_informative_feature(method):
    train, test = _split(600, 0), _split(300, 1)
    params = {"n_estimators": 60, "max_depth": 8} if method == "random_forest" else {"max_iter": 40, "early_stopping_rounds": 0}
    tb = TreeBaseline(method, None, params=params, n_jobs=1, feature_set="tabular").fit(train)
    assert tb.feature_names == NAMES
    table = tree_importance(tb, test, n_repeats=3, max_samples=200, seed=0)
    assert list(table.columns) == list(IMPORTANCE_COLUMNS)
    assert set(table["target"]) == {"TEFF", "LOGG", "stage"} and len(table) == 3 * len(NAMES)
    expected = {"TEFF": "EW_FE1_15212", "LOGG": "JK0", "stage": "DEPTH_CO_15586"}
    for target, feat in expected.items():
        sub = table[table["target"] == target].set_index("feature")
        assert sub["permutation"].idxmax() == feat
        if method == "random_forest":  # MDI importances, normalized per target
            assert sub["gain"].idxmax() == feat
            assert sub["gain"].sum() == pytest.approx(1.0)
        else:  # HistGradientBoosting has no native importance
            assert sub["gain"].isna().all()
    # regression importance is the MAE increase in label units: shuffling the Teff feature costs
    # roughly the mean |Δ| of two independent N(0, 600 K) draws (~ 600·2/√π·... ≈ 480 K) minus the fit MAE
    teff = table[(table["target"] == "TEFF") & (table["feature"] == "EW_FE1_15212")]["permutation"].iloc[0]
    assert 200 < teff < 900
    noise = table[(table["target"] == "TEFF") & (table["feature"] == "NOISE")]["permutation"].iloc[0]
    assert abs(noise) < 0.1 * teff
    assert table.loc[table["kind"] == "classification", "metric"].eq("delta_accuracy").all()


def test_tree_importance_without_permutation_and_groups(tmp_path):
    train, test = _split(300, 2), _split(100, 3)
    tb = TreeBaseline("random_forest", None, params={"n_estimators": 20}, n_jobs=1, feature_set="tabular").fit(train)
    table = tree_importance(tb, test, permutation=False)
    assert table["permutation"].isna().all() and table["gain"].notna().all()
    assert [feature_group(f) for f in NAMES] == ["spectral_index", "spectral_index", "photometry", "other"]
    assert feature_group("PC03") == "spectra_pca" and feature_group("EW_X_OUTLIER") == "flag"
    groups = group_importance(table, "gain")
    teff = groups[groups["target"] == "TEFF"].set_index("group")["gain"]
    assert teff.sum() == pytest.approx(1.0) and teff.idxmax() == "spectral_index"
    path = save_figure(importance_figure(table, top=4), tmp_path / "imp.png")
    assert path.stat().st_size > 5000


def test_run_baselines_feature_sets_and_tabular_alignment():
    rng = np.random.default_rng(0)
    n, p = 240, 40
    labels = rng.normal(size=(n, 1))
    flux = (1 + 0.05 * labels * np.sin(np.arange(p))[None, :] + 0.01 * rng.normal(size=(n, p))).astype(np.float32)
    table = pd.DataFrame({"APOGEE_ID": [f"2M{i:04d}" for i in range(n)], "split": "train",
                          "EW_A": labels[:, 0] + 0.01 * rng.normal(size=n), "EW_A_ERR": 0.1, "FE_H_X": 1.0})
    table.attrs["feature_stats"] = {"features": ["EW_A", "EW_A_ERR", "FE_H_X"]}
    ids = list(table["APOGEE_ID"][::-1]) + ["2M_missing"]
    x, names = tabular_features(table, ids, split="train", exclude=["*_ERR", "*_X"])
    assert names == ["EW_A"] and x.shape == (n + 1, 1)
    np.testing.assert_allclose(x[:n, 0], table["EW_A"].to_numpy()[::-1], rtol=1e-6)
    assert np.isnan(x[-1, 0])
    x, _ = tabular_features(table, list(table["APOGEE_ID"]), split="train", exclude=["*_ERR", "*_X"])

    def part(sl):
        return {"flux": flux[sl], "labels": labels[sl], "snr": np.full(len(flux[sl]), 100.0), "tabular": x[sl],
                "tabular_names": ["EW_A"], "label_names": ["TEFF"], "class_tasks": []}

    tr, te = part(slice(0, 180)), part(slice(180, None))
    base = {"methods": ["random_forest"], "n_jobs": 1, "pca": {"n_components": 5},
            "random_forest": {"n_estimators": 20}}
    res = {fs: run_baselines(tr, None, te, {**base, "features": fs}, return_models=True)
           for fs in ("spectra_pca", "tabular", "both")}
    feats = {fs: r["random_forest"]["features"] for fs, r in res.items()}
    assert feats["spectra_pca"]["n_components"] == 5 and feats["spectra_pca"]["n_tabular"] == 0
    assert feats["tabular"]["n_tabular"] == 1 and "n_components" not in feats["tabular"]
    assert res["both"]["random_forest"]["_model"].feature_names == [f"PC{i:02d}" for i in range(5)] + ["EW_A"]
    with pytest.raises(ValueError, match="tabular"):
        run_baselines({**tr, "tabular": None}, None, te, {**base, "features": "tabular"})
    with pytest.raises(ValueError, match="features must be one of"):
        run_baselines(tr, None, te, {**base, "features": "pixels"})


def _result(maes: dict, acc: float) -> dict:
    return {"regression": {"overall": {k: {"mae": v} for k, v in maes.items()}},
            "classification": {"stage": {"accuracy": acc}}}


def test_feature_set_comparison_picks_winners():
    results = {
        "spectra_pca": {"xgboost": _result({"TEFF": 80.0, "FE_H": 0.03}, 0.80),
                        "random_forest": _result({"TEFF": 90.0, "FE_H": 0.05}, 0.85)},
        "tabular": {"xgboost": _result({"TEFF": 60.0, "FE_H": 0.06}, 0.90),
                    "cannon": {"skipped": True, "reason": "n/a"}},
        "both": {"xgboost": _result({"TEFF": 65.0, "FE_H": 0.02}, 0.88)},
    }
    long, winners = feature_set_comparison(results)
    assert len(long) == 4 * 3  # 4 runs × (2 labels + 1 task); the skipped method is left out
    w = winners.set_index("target")
    assert w.loc["TEFF", "winner"] == "tabular" and w.loc["TEFF", "runner_up"] == "both"
    assert w.loc["FE_H", "winner"] == "both" and w.loc["FE_H", "value"] == pytest.approx(0.02)
    assert w.loc["stage", "winner"] == "tabular" and w.loc["stage", "metric"] == "accuracy"
    assert w.loc["stage", "runner_up"] == "both"
    md = feature_set_markdown(long, winners)
    assert "| TEFF (mae) | **tabular** | xgboost | 60.0 | both | 65.0 |" in md
    assert "Targets won: tabular 2, both 1" in md


# --------------------------------------------------------------------------- network saliency


class _Pred:
    """The parts of a Predictor that network_saliency uses."""

    def __init__(self, module):
        from stellarnet.network.inference import Predictor

        p = Predictor(module, fuse=False)
        self.module, self.label_names, self.device = p.module, p.label_names, p.device
        self.standardize_photometry = p.standardize_photometry


P_SMALL = 160
TINY_NET = {
    "spectral_encoder": {"_target_": "stellarnet.network.encoders.SpectralConvEncoder", "channels": [8, 16],
                         "kernel_sizes": [5, 3], "strides": [2, 2], "pool_size": 8, "dropout": 0.1, "out_dim": 32},
    "photometry": {"_target_": "stellarnet.network.encoders.PhotometryMLP", "hidden": [16], "out_dim": 8},
    "trunk": {"_target_": "stellarnet.network.heads.TrunkMLP", "hidden": [64], "dropout": 0.1},
    "regression_head": {"_target_": "stellarnet.network.heads.HeteroscedasticHead"},
    "classification_head": {"_target_": "stellarnet.network.heads.ClassificationHead"},
}
SPEC = {
    "grid": None, "n_pixels": P_SMALL, "wavelength": np.linspace(15100.0, 16900.0, P_SMALL).tolist(),
    "label_names": ["TEFF", "LOGG", "FE_H", "ALPHA_FE"], "label_units": ["K", "dex", "dex", "dex"],
    "label_mean": [4800.0, 2.5, -0.2, 0.1], "label_std": [600.0, 1.0, 0.3, 0.1],
    "phot_features": ["JH0", "HK0", "JK0", "BPRP0", "M_K", "M_G"],
    "phot_mean": [0.6, 0.15, 0.75, 1.2, -1.0, 1.5], "phot_std": [0.1, 0.05, 0.15, 0.3, 1.5, 1.5],
    "class_tasks": {"spectral_type": ["F", "G", "K", "M"], "luminosity_class": ["I", "II", "III", "IV", "V"],
                    "stage": ["MS", "SG", "RGB", "RC"]},
}


@pytest.fixture(scope="module")
def tiny_module():
    from stellarnet.network import StellarNetModule

    torch.manual_seed(0)
    return StellarNetModule(net=TINY_NET, data_spec=SPEC, log_figures=False).eval()


def test_network_saliency_matches_finite_differences_and_ignores_masked_pixels(tiny_module):
    rng = np.random.default_rng(0)
    n = 3
    flux = (1 + 0.05 * rng.normal(size=(n, P_SMALL))).astype(np.float32)
    err = np.full((n, P_SMALL), 0.01, np.float32)
    phot = rng.normal(size=(n, 6)) * 0.1 + np.array([0.6, 0.15, 0.75, 1.2, -1.0, 1.5])
    mask = np.ones((n, P_SMALL), np.float32)
    mask[:, 40:50] = 0
    pred = _Pred(tiny_module)
    sal = network_saliency(pred, flux, err, phot, mask, max_stars=None, batch_size=2)
    assert sal.shape == (4, P_SMALL) and np.all(sal >= 0)
    assert np.all(sal[:, 40:50] == 0)  # masked pixels do not reach the network
    assert sal[:, :40].max() > 0

    # finite differences of the physical-unit prediction (TEFF, K) for a few pixels
    m = tiny_module
    std = m.label_std.detach().numpy()
    phot_z, phot_m = pred.standardize_photometry(phot, n)

    def teff(fl):
        with torch.no_grad():
            out = m(torch.from_numpy(fl), torch.from_numpy(err), torch.from_numpy(mask),
                    torch.from_numpy(phot_z), torch.from_numpy(phot_m))
        return out["mean"].numpy()[:, 0].astype(np.float64) * std[0]

    h = 1e-2
    for px in (5, 77, 130):
        up, dn = flux.copy(), flux.copy()
        up[:, px] += h
        dn[:, px] -= h
        fd = np.abs((teff(up) - teff(dn)) / (2 * h)).mean()
        assert sal[0, px] == pytest.approx(fd, rel=0.05, abs=1e-3 * sal[0].max())


def test_saliency_tables_and_figure(tmp_path):
    lam = np.linspace(15100.0, 16900.0, 4000)  # 0.45 Å pixels: every index band holds pixels
    sal = np.ones((4, lam.size))
    lines = load_line_centres()
    assert len(lines) == 31 and {"FE1_15212", "BR11_16811", "CO_15586"} <= set(lines["name"])
    fe = lines.set_index("name").loc["FE1_15212"]
    assert fe["wavelength"] == pytest.approx(15211.68) and fe["species"] == "Fe I"
    band = (lam >= fe["band_lo"] - 1) & (lam <= fe["band_hi"] + 1)
    sal[1, band] = 5.0  # LOGG looks at the Fe I 15212 region only
    frame = saliency_frame(sal, lam, ["TEFF", "LOGG", "FE_H", "ALPHA_FE"])
    assert list(frame.columns) == ["wavelength", "TEFF", "LOGG", "FE_H", "ALPHA_FE"]
    per_line = line_saliency(frame, lines).set_index("name")
    assert per_line.loc["FE1_15212", "LOGG"] == pytest.approx(5.0)
    assert per_line.loc["FE1_15212", "TEFF"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="does not match"):
        saliency_frame(sal[:3], lam, ["TEFF", "LOGG", "FE_H", "ALPHA_FE"])
    path = save_figure(saliency_figure(frame, lines, units={"TEFF": "K"}), tmp_path / "sal.png")
    assert path.stat().st_size > 10000
