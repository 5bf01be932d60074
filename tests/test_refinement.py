"""The refinement stage end to end: build it for a model folder, load it, predict, write catalogues."""

from __future__ import annotations

import copy
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from test_evaluate import NET as EVAL_NET
from test_evaluate import SPEC_KEYS

from stellarnet.dataset.manifest import load_manifest
from stellarnet.evaluation.split_predictions import load_split
from stellarnet.network import StellarNetModule, save_model_folder
from stellarnet.network.model_folder import EMULATOR_FILE, CheckpointError, load_model
from stellarnet.workflows.refinement import build_refinement
from stellarnet.io.predictions import predictions_frame

NET = copy.deepcopy(EVAL_NET)  # the evaluation tests' tiny network, without dropout (as the default model)
NET["spectral_encoder"]["dropout"] = NET["trunk"]["dropout"] = 0.0
SETTINGS = {"hidden": 16, "epochs": 3, "batch_size": 64, "members": 2, "member_epochs": 2,
            "fit": {"iters": 2, "clip_rounds": 1, "clip_iters": 1}}


@pytest.fixture(scope="module")
def refined_dir(tiny_shards, tmp_path_factory) -> tuple[Path, dict]:
    """An (untrained) tiny network's model folder with a 3-epoch refinement stage."""
    manifest = load_manifest(tiny_shards)
    torch.manual_seed(0)
    module = StellarNetModule(net=NET, data_spec={k: manifest[k] for k in SPEC_KEYS}, log_figures=False)
    folder = save_model_folder(module, tmp_path_factory.mktemp("refined_model"))
    summary = build_refinement(folder, tiny_shards, SETTINGS, tensorboard_dir=folder.parent / "tb", progress=False)
    return folder, summary


def test_build_writes_emulator_and_summary(refined_dir, tiny_shards):
    folder, summary = refined_dir
    assert (folder / EMULATOR_FILE).is_file()
    saved = json.loads((folder / "refinement.json").read_text())
    assert saved["training"]["epochs"] == 3 and saved["training"]["hidden"] == 16
    n_train = load_manifest(tiny_shards)["split_rows"]["train"]
    assert summary["training"]["stars"] == n_train
    assert len(summary["sigma_scale"]) == 4 and all(np.isfinite(summary["sigma_scale"]))
    assert 0 <= summary["val_refined_fraction"] <= 1
    assert not list(folder.glob(".*.tmp"))  # atomic write left nothing behind
    assert list((folder.parent / "tb").glob("events.*"))
    assert saved["training"]["members"]["n"] == 2 and saved["training"]["members"]["epochs"] == 2


def test_member_spread_is_part_of_the_refined_sigma(refined_dir, tiny_shards):
    """The stage's member emulators load with it; their spread is reported and added to the refined σ
    in quadrature (a predictor without them gives the same labels and a σ smaller by exactly that)."""
    folder, _ = refined_dir
    model = load_model(folder)
    assert len(model.emulator_members) == 2
    data = load_split(tiny_shards, "test")
    args = (data["flux"], data["flux_err"], data["photometry"], data["pix_mask"])
    out = model.predict(*args)
    model.disagreement_inflation = False
    with_members = model.predict(*args)
    members, model.emulator_members = model.emulator_members, []
    without = model.predict(*args)
    assert "refine_emulator_spread" not in without
    spread = with_members["refine_emulator_spread"]
    ok = (with_members["refine_flag"] == 0) & (without["refine_flag"] == 0)
    assert ok.any() and np.all(spread[ok] > 0)
    np.testing.assert_allclose(with_members["labels"][ok], without["labels"][ok], rtol=1e-5)
    np.testing.assert_allclose(with_members["sigma_aleatoric"][ok] ** 2,
                               without["sigma_aleatoric"][ok] ** 2 + spread[ok] ** 2, rtol=1e-3)
    assert np.all(out["sigma_aleatoric"][ok] >= with_members["sigma_aleatoric"][ok] * (1 - 1e-5))
    model.emulator_members = members


def test_second_look_is_the_network_on_the_spectrum_without_the_fit_outliers(refined_dir, tiny_shards):
    """Where the fit rejected outlier pixels, the network's labels, σ and classes are those it gives for
    the same spectrum with exactly those pixels masked."""
    from stellarnet.preparation.spectra import BAD_PIXEL_ERR
    from stellarnet.refinement.fit import refine_labels

    folder, _ = refined_dir
    data = load_split(tiny_shards, "test")
    flux, err = data["flux"].copy(), data["flux_err"].copy()
    rng = np.random.default_rng(0)
    good = data["pix_mask"] > 0
    hot = good & (rng.random(flux.shape) < 0.005)  # unflagged hot pixels with an ordinary error
    flux[hot] += 50 * err[hot]
    model = load_model(folder)
    out = model.predict(flux, err, data["photometry"], data["pix_mask"])
    plain = load_model(folder, refine=False)
    net = plain.predict(flux, err, data["photometry"], data["pix_mask"])
    fit = refine_labels(model.emulator, *[np.asarray(a, np.float32) for a in (flux, err, data["pix_mask"])],
                        net["labels"].astype(np.float64), **model.refine_settings)
    rows, cols = fit.outlier_pixels
    assert rows.size and np.isin(np.flatnonzero(hot.any(1)), rows).mean() > 0.8  # the hot pixels were found
    masked_flux, masked_err, mask = flux.copy(), err.copy(), data["pix_mask"].astype(np.float32).copy()
    masked_flux[rows, cols], masked_err[rows, cols], mask[rows, cols] = 1.0, BAD_PIXEL_ERR, 0.0
    looked = np.unique(rows)
    again = plain.predict(masked_flux[looked], masked_err[looked], data["photometry"][looked], mask[looked])
    np.testing.assert_allclose(out["labels_network"][looked], again["labels"], rtol=1e-5, atol=1e-4)
    for task, names in again["classes"].items():
        assert np.array_equal(out["classes"][task][looked], names)
    rest = np.setdiff1d(np.arange(len(flux)), looked)
    np.testing.assert_array_equal(out["labels_network"][rest], net["labels"][rest])


