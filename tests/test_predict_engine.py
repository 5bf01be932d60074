"""``stellarnet.predict`` on Lightning's engine: 2 DDP processes write the one-process catalogue, a
killed run resumes from its part files, part files round-trip exactly, chunks cover the input once."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import copy_survey_slice
from test_predict import _cfg, model_dir  # noqa: F401 - the untrained tiny model folder fixture

from stellarnet.dataset.chunks import open_chunks
from stellarnet.workflows.predict import PARTS_DIR, predict
from stellarnet.io.predictions import finished_parts, read_part, write_part

N_ROWS = 30
COMMON = ("num_workers=0", "mc_samples=2", "seed=3", "chunk_size=4", "trainer.accelerator=cpu",
          "trainer.enable_progress_bar=false")


@pytest.fixture(scope="module")
def survey(tiny_survey, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("engine_survey")
    allstar, ids, files = copy_survey_slice(tiny_survey["root"], tiny_survey["allstar"], root, N_ROWS)
    return {"root": root, "allstar": allstar, "ids": ids, "files": files}


def test_chunks_cover_the_input_once_in_order(survey):
    """Every star in exactly one chunk, chunk k holding stars 4k … 4k+3 in catalogue order."""
    ds = open_chunks(str(survey["allstar"]), "dr12", chunk_size=4, spectra_root=str(survey["root"]))
    assert (ds.n_stars, ds.n_chunks, len(ds)) == (N_ROWS, 8, 8)
    ids = np.concatenate([ds[i]["apogee_id"] for i in range(len(ds))])
    assert list(ids) == list(survey["ids"])
    sub = ds.only([5, 2])
    assert [sub[0]["chunk_index"], sub[1]["chunk_index"]] == [5, 2]
    assert list(sub[1]["apogee_id"]) == list(survey["ids"][8:12])
    assert ds.rows_of(7) == 2
    with pytest.raises(IndexError):
        ds.only([8])


def test_part_files_round_trip_exactly(tmp_path):
    frame = pd.DataFrame({"APOGEE_ID": np.array(["2M0001", "2M0002"], dtype=object), "TEFF": np.float32([4800.5, np.nan]),
                          "RA": np.array([1.25, 2.5]), "STELLARNET_FLAG": np.int32([0, 9]),
                          "REFINE_FLAG": np.int16([1, 2]), "STAGE": np.array(["RC", "RGB"], dtype=object),
                          "READ_ERROR": np.array(["", "SpectrumFormatError: x"], dtype=object)})
    path = write_part(tmp_path, 12, frame)
    assert path.name == "part-0000012.npz" and finished_parts(tmp_path) == {12}
    back = read_part(path)
    pd.testing.assert_frame_equal(back, frame)
    assert list(back.dtypes) == list(frame.dtypes)


def _run(model_dir, survey, out, *extra):
    return predict(_cfg(model_dir, str(survey["allstar"]), out, f"spectra_root={survey['root']}", *COMMON, *extra))


def test_a_killed_run_resumes_from_its_parts(model_dir, survey, tmp_path, monkeypatch):
    """A run stopped after 3 of 8 chunks leaves 3 part files and no catalogue; the same command then
    predicts only the 5 others and writes the catalogue of an uninterrupted run (same bytes); the
    parts are removed once merged. Another plan (other mc_samples) does not reuse them."""
    from stellarnet.network import prediction

    ref_summary, ref_paths = _run(model_dir, survey, tmp_path / "ref")
    assert ref_summary["chunks_skipped"] == 0 and ref_summary["stars"] == N_ROWS

    real = prediction.PartWriter.write_on_batch_end

    def dying(self, *args, **kwargs):
        if self.written == 3:
            raise KeyboardInterrupt("killed")
        real(self, *args, **kwargs)

    monkeypatch.setattr(prediction.PartWriter, "write_on_batch_end", dying)
    out = tmp_path / "killed"
    with pytest.raises(BaseException):
        _run(model_dir, survey, out)
    parts = list((out / PARTS_DIR).glob("*/part-*.npz"))
    assert len(parts) == 3 and not (out / "predictions.csv").exists()
    monkeypatch.setattr(prediction.PartWriter, "write_on_batch_end", real)

    # another plan in the same directory (other MC samples) reuses none of them, and leaves them be
    other, _ = _run(model_dir, survey, out, "mc_samples=0", "overwrite=true")
    assert other["chunks_skipped"] == 0
    (out / "predictions.csv").unlink(), (out / "predictions.fits").unlink(), (out / "predictions.columns.json").unlink()
    monkeypatch.setattr(prediction.PartWriter, "write_on_batch_end", dying)
    with pytest.raises(BaseException):
        _run(model_dir, survey, out)  # killed again: still the first 3 parts of this plan
    monkeypatch.setattr(prediction.PartWriter, "write_on_batch_end", real)
    summary, paths = _run(model_dir, survey, out)
    assert summary["chunks_skipped"] == 3 and summary["chunks_written_here"] == 5
    assert Path(paths["csv"]).read_bytes() == Path(ref_paths["csv"]).read_bytes()
    assert not (out / PARTS_DIR).exists()


def test_two_ddp_processes_write_the_one_process_catalogue(model_dir, survey, tmp_path):
    """``trainer=ddp trainer.devices=2`` on the CPU (gloo), launched as a user launches it: the same
    rows, order and numbers as one process (MC-dropout seeded per chunk), byte for byte."""
    base = [sys.executable, "-m", "stellarnet.predict", f"ckpt_path={model_dir}", f"input={survey['allstar']}",
            f"spectra_root={survey['root']}", *COMMON, "overwrite=true"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    one = subprocess.run(base + [f"output_dir={tmp_path / 'one'}"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(base + [f"output_dir={tmp_path / 'two'}", "trainer=ddp", "trainer.devices=2",
                                 "trainer.accelerator=cpu"], capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    assert "Starting with 2 processes" in two.stderr + two.stdout
    assert "Traceback" not in two.stderr + two.stdout  # rank 1 ends cleanly too (it returns without merging)
    assert (tmp_path / "two/predictions.csv").read_bytes() == (tmp_path / "one/predictions.csv").read_bytes()
    assert len(re.findall(r"^30 stars \(", two.stdout, flags=re.M)) == 1  # rank 0 alone reports


def test_the_output_directory_holds_the_catalogue_only(model_dir, survey, tmp_path):
    """No Lightning logs, checkpoints or leftover parts next to the catalogue."""
    _run(model_dir, survey, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "predictions.columns.json", "predictions.csv", "predictions.fits"]


def test_provenance_without_the_simulated_key_is_not_called_simulated(model_dir, tmp_path):
    """A model folder whose provenance.json predates the ``simulated`` key is not flagged simulated."""
    import json
    import shutil

    from stellarnet.network.model_folder import load_model
    from stellarnet.workflows.predict import catalogue_provenance

    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    (folder / "provenance.json").write_text(json.dumps({"training_data": "allStar-dr17 (real)"}))
    prov = catalogue_provenance(folder, load_model(folder), "x.fits")
    assert prov["training_data_simulated"] is False and prov["training_data"] == "allStar-dr17 (real)"
    (folder / "provenance.json").write_text(json.dumps({"training_data": "sim", "simulated": True}))
    assert catalogue_provenance(folder, load_model(folder), "x.fits")["training_data_simulated"] is True


def test_prediction_from_a_shard_dataset_keeps_the_manifest_order(model_dir, tiny_shards, tmp_path):
    """A shard dataset as input: chunks never cross a shard, every row once, in manifest order (train,
    val, test; shard by shard), with its split; no reader processes (nothing to read but HDF5)."""
    import json

    import h5py

    manifest = json.loads((tiny_shards / "manifest.json").read_text())
    ds = open_chunks(str(tiny_shards), "dr12", chunk_size=16)
    assert ds.kind == "shards" and ds.n_stars == sum(s["rows"] for s in manifest["shards"])
    assert sum(ds.rows_of(k) for k in range(ds.n_chunks)) == ds.n_stars
    expected = []
    for split in ("train", "val", "test"):
        for sh in (s for s in manifest["shards"] if s["split"] == split):
            with h5py.File(tiny_shards / sh["file"], "r") as f:
                expected += [(i.decode(), split) for i in f["apogee_id"][:]]
    summary, paths = predict(_cfg(model_dir, str(tiny_shards), tmp_path / "out", "chunk_size=16", "mc_samples=0",
                                  "num_workers=2", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false"))
    cat = pd.read_csv(paths["csv"], keep_default_na=False)
    assert list(zip(cat["APOGEE_ID"], cat["SPLIT"])) == expected
    assert summary["stars"] == len(expected) and summary["read_errors"] == 0
    assert summary["num_workers"] == 0  # shards need no readers
