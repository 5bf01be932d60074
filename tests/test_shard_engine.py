"""Shard building on the prediction engine: 2 DDP processes (gloo, CPU) build the shards one process
builds — same files, same checksums, same manifest — and resume a killed build without redoing the
finished shards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from stellarnet.dataset.manifest import BUILDING_MARKER, MANIFEST, load_manifest
from stellarnet.dataset.shards import ShardTasks, _ShardTask


def _overrides(survey: dict, out: Path) -> list[str]:
    return [f"data.survey.allstar={survey['allstar']}", f"data.survey.spectra_root={survey['root']}",
            f"data.shards.out_dir={out}", "data.shards.grid=dr12", "data.shards.rows_per_shard=40",
            "data.shards.n_workers=0"]


def _cli(survey: dict, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """``python -m stellarnet.build_shards`` as a user launches it."""
    cmd = [sys.executable, "-m", "stellarnet.build_shards", *_overrides(survey, out),
           f"hydra.run.dir={out.parent / (out.name + '_run')}", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


def _one_process(survey: dict, out: Path) -> None:
    """The same build in this process (the entry's config, no trainer)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from stellarnet.common.paths import CONF_DIR
    from stellarnet.dataset.ensure import ensure_shards

    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose(config_name="train", overrides=_overrides(survey, out))
    ensure_shards(OmegaConf.to_container(cfg.data, resolve=True))


def _comparable(manifest: dict) -> dict:
    """The manifest without the paths that name the output directory."""
    return {k: v for k, v in manifest.items() if k not in ("sources",)}


def test_two_ddp_processes_build_the_one_process_shards_and_resume(tiny_survey, tmp_path):
    _one_process(tiny_survey, tmp_path / "one")
    ddp = ("trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu")
    two = _cli(tiny_survey, tmp_path / "two", *ddp)
    assert two.returncode == 0, two.stderr[-2000:]
    out = two.stdout + two.stderr
    assert "Starting with 2 processes" in out and "Traceback" not in out
    assert out.count("rows per split:") == 1  # rank 0 alone writes and reports the manifest
    m1, m2 = load_manifest(tmp_path / "one"), load_manifest(tmp_path / "two")
    assert len(m1["shards"]) >= 4 and m1["shards"] == m2["shards"]  # same files, rows and SHA-256
    assert _comparable(m1) == _comparable(m2)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())

    # a build killed midway: one shard gone, the marker left, no new manifest yet
    work = tmp_path / "two"
    lost = work / m2["shards"][1]["file"]
    lost.unlink()
    (work / BUILDING_MARKER).write_text(json.dumps({"build_hash": m2["build_hash"]}))
    kept = {sh["file"]: (work / sh["file"]).stat().st_mtime_ns for sh in m2["shards"] if sh["file"] != lost.name}
    again = _cli(tiny_survey, work, *ddp)
    assert again.returncode == 0, again.stderr[-2000:]
    assert load_manifest(work)["shards"] == m1["shards"] and lost.exists()
    assert {f: (work / f).stat().st_mtime_ns for f in kept} == kept  # finished shards were not rebuilt
    assert not (work / BUILDING_MARKER).exists() and (work / MANIFEST).exists()


def test_a_shard_task_is_built_once_and_then_skipped(tiny_survey, tmp_path):
    """ShardTasks' item: the shard is written with its entry; asked again (a resumed build), the
    complete file of the same build is kept and its entry returned unchanged."""
    import numpy as np

    from stellarnet.io.catalogs import read_allstar
    from stellarnet.io.layout import spectrum_path

    df = read_allstar(tiny_survey["allstar"], columns=["APOGEE_ID", "TELESCOPE", "FIELD"]).iloc[:5]
    files = [str(spectrum_path(tiny_survey["root"], "aspcapStar", t, f, a))
             for t, f, a in zip(df["TELESCOPE"], df["FIELD"], df["APOGEE_ID"])]
    task = _ShardTask(path=str(tmp_path / "train-00000.h5"), build_hash="abc", grid="dr12", normalized=True,
                      files=files, columns={"snr": np.arange(5, dtype=np.float32)})
    first = ShardTasks([task])[0]
    second = ShardTasks([task])[0]
    assert first["rows"] == 5 and first["stars"] == 5 and not first["skipped"] and second["skipped"]
    assert first["sha256"] == second["sha256"] and not list(tmp_path.glob("*.tmp"))


def test_building_shards_leaves_the_global_random_state_alone(tiny_survey, loose_cuts, tmp_path):
    """train seeds torch, then builds missing shards, then initializes the network: the build must
    not draw from torch's global RNG (the DataLoader's worker seed did), or the same seed gives
    other weights depending on whether the shards existed."""
    import torch

    from stellarnet.dataset.shards import build_shards

    torch.manual_seed(123)
    before = torch.get_rng_state().clone()
    build_shards(tiny_survey["allstar"], tmp_path / "s", loose_cuts, spectra_root=tiny_survey["root"], grid="dr12",
                 rows_per_shard=64, n_workers=2, progress=False)
    assert torch.equal(torch.get_rng_state(), before)