def test_predictor_refines_by_default_and_can_be_switched_off(refined_dir, tiny_shards):
    folder, summary = refined_dir
    data = load_split(tiny_shards, "test")
    refined = load_model(folder)
    assert refined.emulator is not None
    np.testing.assert_allclose(refined.refine_sigma_scale, summary["sigma_scale"], rtol=1e-6)
    np.testing.assert_allclose(refined.refine_sigma_network_scale, summary["sigma_network_scale"], rtol=1e-6)
    out = refined.predict(data["flux"], data["flux_err"], data["photometry"], data["pix_mask"])
    plain = load_model(folder, refine=False).predict(data["flux"], data["flux_err"], data["photometry"], data["pix_mask"])
    off = refined.predict(data["flux"], data["flux_err"], data["photometry"], data["pix_mask"], refine=False)
    # the network's own labels, but for the stars whose fit rejected outlier pixels: those the network
    # looked at again with the pixels masked (Predictor._second_look)
    clean = out["refine_outlier_fraction"] == 0
    assert clean.any()
    np.testing.assert_array_equal(out["labels_network"][clean], plain["labels"][clean])
    no_look = load_model(folder)
    no_look.second_look = False
    np.testing.assert_array_equal(no_look.predict(data["flux"], data["flux_err"], data["photometry"],
                                                  data["pix_mask"])["labels_network"], plain["labels"])
    np.testing.assert_array_equal(off["labels"], plain["labels"])
    assert "refine_flag" not in off
    ok = out["refine_flag"] == 0
    kept = out["refine_flag"] == 1
    np.testing.assert_array_equal(out["labels"][kept], out["labels_network"][kept])
    if ok.any():
        assert not np.array_equal(out["labels"][ok], plain["labels"][ok])
    assert np.isfinite(out["refine_chi2"]).all() and np.all(out["sigma_total"] > 0)
    b = np.asarray(summary["sigma_network_scale"])  # the refined σ carries the error floor b·σ_network
    assert np.all(out["sigma_aleatoric"][ok] >= b * out["sigma_network"][ok] * (1 - 1e-5))
    df = predictions_frame({"apogee_id": np.arange(len(data["flux"]))}, out, refined.label_names, refined.class_tasks)
    for col in ("TEFF", "TEFF_NET", "TEFF_NET_ERR", "REFINE_CHI2", "REFINE_FLAG", "TEFF_ERR_EMULATOR"):
        assert col in df.columns
    np.testing.assert_array_equal(df["LOGG_ERR_EMULATOR"], out["refine_emulator_spread"][:, 1])
    with pytest.raises(ValueError, match="no spectrum emulator"):
        load_model(folder, refine=False).predict(data["flux"][:2], data["flux_err"][:2], refine=True)


def test_saved_fit_settings_are_used_and_old_stages_fit_no_continuum(refined_dir, tmp_path):
    folder, _ = refined_dir
    new = load_model(folder)
    assert new.refine_settings == {"iters": 2, "clip_rounds": 1, "clip_iters": 1, "clip_threshold": 2.0,
                                   "continuum_degree": 4, "continuum_knots": 100.0, "pixel_clip": 5.0, "fit_lsf": True,
                                   "lsf_per_chip": True, "noise_correlation": True}
    assert new.chi2_scaling == "two_sided" and new.label_range is not None
    assert new.disagreement_inflation is True
    old = tmp_path / "old"
    shutil.copytree(folder, old)
    state = torch.load(old / EMULATOR_FILE, weights_only=True)
    for key in ("continuum_degree", "continuum_knots", "pixel_clip", "fit_lsf", "noise_correlation"):  # saved before
        del state["refine"][key]
    del state["chi2_scaling"], state["label_range"], state["disagreement_inflation"]
    torch.save(state, old / EMULATOR_FILE)
    loaded = load_model(old)
    assert loaded.disagreement_inflation is False  # an old stage's σ is what it was
    assert loaded.refine_settings["continuum_degree"] is None and loaded.refine_settings["pixel_clip"] is None
    assert loaded.refine_settings["fit_lsf"] is False and loaded.refine_settings["continuum_knots"] is None
    assert loaded.refine_settings["noise_correlation"] is False
    assert loaded.chi2_scaling == "at_least_one" and loaded.label_range is None


def test_refinement_survives_bad_pixels(refined_dir, tiny_shards):
    folder, _ = refined_dir
    data = load_split(tiny_shards, "test")
    flux = data["flux"][:4].copy()
    flux[0, 100:300] = np.nan
    flux[1, :] = np.inf  # nothing usable: no numbers (the network's prior is not a measurement)
    out = load_model(folder).predict(flux, data["flux_err"][:4], data["photometry"][:4], data["pix_mask"][:4])
    assert np.isfinite(out["labels"][[0, 2, 3]]).all() and np.isnan(out["labels"][1]).all()
    assert out["refine_flag"].shape == (4,) and out["refine_flag"][1] == 2


def test_bad_emulator_files_are_refused(refined_dir, tmp_path):
    folder, _ = refined_dir
    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    (copy / EMULATOR_FILE).write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="spectrum emulator"):
        load_model(copy)
    assert load_model(copy, refine=False).emulator is None  # the network alone still loads

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(copy / EMULATOR_FILE, "wb") as fh:
        pickle.dump({"format": "stellarnet-emulator/1", "x": Evil()}, fh)
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        load_model(copy)
    torch.save({"format": "something-else"}, copy / EMULATOR_FILE)
    with pytest.raises(CheckpointError, match="not a stellarnet spectrum emulator"):
        load_model(copy)


def test_build_needs_a_model_folder(tmp_path, tiny_shards):
    with pytest.raises(FileNotFoundError, match="model folder"):
        build_refinement(tmp_path, tiny_shards, SETTINGS, progress=False)


