"""`train(cfg)` end to end on tiny shards (lightning-hydra-template style)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict

from stellarnet.common.paths import CONF_DIR
from stellarnet.workflows.train import train


def make_cfg(tmp_path: Path, survey: dict, loose_cuts: dict, overrides=()):
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose(config_name="train", return_hydra_config=False,
                      overrides=["+experiment=apogee", "trainer=default",
                                 f"data.survey.allstar={survey['allstar']}",
                                 f"data.survey.spectra_root={survey['root']}",
                                 f"data.shards.out_dir={tmp_path / 'shards'}",
                                 "data.shards.rows_per_shard=64", "data.shards.n_workers=1",
                                 "data.shards.split.fractions.train=0.6",
                                 "data.shards.split.fractions.val=0.2",
                                 "data.shards.split.fractions.test=0.2",
                                 "data.datamodule.batch_size=16", "data.datamodule.num_workers=0",
                                 "trainer.enable_progress_bar=false", "refine.epochs=2", "refine.hidden=16",
                                 *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
        cfg.data.cuts = loose_cuts
    return cfg


def test_train_fast_dev_run(tmp_path, tiny_survey, loose_cuts):
    cfg = make_cfg(tmp_path, tiny_survey, loose_cuts, ["+trainer.fast_dev_run=true"])
    metrics, objects = train(cfg)
    assert "train/loss" in metrics or "val/loss" in metrics
    out = json.loads((tmp_path / "run" / "test_metrics.json").read_text())
    assert out  # test metrics were written
    assert (tmp_path / "shards" / "manifest.json").exists()


@pytest.mark.slow
def test_train_resume_from_last(tmp_path, tiny_survey, loose_cuts):
    cfg = make_cfg(tmp_path, tiny_survey, loose_cuts, ["trainer.max_epochs=1", "test=false"])
    _, objs = train(cfg)
    steps_one = objs["trainer"].global_step
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert last.exists()
    cfg2 = make_cfg(tmp_path, tiny_survey, loose_cuts, ["trainer.max_epochs=2", "test=false",
                                                          f"ckpt_path={last}"])
    _, objs2 = train(cfg2)
    assert objs2["trainer"].global_step == 2 * steps_one
    ck = torch.load(last, map_location="cpu", weights_only=True)
    assert ck["global_step"] == 2 * steps_one
    # raising max_epochs on resume re-stretches the one-cycle schedule over the new length
    assert ck["stellarnet_schedule_total"] == 2 * steps_one
    assert ck["lr_schedulers"][0]["total_steps"] == 2 * steps_one
    assert ck["lr_schedulers"][0]["last_epoch"] == 2 * steps_one


@pytest.mark.parametrize("override", ["logger=none", "~logger"])
def test_train_without_a_logger(tmp_path, tiny_survey, loose_cuts, override):
    """Documented in docs/configuration.md: trains without a logger; the LR monitor (which needs
    one) is dropped instead of failing."""
    cfg = make_cfg(tmp_path, tiny_survey, loose_cuts, ["+trainer.fast_dev_run=true", "test=false", override])
    assert not cfg.get("logger")
    _, objects = train(cfg)
    from lightning.pytorch.callbacks import LearningRateMonitor

    assert not objects["trainer"].loggers
    assert not any(isinstance(c, LearningRateMonitor) for c in objects["trainer"].callbacks)
    assert not (tmp_path / "run" / "tensorboard").exists()


def test_a_real_tiny_training_run_exports_a_working_model_folder(tmp_path, tiny_survey, loose_cuts):
    """No fast_dev_run: 2 epochs, then the export path users get (σ scale and class temperatures
    fitted on val, the refinement stage, the evaluation report, the model card) — values checked."""
    import numpy as np

    from stellarnet.network import load_model

    cfg = make_cfg(tmp_path, tiny_survey, loose_cuts, ["trainer.max_epochs=2", "shifts.enabled=false",
                                                       "refine.epochs=3", "refine.hidden=16", "logger=none"])
    metrics, objects = train(cfg)
    folder = tmp_path / "run" / "model"
    for name in ("model.pt", "emulator.pt", "provenance.json", "MODEL_CARD.md", "refinement.json"):
        assert (folder / name).is_file(), name
    model = load_model(folder)
    spec = model.data_spec
    assert len(spec["sigma_scale"]) == 4 and all(0.05 < s < 20 for s in spec["sigma_scale"])
    # the noise term, fitted on the val split as it is and at a lower S/N: finite, ≥ 0, applied
    assert len(spec["sigma_noise_scale"]) == 4 and all(np.isfinite(k) and k >= 0 for k in spec["sigma_noise_scale"])
    np.testing.assert_allclose(model.sigma_noise_scale, spec["sigma_noise_scale"], rtol=1e-6)
    assert set(spec["class_temperature"]) == {"spectral_type", "luminosity_class", "stage"}
    assert all(0.05 <= t <= 20 for t in spec["class_temperature"].values())
    prov = json.loads((folder / "provenance.json").read_text())
    assert prov["simulated"] is False  # the test passes its survey as data.survey.allstar
    assert prov["split_rows"] == json.loads((tmp_path / "shards" / "manifest.json").read_text())["split_rows"]
    report = json.loads((tmp_path / "run" / "evaluation.json").read_text())
    assert report["meta"]["labels"].startswith("network + χ² refinement")
    assert 0 <= report["classification"]["stage"]["ece"] <= 1
    assert all(np.isfinite(report["regression"]["overall"][k]["mae"]) for k in ("TEFF", "LOGG", "FE_H", "ALPHA_FE"))
    tm = json.loads((tmp_path / "run" / "test_metrics.json").read_text())
    assert tm["labels"]["TEFF"]["unit"] == "K" and 0 < tm["labels"]["TEFF"]["mae"] < 3000  # 2 epochs: rough
    assert tm["labels"]["TEFF"]["n"] == report["regression"]["overall"]["TEFF"]["n"]
    assert np.isfinite(metrics["eval/mae_TEFF"])
