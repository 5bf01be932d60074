"""``python -m stellarnet.evaluate``: the report's Cramér–Rao section (MAE/CRLB per label per S/N
bin for giants and all stars, against the catalogue labels), its switch, and the stars outside
the spectral model's label box (excluded and counted)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from stellarnet.dataset.manifest import load_manifest
from stellarnet.evaluation.split_predictions import load_split
from stellarnet.workflows.evaluate import evaluate
from stellarnet.network import StellarNetModule, load_model, save_model_folder
from stellarnet.common.paths import CONF_DIR

NET = {
    "spectral_encoder": {"_target_": "stellarnet.network.encoders.SpectralConvEncoder", "channels": [4],
                         "kernel_sizes": [5], "strides": [4], "pool_size": 4, "dropout": 0.1, "out_dim": 8},
    "photometry": {"_target_": "stellarnet.network.encoders.PhotometryMLP", "hidden": [8], "out_dim": 4},
    "trunk": {"_target_": "stellarnet.network.heads.TrunkMLP", "hidden": [8], "dropout": 0.1},
}
SPEC_KEYS = ("grid", "n_pixels", "label_names", "label_units", "label_mean", "label_std", "phot_features",
             "phot_mean", "phot_std", "class_tasks")
MAX_STARS = 40


@pytest.fixture(scope="module")
def model_dir(tiny_shards, tmp_path_factory) -> Path:
    """An untrained tiny network for the tiny shards (weights do not matter: the numbers are
    checked against its own predictions)."""
    manifest = load_manifest(tiny_shards)
    spec = {k: manifest[k] for k in SPEC_KEYS}
    torch.manual_seed(0)
    module = StellarNetModule(net=NET, data_spec=spec, log_figures=False)
    return save_model_folder(module, tmp_path_factory.mktemp("eval_model"))


def _cfg(model_dir: Path, dataset: Path, out: Path, *overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose(config_name="evaluate", overrides=[
            f"ckpt_path={model_dir}", f"dataset_dir={dataset}", f"output_dir={out}", "mc_samples=0",
            "calib_split=null", "batch_size=64", f"crlb.max_stars={MAX_STARS}", *overrides])
    GlobalHydra.instance().clear()
    return cfg


def test_report_has_mae_over_crlb_per_label_per_snr_bin(model_dir, tiny_shards, tmp_path):
    from stellarnet.evaluation.spectral_model import emulator_model

    report, paths = evaluate(_cfg(model_dir, tiny_shards, tmp_path))
    block = report["crlb"]
    on_disk = json.loads(Path(paths["json"]).read_text())["crlb"]
    assert on_disk["n_in_box"] == block["n_in_box"]
    n_split = len(load_split(tiny_shards, "test")["snr"])
    assert block["n_split"] == n_split and block["n_selected"] == min(MAX_STARS, n_split)
    assert block["labels_at"] == "catalogue" and block["noise"] == "flux_err"
    assert block["n_in_box"] + block["n_outside_box"] + block["n_no_labels"] == block["n_selected"]
    assert block["n_in_box"] > 0
    labels = ["TEFF", "LOGG", "FE_H", "ALPHA_FE"]
    bins = ["0-50", "50-100", "100-200", ">=200", "all"]
    for group in ("giants", "all"):
        for lab in labels:
            assert list(block["mae_over_crlb"][group][lab]) == bins
            assert list(block["crlb_by_bin"][group][lab]) == bins
    assert block["n_by_group"]["all"] == block["n_in_box"] >= block["n_by_group"]["giants"]
    all_teff = block["mae_over_crlb"]["all"]["TEFF"]
    assert all_teff["all"]["n"] == sum(all_teff[b]["n"] for b in bins[:-1])
    assert all_teff["all"]["ratio"] > 0 and 0.1 < block["crlb_by_bin"]["all"]["TEFF"]["all"]["median"] < 200

    # the numbers are the network's residuals against the catalogue, on the same seeded subset
    data = load_split(tiny_shards, "test")
    pred = load_model(model_dir).predict(data["flux"], data["flux_err"], photometry=data["photometry"],
                                         pix_mask=data["pix_mask"], mc_samples=0)["labels"]
    rows = np.sort(np.random.default_rng(0).choice(n_split, MAX_STARS, replace=False)) if n_split > MAX_STARS \
        else np.arange(n_split)
    cat = data["labels"][rows, :4].astype(float)
    snr = data["snr"][rows]
    model = emulator_model()
    inside = np.all(np.isfinite(cat), 1) & (snr > 0) & np.all((cat >= model.lower) & (cat <= model.upper), 1)
    assert inside.sum() == block["n_in_box"]
    mae = np.abs(pred[rows][inside] - cat[inside]).mean(0)
    for j, lab in enumerate(labels):
        assert block["mae_over_crlb"]["all"][lab]["all"]["mae"] == pytest.approx(mae[j], rel=1e-4)

    # goal: giants at S/N >= 100, with the catalogue-noise floor
    goal = block["goal"]
    assert goal["group"] == "giants" and goal["snr_min"] == 100 and goal["max_ratio"] == 2
    assert set(goal["labels"]) == set(labels) and goal["met"] in (True, False, None)
    md = Path(paths["markdown"]).read_text()
    assert "## Accuracy vs the Cramér–Rao bound" in md
    assert "MAE/CRLB — giants" in md and "MAE/CRLB — all" in md and "median CRLB σ — giants" in md
    assert "catalogue's own label noise" in md
    assert "Goal: MAE/CRLB ≤ 2 for giants at S/N ≥ 100:" in md
    assert f"{block['n_outside_box']} outside it" in md


def test_crlb_disabled_leaves_no_section(model_dir, tiny_shards, tmp_path):
    report, paths = evaluate(_cfg(model_dir, tiny_shards, tmp_path, "crlb.enabled=false"))
    assert "crlb" not in report
    assert "crlb" not in json.loads(Path(paths["json"]).read_text())
    assert "Cramér–Rao" not in Path(paths["markdown"]).read_text()
    assert "regression" in report  # the rest of the report is unchanged


def test_stars_outside_the_model_box_are_excluded_and_counted(model_dir, tiny_shards, tmp_path, monkeypatch):
    """A box cut at the median catalogue Teff: the hotter stars are excluded and counted."""
    import stellarnet.evaluation.spectral_model as sm

    data = load_split(tiny_shards, "test")
    teff = data["labels"][:, 0]
    cut = float(np.nanmedian(teff))
    full = sm.emulator_model()
    upper = full.upper.copy()
    upper[0] = cut
    monkeypatch.setattr(sm, "emulator_model", lambda: replace(full, upper=upper))
    report, paths = evaluate(_cfg(model_dir, tiny_shards, tmp_path, "crlb.max_stars=null"))
    block = report["crlb"]
    cat = data["labels"][:, :4].astype(float)
    usable = np.all(np.isfinite(cat), 1) & (data["snr"] > 0)
    inside = usable & np.all((cat >= full.lower) & (cat <= upper), 1)
    assert block["n_selected"] == block["n_split"] == len(teff)
    assert block["n_in_box"] == int(inside.sum()) > 0
    assert block["n_outside_box"] == int((usable & ~inside).sum()) > 0
    assert block["n_no_labels"] == int((~usable).sum())
    assert block["box"]["TEFF"][1] == pytest.approx(cut)
    assert block["crlb_by_bin"]["all"]["TEFF"]["all"]["n"] == block["n_in_box"]
    assert f"{block['n_outside_box']} outside it" in Path(paths["markdown"]).read_text()


def test_only_catalogue_labels_are_supported(model_dir, tiny_shards, tmp_path):
    with pytest.raises(ValueError, match="labels_at"):
        evaluate(_cfg(model_dir, tiny_shards, tmp_path, "crlb.labels_at=truth"))


def test_crlb_section_is_skipped_when_no_star_is_inside(model_dir, tiny_shards, tmp_path, monkeypatch):
    import stellarnet.evaluation.spectral_model as sm

    full = sm.emulator_model()
    lower = full.lower.copy()
    lower[0] = 1e5  # nothing is that hot
    monkeypatch.setattr(sm, "emulator_model", lambda: replace(full, lower=lower, upper=full.upper + [2e5, 0, 0, 0]))
    report, paths = evaluate(_cfg(model_dir, tiny_shards, tmp_path))
    block = report["crlb"]
    assert block["skipped"] is True and block["n_in_box"] == 0 and "mae_over_crlb" not in block
    assert "Not computed: no star" in Path(paths["markdown"]).read_text()
    assert not math.isnan(block["n_outside_box"])


def test_an_earlier_evaluation_is_not_overwritten(model_dir, tiny_shards, tmp_path):
    from stellarnet.io.predictions import OutputExistsError

    _, paths = evaluate(_cfg(model_dir, tiny_shards, tmp_path, "crlb.enabled=false"))
    before = Path(paths["json"]).read_bytes()
    assert json.loads(before)["meta"]["split"] == "test"
    with pytest.raises(OutputExistsError, match="evaluation.json already exists .* overwrite=true"):
        evaluate(_cfg(model_dir, tiny_shards, tmp_path, "crlb.enabled=false", "split=val"))
    assert Path(paths["json"]).read_bytes() == before
    report, _ = evaluate(_cfg(model_dir, tiny_shards, tmp_path, "crlb.enabled=false", "split=val", "overwrite=true"))
    assert json.loads(Path(paths["json"]).read_text())["meta"] == {**report["meta"], "split": "val"}
