"""Cramér–Rao bound: analytic linear-Gaussian cases, Monte-Carlo check, masking / SNR scaling,
finite-difference Jacobian, summaries, the real emulator for one giant, and the benchmark script."""

from __future__ import annotations

import importlib.util
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stellarnet.evaluation.crlb_summary import GAUSS_MAE_FACTOR, crlb_by_bin, crlb_table_markdown, mae_over_crlb
from stellarnet.evaluation.fisher import SingularFisherWarning, crlb_covariance, crlb_for_stars, crlb_sigma, fisher_matrix, jacobian
from stellarnet.evaluation.crlb import box_selection, compute_crlb, crlb_goal, crlb_report, subset_rows, to_model_grid
from stellarnet.evaluation.report import to_jsonable

ROOT = Path(__file__).resolve().parents[1]


def _linear_problem(seed: int = 0, n_pix: int = 300, n_lab: int = 3):
    rng = np.random.default_rng(seed)
    A = rng.normal(0.0, 1.0, (n_pix, n_lab)) * np.array([1e-3, 0.3, 0.1])[:n_lab]  # mixed "units"
    b = 1.0 + rng.normal(0.0, 0.05, n_pix)
    sigma = rng.uniform(0.005, 0.02, n_pix)

    def model_fn(labels: np.ndarray) -> np.ndarray:
        return np.atleast_2d(labels) @ A.T + b

    return A, b, sigma, model_fn


def _analytic_cov(A: np.ndarray, sigma: np.ndarray, good: np.ndarray | None = None) -> np.ndarray:
    if good is not None:
        A, sigma = A[good], sigma[good]
    return np.linalg.inv(A.T @ (A / sigma[:, None] ** 2))


def test_linear_model_matches_analytic_bound_and_monte_carlo():
    A, b, sigma, model_fn = _linear_problem()
    theta = np.array([4800.0, 2.5, 0.1])
    J = jacobian(model_fn, theta, steps=[10.0, 0.02, 0.01])
    np.testing.assert_allclose(J, A, rtol=1e-6, atol=1e-9)
    cov_true = _analytic_cov(A, sigma)
    F = fisher_matrix(J, sigma)
    np.testing.assert_allclose(crlb_covariance(F), cov_true, rtol=1e-6)
    bound = crlb_for_stars(model_fn, theta[None], flux_err=sigma, steps=[10.0, 0.02, 0.01])
    np.testing.assert_allclose(bound[0], np.sqrt(np.diag(cov_true)), rtol=1e-6)

    # Monte Carlo: weighted least squares on noisy spectra reaches the bound (it is efficient here)
    rng = np.random.default_rng(1)
    n_mc = 4000
    y = model_fn(theta)[0] + rng.normal(0.0, 1.0, (n_mc, A.shape[0])) * sigma
    W = 1.0 / sigma**2
    fit = np.linalg.solve(A.T @ (A * W[:, None]), (A * W[:, None]).T @ (y - b).T).T
    np.testing.assert_allclose(fit.mean(axis=0), theta, atol=3 * bound[0].max())
    ratio = fit.std(axis=0) / bound[0]
    assert np.all(np.abs(ratio - 1.0) < 0.1), ratio


def test_masking_pixels_increases_the_bound():
    A, _, sigma, model_fn = _linear_problem(2)
    theta = np.array([[5000.0, 3.0, -0.2]])
    good = np.ones(A.shape[0], bool)
    good[::3] = False
    full = crlb_for_stars(model_fn, theta, flux_err=sigma, steps=1e-3)
    masked = crlb_for_stars(model_fn, theta, flux_err=sigma, good=good, steps=1e-3)
    assert np.all(masked > full)
    np.testing.assert_allclose(masked[0], np.sqrt(np.diag(_analytic_cov(A, sigma, good))), rtol=1e-6)
    # a pixel with infinite error is the same as a masked pixel
    sig_inf = np.where(good, sigma, np.inf)
    np.testing.assert_allclose(crlb_for_stars(model_fn, theta, flux_err=sig_inf, steps=1e-3), masked, rtol=1e-10)