def _flag_result(n: int = 8) -> dict:
    """A refined prediction dict in which nothing is wrong (every flag clear)."""
    lab = np.tile([4800.0, 2.5, -0.1, 0.05], (n, 1))
    sig = np.tile([20.0, 0.03, 0.02, 0.02], (n, 1))
    return {"labels": lab.copy(), "labels_network": lab.copy(), "sigma_network": sig, "sigma_refined": sig,
            "refine_flag": np.zeros(n, np.int8), "refine_chi2": np.ones(n), "refine_outlier_fraction": np.zeros(n),
            "refine_masked_segments": np.zeros(n, np.int16), "refine_companion": np.full(n, 2.0)}


def test_each_stellarnet_flag_bit_is_set_on_a_star_built_to_trip_it():
    from stellarnet.io.bitmasks import STELLARNET_FLAG as F
    from stellarnet.network.flags import stellarnet_flags

    box = np.array([[3500.0, 7000.0], [0.0, 5.0], [-2.0, 0.5], [-0.2, 0.5]])
    res = _flag_result(10)
    pix = np.ones(10)
    res["refine_flag"][0] = 1
    res["refine_flag"][1] = 2
    res["refine_chi2"][2] = 3.5
    res["labels"][3, 0] = res["labels_network"][3, 0] = 7500.0
    res["refine_outlier_fraction"][4] = 0.04
    res["labels"][5, 2] += 0.2  # 0.2 dex against a combined σ of 0.028: > 3σ
    res["refine_masked_segments"][6] = 2
    pix[7] = 0.5
    res["refine_companion"][8] = 25.0  # the star's lines at another velocity in the residuals
    level = np.ones((10, 12))
    level[9, 5] = 0.7  # a chip segment whose upper envelope is at 0.7: a spoiled normalization
    level[0, 3] = np.nan  # a segment without good pixels says nothing
    flag = stellarnet_flags(res, pix, box, continuum_level=level)
    expect = ["REFINE_FAILED", "NOT_REFINED", "HIGH_CHI2", "OUTSIDE_TRAINING", "OUTLIER_PIXELS",
              "NET_REFINE_DISAGREE", "MASKED_SEGMENTS", "FEW_PIXELS", "BINARY_CANDIDATE", "BAD_CONTINUUM"]
    for i, name in enumerate(expect):
        assert F.decode(int(flag[i])) == [name], (i, F.decode(int(flag[i])))
    assert not stellarnet_flags(_flag_result(), np.ones(8), box).any()
    net_only = {"labels": _flag_result()["labels"]}
    assert all(F.decode(int(v)) == ["NOT_REFINED"] for v in stellarnet_flags(net_only, np.ones(8), None))


def test_a_spoiled_normalization_trips_bad_continuum_and_ordinary_ones_do_not(refined_dir, tiny_shards):
    from stellarnet.io import grids
    from stellarnet.io.bitmasks import STELLARNET_FLAG as F
    from stellarnet.preparation.spectra import continuum_envelope

    folder, _ = refined_dir
    data = load_split(tiny_shards, "test")
    model = load_model(folder)
    n = min(8, len(data["flux"]))
    flux, err, mask = data["flux"][:n].copy(), data["flux_err"][:n].copy(), data["pix_mask"][:n]
    level = continuum_envelope(flux, mask > 0, model.grid)
    assert level.shape == (n, 12) and np.nanmax(np.abs(level - 1)) < 0.1
    bit = 1 << F.bit("BAD_CONTINUUM")
    assert not (model.predict(flux, err, data["photometry"][:n], mask)["stellarnet_flag"] & bit).any()
    tilted = flux * (1.0 + 0.03 * np.linspace(-1, 1, flux.shape[1], dtype=np.float32))  # another convention
    assert not (model.predict(tilted, err, data["photometry"][:n], mask)["stellarnet_flag"] & bit).any()
    red = grids.chip_slices(model.grid)[2]
    spoiled = flux.copy()
    spoiled[:, red] *= np.linspace(0.5, 1.0, red.stop - red.start, dtype=np.float32)  # pulled-up pseudo-continuum
    out = model.predict(spoiled, err, data["photometry"][:n], mask)
    assert (out["stellarnet_flag"] & bit).all() and F.any_set(out["stellarnet_flag"], F.bad_bits).all()


def test_predictions_carry_the_flag_and_outlier_pixels_trip_it(refined_dir, tiny_shards):
    from stellarnet.io.bitmasks import STELLARNET_FLAG as F

    folder, _ = refined_dir
    data = load_split(tiny_shards, "test")
    model = load_model(folder)
    n = min(8, len(data["flux"]))
    flux, err = data["flux"][:n].copy(), data["flux_err"][:n].copy()
    out = model.predict(flux, err, data["photometry"][:n], data["pix_mask"][:n])
    assert out["stellarnet_flag"].shape == (n,) and out["stellarnet_flag"].dtype == np.int32
    rng = np.random.default_rng(0)
    hit = (rng.random(flux.shape) < 0.05) & (data["pix_mask"][:n] > 0)
    flux[hit] -= 50 * err[hit]  # 5 % of the pixels 50 σ low, errors as quoted
    bad = model.predict(flux, err, data["photometry"][:n], data["pix_mask"][:n])
    tripped = bad["stellarnet_flag"] & (1 << F.bit("OUTLIER_PIXELS")) > 0
    assert tripped[bad["refine_flag"] == 0].all() and np.median(bad["refine_outlier_fraction"]) > 0.03
    df = predictions_frame({"apogee_id": np.arange(n)}, bad, model.label_names, model.class_tasks)
    assert np.array_equal(df["STELLARNET_FLAG"].to_numpy(), bad["stellarnet_flag"])
    net = load_model(folder, refine=False).predict(flux, err, data["photometry"][:n], data["pix_mask"][:n])
    assert np.all(net["stellarnet_flag"] & (1 << F.bit("NOT_REFINED")))


