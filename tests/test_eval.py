"""Tests of stellarnet.evaluation: metrics, calibration, report and figures."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn.metrics import f1_score, precision_recall_fscore_support

from stellarnet.evaluation import calibration as cal
from stellarnet.evaluation import figures as figs
from stellarnet.evaluation import metrics as M
from stellarnet.evaluation import report as R

LABELS = ["TEFF", "LOGG", "FE_H", "ALPHA_FE"]


# ------------------------------------------------------------------------------------- metrics
def test_regression_metrics_hand_computed() -> None:
    pred = np.array([1.0, 2.0, 3.0, 4.0, 10.0, 5.0])
    true = np.array([0.0, 0.0, 0.0, 0.0, 0.0, np.nan])  # last row: NaN truth, excluded
    m = M.regression_metrics(pred, true, outlier_k=3.0)
    # residuals 1, 2, 3, 4, 10
    assert m["n"] == 5
    assert m["mae"] == pytest.approx(4.0)
    assert m["bias_mean"] == pytest.approx(4.0)
    assert m["bias_median"] == pytest.approx(3.0)
    # |d - 3| = 2, 1, 0, 1, 7 -> MAD = 1
    assert m["scatter"] == pytest.approx(1.4826)
    assert m["rmse"] == pytest.approx(math.sqrt(130 / 5))
    assert m["std"] == pytest.approx(np.std([1, 2, 3, 4, 10], ddof=1))
    assert m["outlier_frac"] == pytest.approx(0.2)  # only |10 - 3| > 3 * 1.4826
    assert m["outlier_threshold"] == pytest.approx(3 * 1.4826)
    m_abs = M.regression_metrics(pred, true, outlier_abs=3.5)
    assert m_abs["outlier_frac"] == pytest.approx(0.4)  # 4 and 10
    empty = M.regression_metrics(np.array([1.0]), np.array([np.nan]))
    assert empty["n"] == 0 and math.isnan(empty["mae"])
    with pytest.raises(ValueError):
        M.regression_metrics(np.zeros(3), np.zeros(4))


def test_multi_label_outlier_abs_per_label() -> None:
    true = np.zeros((5, 2))
    pred = np.column_stack([[1.0, 2, 3, 4, 10], [0.1, 0.2, 0.3, 0.4, 1.0]])
    out = M.multi_label_metrics(pred, true, ["TEFF", "LOGG"], outlier_abs={"TEFF": 3.5})
    assert out["TEFF"]["outlier_frac"] == pytest.approx(0.4)
    assert out["LOGG"]["outlier_frac"] == pytest.approx(0.2)  # falls back to k * scatter
    assert out["LOGG"]["mae"] == pytest.approx(0.4)


def test_per_snr_bin_and_group_metrics() -> None:
    # residual = bin index + 1 in each S/N bin, so per-bin MAE is known exactly
    snr = np.array([10, 20, 60, 70, 80, 150, 500, 1000, np.nan, -5.0])
    d = np.array([1, 1, 2, 2, 2, 3, 4, 4, 9, 9], dtype=float)
    true = np.column_stack([np.full(10, 5000.0), np.full(10, 2.5)])
    true[1, 1] = np.nan
    pred = true + d[:, None]
    groups = np.array([0, 0, 1, 1, 1, 1, 2, -1, 0, 0])
    rep = M.regression_report(pred, true, ["TEFF", "LOGG"], snr=snr, snr_edges=[0, 50, 100, 200, np.inf],
                              groups=groups, group_names=["MS", "RGB", "RC"])
    assert list(rep["by_snr"]) == ["0-50", "50-100", "100-200", ">=200"]
    assert [rep["by_snr"][b]["TEFF"]["n"] for b in rep["by_snr"]] == [2, 3, 1, 2]
    assert [rep["by_snr"][b]["TEFF"]["mae"] for b in rep["by_snr"]] == pytest.approx([1, 2, 3, 4])
    assert rep["by_snr"]["0-50"]["LOGG"]["n"] == 1  # the NaN truth is excluded
    assert rep["overall"]["TEFF"]["n"] == 10
    assert rep["by_group"]["MS"]["TEFF"]["n"] == 4
    assert rep["by_group"]["MS"]["TEFF"]["mae"] == pytest.approx((1 + 1 + 9 + 9) / 4)
    assert rep["by_group"]["RGB"]["TEFF"]["mae"] == pytest.approx((2 + 2 + 2 + 3) / 4)
    assert rep["by_group"]["RC"]["TEFF"]["n"] == 1
    assert M.snr_bin_index(np.array([0.0, 49.99, 50.0, np.inf]), [0, 50, np.inf]).tolist() == [0, 0, 1, -1]
    with pytest.raises(ValueError):
        M.snr_bin_index(np.zeros(2), [50, 0])


def test_confusion_matrix_and_accuracy_hand_computed() -> None:
    true = np.array([0, 0, 1, 1, 2, -1])
    pred = np.array([0, 1, 1, 1, 0, 2])
    cm = M.confusion_matrix(true, pred, 3)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    m = M.classification_metrics(pred, true, ["a", "b", "c"])
    assert m["n"] == 5
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["confusion"] == cm.tolist()
    norm = np.array(m["confusion_normalized"])
    assert norm[0].tolist() == [0.5, 0.5, 0.0] and norm[2].tolist() == [1.0, 0.0, 0.0]
    assert m["per_class"]["b"] == {"precision": pytest.approx(2 / 3), "recall": 1.0, "f1": pytest.approx(0.8), "support": 2}
    assert m["per_class"]["c"]["f1"] == 0.0


def test_macro_f1_matches_sklearn() -> None:
    rng = np.random.default_rng(3)
    true = rng.integers(0, 4, 500)
    pred = np.where(rng.random(500) < 0.6, true, rng.integers(0, 5, 500))  # class 4 only predicted
    m = M.classification_metrics(pred, true, n_classes=5)
    assert m["macro_f1"] == pytest.approx(f1_score(true, pred, average="macro", zero_division=0))
    assert m["accuracy"] == pytest.approx(np.mean(true == pred))
    p, r, f, s = precision_recall_fscore_support(true, pred, labels=range(5), zero_division=0)
    for k in range(5):
        pc = m["per_class"][str(k)]
        assert (pc["precision"], pc["recall"], pc["f1"], pc["support"]) == pytest.approx((p[k], r[k], f[k], s[k]))


def test_red_clump_purity_completeness_and_report() -> None:
    # stage codes: MS 0, SG 1, RGB 2, RC 3
    true = np.array([3, 3, 3, 3, 2, 2, 2, 0, -1])
    pred = np.array([3, 3, 3, 2, 3, 2, 2, 0, 3])
    rc = M.red_clump_purity_completeness(pred, true, rc_code=3)
    assert rc["purity"] == pytest.approx(3 / 4)  # the −1 row is excluded
    assert rc["completeness"] == pytest.approx(3 / 4)
    rep = M.classification_report(np.column_stack([pred, pred]), np.column_stack([true, true]),
                                  ["spectral_type", "stage"])
    assert "red_clump" in rep["stage"] and "red_clump" not in rep["spectral_type"]
    assert rep["stage"]["red_clump"]["purity"] == pytest.approx(0.75)
    assert rep["stage"]["classes"][:4] == ["MS", "SG", "RGB", "RC"]


# --------------------------------------------------------------------------------- calibration
def _gauss(n: int, scale_true: float, seed: int, err: float = 0.0):
    rng = np.random.default_rng(seed)
    true = rng.normal(size=(n, 2)) * [500.0, 1.0] + [5000.0, 3.0]
    sigma = rng.uniform(0.5, 2.0, size=(n, 2)) * [50.0, 0.1]  # predicted σ
    total = np.sqrt((scale_true * sigma) ** 2 + err**2)
    pred = true + rng.normal(size=(n, 2)) * total
    return pred, true, sigma


def test_calibration_correct_sigma() -> None:
    pred, true, sigma = _gauss(20000, 1.0, 0)
    rep = cal.calibration_report(pred, true, sigma, label_names=["TEFF", "LOGG"])
    for m in rep.values():
        assert m["n"] == 20000
        assert m["z_std"] == pytest.approx(1.0, abs=0.03)
        assert m["z_robust_std"] == pytest.approx(1.0, abs=0.04)
        assert m["coverage_1sigma"] == pytest.approx(0.683, abs=0.015)
        assert m["coverage_2sigma"] == pytest.approx(0.954, abs=0.01)
        rel = m["reliability"]
        assert np.max(np.abs(np.subtract(rel["observed"], rel["expected"]))) < 0.02
        assert m["calibration_error"] < 0.01


def test_calibration_sigma_too_small_and_scale_fit() -> None:
    pred, true, sigma = _gauss(20000, 2.0, 1)  # predicted σ half the real scatter
    m = cal.calibration_metrics(pred[:, 0], true[:, 0], sigma[:, 0])
    assert m["z_std"] == pytest.approx(2.0, abs=0.06)
    assert m["coverage_1sigma"] < 0.45
    rel = m["reliability"]
    assert all(o < e for o, e in zip(rel["observed"], rel["expected"]))  # over-confident everywhere
    k_rms = cal.fit_sigma_scale(pred, true, sigma)
    k_rob = cal.fit_sigma_scale(pred, true, sigma, method="robust")
    assert k_rms == pytest.approx([2.0, 2.0], abs=0.06)
    assert k_rob == pytest.approx([2.0, 2.0], abs=0.08)
    # fitted on "validation", applied to an independent "test" split
    pt, tt, st = _gauss(20000, 2.0, 2)
    scaled = cal.calibration_report(pt, tt, cal.apply_sigma_scale(st, k_rms))
    for m in scaled.values():
        assert m["z_std"] == pytest.approx(1.0, abs=0.04)
        assert m["coverage_1sigma"] == pytest.approx(0.683, abs=0.02)


def test_sigma_scale_with_catalogue_error() -> None:
    # residuals have predicted-σ part 1.5·σ plus a catalogue error e added in quadrature
    pred, true, sigma = _gauss(20000, 1.5, 4, err=0.08)
    err = np.full_like(sigma, 0.08)
    k = cal.fit_sigma_scale(pred[:, 1:], true[:, 1:], sigma[:, 1:], err[:, 1:])
    assert k[0] == pytest.approx(1.5, abs=0.08)
    z = cal.z_scores(pred[:, 1], true[:, 1], k[0] * sigma[:, 1], err[:, 1])
    assert np.std(z) == pytest.approx(1.0, abs=0.04)
    # NaN truths / NaN scale handling
    assert np.isnan(cal.z_scores(np.array([1.0]), np.array([np.nan]), np.array([1.0]))[0])
    assert cal.apply_sigma_scale(np.ones((2, 2)), np.array([2.0, np.nan])).tolist() == [[2.0, 1.0], [2.0, 1.0]]


# ------------------------------------------------------------------------------------- report
def _fake_model(n: int = 300, seed: int = 0):
    rng = np.random.default_rng(seed)
    true = np.column_stack([rng.uniform(3500, 7000, n), rng.uniform(0.5, 5, n), rng.uniform(-2, 0.5, n),
                            rng.uniform(-0.1, 0.4, n)])
    sig = np.array([80.0, 0.1, 0.05, 0.03])
    pred = true + rng.normal(size=true.shape) * sig
    true[:5, 2] = np.nan
    classes = np.column_stack([rng.integers(-1, 4, n), rng.integers(0, 5, n), rng.integers(0, 4, n)])
    pcls = np.where(rng.random(classes.shape) < 0.7, classes, rng.integers(0, 4, classes.shape))
    return pred, true, np.tile(sig, (n, 1)), classes, pcls, rng.uniform(10, 400, n)


def test_build_and_write_report(tmp_path) -> None:
    pred, true, sigma, cls, pcls, snr = _fake_model()
    rep = R.build_report(pred, true, LABELS, sigma=sigma, sigma_scale=np.array([1.0, 1.0, 2.0, 1.0]),
                         pred_classes=pcls, true_classes=cls, snr=snr, train_time_s=12.5, predict_rate=1000.0,
                         meta={"model": "fake", "split": "test"})
    text = json.dumps(rep, allow_nan=False)  # plain, finite JSON (NaN became null)
    assert json.loads(text)["regression"]["overall"]["FE_H"]["n"] == 295
    assert set(rep["regression"]["by_group"]) == {"MS", "SG", "RGB", "RC"}  # from the true stage column
    assert rep["calibration_raw"]["TEFF"]["z_std"] == pytest.approx(1.0, abs=0.15)
    assert rep["calibration"]["FE_H"]["z_std"] == pytest.approx(0.5, abs=0.08)  # σ scaled ×2
    assert rep["sigma_scale"]["FE_H"] == 2.0
    assert "red_clump" in rep["classification"]["stage"]
    paths = R.write_report(rep, tmp_path / "out", "test_report")
    assert json.loads(paths["json"].read_text())["meta"]["model"] == "fake"
    md = paths["markdown"].read_text()
    assert "# test_report" in md and "| TEFF [K] |" in md and "Red clump" in md and "By S/N" in md
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["test_report.json", "test_report.md"]


def test_to_jsonable_and_comparison_table() -> None:
    obj = R.to_jsonable({"a": np.float32(1.5), "b": np.array([1, 2]), "c": math.nan, "_hidden": 1, 3: (np.int64(4),)})
    assert obj == {"a": 1.5, "b": [1, 2], "c": None, "3": [4]}
    pred, true, _, cls, pcls, snr = _fake_model()
    a = R.build_report(pred, true, LABELS, pred_classes=pcls, true_classes=cls, train_time_s=3.0, predict_rate=500.0)
    b = R.build_report(pred + [100.0, 0, 0, 0], true, LABELS, pred_classes=cls, true_classes=cls, train_time_s=7.0,
                       predict_rate=50.0)
    table = R.comparison_table({"netA": a, "netB": b, "xgboost": {"skipped": True, "reason": "not installed"}})
    lines = table.strip().splitlines()
    assert len(lines) == 5
    assert len({line.count("|") for line in lines}) == 1  # all rows have the same column count
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[0] == "method" and "TEFF MAE [K]" in header and "stage F1" in header
    row_b = [c.strip() for c in lines[3].strip("|").split("|")]
    assert row_b[header.index("stage acc")] == "1.000"
    assert row_b[header.index("train [s]")] == "7.0"
    assert float(row_b[header.index("TEFF MAE [K]")]) > 90
    assert "skipped: not installed" in lines[4]


# ------------------------------------------------------------------------------------ figures
def test_figures_render_and_save(tmp_path) -> None:
    pred, true, sigma, cls, pcls, snr = _fake_model(200)
    rep = R.build_report(pred, true, LABELS, sigma=sigma, pred_classes=pcls, true_classes=cls, snr=snr)
    made = {
        "one_to_one": figs.one_to_one_figure(pred, true, LABELS, color=snr),
        "resid_snr": figs.residuals_vs_snr_figure(pred, true, snr, LABELS),
        "kiel": figs.kiel_diagram_figure(true, pred, LABELS),
        "cm": figs.confusion_matrices_figure(rep["classification"]),
        "reliability": figs.reliability_figure(rep["calibration"]),
        "compare": figs.method_comparison_figure({"a": rep, "b": rep, "c": {"skipped": True}}),
    }
    kiel_axes = made["kiel"].axes[:2]
    assert all(ax.xaxis_inverted() and ax.yaxis_inverted() for ax in kiel_axes)
    assert len(made["one_to_one"].axes) == 5  # 4 panels + colour bar
    assert "MAE" in made["one_to_one"].axes[0].texts[0].get_text()
    for name, fig in made.items():
        path = figs.save_figure(fig, tmp_path / name)
        assert path.suffix == ".png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left
    written = figs.write_standard_figures(tmp_path / "std", pred, true, LABELS, snr=snr, report=rep, prefix="test_")
    assert set(written) == {"one_to_one", "residuals_vs_snr", "kiel", "confusion", "reliability"}
    assert all(p.name.startswith("test_") and p.stat().st_size > 1000 for p in written.values())


def test_fit_sigma_two_term_recovers_scale_and_floor_through_catalogue_noise():
    """Errors = a·σ_fit (shrinks with S/N) ⊕ b·σ_floor (does not), compared with references that
    carry their own noise: the ML fit recovers a and b, a single scale cannot cover both ends."""
    rng = np.random.default_rng(11)
    n = 6000
    snr = rng.uniform(50, 400, n)
    s_fit = 5.0 * 100 / snr  # K: a formal σ ∝ 1/SNR
    s_floor = rng.uniform(8.0, 20.0, n)  # e.g. the network's σ
    a_true, b_true = 1.6, 0.35
    truth = rng.normal(4800, 400, n)
    pred = truth + np.sqrt((a_true * s_fit) ** 2 + (b_true * s_floor) ** 2) * rng.standard_normal(n)
    err = np.full(n, 15.0)
    ref = truth + err * rng.standard_normal(n)
    a, b = cal.fit_sigma_two_term(pred, ref, s_fit, s_floor, err)
    assert a.shape == b.shape == (1,)
    assert abs(a[0] - a_true) < 0.25 and abs(b[0] - b_true) < 0.08, (a, b)
    sig2 = np.sqrt((a * s_fit) ** 2 + (b * s_floor) ** 2)
    k = cal.fit_sigma_scale(pred, ref, s_fit, err)
    hi = snr > 250
    z2, z1 = (pred - truth) / sig2, (pred - truth) / (k * s_fit)
    assert abs(np.mean(np.abs(z2[hi]) < 1) - 0.683) < 0.05  # calibrated at high S/N too
    assert np.mean(np.abs(z1[hi]) < 1) < 0.6  # the single scale under-covers there
    # no floor in the data: b comes out small; NaN where too few rows
    pred0 = truth + a_true * s_fit * rng.standard_normal(n)
    a0, b0 = cal.fit_sigma_two_term(pred0, truth, s_fit, s_floor)
    assert abs(a0[0] - a_true) < 0.1 and b0[0] < 0.05
    an, bn = cal.fit_sigma_two_term(np.array([[1.0], [np.nan]]), np.zeros((2, 1)), np.ones((2, 1)), np.ones((2, 1)))
    assert np.isnan(an[0]) and np.isnan(bn[0])


def test_sigma_fits_leave_out_reference_failures():
    """3 % of the references off by 300-900 K (a catalogue's unflagged failed fits): the two-term
    fit and the single scale come out as without them; without clipping both are inflated > 2x."""
    rng = np.random.default_rng(12)
    n = 6000
    snr = rng.uniform(50, 400, n)
    s_fit, s_floor = 5.0 * 100 / snr, rng.uniform(8.0, 20.0, n)
    truth = rng.normal(4800, 400, n)
    pred = truth + np.sqrt((1.6 * s_fit) ** 2 + (0.35 * s_floor) ** 2) * rng.standard_normal(n)
    err = np.full(n, 15.0)
    ref = truth + err * rng.standard_normal(n)
    failed = ref.copy()
    bad = rng.random(n) < 0.03
    failed[bad] += rng.choice([-1, 1], bad.sum()) * rng.uniform(300, 900, bad.sum())
    a, b = cal.fit_sigma_two_term(pred, ref, s_fit, s_floor, err)
    ac, bc = cal.fit_sigma_two_term(pred, failed, s_fit, s_floor, err)
    assert abs(ac[0] - a[0]) < 0.15 and abs(bc[0] - b[0]) < 0.05, (a, b, ac, bc)
    ap, bp = cal.fit_sigma_two_term(pred, failed, s_fit, s_floor, err, clip_sigma=None)
    assert max(ap[0] / a[0], bp[0] / b[0]) > 2, (a, b, ap, bp)
    k, kc = cal.fit_sigma_scale(pred, ref, s_fit, err), cal.fit_sigma_scale(pred, failed, s_fit, err)
    assert abs(kc[0] / k[0] - 1) < 0.05, (k, kc)
    assert cal.fit_sigma_scale(pred, failed, s_fit, err, clip_sigma=None)[0] > 2 * k[0]


def test_temperature_scaling_fixes_over_confident_probabilities():
    """Probabilities sharpened by T = 1/3 (over-confident): the fitted temperature is ~3, the ECE
    drops, accuracy is unchanged; the Predictor applies a folder's temperature."""
    from stellarnet.evaluation.calibration import expected_calibration_error, fit_temperature
    from stellarnet.network.inference import apply_temperature

    rng = np.random.default_rng(0)
    n, k = 4000, 4
    logits = rng.normal(0, 1.0, (n, k))
    true_p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    y = np.array([rng.choice(k, p=row) for row in true_p])
    sharp = apply_temperature(true_p, 1 / 3)  # what an over-confident network reports
    t = fit_temperature(sharp, y)
    assert 2.6 < t < 3.4
    fixed = apply_temperature(sharp, t)
    assert expected_calibration_error(fixed, y) < 0.03 < expected_calibration_error(sharp, y)
    assert (fixed.argmax(1) == sharp.argmax(1)).all()
    np.testing.assert_allclose(fixed.sum(1), 1.0)
    assert fit_temperature(sharp[:5], y[:5]) == 1.0  # too few rows: no change
    assert np.isnan(expected_calibration_error(sharp, -np.ones(n)))


def test_predictor_applies_the_model_folders_class_temperature(tmp_path):
    from conftest import tiny_model_folder

    from stellarnet.network import load_model
    from stellarnet.network.inference import apply_temperature

    model = load_model(tiny_model_folder(tmp_path / "m", photometry=False, dropout=0.0))
    rng = np.random.default_rng(1)
    flux = (1 - 0.2 * rng.random((6, model.n_pixels))).astype(np.float32)
    err = np.full_like(flux, 0.01)
    plain = model.predict(flux, err)["class_probs"]["stage"]
    model.data_spec["class_temperature"] = {"stage": 4.0}
    scaled = model.predict(flux, err)["class_probs"]["stage"]
    np.testing.assert_allclose(scaled, apply_temperature(plain, 4.0), rtol=1e-5, atol=1e-6)


def test_predict_accepts_pandas_and_astropy_and_returns_a_qtable(tmp_path):
    import astropy.units as u
    import pandas as pd
    from astropy.table import Table

    from conftest import tiny_model_folder

    from stellarnet.network import load_model

    model = load_model(tiny_model_folder(tmp_path / "m", photometry=False, dropout=0.0))
    rng = np.random.default_rng(2)
    flux = (1 - 0.2 * rng.random((3, model.n_pixels))).astype(np.float32)
    err = np.full_like(flux, 0.01)
    ref = model.predict(flux, err)["labels"]
    for f, e in ((pd.DataFrame(flux), pd.DataFrame(err)),
                 (Table({"FLUX": flux}), Table({"FLUX_ERR": err})),
                 (flux * u.dimensionless_unscaled, err * u.dimensionless_unscaled), (flux.tolist(), err.tolist())):
        np.testing.assert_allclose(model.predict(f, e)["labels"], ref, rtol=1e-6)
    with pytest.raises(ValueError, match="must be dimensionless"):
        model.predict(flux * u.erg, err)
    table = model.predict(flux, err, output="table")
    assert table["TEFF"].unit == u.K and table["TEFF_ERR"].unit == u.K and table["LOGG_ERR"].unit == u.dex
    np.testing.assert_allclose(table["TEFF"].value, ref[:, 0], rtol=1e-6)
    assert "STELLARNET_FLAG" in table.colnames and "P_STAGE_RC" in table.colnames


def test_an_unresolvable_sigma_floor_is_not_assumed_zero():
    """Reference errors (50) dwarf a floor of 5: maximum likelihood may put the floor at ~0, the
    'upper' rule takes the largest floor the data allow at 1σ; a floor the data measure is kept."""
    from stellarnet.evaluation.calibration import fit_sigma_two_term

    rng = np.random.default_rng(3)
    n = 1200
    s_fit = rng.uniform(2, 6, n)
    s_net = np.full(n, 15.0)
    truth = np.sqrt(s_fit**2 + (0.35 * s_net) ** 2)  # a floor b = 0.35
    err = np.full(n, 50.0)
    pred = rng.normal(0, truth) + rng.normal(0, err)
    a_ml, b_ml = fit_sigma_two_term(pred, np.zeros(n), s_fit, s_net, err)
    a_up, b_up = fit_sigma_two_term(pred, np.zeros(n), s_fit, s_net, err, unresolved_floor="upper")
    assert b_up[0] > b_ml[0] and b_up[0] >= 0.2
    # well measured (small reference errors): the rule changes nothing
    pred2 = rng.normal(0, truth) + rng.normal(0, 1.0, n)
    a1, b1 = fit_sigma_two_term(pred2, np.zeros(n), s_fit, s_net, np.ones(n))
    a2, b2 = fit_sigma_two_term(pred2, np.zeros(n), s_fit, s_net, np.ones(n), unresolved_floor="upper")
    np.testing.assert_allclose([a1[0], b1[0]], [a2[0], b2[0]])
    assert 0.25 < b1[0] < 0.45


def test_calibration_metrics_pin_their_definitions():
    """z std with ddof 1, robust std about the median (a biased z keeps its spread), n = 0 when
    nothing is usable, reliability levels 0.05 … 0.95 and 0.99; the robust σ scale ignores a bias."""
    from stellarnet.evaluation.calibration import DEFAULT_LEVELS, _fit_scale_1d, calibration_metrics

    z = np.array([-1.0, 0.0, 2.0])
    m = calibration_metrics(z, np.zeros(3), np.ones(3))
    assert m["n"] == 3 and m["z_std"] == pytest.approx(np.std(z, ddof=1)) and m["z_mean"] == pytest.approx(1 / 3)
    rng = np.random.default_rng(6)
    biased = 5.0 + rng.normal(0, 1, 4001)
    mb = calibration_metrics(biased, np.zeros(4001), np.ones(4001))
    assert mb["z_robust_std"] == pytest.approx(1.0, abs=0.05) and mb["z_mean"] == pytest.approx(5.0, abs=0.05)
    empty = calibration_metrics(np.full(3, np.nan), np.zeros(3), np.ones(3))
    assert empty["n"] == 0 and np.isnan(empty["z_std"])
    assert DEFAULT_LEVELS[:2] == (0.05, 0.1) and DEFAULT_LEVELS[-2:] == (0.95, 0.99) and len(DEFAULT_LEVELS) == 20
    r = 3.0 + rng.normal(0, 2.0, 4001)  # residuals with a bias: the robust scale is their spread, 2
    k = _fit_scale_1d(r, np.ones(4001), np.zeros(4001), "robust", (1e-3, 1e3))
    assert k == pytest.approx(2.0, rel=0.05)


def test_expected_calibration_error_by_hand():
    """Three stars in three confidence bins: |1 − 0.9|, |0 − 0.6|, |1 − 0.8| → ECE 0.3; class 0 counts."""
    from stellarnet.evaluation.calibration import expected_calibration_error

    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]])
    assert expected_calibration_error(probs, np.array([0, 1, 1])) == pytest.approx(0.3)
    assert expected_calibration_error(probs, np.array([0, -1, 1])) == pytest.approx(0.15)  # −1: ignored
