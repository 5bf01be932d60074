"""``stellarnet.predict`` from FITS files: reader processes give the in-process catalogue (same
rows, order, numbers and per-file read errors); the new settings are checked before anything runs."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from conftest import copy_survey_slice, tiny_model_folder

from stellarnet.common.paths import CONF_DIR
from stellarnet.workflows.predict import predict

N_ROWS = 20
BAD_ROWS = {"truncated": 4, "missing": 11}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """An untrained tiny network on the dr12 grid with photometry (weights do not matter here)."""
    return tiny_model_folder(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def catalog(tiny_survey, tmp_path_factory) -> dict:
    """A 20-row allStar slice with its aspcapStar files; one is truncated, one missing."""
    root = tmp_path_factory.mktemp("predict_survey")
    allstar, ids, files = copy_survey_slice(tiny_survey["root"], tiny_survey["allstar"], root, N_ROWS)
    files[BAD_ROWS["truncated"]].write_bytes(files[BAD_ROWS["truncated"]].read_bytes()[:30000])
    files[BAD_ROWS["missing"]].unlink()
    return {"root": root, "allstar": allstar, "ids": ids, "files": files}


def _cfg(model_dir: Path, inp: str, out: Path, *overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose(config_name="predict", overrides=[f"ckpt_path={model_dir}", f"input={inp}",
                                                        f"output_dir={out}", *overrides])
    GlobalHydra.instance().clear()
    return cfg


def _fits_without_date(path) -> bytes:
    """The catalogue's bytes with the DATE card blanked (the write time differs between runs)."""
    from astropy.io import fits

    data = bytearray(Path(path).read_bytes())
    with fits.open(path) as hdul:
        card = hdul[1].header.cards["DATE"].image.encode()
    at = data.find(card)
    assert at > 0
    data[at:at + 80] = b" " * 80
    return bytes(data)


COMMON = ("chunk_size=6", "mc_samples=3", "seed=11", "torch_threads=1")


def test_pooled_predict_writes_the_in_process_catalogue(model_dir, catalog, tmp_path):
    inp = str(catalog["allstar"])
    extra = (f"spectra_root={catalog['root']}", *COMMON)
    threads = torch.get_num_threads()
    s0, p0 = predict(_cfg(model_dir, inp, tmp_path / "w0", "num_workers=0", *extra))
    s2, p2 = predict(_cfg(model_dir, inp, tmp_path / "w2", "num_workers=2", *extra))
    assert torch.get_num_threads() == threads  # restored
    assert Path(p0["csv"]).read_bytes() == Path(p2["csv"]).read_bytes()
    assert _fits_without_date(p0["fits"]) == _fits_without_date(p2["fits"])
    assert s0 == {**s2, "num_workers": 0}
    assert s2 == {"stars": N_ROWS, "read_errors": 2, "flagged_bad": N_ROWS, "num_workers": 2, "torch_threads": 1, "batch_size": 128,
                  "precision": "32", "refined": False, "chunks_skipped": 0, "chunks_written_here": 4,
                  "survey_residual": None}
    cat = pd.read_csv(p2["csv"], dtype={"APOGEE_ID": str, "READ_ERROR": str}, keep_default_na=False)
    assert cat["APOGEE_ID"].tolist() == catalog["ids"]  # allStar order
    err = cat["READ_ERROR"]
    assert err[BAD_ROWS["truncated"]].startswith("SpectrumFormatError:") and "truncated" in err[BAD_ROWS["truncated"]]
    assert err[BAD_ROWS["missing"]].startswith("FileNotFoundError:")
    assert (err != "").sum() == 2
    bad = list(BAD_ROWS.values())
    labels = cat[["TEFF", "LOGG", "TEFF_ERR_EPISTEMIC"]].replace("", np.nan).astype(float)
    assert labels.iloc[bad].isna().all().all()  # no numbers for unreadable spectra
    assert np.isfinite(labels.drop(index=bad).to_numpy()).all()
    assert (labels.drop(index=bad)["TEFF_ERR_EPISTEMIC"] > 0).mean() > 0.5  # MC dropout ran (seeded)