def test_doubling_snr_halves_the_bound_and_snr_equals_constant_error():
    _, _, _, model_fn = _linear_problem(3)
    theta = np.array([[4500.0, 2.0, 0.0], [5200.0, 4.0, -0.5]])
    s50 = crlb_for_stars(model_fn, theta, snr=50, steps=1e-3)
    s100 = crlb_for_stars(model_fn, theta, snr=np.array([100.0, 100.0]), steps=1e-3)
    np.testing.assert_allclose(s50 / s100, 2.0, rtol=1e-9)
    np.testing.assert_allclose(crlb_for_stars(model_fn, theta, flux_err=np.full(300, 0.01), steps=1e-3), s100, rtol=1e-9)
    with pytest.raises(ValueError, match="snr"):
        crlb_for_stars(model_fn, theta)


def test_finite_difference_jacobian_of_quadratic_model_matches_analytic():
    rng = np.random.default_rng(4)
    n_pix, n_lab = 50, 4
    c = rng.normal(size=(n_pix, n_lab))
    q = rng.normal(size=(n_pix, n_lab, n_lab))
    scale = np.array([1000.0, 1.0, 0.3, 0.2])  # physical label scales

    def model_fn(labels: np.ndarray) -> np.ndarray:
        x = np.atleast_2d(labels) / scale
        return x @ c.T + np.einsum("nl,plm,nm->np", x, q, x)

    def analytic(labels: np.ndarray) -> np.ndarray:
        x = np.atleast_2d(labels) / scale
        d = c[None] + np.einsum("plm,nm->npl", q, x) + np.einsum("pml,nm->npl", q, x)
        return d / scale

    labels = rng.normal(size=(7, n_lab)) * scale + np.array([4800, 2.5, 0, 0.1])
    J = jacobian(model_fn, labels, steps=[10.0, 0.02, 0.01, 0.01], chunk=3)
    assert J.shape == (7, n_pix, n_lab)
    np.testing.assert_allclose(J, analytic(labels), rtol=1e-6, atol=1e-9)
    # a model callable carrying an analytic jacobian is used as such
    model_fn.jacobian = analytic  # type: ignore[attr-defined]
    np.testing.assert_array_equal(jacobian(model_fn, labels), analytic(labels))


def test_jacobian_stencil_stays_inside_bounds():
    A, b, _, _ = _linear_problem(5)
    lo, hi = np.array([4000.0, 0.0, -1.0]), np.array([6000.0, 5.0, 0.5])

    def boxed(labels: np.ndarray) -> np.ndarray:
        labels = np.atleast_2d(labels)
        if np.any(labels < lo) or np.any(labels > hi):
            raise ValueError("outside the box")
        return labels @ A.T + b

    edge = np.array([[4000.0, 5.0, 0.5], [5995.0, 0.01, -0.995]])
    with pytest.raises(ValueError, match="outside"):
        jacobian(boxed, edge, steps=[10.0, 0.02, 0.01])
    J = jacobian(boxed, edge, steps=[10.0, 0.02, 0.01], bounds=(lo, hi))
    np.testing.assert_allclose(J, np.broadcast_to(A, J.shape), rtol=1e-6, atol=1e-9)


def test_singular_and_uninformative_fisher():
    A, _, sigma, _ = _linear_problem(6)
    # label 2 has no information (zero derivative everywhere): infinite bound, others exact
    A0 = A.copy()
    A0[:, 2] = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error", SingularFisherWarning)  # expected zero info is not "singular"
        s = crlb_sigma(fisher_matrix(A0, sigma))
    assert math.isinf(s[2])
    np.testing.assert_allclose(s[:2], np.sqrt(np.diag(_analytic_cov(A[:, :2], sigma))), rtol=1e-6)
    # two labels with proportional derivatives: degenerate → warning, finite pseudo-inverse values
    Ad = A.copy()
    Ad[:, 1] = 2.0 * Ad[:, 0]
    with pytest.warns(SingularFisherWarning, match="singular"):
        s = crlb_sigma(fisher_matrix(Ad, sigma))
    assert np.all(np.isfinite(s))
    # all pixels masked: every bound infinite
    assert np.all(np.isinf(crlb_sigma(fisher_matrix(A, sigma, np.zeros(A.shape[0], bool)))))