def test_shift_suite_scores_a_model_folder_and_writes_the_table(refined_dir, tmp_path):
    from stellarnet.benchmarks.shift_suite import shift_table_from_config

    folder, _ = refined_dir
    assert shift_table_from_config(folder, tmp_path, {"enabled": False}) is None
    paths = shift_table_from_config(folder, tmp_path, {"enabled": True, "names": ["none", "outliers_2pc", "low_snr"],
                                                       "n_stars": 60, "seed": 1})
    res = json.loads(paths["json"].read_text())
    assert list(res["shifts"]) == ["none", "outliers_2pc", "low_snr"]
    assert res["shifts"]["none"]["snr_bin"] == [100.0, 200.0] and res["shifts"]["low_snr"]["snr_bin"] == [25.0, 50.0]
    for entry in res["shifts"].values():
        assert set(entry["refined"]) == set(entry["network"]) == {"TEFF", "LOGG", "FE_H", "ALPHA_FE"}
        assert entry["n_bin"] > 5 and 0 <= entry["stage"]["accuracy"] <= 1
        for m in entry["refined"].values():
            assert m["robust_sigma"] > 0 and 0 <= m["coverage_1sigma"] <= 1
    from stellarnet.io.bitmasks import STELLARNET_FLAG

    for entry in res["shifts"].values():
        assert set(entry["flag_rates"]) == set(STELLARNET_FLAG.bits.values())
        assert all(0 <= v <= 1 for v in entry["flag_rates"].values())
    assert res["shifts"]["outliers_2pc"]["shift"]["outlier_fraction"] == [0.005, 0.05]
    table = paths["markdown"].read_text()
    assert "| none | refined |" in table and "| outliers_2pc | refined |" in table
    assert "| low_snr (S/N 25–50) | refined |" in table
    assert res["common_residual"] is False and "common_residual" not in res["shifts"]["none"]


def test_shift_suite_can_treat_each_shift_as_one_survey(refined_dir, tmp_path):
    """``common_residual``: the shared residual is measured on each shift's stars and divided out for
    that shift only (the model folder's predictor is left without it)."""
    from stellarnet.benchmarks.shift_suite import run_shift_suite

    folder, _ = refined_dir
    model = load_model(folder)
    res = run_shift_suite(model, ["none"], n=60, seed=1, common_residual=True)
    shared = res["shifts"]["none"]["common_residual"]
    assert res["common_residual"] is True and shared["stars"] > 30 and shared["pixels_corrected"] > 0
    assert model.flux_correction is None
    plain = run_shift_suite(model, ["none"], n=60, seed=1)
    assert plain["shifts"]["none"]["refined"] != res["shifts"]["none"]["refined"]


def test_recalibrate_keeps_the_emulator_and_refits_the_calibration(refined_dir, tiny_shards, tmp_path):
    folder, _ = refined_dir
    copy_dir = tmp_path / "recal"
    shutil.copytree(folder, copy_dir)
    before = torch.load(copy_dir / EMULATOR_FILE, weights_only=True)
    summary = build_refinement(copy_dir, tiny_shards, {**SETTINGS, "fit": {**SETTINGS["fit"], "fit_lsf": False}},
                               progress=False, recalibrate=True)
    after = torch.load(copy_dir / EMULATOR_FILE, weights_only=True)
    for k, v in before["state_dict"].items():  # the same emulator ...
        assert torch.equal(v, after["state_dict"][k])
    assert after["refine"]["fit_lsf"] is False and before["refine"]["fit_lsf"] is True  # ... new fit settings
    assert len(summary["sigma_scale"]) == 4
    with pytest.raises(FileNotFoundError, match="build the stage first"):
        empty = tmp_path / "no_stage"
        shutil.copytree(folder, empty)
        (empty / EMULATOR_FILE).unlink()
        build_refinement(empty, tiny_shards, SETTINGS, progress=False, recalibrate=True)


# ---------------------------------------------------------------- behaviours a bug would break
def test_model_folder_sigma_scales_are_applied(refined_dir, tiny_shards):
    """The folder's σ calibration is what predict reports: a network σ scale of 2 doubles the
    network's aleatoric σ; the refined σ is sqrt((a·σ_fit·√χ²)² + (b·σ_network)²) with the folder's a, b."""
    folder, _ = refined_dir
    data = load_split(tiny_shards, "test")
    args = (data["flux"][:12], data["flux_err"][:12], data["photometry"][:12], data["pix_mask"][:12])
    net = load_model(folder, refine=False)
    base = net.predict(*args)
    net.sigma_scale = (np.ones(4) if net.sigma_scale is None else net.sigma_scale) * 2
    doubled = net.predict(*args)
    np.testing.assert_allclose(doubled["sigma_aleatoric"], 2 * base["sigma_aleatoric"], rtol=1e-5)
    np.testing.assert_allclose(doubled["labels"], base["labels"])

    model = load_model(folder)
    model.disagreement_inflation = False  # the σ model alone (the inflation: its own test below)
    model.emulator_members = []  # ... and without the members' spread (test_member_spread_is_part_of_the_refined_sigma)
    model.refine_sigma_scale = np.ones(4)
    model.refine_sigma_network_scale = np.zeros(4)
    plain = model.predict(*args)
    ok = plain["refine_flag"] == 0
    assert ok.any()
    model.refine_sigma_scale = np.full(4, 3.0)  # a scales the fit's σ linearly
    scaled = model.predict(*args)
    np.testing.assert_allclose(scaled["sigma_aleatoric"][ok], 3 * plain["sigma_aleatoric"][ok], rtol=1e-4)
    model.refine_sigma_scale = np.ones(4)
    model.refine_sigma_network_scale = np.full(4, 0.5)  # b adds the network's σ in quadrature
    floor = model.predict(*args)
    want = np.sqrt(plain["sigma_aleatoric"] ** 2 + (0.5 * plain["sigma_network"]) ** 2)
    np.testing.assert_allclose(floor["sigma_aleatoric"][ok], want[ok], rtol=1e-4)
    model.refine_sigma_scale = np.full(4, 3.0)
    two_term = model.predict(*args)
    spread = two_term["sigma_aleatoric"][ok] / two_term["sigma_network"][ok]
    assert np.ptp(spread, axis=0).max() > 0  # per star, not a constant


