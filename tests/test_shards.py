"""Shard build, manifest, resume, corruption and the DataModule."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from stellarnet.io import grids
from stellarnet.io.catalogs import read_allstar
from stellarnet.dataset.datamodule import StellarDataModule
from stellarnet.dataset.manifest import ShardError, load_manifest, verify_dataset
from stellarnet.dataset.reader import ShardReader
from stellarnet.dataset.shards import build_shards
from stellarnet.preparation.spectra import prepare_spectrum
from stellarnet.io.spectra import read_spectrum
from stellarnet.preparation.splits import assign_splits


def _all_rows(dataset):
    m = load_manifest(dataset)
    rows = {}
    for split in ("train", "val", "test"):
        r = ShardReader(dataset, split, m, verify=False)
        data = r.read_all(r.FIELDS + ("apogee_id", "field", "row_index"))
        r.close()
        rows[split] = data
    return m, rows


def test_manifest_contents(tiny_shards):
    m = load_manifest(tiny_shards)
    assert m["schema_version"] == 1
    assert m["grid"] == "dr12" and m["n_pixels"] == 7214 and len(m["wavelength"]) == 7214
    assert m["label_names"] == ["TEFF", "LOGG", "FE_H", "ALPHA_FE"]
    assert m["label_units"] == ["K", "dex", "dex", "dex"]
    assert 3500 < m["label_mean"][0] < 6500 and m["label_std"][0] > 100
    assert set(m["class_tasks"]) == {"spectral_type", "luminosity_class", "stage"}
    assert sum(m["split_rows"].values()) == sum(s["rows"] for s in m["shards"])
    assert all(len(s["sha256"]) == 64 for s in m["shards"])
    assert m["cut_report"] and m["cut_report"][0]["before"] >= m["cut_report"][-1]["kept"]
    assert (tiny_shards / "cut_report.md").exists()


def test_round_trip_matches_source_files(tiny_shards, tiny_survey):
    """What goes in comes out: shard rows equal the preprocessed spectra and catalogue values."""
    m, rows = _all_rows(tiny_shards)
    data = rows["train"]
    cat = read_allstar(tiny_survey["allstar"])
    for j in (0, len(data["flux"]) // 2, len(data["flux"]) - 1):
        r = int(data["row_index"][j])
        star = cat.iloc[r]
        assert star["APOGEE_ID"] == data["apogee_id"][j].decode()
        path = (tiny_survey["root"] / "apogee/spectro/aspcap/dr17/synspec_rev1" / star["TELESCOPE"] / star["FIELD"]
                / f"aspcapStar-dr17-{star['APOGEE_ID']}.fits")
        spec = read_spectrum(path)
        fl, er, gd = prepare_spectrum(spec.flux, spec.flux_err, spec.pixmask, grid="dr12", normalized=True)
        np.testing.assert_array_equal(data["flux"][j], fl)
        np.testing.assert_array_equal(data["flux_err"][j], er)
        np.testing.assert_array_equal(data["pix_mask"][j].astype(bool), gd)
        np.testing.assert_allclose(data["labels"][j][0], star["TEFF"], rtol=1e-6)
        alpha = star["ALPHA_M"] + star["M_H"] - star["FE_H"]  # [α/Fe] from DR17's [α/M]
        assert m["label_columns"]["ALPHA_FE"] == "ALPHA_FE"
        if np.isfinite(alpha):
            np.testing.assert_allclose(data["labels"][j][3], alpha, rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(data["label_err"][j][3], star["ALPHA_M_ERR"], rtol=1e-6)
        else:
            assert np.isnan(data["labels"][j][3])
    assert np.isfinite(data["flux"]).all() and np.isfinite(data["flux_err"]).all()


def test_no_split_shares_a_field_or_star(tiny_shards):
    _, rows = _all_rows(tiny_shards)
    fields = {s: set(rows[s]["field"].tolist()) for s in rows}
    stars = {s: set(rows[s]["apogee_id"].tolist()) for s in rows}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not fields[a] & fields[b]
        assert not stars[a] & stars[b]


def test_assign_splits_keeps_duplicates_together():
    df = pd.DataFrame({
        "FIELD": ["A", "A", "B", "B", "C", "D", "E", "F"],
        "APOGEE_ID": ["s1", "s2", "s1", "s3", "s4", "s5", "s6", "s7"],  # s1 links fields A and B
    })
    split = assign_splits(df, {"train": 0.5, "val": 0.25, "test": 0.25}, seed=3)
    assert split[0] == split[1] == split[2] == split[3]
    assert set(split) == {"train", "val", "test"}
    with pytest.raises(ValueError, match="FIELDX"):
        assign_splits(df, {"train": 1.0}, by="FIELDX")


def test_resumed_build_equals_clean_build(tiny_shards, tiny_survey, loose_cuts, tmp_path):
    """Simulate a kill: delete one shard, truncate another, leave a stale temp file; rerun."""
    work = tmp_path / "resume"
    shutil.copytree(tiny_shards, work)
    clean = json.loads((tiny_shards / "manifest.json").read_text())
    shard_files = sorted(work.glob("*.h5"))
    shard_files[0].unlink()
    with open(shard_files[1], "r+b") as f:
        f.truncate(1000)
    (work / "manifest.json").unlink()
    (work / "val-00000.h5.tmp").write_bytes(b"partial")
    m = build_shards(tiny_survey["allstar"], work, loose_cuts, spectra_root=tiny_survey["root"], grid="dr12",
                     rows_per_shard=64, n_workers=1, progress=False,
                     split={"by": "FIELD", "fractions": {"train": 0.6, "val": 0.2, "test": 0.2}, "seed": 1})
    assert m == clean
    verify_dataset(work)


def test_corrupted_and_truncated_shards_are_reported(tiny_shards, tmp_path):
    work = tmp_path / "bad"
    shutil.copytree(tiny_shards, work)
    shard = sorted(work.glob("train-*.h5"))[0]
    with h5py.File(shard, "r+") as f:
        f["flux"][0, 0] = 42.0
    with pytest.raises(ShardError, match="SHA-256"):
        verify_dataset(work)
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size // 3)
    with pytest.raises(ShardError, match="truncated|SHA-256"):
        verify_dataset(work)
    with pytest.raises(ShardError, match="truncated"):
        verify_dataset(work, check_sha=False)


def test_newer_schema_is_refused(tiny_shards, tmp_path):
    work = tmp_path / "newer"
    shutil.copytree(tiny_shards, work)
    m = json.loads((work / "manifest.json").read_text())
    m["schema_version"] = 99
    (work / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ShardError, match="newer"):
        load_manifest(work)


def test_missing_labels_are_masked(tiny_shards):
    dm = StellarDataModule(str(tiny_shards), batch_size=16, num_workers=0)
    dm.setup("fit")
    ds = dm.datasets["train"]
    raw = ds.reader.read_all(("labels",))["labels"]
    missing = np.argwhere(~np.isfinite(raw))
    assert len(missing) > 0, "the tiny survey should contain stars with a missing label"
    i, j = missing[0]
    item = ds[int(i)]
    assert item["label_mask"][j] == 0 and item["labels"][j] == 0 and item["label_err"][j] == 0
    assert item["label_mask"].sum() >= 3


def test_datamodule_batch_shapes_and_dtypes(tiny_shards):
    dm = StellarDataModule(str(tiny_shards), batch_size=8, num_workers=0)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    m = dm.manifest
    P, L, F, C = m["n_pixels"], len(m["label_names"]), len(m["phot_features"]), len(m["class_tasks"])
    expected = {"flux": (torch.float32, (8, P)), "flux_err": (torch.float32, (8, P)),
                "pix_mask": (torch.float32, (8, P)), "photometry": (torch.float32, (8, F)),
                "phot_mask": (torch.float32, (8, F)), "labels": (torch.float32, (8, L)),
                "label_err": (torch.float32, (8, L)), "label_mask": (torch.float32, (8, L)),
                "classes": (torch.int64, (8, C)), "index": (torch.int64, (8,))}
    assert set(batch) == set(expected)
    for k, (dtype, shape) in expected.items():
        assert batch[k].dtype == dtype, k
        assert tuple(batch[k].shape) == shape, k
        if dtype == torch.float32:
            assert torch.isfinite(batch[k]).all(), k
    # standardized labels: roughly zero mean over the train split
    labels = torch.cat([b["labels"][:, 0] for b in dm.train_dataloader()])
    assert abs(float(labels.mean())) < 0.2
    spec = dm.data_spec()
    assert spec["grid"] == "dr12" and len(spec["wavelength"]) == grids.n_pixels("dr12")


def test_datamodule_with_workers(tiny_shards):
    dm = StellarDataModule(str(tiny_shards), batch_size=32, num_workers=2, verify=False)
    dm.setup("fit")
    n = sum(len(b["index"]) for b in dm.val_dataloader())
    assert n == len(dm.datasets["val"])


def _rebuild(survey, cuts, out, seed):
    return build_shards(survey["allstar"], out, cuts, spectra_root=survey["root"], grid="dr12",
                        rows_per_shard=64, n_workers=1, progress=False,
                        split={"by": "FIELD", "fractions": {"train": 0.6, "val": 0.2, "test": 0.2}, "seed": seed})


def test_interrupted_rebuild_with_other_settings_is_refused_then_finished(tiny_shards, tiny_survey, loose_cuts,
                                                                          tmp_path, monkeypatch):
    """A rebuild killed after one shard leaves old shards, one new shard and the old manifest:
    no reader may take that for a dataset (doubled and missing stars); a rerun finishes it."""
    import stellarnet.dataset.shards as shards_mod
    from stellarnet.dataset.chunks import open_chunks

    work = tmp_path / "half"
    shutil.copytree(tiny_shards, work)
    real = shards_mod._write_shard
    calls = []

    def killed_after_one(task):
        if calls:
            raise KeyboardInterrupt("killed")
        calls.append(task.path)
        return real(task)

    monkeypatch.setattr(shards_mod, "_write_shard", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        _rebuild(tiny_survey, loose_cuts, work, seed=7)
    monkeypatch.setattr(shards_mod, "_write_shard", real)
    assert (work / "manifest.json").exists() and (work / ".building").exists()
    assert not (work / ".build.lock").exists()  # released on the way out
    with pytest.raises(ShardError, match="interrupted"):
        load_manifest(work)
    with pytest.raises(ShardError, match="interrupted"):
        open_chunks(str(work), "dr12")
    # the marker alone is what says so: without it the mixed shards are still caught by their build hash
    (work / ".building").unlink()
    with pytest.raises(ShardError, match="another build"):
        verify_dataset(work, check_sha=False)
    (work / ".building").write_text("{}")
    m = _rebuild(tiny_survey, loose_cuts, work, seed=7)
    assert not (work / ".building").exists()
    verify_dataset(work)
    clean = _rebuild(tiny_survey, loose_cuts, tmp_path / "clean", seed=7)
    assert m["shards"] == clean["shards"] and m["build_hash"] == clean["build_hash"]


def test_modified_shard_is_refused_by_predict_source(tiny_shards, tmp_path):
    from stellarnet.dataset.chunks import open_chunks

    work = tmp_path / "mod"
    shutil.copytree(tiny_shards, work)
    shard = sorted(work.glob("val-*.h5"))[0]
    with h5py.File(shard, "r+") as f:
        f["apogee_id"][0] = b"SOMEONE-ELSE"
    with pytest.raises(ShardError, match="SHA-256"):
        open_chunks(str(work), "dr12")


def test_concurrent_build_is_refused_and_stale_lock_taken_over(tiny_shards, tiny_survey, loose_cuts, tmp_path):
    import os
    import socket
    import subprocess
    import sys

    work = tmp_path / "locked"
    shutil.copytree(tiny_shards, work)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (work / ".build.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": live.pid}))
        with pytest.raises(ShardError, match=f"another build is writing .*pid {live.pid}"):
            _rebuild(tiny_survey, loose_cuts, work, seed=1)
    finally:
        live.kill()
        live.wait()
    # the same lock left by a process that no longer runs: taken over, build proceeds (and releases it)
    m = _rebuild(tiny_survey, loose_cuts, work, seed=1)
    assert m == json.loads((tiny_shards / "manifest.json").read_text())
    assert not (work / ".build.lock").exists()
    assert os.path.exists(work / "manifest.json")


def test_class_weights_inverse_frequency_capped_and_normalized():
    from stellarnet.dataset.shards import _class_weights

    codes = np.array([0] * 80 + [1] * 20 + [-1] * 50)  # −1 = undefined, ignored
    np.testing.assert_allclose(_class_weights(codes, 3), [0.4, 1.6, 0.0])  # 100/(2·count), mean 1 over present
    rare = np.array([0] * 1000 + [1])
    w = np.array([1001 / 2000, 10.0])  # the rare class's 500.5 capped at 10
    np.testing.assert_allclose(_class_weights(rare, 2), w / w.mean())


def test_a_lock_held_by_another_users_process_counts_as_alive(monkeypatch):
    import os

    from stellarnet.dataset.build_lock import _pid_alive

    def denied(pid, sig):
        raise PermissionError("not yours")

    monkeypatch.setattr(os, "kill", denied)
    assert _pid_alive(12345) is True


def test_default_split_is_80_10_10_by_field(tiny_survey, loose_cuts, tmp_path):
    m = build_shards(tiny_survey["allstar"], tmp_path / "ds", loose_cuts, spectra_root=tiny_survey["root"], grid="dr12",
                     rows_per_shard=256, n_workers=1, progress=False)
    assert m["split"] == {"by": "FIELD", "fractions": {"train": 0.8, "val": 0.1, "test": 0.1}, "seed": 42}
    total = sum(m["split_rows"].values())
    assert 0.6 < m["split_rows"]["train"] / total < 0.95


def test_every_selected_star_is_in_exactly_one_shard(tiny_shards):
    """No star lost or doubled across shards: the rows add up to the stars that passed the cuts and
    have a readable spectrum, each allStar row once (several shards per split here: 64 rows each)."""
    m, rows = _all_rows(tiny_shards)
    kept = m["cut_report"][-1]["kept"]
    expected = kept - m["spectra_missing"]["count"] - len(m["spectra_failed"])
    assert sum(m["split_rows"].values()) == expected
    assert sum(len(rows[s]["row_index"]) for s in rows) == expected
    all_rows = np.concatenate([rows[s]["row_index"] for s in rows])
    assert len(np.unique(all_rows)) == len(all_rows)
    assert max(sh["rows"] for sh in m["shards"]) == 64 and len(m["shards"]) > 3


def test_a_current_dataset_is_reused_not_rebuilt(tiny_shards, tiny_survey, loose_cuts, tmp_path):
    work = tmp_path / "again"
    shutil.copytree(tiny_shards, work)
    stamps = {p.name: p.stat().st_mtime_ns for p in work.glob("*")}
    m = _rebuild(tiny_survey, loose_cuts, work, seed=1)
    assert m == json.loads((tiny_shards / "manifest.json").read_text())
    assert {p.name: p.stat().st_mtime_ns for p in work.glob("*")} == stamps  # nothing rewritten