def test_pooled_predict_from_a_file_list_with_a_bad_file(model_dir, catalog, tmp_path):
    bad = tmp_path / "aspcapStar-dr17-2M00000001+0000001.fits"
    bad.write_text("not FITS\n" * 100)
    files = [str(f) for i, f in enumerate(catalog["files"]) if i not in BAD_ROWS.values()][:7]
    files.insert(3, str(bad))
    (tmp_path / "list.txt").write_text("\n".join(files) + "\n")
    inp = str(tmp_path / "list.txt")
    s0, p0 = predict(_cfg(model_dir, inp, tmp_path / "w0", "num_workers=0", *COMMON, "chunk_size=3"))
    s1, p1 = predict(_cfg(model_dir, inp, tmp_path / "w1", "num_workers=1", *COMMON, "chunk_size=3"))
    assert Path(p0["csv"]).read_bytes() == Path(p1["csv"]).read_bytes()
    assert s0["read_errors"] == s1["read_errors"] == 1
    cat = pd.read_csv(p1["csv"], dtype=str, keep_default_na=False)
    assert cat["APOGEE_ID"][3] == bad.stem and "not a readable FITS" in cat["READ_ERROR"][3]


def test_defaults_follow_the_measurements():
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose(config_name="predict")
    GlobalHydra.instance().clear()
    assert cfg.batch_size == "auto" and cfg.num_workers == "auto" and cfg.torch_threads == "auto"
    assert str(cfg.precision) == "32" and cfg.seed is None
    from stellarnet.workflows.predict import AUTO_BATCH_SIZE

    assert AUTO_BATCH_SIZE == {"32": 128, "bf16": 256}


@pytest.mark.parametrize("override,message", [
    ("num_workers=-1", "num_workers must be an integer >= 0 or 'auto', got num_workers=-1"),
    ("num_workers=1.5", "num_workers must be an integer >= 0 or 'auto', got num_workers=1.5"),
    ("torch_threads=0", "torch_threads must be an integer >= 1, got torch_threads=0 (or 'auto' or null)"),
    ("batch_size=fast", "batch_size must be an integer >= 1, got batch_size='fast' (or 'auto')"),
    ("precision=fp16", "precision must be one of '32', 'bf16' or 'auto', got 'fp16'"),
    ("seed=-3", "seed must be an integer >= 0, got seed=-3"),
])
def test_new_settings_are_checked_before_loading(tmp_path, override, message):
    cfg = _cfg(tmp_path / "nowhere.ckpt", str(tmp_path), tmp_path / "out", override)
    with pytest.raises(ValueError, match=re.escape(message)):
        predict(cfg)


def test_bf16_uses_its_batch_size(model_dir, catalog, tmp_path, monkeypatch):
    import stellarnet.common.hardware as hardware

    monkeypatch.setattr(hardware, "cpu_bf16_supported", lambda: True)  # emulated bf16 is only slower
    inp = str(catalog["allstar"])
    s, p = predict(_cfg(model_dir, inp, tmp_path / "bf16", f"spectra_root={catalog['root']}", "precision=bf16",
                        "num_workers=0", "mc_samples=0", "torch_threads=1"))
    assert (s["precision"], s["batch_size"], s["read_errors"]) == ("bf16", 256, 2)
    s32, p32 = predict(_cfg(model_dir, inp, tmp_path / "fp32", f"spectra_root={catalog['root']}",
                            "num_workers=0", "mc_samples=0", "torch_threads=1"))
    a = pd.read_csv(p["csv"])
    b = pd.read_csv(p32["csv"])
    assert (np.abs(a["TEFF"] - b["TEFF"]).dropna() < 60).all()


def test_a_shifted_survey_in_files_is_predicted_and_scored_against_its_truth(model_dir, tmp_path):
    """``simulate shift=combined`` writes a survey the model was not trained on; ``predict`` reads it from the
    allStar like any survey and ``score_catalogue`` joins the catalogue's rows (duplicates included) to the
    truth file: what scripts/bench_shift_files.py does, on a handful of stars."""
    from astropy.io import fits

    from stellarnet.benchmarks.shift_suite import score_catalogue
    from stellarnet.simulate.survey import simulate_survey

    paths = simulate_survey(tmp_path / "survey", n_stars=30, seed=3, stars_per_field=30, external=False,
                            progress=False, dup_fraction=0.1, shift="combined")
    n_rows = len(fits.getdata(paths["allstar"], 1))
    out = tmp_path / "pred"
    predict(_cfg(model_dir, str(paths["allstar"]), out, *COMMON))
    res = score_catalogue(out / "predictions.fits", paths["truth"], snr_bin=(0.0, 1e9))
    assert res["n_rows"] == res["n_bin"] == n_rows > 30  # every row scored, the duplicate observations too
    assert "refined" not in res  # a model folder without a refinement stage: the network's labels
    for m in res["network"].values():
        assert m["n"] == n_rows and np.isfinite(m["robust_sigma"]) and 0 <= m["coverage_1sigma"] <= 1
    assert 0 <= res["stage"]["accuracy"] <= 1 and res["flag_any_bad"] == 1.0  # NOT_REFINED is a bad bit