def test_refinement_guard_and_flags(refined_dir, tiny_shards, monkeypatch):
    """A fit that moves more than REFINE_MAX_SHIFT network σ and does not explain the spectrum keeps the
    network's labels (flag 1, STELLARNET_FLAG REFINE_FAILED); the same move with a good χ² keeps the
    refined labels; non-finite network labels are not refined (flag 2, NOT_REFINED)."""
    import stellarnet.network.inference as inference
    from stellarnet.io.bitmasks import STELLARNET_FLAG

    folder, _ = refined_dir
    data = load_split(tiny_shards, "test")
    args = (data["flux"][:8], data["flux_err"][:8], data["photometry"][:8], data["pix_mask"][:8])
    model = load_model(folder)
    monkeypatch.setattr(inference, "REFINE_MAX_SHIFT", 0.0)  # every move is "too large" ...
    kept = model.predict(*args)
    good_fit = kept["refine_chi2"] <= inference.FLAG_HIGH_CHI2
    assert good_fit.any()
    assert (kept["refine_flag"][good_fit] == 0).all()  # ... but a fit that explains the spectrum is trusted
    monkeypatch.setattr(inference, "FLAG_HIGH_CHI2", -1.0)  # ... and now no fit does
    out = model.predict(*args)
    assert (out["refine_flag"] == 1).all()
    np.testing.assert_array_equal(out["labels"], out["labels_network"])
    assert STELLARNET_FLAG.any_set(out["stellarnet_flag"], ["REFINE_FAILED"]).all()
    monkeypatch.setattr(inference, "REFINE_MAX_SHIFT", 5.0)
    monkeypatch.setattr(inference, "FLAG_HIGH_CHI2", 2.0)

    res = load_model(folder, refine=False).predict(*args)
    res["labels"][0, 1] = np.nan
    mask = np.asarray(args[3], np.float32)
    fit = inference.refine_labels(model.emulator, np.asarray(args[0]), np.asarray(args[1]), mask,
                                  res["labels"].astype(np.float64), **model.refine_settings)
    model._refine(res, fit)
    assert res["refine_flag"][0] == 2 and (res["refine_flag"][1:] != 2).all()
    flags = inference.stellarnet_flags(res, mask.mean(1), None)
    assert STELLARNET_FLAG.any_set(flags[:1], ["NOT_REFINED"]).all()


def test_device_auto_chooses_a_gpu_when_torch_sees_one(monkeypatch):
    from stellarnet.workflows.refinement import _device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _device("auto") == "cuda" and _device(None) == "cuda" and _device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _device("auto") == "cpu"


def test_disagreement_threshold_is_three_combined_sigma():
    """NET_REFINE_DISAGREE at |refined − network| > 3 √(σ_net² + σ_fit²), not at any other combination."""
    from stellarnet.io.bitmasks import STELLARNET_FLAG as F
    from stellarnet.network.flags import stellarnet_flags

    res = _flag_result(4)
    res["sigma_network"] = np.tile([1.0, 0.03, 0.02, 0.02], (4, 1))
    res["sigma_refined"] = np.tile([2.0, 0.03, 0.02, 0.02], (4, 1))  # Teff: combined σ = √5 = 2.236 K
    res["labels"][:, 0] += [6.6, 6.8, 2.0, -7.0]  # threshold 3√5 = 6.708 K
    flagged = F.any_set(stellarnet_flags(res, np.ones(4), None), ["NET_REFINE_DISAGREE"])
    assert flagged.tolist() == [False, True, False, True]


def test_refined_predictions_carry_the_line_shape_fit(refined_dir, tiny_shards):
    folder, _ = refined_dir
    data = load_split(tiny_shards, "test")
    out = load_model(folder).predict(data["flux"][:6], data["flux_err"][:6], data["photometry"][:6], data["pix_mask"][:6])
    assert out["refine_lsf_variance"].shape == (6,) and np.isfinite(out["refine_lsf_variance"]).all()
    assert out["sigma_refined"].shape == (6, 4) and (out["sigma_refined"] > 0).all()


def test_predict_gives_the_refinement_all_the_cpus(refined_dir, tiny_survey, tmp_path):
    """torch_threads=auto: with the χ² refinement the model gets every CPU of the process (reading is
    ~10 % of the work); the network alone leaves one per reader process (docs/performance.md)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from stellarnet.common.hardware import available_cpus
    from stellarnet.common.paths import CONF_DIR
    from stellarnet.workflows.predict import predict

    folder, _ = refined_dir
    files = ",".join(str(p) for p in sorted(Path(tiny_survey["root"]).rglob("aspcapStar-*.fits"))[:6])
    threads = {}
    for refine in (True, False):
        GlobalHydra.instance().clear()
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
            cfg = compose(config_name="predict", overrides=[
                f"ckpt_path={folder}", f"input='{files}'", f"output_dir={tmp_path / str(refine)}", f"refine={refine}",
                "num_workers=1", "mc_samples=0", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false"])
        GlobalHydra.instance().clear()
        summary, _ = predict(cfg)
        assert summary["refined"] is refine and summary["stars"] == 6
        threads[refine] = summary["torch_threads"]
    assert threads == {True: available_cpus(), False: max(1, available_cpus() - 1)}


# ------------------------------------------------------------------ mutation-benchmark survivors
def test_refine_defaults_are_the_config_files():
    """One set of defaults: REFINE_DEFAULTS (used when a model folder's settings lack a key) are
    conf/refine_stage/default.yaml, and train_emulator's keyword defaults say the same."""
    import inspect

    from omegaconf import OmegaConf

    from stellarnet.common.paths import CONF_DIR
    from stellarnet.refinement.training import train_emulator
    from stellarnet.workflows.refinement import REFINE_DEFAULTS

    yaml = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "refine_stage" / "default.yaml"), resolve=True)
    assert REFINE_DEFAULTS == yaml
    params = inspect.signature(train_emulator).parameters
    for key in ("hidden", "epochs", "batch_size", "lr", "clip_after", "clip_threshold", "seed"):
        assert params[key].default == yaml[key], key


