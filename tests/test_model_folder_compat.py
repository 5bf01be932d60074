"""Model folders written before the package was restructured (``stellarnet.models.*`` targets in
their hyper-parameters) still load and predict exactly as they did.

``tests/data/model_folder_2026-12`` was written by commit cbacc5a (an untrained tiny network, the
conftest's ``tiny_model_folder``, plus a tiny spectrum emulator); ``..._expected.json`` holds what
that code predicted for the spectra below, network alone and refined."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).resolve().parent / "data"
FOLDER = DATA / "model_folder_2026-12"


def _spectra() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    flux = (1 - 0.05 * rng.random((4, 7214))).astype(np.float32)
    return flux, np.full((4, 7214), 0.01, np.float32)


def test_the_old_folder_stores_the_old_module_paths():
    text = (FOLDER / "config.yaml").read_text()
    assert "stellarnet.models.encoders.SpectralConvEncoder" in text


@pytest.mark.parametrize("refine", [False, True])
def test_an_old_model_folder_predicts_what_it_predicted_before(refine):
    from stellarnet.network.model_folder import load_model

    expected = json.loads((DATA / "model_folder_2026-12_expected.json").read_text())["refined" if refine else "network"]
    flux, err = _spectra()
    pred = load_model(FOLDER, refine=refine).predict(flux, err)
    assert set(expected) <= set(pred)
    for key, values in expected.items():
        np.testing.assert_allclose(np.asarray(pred[key], float), np.asarray(values, float), rtol=1e-5, atol=1e-6,
                                   err_msg=key)


def test_moved_targets_are_rewritten_and_others_kept():
    from stellarnet.network.components import current_targets

    cfg = {"a": {"_target_": "stellarnet.models.heads.TrunkMLP", "hidden": [8]},
           "b": [{"_target_": "stellarnet.network.encoders.PhotometryMLP"}], "c": None}
    out = current_targets(cfg)
    assert out["a"] == {"_target_": "stellarnet.network.heads.TrunkMLP", "hidden": [8]}
    assert out["b"][0]["_target_"] == "stellarnet.network.encoders.PhotometryMLP"
    assert cfg["a"]["_target_"] == "stellarnet.models.heads.TrunkMLP"  # the input is not modified
