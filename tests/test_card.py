"""The model card (provenance.json + MODEL_CARD.md in a model folder) and how predict uses it."""

from __future__ import annotations

import json
import logging
import shutil

from astropy.io import fits
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from conftest import tiny_model_folder

from stellarnet.dataset.manifest import load_manifest
from stellarnet.evaluation.card import write_model_card
from stellarnet.common.paths import CONF_DIR


def test_card_records_the_training_data_and_predict_carries_it(tiny_shards, tiny_survey, tmp_path, caplog):
    from stellarnet.workflows.predict import predict

    manifest = load_manifest(tiny_shards)
    model = tiny_model_folder(tmp_path / "model")
    paths = write_model_card(model, manifest, simulated=True, metrics={"eval/mae_TEFF": 51.234, "bad": [1]})
    prov = json.loads(paths["provenance"].read_text())
    assert prov["simulated"] is True and prov["grid"] == "dr12"
    assert prov["sources"]["allstar_sha256"] == manifest["sources"]["allstar_sha256"]
    assert prov["split_rows"] == manifest["split_rows"] and prov["test_metrics"] == {"eval/mae_TEFF": 51.234}
    n_stars = sum(manifest["split_rows"].values())
    assert f"{n_stars} stars after cuts" in prov["training_data"] and "simulated survey" in prov["training_data"]
    assert "SNR > 20 (-" in prov["cuts_summary"]
    card = paths["card"].read_text()
    assert "Trained on simulated spectra" in card and "`eval/mae_TEFF`: 51.23" in card

    spectrum = sorted(tiny_survey["root"].rglob("aspcapStar-*.fits"))[0]
    local = tmp_path / spectrum.name
    shutil.copy(spectrum, local)
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose(config_name="predict", overrides=[f"ckpt_path={model}", f"input={local}",
                                                        f"output_dir={tmp_path / 'out'}", "num_workers=0",
                                                        "mc_samples=0"])
    GlobalHydra.instance().clear()
    with caplog.at_level(logging.WARNING, logger="stellarnet.predict"):
        _, out = predict(cfg)
    assert any("trained on simulated spectra" in r.message for r in caplog.records)
    with fits.open(out["fits"]) as hdul:
        hdr = hdul[1].header
    assert hdr["SNTRAIN"] == prov["training_data"] and hdr["SNCUTS"] == prov["cuts_summary"]
    assert hdr["SNREFINE"] == "False" and len(hdr["SNMHASH"]) == 64