def test_fisher_matrix_broadcasting_and_nonfinite_sigma():
    A, _, sigma, _ = _linear_problem(7)
    J = np.stack([A, 2 * A])
    F = fisher_matrix(J, sigma[None, :])
    np.testing.assert_allclose(F[1], 4 * F[0])
    bad_sig = sigma.copy()
    bad_sig[:10] = np.nan
    good = np.ones(A.shape[0], bool)
    good[:10] = False
    np.testing.assert_allclose(fisher_matrix(A, bad_sig), fisher_matrix(A, sigma, good))


def test_mae_over_crlb_recovers_the_excess_factor():
    rng = np.random.default_rng(8)
    n = 20000
    snr = rng.uniform(30, 300, n)
    crlb = np.column_stack([600.0 / snr, 1.0 / snr, 0.4 / snr])  # bound ∝ 1/SNR
    k = np.array([1.0, 2.0, 3.0])
    res = rng.normal(size=(n, 3)) * crlb * k
    out = mae_over_crlb(res, crlb, snr, label_names=["TEFF", "LOGG", "FE_H"])
    for j, name in enumerate(["TEFF", "LOGG", "FE_H"]):
        for b in ("50-100", "100-200", ">=200", "all"):
            assert abs(out[name][b]["ratio_per_star"] / k[j] - 1) < 0.05, (name, b, out[name][b])
        for b in ("50-100", "100-200"):  # narrow-ish bins: median-CRLB ratio close too
            assert abs(out[name][b]["ratio"] / k[j] - 1) < 0.15, (name, b, out[name][b])
        assert out[name]["0-50"]["n"] == int(((snr < 50)).sum())
        assert out[name]["all"]["n"] == n
        assert out[name]["all"]["sigma_achieved"] == pytest.approx(out[name]["all"]["mae"] / GAUSS_MAE_FACTOR)
    # masks, empty bins, JSON
    out2 = mae_over_crlb(res, crlb, snr, edges=[0, 10, 50, math.inf], label_names=["TEFF", "LOGG", "FE_H"],
                         mask=snr > 100)
    assert out2["TEFF"]["0-10"]["n"] == 0 and math.isnan(out2["TEFF"]["0-10"]["ratio"])
    assert out2["TEFF"]["all"]["n"] == int((snr > 100).sum())
    json.dumps(to_jsonable(out2), allow_nan=False)
    summ = crlb_by_bin(crlb, snr, label_names=["TEFF", "LOGG", "FE_H"])
    sel = (snr >= 100) & (snr < 200)
    assert summ["LOGG"]["100-200"]["median"] == pytest.approx(np.median(crlb[sel, 1]))
    md = crlb_table_markdown(summ, "median")
    assert "| TEFF (K) |" in md and "100-200" in md
    assert "| LOGG |" in crlb_table_markdown(out, "ratio")


def _giant_model_fn():
    from stellarnet.evaluation.spectral_model import emulator_model

    model = emulator_model()
    return model.emulator, model.fn


def test_spectral_model_is_the_normalized_emulator():
    from stellarnet.preparation.spectra import continuum_normalize
    from stellarnet.physics.kurucz import load_emulator
    from stellarnet.evaluation.spectral_model import MODEL_GRID, emulator_model

    model = emulator_model()
    emu = load_emulator()
    x = np.array([[4800.0, 2.5, 0.0, 0.1], [5600.0, 4.4, -0.3, 0.0]])
    raw = emu(x).astype(np.float64)
    np.testing.assert_allclose(model.fn(x), continuum_normalize(raw, np.ones_like(raw), None, grid="dr12")[0])
    assert model.grid == MODEL_GRID == "dr12" and model.label_names == ("TEFF", "LOGG", "FE_H", "ALPHA_FE")
    np.testing.assert_array_equal(model.bounds[0], emu.x_min)
    np.testing.assert_array_equal(model.bounds[1], emu.x_max)