def test_training_subset_is_seeded_and_consistent():
    from stellarnet.workflows.refinement import _training_rows

    assert np.array_equal(_training_rows(100, None, 0), np.arange(100))
    assert np.array_equal(_training_rows(100, 100, 0), np.arange(100))
    a, b = _training_rows(100, 30, 1), _training_rows(100, 30, 1)
    assert len(a) == 30 and np.array_equal(a, b) and np.all(np.diff(a) > 0) and a.max() < 100
    assert not np.array_equal(_training_rows(100, 30, 2), a)


def test_predictions_read_block_by_block_equal_those_of_the_loaded_split(refined_dir, tiny_shards):
    """predict_rows (the refinement build's reader) gives predict_split's numbers on the same rows."""
    from stellarnet.dataset.reader import ShardReader
    from stellarnet.evaluation.split_predictions import predict_rows, predict_split

    model = load_model(refined_dir[0])
    reader = ShardReader(tiny_shards, "val", verify=False)
    rows = np.arange(1, len(reader), 2)
    blocked, _ = predict_rows(model, reader, rows, block=64, batch_size=32)
    whole, _ = predict_split(model, reader.rows(rows, ("flux", "flux_err", "pix_mask", "photometry")), batch_size=32)
    reader.close()
    for key in ("labels", "sigma_total", "labels_network", "refine_flag"):
        np.testing.assert_allclose(blocked[key], whole[key], rtol=1e-5, atol=1e-6, err_msg=key)
    assert list(blocked["classes"]["stage"]) == list(whole["classes"]["stage"])


def test_a_streamed_build_reads_bounded_blocks_and_fits_as_well(refined_dir, tiny_shards, tmp_path, monkeypatch):
    """refine.memory_gb=0: the emulator's spectra are read from the shards every epoch; no read of
    spectra in the whole build asks for more than block_stars rows (the memory bound), and the stage is
    as good as the in-memory one (same stars, χ² no more than 15 % above, finite σ model)."""
    from stellarnet.dataset.reader import ShardReader

    largest = {"rows": 0}
    rows_fn = ShardReader.rows

    def spy(self, indices, fields=ShardReader.FIELDS):
        if "flux" in fields:
            largest["rows"] = max(largest["rows"], len(indices))
        return rows_fn(self, indices, fields)

    monkeypatch.setattr(ShardReader, "rows", spy)
    manifest = load_manifest(tiny_shards)
    torch.manual_seed(0)
    module = StellarNetModule(net=NET, data_spec={k: manifest[k] for k in SPEC_KEYS}, log_figures=False)
    folder = save_model_folder(module, tmp_path / "m")
    summary = build_refinement(folder, tiny_shards, {**SETTINGS, "memory_gb": 0, "block_stars": 48},
                               tensorboard_dir=None, progress=False)
    memory = refined_dir[1]
    assert summary["training"]["streamed"] and not memory["training"]["streamed"]
    assert 0 < largest["rows"] <= 48
    assert summary["training"]["stars"] == memory["training"]["stars"]
    # blocks of 48 with minibatches of 64: more (smaller) steps per epoch, measured χ² 32.0 vs 37.7
    assert summary["training"]["chi2_per_pixel"] < 1.15 * memory["training"]["chi2_per_pixel"]
    assert all(np.isfinite(summary["sigma_scale"])) and summary["val_n"] == memory["val_n"]


def test_refined_fraction_is_that_of_the_exported_model(refined_dir, tiny_shards):
    """val_refined_fraction is the share of validation stars whose refinement was kept (flag 0), as
    the exported model folder predicts them (not the share rejected)."""
    folder, summary = refined_dir
    val = load_split(tiny_shards, "val")
    out = load_model(folder).predict(val["flux"], val["flux_err"], val["photometry"], val["pix_mask"])
    assert summary["val_refined_fraction"] == pytest.approx(np.mean(out["refine_flag"] == 0), abs=0.02)


def test_a_stage_builds_without_tensorboard(tiny_shards, tmp_path):
    manifest = load_manifest(tiny_shards)
    torch.manual_seed(0)
    module = StellarNetModule(net=NET, data_spec={k: manifest[k] for k in SPEC_KEYS}, log_figures=False)
    folder = save_model_folder(module, tmp_path / "m")
    summary = build_refinement(folder, tiny_shards, {**SETTINGS, "epochs": 1}, tensorboard_dir=None, progress=False)
    assert (folder / EMULATOR_FILE).is_file() and summary["training"]["epochs"] == 1
    assert not (tmp_path / "tb").exists()