def test_library_crlb_never_imports_the_simulator():
    """The bound's code (evaluation.crlb, evaluation.fisher) takes the spectral model as an argument."""
    import subprocess
    import sys

    code = ("import sys, stellarnet.evaluation.crlb, stellarnet.evaluation.report, stellarnet.evaluation.split_predictions; "
            "bad = [m for m in sys.modules if m.startswith('stellarnet.simulate')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_to_model_grid_subset_rows_and_box_selection():
    from stellarnet.io import grids

    src, dst = grids.grid_indices("dr17"), grids.grid_indices("dr12")
    arr = np.tile(src.astype(float), (2, 1))
    out = to_model_grid(arr, "dr17", "dr12", np.inf)
    assert out.shape == (2, dst.size)
    np.testing.assert_array_equal(out[0][np.isin(dst, src)], dst[np.isin(dst, src)])
    same = np.zeros((1, dst.size))
    assert to_model_grid(same, "dr12", "dr12", 1.0) is same

    np.testing.assert_array_equal(subset_rows(5), np.arange(5))
    np.testing.assert_array_equal(subset_rows(5, 10), np.arange(5))
    r = subset_rows(100, 10, seed=3)
    assert r.size == 10 and np.all(np.diff(r) > 0)
    np.testing.assert_array_equal(r, subset_rows(100, 10, seed=3))

    labels = np.array([[5000.0, 2.0], [8000.0, 2.0], [np.nan, 2.0], [5000.0, 2.0], [5000.0, 9.0]])
    snr = np.array([100.0, 100.0, 100.0, 0.0, 50.0])
    sel, counts = box_selection(labels, snr, [4000.0, 0.0], [6000.0, 5.0])
    np.testing.assert_array_equal(sel, [True, False, False, False, False])
    assert counts == {"n": 5, "n_in_box": 1, "n_outside_box": 2, "n_no_labels": 2}


def test_crlb_report_on_a_linear_model():
    A, b, sigma, model_fn = _linear_problem(seed=4)
    names = ["TEFF", "LOGG", "FE_H"]
    rng = np.random.default_rng(5)
    n = 3000
    labels = np.column_stack([rng.uniform(4000, 6000, n), rng.uniform(1, 4, n), rng.uniform(-1, 0.5, n)])
    labels[:50, 0] = 7000.0  # outside the box
    labels[50:60, 2] = np.nan  # no label
    snr = rng.uniform(40, 300, n)
    flux_err = sigma[None, :] * (100.0 / snr[:, None])
    pix_mask = np.ones((n, A.shape[0]), bool)
    pix_mask[:, :20] = False
    flux_err[:, :20] = 1e-6  # masked pixels are excluded however small their error
    giants = rng.uniform(size=n) < 0.6
    bounds = ([3500.0, 0.0, -2.0], [6500.0, 5.0, 1.0])
    bound = crlb_for_stars(model_fn, np.nan_to_num(labels), flux_err=np.where(pix_mask, flux_err, np.inf),
                           steps=[10.0, 0.02, 0.01])
    k = 1.5
    pred = labels + rng.normal(size=labels.shape) * bound * k
    cat_err = np.full_like(labels, np.nan)
    cat_err[:] = [20.0, 0.02, 0.01]
    out = crlb_report(model_fn, bounds, labels_at=labels, snr=snr, flux_err=flux_err, pix_mask=pix_mask,
                      grid="dr12", model_grid="dr12", label_names=names, pred=pred, reference_err=cat_err,
                      groups={"giants": giants}, edges=[0, 100, 200, math.inf])
    assert (out["n"], out["n_in_box"], out["n_outside_box"], out["n_no_labels"]) == (n, n - 60, 50, 10)
    inside = np.ones(n, bool)
    inside[:60] = False
    assert out["n_by_group"] == {"giants": int((giants & inside).sum()), "all": n - 60}
    assert list(out["crlb_by_bin"]) == ["giants", "all"]
    np.testing.assert_allclose(out["crlb_by_bin"]["all"]["LOGG"]["all"]["median"], np.median(bound[inside, 1]),
                               rtol=1e-6)
    for j, name in enumerate(names):
        for b in ("0-100", "100-200", ">=200", "all"):
            assert abs(out["mae_over_crlb"]["all"][name][b]["ratio_per_star"] / k - 1) < 0.1
    goal = out["goal"]
    assert goal["met"] is True and goal["group"] == "giants"
    rows = inside & giants & (snr >= 100)
    for j, name in enumerate(names):
        g = goal["labels"][name]
        assert g["n"] == int(rows.sum()) and g["within_2x"] is True
        assert g["median_reference_err"] == pytest.approx(cat_err[0, j])
        expect = np.median(np.hypot(bound[rows, j], cat_err[0, j])) / np.median(bound[rows, j])
        assert g["floor_ratio"] == pytest.approx(expect, rel=1e-6)
    json.dumps(to_jsonable(out), allow_nan=False)

    # k = 3 everywhere: the goal is not met; no giants at S/N >= 100: undetermined
    far = labels + rng.normal(size=labels.shape) * bound * 3.0
    out3 = crlb_report(model_fn, bounds, labels_at=labels, snr=snr, flux_err=flux_err, pix_mask=pix_mask,
                       grid="dr12", model_grid="dr12", label_names=names, pred=far, groups={"giants": giants})
    assert out3["goal"]["met"] is False and "floor_ratio" not in out3["goal"]["labels"]["TEFF"]
    none = crlb_goal(far, bound, np.full(n, 50.0), giants, label_names=names)
    assert all(v["within_2x"] is None and v["n"] == 0 for v in none.values())
    empty = crlb_report(model_fn, ([0.0] * 3, [1.0] * 3), labels_at=labels, snr=snr, flux_err=flux_err,
                        pix_mask=pix_mask, grid="dr12", model_grid="dr12", label_names=names, pred=pred,
                        steps=[0.1, 0.1, 0.1])
    assert empty["skipped"] is True and empty["n_in_box"] == 0 and "goal" not in empty
    with pytest.raises(ValueError, match="noise"):
        crlb_report(model_fn, bounds, labels_at=labels, snr=snr, flux_err=flux_err, pix_mask=pix_mask,
                    grid="dr12", model_grid="dr12", label_names=names, noise="white")


def test_compute_crlb_noise_models_share_one_jacobian():
    A, b, sigma, model_fn = _linear_problem(seed=6)
    labels = np.array([[5000.0, 2.0, 0.0], [5500.0, 3.0, -0.5]])
    snr = np.array([50.0, 200.0])
    good = np.ones((2, A.shape[0]), bool)
    calls = []

    def counted(x):
        calls.append(len(x))
        return model_fn(x)

    lines: list[str] = []
    out = compute_crlb(counted, labels, snr, np.tile(sigma, (2, 1)), good, steps=[10.0, 0.02, 0.01],
                       progress=lines.append)
    assert len(calls) == 1 and len(lines) == 1 and lines[0].startswith("CRLB 2/2")
    np.testing.assert_allclose(out["flux_err"][0], np.sqrt(np.diag(_analytic_cov(A, sigma))), rtol=1e-6)
    np.testing.assert_allclose(out["snr"][1], np.sqrt(np.diag(_analytic_cov(A, np.full_like(sigma, 1 / 200)))),
                               rtol=1e-6)
    with pytest.raises(ValueError, match="unknown noise"):
        compute_crlb(model_fn, labels, snr, np.tile(sigma, (2, 1)), good, noise_models=("white",))


def test_emulator_giant_bound_has_sensible_magnitudes():
    emu, model_fn = _giant_model_fn()
    giant = np.array([[4800.0, 2.5, 0.0, 0.1]])
    s = {snr: crlb_for_stars(model_fn, giant, snr=snr, bounds=(emu.x_min, emu.x_max))[0] for snr in (50, 100, 200)}
    for snr, v in s.items():
        print(f"CRLB giant SNR {snr}: Teff {v[0]:.2f} K, logg {v[1]:.4f}, [Fe/H] {v[2]:.4f}, [a/Fe] {v[3]:.4f}")
    v = s[100]
    assert 1.0 < v[0] < 50.0
    assert 0.001 < v[1] < 0.1
    assert 0.0005 < v[2] < 0.05
    assert 0.0005 < v[3] < 0.05
    np.testing.assert_allclose(s[50] / s[200], 4.0, rtol=1e-6)
    # step-size independence of the finite differences (the model is smooth)
    s_half = crlb_for_stars(model_fn, giant, snr=100, steps=[5.0, 0.01, 0.005, 0.005])[0]
    np.testing.assert_allclose(s_half, v, rtol=0.02)


def _load_script(name: str = "crlb"):
    spec = importlib.util.spec_from_file_location(f"{name}_script", ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


def test_crlb_script_on_tiny_shards(tiny_shards, tmp_path, capsys):
    from stellarnet.dataset.reader import ShardReader

    mod = _load_script()
    reader = ShardReader(tiny_shards, "test", verify=False)
    d = reader.read_all(("labels", "apogee_id"))
    reader.close()
    ids = d["apogee_id"].astype(str)
    lab = d["labels"][:, :4].astype(float)
    pd.DataFrame({"APOGEE_ID": ids, "TEFF": lab[:, 0] + 5.0, "LOGG": lab[:, 1], "FE_H": lab[:, 2],
                  "ALPHA_FE": lab[:, 3]}).to_csv(tmp_path / "pred.csv", index=False)
    out = tmp_path / "crlb.json"
    rc = mod.main(["--dataset", str(tiny_shards), "--split", "test", "--out", str(out), "--max-stars", "12",
                   "--predictions", str(tmp_path / "pred.csv"), "--truth", "auto",
                   "--per-star", str(tmp_path / "per_star.csv")])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["labels_at"] == "truth" and 0 < res["n_in_box"] <= 12
    all_bins = res["crlb"]["flux_err"]["all"]
    assert all_bins["TEFF"]["all"]["n"] == res["n_in_box"]
    assert 0.1 < all_bins["TEFF"]["all"]["median"] < 200
    # shard errors include the model-mismatch inflation: never a tighter bound than white 1/SNR noise
    assert all_bins["LOGG"]["all"]["median"] >= 0.9 * res["crlb"]["snr"]["all"]["LOGG"]["all"]["median"]
    cat = res["mae_over_crlb"]["catalogue"]["all"]
    assert cat["TEFF"]["all"]["mae"] == pytest.approx(5.0, rel=1e-3)  # pred = catalogue + 5 K
    assert cat["LOGG"]["all"]["mae"] == pytest.approx(0.0, abs=1e-5)
    assert "truth" in res["mae_over_crlb"]
    per_star = pd.read_csv(tmp_path / "per_star.csv")
    assert len(per_star) == res["n_in_box"] and np.all(per_star["TEFF_CRLB"] > 0)
    assert np.median(per_star["FE_H_CRLB"]) == pytest.approx(all_bins["FE_H"]["all"]["median"])
    printed = capsys.readouterr().out
    assert "median CRLB" in printed and "MAE/CRLB" in printed


def test_nuisance_crlb_costs_nothing_when_orthogonal_and_grows_when_degenerate():
    from stellarnet.io import grids

    mod = _load_script("crlb_nuisances")
    rng = np.random.default_rng(0)
    J = rng.standard_normal((400, 2))
    q, _ = np.linalg.qr(np.concatenate([J, rng.standard_normal((400, 1))], 1))
    orth = {"lsf": q[:, 2:3]}  # orthogonal to both label columns
    base = mod.crlb_with_nuisances(J, orth, (), 100.0)
    np.testing.assert_allclose(mod.crlb_with_nuisances(J, orth, ("lsf",), 100.0), base, rtol=1e-9)
    degenerate = {"lsf": (J[:, :1] + 0.1 * q[:, 2:3])}  # nearly the first label's column
    s = mod.crlb_with_nuisances(J, degenerate, ("lsf",), 100.0)
    assert s[0] > 5 * base[0] and s[1] < 1.5 * base[1] + 1e-12
    # the LSF column of a Gaussian line is ½ f'' per chip and zero on the other chips
    flux = 1.0 - 0.5 * np.exp(-0.5 * ((np.arange(grids.n_pixels("dr12")) % 50 - 25) / 1.4) ** 2)
    cols = mod.nuisance_columns(flux, np.ones((flux.size, 1)))
    first = grids.chip_slices("dr12")[0]
    assert cols["lsf"].shape[1] == 3 and np.all(cols["lsf"][first.stop:, 0] == 0)
    assert cols["lsf"][first.start + 25, 0] > 0  # a line core gets shallower when the LSF broadens