def test_the_refinement_entry_needs_a_model_folder(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "stellarnet.refinement", f"hydra.run.dir={tmp_path}"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("error: ckpt_path is required")


def test_rebuilding_a_stage_starts_from_the_network_again(refined_dir, tiny_shards, tmp_path):
    """A folder that already has emulator.pt rebuilt with the same settings gives the same stage:
    the emulator learns from the network's labels, never from the old stage's refined ones."""
    folder, first = refined_dir
    again = tmp_path / "again"
    shutil.copytree(folder, again)
    second = build_refinement(again, tiny_shards, SETTINGS, tensorboard_dir=None, progress=False)
    assert second["training"]["chi2_per_pixel"] == pytest.approx(first["training"]["chi2_per_pixel"], rel=1e-5)
    np.testing.assert_allclose(second["sigma_scale"], first["sigma_scale"], rtol=1e-5)


def test_disagreement_factor_is_the_birge_ratio_of_the_two_estimates():
    from stellarnet.network.flags import disagreement_factor

    lab = np.array([[5000.0, 4.0], [5000.0, 4.0], [5000.0, 4.0]])
    other = np.array([[5004.0, 4.0], [5030.0, 3.8], [np.nan, 4.5]])
    sig, other_sig = np.array([[3.0, 0.1]] * 3), np.array([[4.0, 0.1]] * 3)
    f = disagreement_factor(lab, sig, other, other_sig)
    # 4 K against √(3² + 4²) = 5 K: consistent (1); 30 K: 6; 0.2 dex against 0.141: √2; NaN: 1
    np.testing.assert_allclose(f, [[1.0, 1.0], [6.0, np.sqrt(2.0)], [1.0, 5.0 / np.sqrt(2.0)]])


def test_refined_sigma_grows_where_network_and_refinement_disagree(refined_dir, tiny_shards):
    """The stage's σ is the σ model's times the Birge ratio of refined vs network labels, and so is the
    network's own σ (where the refinement is kept); switching the inflation off gives the σ model's and
    the network's alone, the same labels, and the same flags (judged before it)."""
    from stellarnet.network.flags import disagreement_factor

    folder, _ = refined_dir
    data = load_split(tiny_shards, "test")
    args = (data["flux"][:12], data["flux_err"][:12], data["photometry"][:12], data["pix_mask"][:12])
    on = load_model(folder)
    off = load_model(folder)
    off.disagreement_inflation = False
    a, b = on.predict(*args), off.predict(*args)
    np.testing.assert_array_equal(a["labels"], b["labels"])
    np.testing.assert_array_equal(a["stellarnet_flag"], b["stellarnet_flag"])
    np.testing.assert_array_equal(a["sigma_refined"], b["sigma_refined"])
    ok = a["refine_flag"] == 0
    assert ok.any()
    factor = disagreement_factor(a["labels"], a["sigma_refined"], a["labels_network"], b["sigma_network"])
    np.testing.assert_allclose(a["sigma_aleatoric"][ok], (b["sigma_aleatoric"] * factor)[ok], rtol=1e-5)
    assert np.all(a["sigma_total"] >= b["sigma_total"] * (1 - 1e-6))
    # the network's σ grows by the same ratio where the refined labels are kept, and only there
    np.testing.assert_allclose(a["sigma_network"][ok], (b["sigma_network"] * factor)[ok], rtol=1e-5)
    np.testing.assert_array_equal(a["sigma_network"][~ok], b["sigma_network"][~ok])
    np.testing.assert_array_equal(a["labels_network"], b["labels_network"])


def test_spline_continuum_absorbs_a_pseudo_continuum_a_chip_polynomial_cannot(refined_dir, tiny_shards):
    """A normalization error on ~100–200 Å scales (as a pseudo-continuum that follows the line
    blanketing leaves) moves the labels of a fit with a per-chip polynomial continuum; the B-spline
    continuum (knots every 100 Å) absorbs it: the labels stay near those of the undistorted spectra."""
    from stellarnet.io import grids
    from stellarnet.refinement.fit import refine_labels

    folder, _ = refined_dir
    model = load_model(folder)
    data = load_split(tiny_shards, "test")
    n = min(24, len(data["flux"]))
    flux, err, mask = data["flux"][:n], data["flux_err"][:n], data["pix_mask"][:n]
    init = model.predict(flux, err, data["photometry"][:n], mask, refine=False)["labels"].astype(np.float64)
    wave = grids.wavelength("dr12")
    phase = np.random.default_rng(0).uniform(0, 2 * np.pi, (n, 1))
    wiggle = (1 + 0.02 * np.sin(2 * np.pi * wave[None, :] / 300.0 + phase)).astype(np.float32)
    kw = {"iters": 3, "clip_rounds": 0}
    moved = {}
    for name, extra in (("chebyshev", {"continuum_degree": 4}), ("spline", {"continuum_degree": 4, "continuum_knots": 100.0})):
        clean = refine_labels(model.emulator, flux, err, mask, init, **kw, **extra)
        bent = refine_labels(model.emulator, flux * wiggle, err * wiggle, mask, init, **kw, **extra)
        moved[name] = np.nanmedian(np.abs(bent.labels - clean.labels) / clean.sigma, 0)
    assert np.all(moved["spline"] < 0.5 * moved["chebyshev"]), moved
    assert np.all(moved["spline"] < 0.5), moved


def test_returned_model_and_weights_are_those_of_the_fit(refined_dir, tiny_shards):
    """``return_model``: the fitted model spectra and final weights reproduce the fit's own reduced χ²;
    unused pixels carry weight 0 and unfitted rows NaN; without it nothing extra is held."""
    from stellarnet.refinement.fit import refine_labels

    folder, _ = refined_dir
    model = load_model(folder)
    data = load_split(tiny_shards, "test")
    n = min(16, len(data["flux"]))
    flux, err, mask = data["flux"][:n], data["flux_err"][:n], data["pix_mask"][:n].copy()
    mask[:, :50] = 0
    init = model.predict(flux, err, data["photometry"][:n], mask, refine=False)["labels"].astype(np.float64)
    init[0] = np.nan
    kw = {**model.refine_settings, "batch_size": 8}
    fit = refine_labels(model.emulator, flux, err, mask, init, return_model=True, **kw)
    assert fit.model_flux.shape == flux.shape and fit.fit_weight.shape == flux.shape
    assert np.isnan(fit.model_flux[0]).all() and (fit.fit_weight[0] == 0).all()
    assert (fit.fit_weight[:, :50] == 0).all()
    w = fit.fit_weight[1:]
    chi2 = ((flux[1:] - fit.model_flux[1:]) ** 2 * w).sum(1) / (w > 0).sum(1)
    np.testing.assert_allclose(chi2, fit.chi2[1:], rtol=1e-3)
    plain = refine_labels(model.emulator, flux, err, mask, init, **kw)
    assert plain.model_flux is None and plain.fit_weight is None
    np.testing.assert_array_equal(plain.labels, fit.labels)


def test_a_residual_every_star_shares_is_measured_and_divided_out(refined_dir, tiny_shards):
    """Telluric-like dips at fixed pixels in every spectrum: ``measure_common_residual`` finds them (the
    correction at those pixels differs from the undistorted spectra's by the dips), and the labels
    predicted with each set's own correction agree far better than those without."""
    folder, _ = refined_dir
    model = load_model(folder)
    data = load_split(tiny_shards, "test")
    flux, err, mask, phot = data["flux"], data["flux_err"], data["pix_mask"], data["photometry"]
    assert len(flux) >= 60
    rng = np.random.default_rng(5)
    good_pixels = np.flatnonzero(mask.mean(0) > 0.95)
    dips = rng.choice(good_pixels, 30, replace=False)
    depth = np.ones(flux.shape[1], np.float32)
    depth[dips] = 1 - rng.uniform(0.03, 0.06, 30).astype(np.float32)
    bent = (flux * depth, err * depth)

    info_clean = model.measure_common_residual(flux, err, phot, mask)
    c_clean = np.zeros(flux.shape[1]) if model.flux_correction is None else model.flux_correction.copy()
    clean = model.predict(flux, err, phot, mask)
    info = model.measure_common_residual(*bent, phot, mask)
    assert info["pixels_corrected"] >= info_clean["pixels_corrected"] and info["stars"] > 30
    found = (1 + model.flux_correction[dips]) / (1 + c_clean[dips])
    assert np.mean(np.abs(found - depth[dips]) < 0.01) > 0.8
    corrected = model.predict(*bent, phot, mask)
    model.flux_correction = None
    raw = model.predict(*bent, phot, mask)
    moved_raw = np.nanmedian(np.abs(raw["labels"] - clean["labels"]) / clean["sigma_total"], 0)
    moved = np.nanmedian(np.abs(corrected["labels"] - clean["labels"]) / clean["sigma_total"], 0)
    assert np.all(moved < 0.5 * moved_raw), (moved, moved_raw)


def test_predict_measures_the_survey_residual_once_and_divides_it_out(refined_dir, tiny_shards, tmp_path):
    """``survey_residual=true``: the residual is measured on a sample of the input, saved beside the
    catalogue and in its provenance, and every row is predicted from the spectra divided by it — the
    catalogue equals the Predictor's own output with that correction."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from stellarnet.common.paths import CONF_DIR
    from stellarnet.dataset.chunks import as_numpy, open_chunks
    from stellarnet.workflows.predict import predict

    folder, _ = refined_dir
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose(config_name="predict", overrides=[
            f"ckpt_path={folder}", f"input={tiny_shards}", f"output_dir={tmp_path}", "survey_residual=true",
            "survey_residual_stars=60", "chunk_size=32", "mc_samples=0", "trainer.accelerator=cpu",
            "trainer.enable_progress_bar=false"])
    GlobalHydra.instance().clear()
    summary, paths = predict(cfg)
    model = load_model(folder)
    correction = np.load(paths["survey_residual"], allow_pickle=False)
    assert correction.shape == (model.n_pixels,) and np.count_nonzero(correction) > 0
    assert summary["survey_residual"]["pixels_corrected"] == np.count_nonzero(correction)
    assert summary["survey_residual"]["stars"] > 30
    assert json.loads(Path(paths["columns"]).read_text())["provenance"]["survey_residual"]["pixels_corrected"] > 0
    from astropy.table import Table

    cat = Table.read(paths["fits"])
    chunk = as_numpy(open_chunks(str(tiny_shards), model.grid, 32, input_kind="shards")[0])
    model.flux_correction = correction
    own = model.predict(chunk["flux"], chunk["flux_err"], chunk["photometry"], chunk["pix_mask"])
    np.testing.assert_allclose(np.asarray(cat["TEFF"][:len(own["labels"])]), own["labels"][:, 0], rtol=1e-5)
    model.flux_correction = None
    plain = model.predict(chunk["flux"], chunk["flux_err"], chunk["photometry"], chunk["pix_mask"])
    assert not np.allclose(plain["labels"][:, 0], own["labels"][:, 0])


def test_a_spectrum_without_a_usable_pixel_gets_no_numbers_and_a_bad_flag(refined_dir, tiny_shards):
    """Through the Python API (files with no good pixel are read errors already): an all-NaN row gets NaN
    labels and σ, no class, refine flag 2 and the bad bits NOT_REFINED and UNPHYSICAL — not the network's
    prior dressed as a measurement; the other rows are as they are alone."""
    from stellarnet.io.bitmasks import STELLARNET_FLAG

    folder, _ = refined_dir
    model = load_model(folder)
    data = load_split(tiny_shards, "test")
    flux, err = data["flux"][:4].copy(), data["flux_err"][:4].copy()
    flux[2] = np.nan
    pred = model.predict(flux, err, data["photometry"][:4])
    assert np.isnan(pred["labels"][2]).all() and np.isnan(pred["sigma_total"][2]).all()
    assert np.isnan(pred["labels_network"][2]).all() and pred["refine_flag"][2] == 2
    assert all(pred["classes"][t][2] == "" for t in pred["classes"])
    assert STELLARNET_FLAG.any_set(pred["stellarnet_flag"][2:3], ["NOT_REFINED"]).all()
    assert STELLARNET_FLAG.any_set(pred["stellarnet_flag"][2:3], ["UNPHYSICAL"]).all()
    alone = model.predict(flux[[0, 1, 3]], err[[0, 1, 3]], data["photometry"][[0, 1, 3]])
    np.testing.assert_allclose(pred["labels"][[0, 1, 3]], alone["labels"], rtol=1e-4)
    frame = predictions_frame({"apogee_id": np.arange(4).astype(str)}, pred, model.label_names, model.class_tasks)
    assert np.isnan(frame["TEFF"][2]) and frame["STAGE"][2] == ""
