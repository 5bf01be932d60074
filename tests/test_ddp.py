"""Multi-process data-parallel training through Lightning on CPU (gloo), 2 processes.

* ``ddp_spawn``: ``train(cfg)`` in this process; Lightning spawns the 2 ranks for fit and test and
  sends rank 0's gathered test metrics back (``stellarnet.workflows.train.return_spawn_results``).
* ``ddp`` (what ``srun``/``torchrun`` launch on a cluster): every rank runs the whole entry point,
  so shard building and the post-fit work must be guarded to rank 0. A driver script is run as a
  subprocess, either by Lightning's own launcher (it re-launches the script for rank 1; under
  pytest it would re-launch pytest) or by ``torchrun`` (both ranks start together: rank 1 must
  wait for rank 0 to build the shards). The driver records, per rank, every file opened for
  writing under the run and shard directories (a ``sys.addaudithook`` hook) and every
  ``ensure_shards`` call.

The test metrics of a 2-process run must equal those of a single-process evaluation of the same
checkpoint on the same test split, with each test star counted once (``DistributedSampler`` pads
the split with duplicates, which the module drops by the batch ``index``).

``SyncBatchNorm`` (``conf/trainer/ddp.yaml``: ``sync_batchnorm: true``) only runs on GPUs, so
these CPU runs set ``trainer.sync_batchnorm=false``. The multi-process tests are ``slow``; the
unit tests of the pieces (gathering, log names, rank-0 shard building) run in the default suite.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.distributed as dist
from test_models import SyntheticStars, loader, make_module
from test_train import make_cfg

import stellarnet.network.ddp as ddp_mod
from stellarnet.network.epoch_metrics import concat_outputs
import stellarnet.workflows.train as T
from stellarnet.dataset.datamodule import StellarDataModule
from stellarnet.network.epoch_metrics import compute_metrics
from stellarnet.workflows.train import train

ROOT = Path(__file__).resolve().parents[1]
DDP_CPU = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.sync_batchnorm=false",
           "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false",
           "model.log_figures=false",
           "data.shards.split.seed=51"]  # 238 / 83 / 67 stars: odd val and test splits, so the sampler pads
_RANK_VARS = ("RANK", "SLURM_PROCID", "NODE_RANK", "LOCAL_RANK", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID",
              "SLURM_STEP_ID", "GROUP_WORLD_SIZE")

needs_gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is needed")


def _test_rows(shards: Path) -> int:
    manifest = json.loads((shards / "manifest.json").read_text())
    return int(manifest["split_rows"]["test"])


def single_process_test_metrics(ckpt: str | Path, shards: Path) -> tuple[dict, dict]:
    """(test_metrics, test_outputs) of one process testing ``ckpt`` on the test split of ``shards``."""
    from stellarnet.network.model_folder import load_module

    module = load_module(ckpt)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    trainer.test(module, datamodule=StellarDataModule(str(shards), batch_size=16, num_workers=0), verbose=False)
    return module.test_metrics, module.test_outputs


def assert_same_metrics(got: dict, ref: dict) -> None:
    assert set(got["labels"]) == set(ref["labels"]) and set(got["classes"]) == set(ref["classes"])
    for name, r in ref["labels"].items():
        g = got["labels"][name]
        assert g["n"] == r["n"], name
        for key in ("mae", "bias", "rmse", "z_std", "coverage_68"):
            if r[key] is None or (isinstance(r[key], float) and math.isnan(r[key])):
                assert g[key] is None or math.isnan(g[key]), (name, key)
            else:
                assert g[key] == pytest.approx(r[key], rel=1e-5, abs=1e-6), (name, key)
    for task, r in ref["classes"].items():
        assert got["classes"][task]["n"] == r["n"], task
        if r["n"]:
            assert got["classes"][task]["accuracy"] == pytest.approx(r["accuracy"], abs=1e-9), task


def assert_whole_split_once(metrics: dict, shards: Path) -> None:
    n_test = _test_rows(shards)
    assert n_test % 2 == 1  # DistributedSampler gave rank 1 a duplicate of the first test star
    # TEFF / LOGG / FE_H are finite for every star (the `finite` cut): n = the test split, no duplicates
    for name in ("TEFF", "LOGG", "FE_H"):
        assert metrics["labels"][name]["n"] == n_test, name
    for task, m in metrics["classes"].items():
        assert 0 < m["n"] <= n_test, task


def assert_sigma_scale_from_whole_val_split(run: Path, ckpt: str, shards: Path) -> None:
    """The model folder's σ scale is the one fitted on the whole val split (not one rank's share)."""
    from stellarnet.evaluation.split_predictions import validation_calibration
    from stellarnet.network.inference import Predictor
    from stellarnet.network.model_folder import load_module

    spec = json.loads((run / "model" / "data_spec.json").read_text())
    scale, noise_scale, _ = validation_calibration(Predictor(load_module(ckpt)), shards, "val")
    np.testing.assert_allclose(spec["sigma_scale"], scale, rtol=1e-6)
    np.testing.assert_allclose(spec["sigma_noise_scale"], noise_scale, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# unit tests of the pieces (default suite)
# ----------------------------------------------------------------------------------------------
def _rank_outputs(module, ds, world: int) -> tuple[list[dict], dict]:
    """Per-rank epoch outputs as DistributedSampler shards the dataset (with padding), and the
    single-process outputs."""
    module.eval()
    per_rank = []
    with torch.no_grad():
        for r in range(world):
            sampler = torch.utils.data.DistributedSampler(ds, num_replicas=world, rank=r, shuffle=False)
            dl = torch.utils.data.DataLoader(ds, batch_size=8, sampler=sampler)
            store = [module._collect(b, module._pred_from_out(module._forward_batch(b))) for b in dl]
            per_rank.append(concat_outputs(store))
        single = concat_outputs([module._collect(b, module._pred_from_out(module._forward_batch(b)))
                                 for b in loader(ds, batch_size=8)])
    return per_rank, single


@pytest.mark.parametrize("world", [2, 3])
def test_gathered_outputs_equal_single_process(monkeypatch, world):
    module = make_module()
    ds = SyntheticStars(37, seed=3, missing_frac=0.3)  # 37 rows: the sampler pads 1 (world 2) or 2 (world 3)
    per_rank, single = _rank_outputs(module, ds, world)
    assert sum(len(p["index"]) for p in per_rank) > len(ds)  # padded duplicates

    def fake_all_gather_object(out, obj):
        out[:] = per_rank

    monkeypatch.setattr(module, "_distributed", lambda: True)
    monkeypatch.setattr(ddp_mod.dist, "get_world_size", lambda *a, **k: world)
    monkeypatch.setattr(ddp_mod.dist, "all_gather_object", fake_all_gather_object)
    gathered = module._gather_outputs(per_rank[0])
    np.testing.assert_array_equal(gathered["index"], np.arange(len(ds)))
    # same rows in the same order; values equal up to float rounding (other batch compositions)
    for key, value in single.items():
        for t, a in (value.items() if isinstance(value, dict) else [(None, value)]):
            g = gathered[key][t] if t else gathered[key]
            if a.dtype.kind == "f":
                np.testing.assert_allclose(g, a, rtol=1e-5, atol=1e-6, err_msg=f"{key} {t}")
            else:
                np.testing.assert_array_equal(g, a, err_msg=f"{key} {t}")
    spec = module.data_spec
    assert_same_metrics(compute_metrics(gathered, spec), compute_metrics(single, spec))
    assert compute_metrics(gathered, spec)["labels"]["TEFF"]["n"] == int(ds.label_mask[:, 0].sum())


def test_single_process_outputs_are_not_reordered():
    module = make_module()
    outputs = {"index": np.array([3, 1, 2]), "labels_pred": np.zeros((3, 4))}
    assert module._gather_outputs(outputs) is outputs


def test_epoch_metric_log_calls_do_not_depend_on_data(monkeypatch):
    """Same names in the same order (data_spec order) whatever the split; labels with n = 0 and
    non-finite values are skipped (the decision is made on gathered metrics, identical on all ranks)."""
    module = make_module()
    calls = []
    monkeypatch.setattr(module, "log", lambda name, value, **kw: calls.append((name, kw)))
    metrics = {"labels": {name: {"n": 5, "mae": 1.0, "bias": 0.0, "z_std": 1.0, "coverage_68": 0.7}
                          for name in reversed(module.label_names)},
               "classes": {t: {"n": 5, "accuracy": 0.5} for t in reversed(list(module.class_tasks))}}
    metrics["labels"]["LOGG"] = {"n": 0, "mae": math.nan, "bias": math.nan, "z_std": math.nan,
                                 "coverage_68": math.nan}
    metrics["labels"]["FE_H"]["z_std"] = math.nan  # n = 1
    module._log_metrics("val", metrics)
    names = [c[0] for c in calls]
    assert names == ["val/mae_TEFF", "val/bias_TEFF", "val/z_std_TEFF", "val/coverage_68_TEFF",
                     "val/mae_FE_H", "val/bias_FE_H", "val/coverage_68_FE_H",
                     "val/mae_ALPHA_FE", "val/bias_ALPHA_FE", "val/z_std_ALPHA_FE", "val/coverage_68_ALPHA_FE",
                     "val/acc_spectral_type", "val/acc_luminosity_class", "val/acc_stage"]
    assert all(kw == {"sync_dist": True, "reduce_fx": "max"} for _, kw in calls)


def test_nonfinite_loss_decision_is_collective(monkeypatch):
    """A rank whose own loss is finite skips (or raises) when another rank's loss is not."""
    batch = torch.utils.data.default_collate([SyntheticStars(4, seed=1)[i] for i in range(4)])
    m = make_module(nan_policy="skip")
    assert m._all_ranks_agree(True) and not m._all_ranks_agree(False)  # single process: its own decision
    monkeypatch.setattr(m, "_all_ranks_agree", lambda decision: False)
    before = {n: b.clone() for n, b in m._norm_buffers().items()}
    assert m.training_step(batch, 0) is None and m.n_skipped_batches == 1
    for n, b in m._norm_buffers().items():  # batch-norm statistics untouched, as for a local NaN
        assert torch.equal(b, before[n]), n
    m = make_module(nan_policy="raise")
    monkeypatch.setattr(m, "_all_ranks_agree", lambda decision: False)
    with pytest.raises(FloatingPointError, match="another rank"):
        m.training_step(batch, 0)


@pytest.fixture
def no_rank_env(monkeypatch):
    for var in _RANK_VARS:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


@pytest.mark.parametrize("env, zero", [
    ({}, True), ({"LOCAL_RANK": "0"}, True), ({"RANK": "0", "LOCAL_RANK": "0"}, True),
    ({"RANK": "1", "LOCAL_RANK": "1"}, False), ({"RANK": "2", "LOCAL_RANK": "0"}, False),  # torchrun node 1
    ({"SLURM_PROCID": "3"}, False), ({"SLURM_PROCID": "0"}, True),
    ({"LOCAL_RANK": "1", "NODE_RANK": "0"}, False), ({"LOCAL_RANK": "0", "NODE_RANK": "1"}, False),
])
def test_env_global_rank_is_zero(no_rank_env, env, zero):
    for k, v in env.items():
        no_rank_env.setenv(k, v)
    assert T.env_global_rank_is_zero() is zero


def test_launch_id(no_rank_env):
    assert T.launch_id() is None
    no_rank_env.setenv("SLURM_JOB_ID", "77")
    assert T.launch_id() is None  # a batch script, not an srun step
    no_rank_env.setenv("SLURM_STEP_ID", "2")
    no_rank_env.setenv("SLURM_PROCID", "1")
    assert T.launch_id() == "slurm:77:2:0"
    no_rank_env.setenv("TORCHELASTIC_RUN_ID", "none")
    assert T.launch_id().startswith("torchrun:none:") and f"agent{os.getppid()}" in T.launch_id()
    no_rank_env.setenv("GROUP_WORLD_SIZE", "2")
    assert "agent" not in T.launch_id()


def _data_cfg(out: Path) -> dict:
    """A valid data config (prepare_shards checks it on every rank before building or waiting)."""
    return {"shards": {"out_dir": str(out), "grid": "dr12", "rows_per_shard": 64, "n_workers": 1,
                       "split": {"fractions": {"train": 0.8, "val": 0.1, "test": 0.1}}},
            "survey": {"allstar": None, "spectra_kind": "aspcapStar", "simulate": {"n_stars": 100}}}


def test_rank0_builds_and_marks_the_launch(no_rank_env, tmp_path):
    calls = []
    no_rank_env.setattr(T, "ensure_shards", lambda cfg: calls.append(cfg) or {"build_hash": "h1"})
    assert T.prepare_shards(_data_cfg(tmp_path)) == {"build_hash": "h1"}
    assert len(calls) == 1 and not (tmp_path / T.SHARDS_READY).exists()  # no launcher: no marker
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "TORCHELASTIC_RUN_ID": "abc", "GROUP_WORLD_SIZE": "2",
                 "MASTER_ADDR": "n0", "MASTER_PORT": "29500"}.items():
        no_rank_env.setenv(k, v)
    T.prepare_shards(_data_cfg(tmp_path))
    assert len(calls) == 2
    assert json.loads((tmp_path / T.SHARDS_READY).read_text()) == {"launch": "torchrun:abc:n0:29500:0",
                                                                    "build_hash": "h1"}


def test_other_ranks_wait_for_rank0(no_rank_env, tmp_path):
    """Rank 1 never builds; it waits for rank 0's marker of *this* launch (an older manifest and an
    older launch's marker do not count)."""
    no_rank_env.setattr(T, "ensure_shards", lambda cfg: pytest.fail("rank 1 must not build shards"))
    no_rank_env.setattr(T, "load_manifest", lambda d: {"dir": str(d)})
    for k, v in {"RANK": "1", "LOCAL_RANK": "1", "SLURM_JOB_ID": "9", "SLURM_STEP_ID": "0",
                 "SLURM_PROCID": "1"}.items():
        no_rank_env.setenv(k, v)
    (tmp_path / "manifest.json").write_text("{}")  # stale, from an older build
    (tmp_path / T.SHARDS_READY).write_text(json.dumps({"launch": "slurm:8:0:0"}))  # an older job
    done = threading.Timer(0.5, lambda: (tmp_path / T.SHARDS_READY).write_text(json.dumps({"launch": "slurm:9:0:0"})))
    done.start()
    t0 = time.monotonic()
    assert T.wait_for_shards(tmp_path, timeout_s=30, poll_s=0.05, launch=T.launch_id()) == {"dir": str(tmp_path)}
    assert time.monotonic() - t0 >= 0.4
    done.join()
    # no launch id (the ranks Lightning's launcher starts after rank 0 built): the manifest suffices
    assert T.wait_for_shards(tmp_path, timeout_s=1, poll_s=0.05) == {"dir": str(tmp_path)}


def test_wait_for_shards_times_out_with_a_clear_error(tmp_path):
    with pytest.raises(TimeoutError, match=r"rank 0.*shared.*shards_wait_timeout_s"):
        T.wait_for_shards(tmp_path, timeout_s=0.2, poll_s=0.05, launch="slurm:1:0:0")


def test_prebuilt_shards_need_no_marker(monkeypatch, tmp_path):
    """shards_wait_timeout_s <= 0: shards built before the job (node-local disks), no waiting."""
    monkeypatch.setattr(T, "load_manifest", lambda d: {"dir": str(d)})
    with pytest.raises(FileNotFoundError, match="before the job"):
        T.wait_for_shards(tmp_path, timeout_s=0, launch="slurm:1:0:0")
    (tmp_path / "manifest.json").write_text("{}")
    assert T.wait_for_shards(tmp_path, timeout_s=0, launch="slurm:1:0:0") == {"dir": str(tmp_path)}


# ----------------------------------------------------------------------------------------------
# 2-process runs (slow)
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
@needs_gloo
def test_ddp_spawn_cpu_two_processes(tmp_path, tiny_survey, loose_cuts):
    cfg = make_cfg(tmp_path, tiny_survey, loose_cuts, [*DDP_CPU, "trainer.strategy=ddp_spawn"])
    metrics, objects = train(cfg)
    trainer = objects["trainer"]
    assert trainer.world_size == 2 and trainer.num_devices == 2
    assert "val/loss" in metrics and "test/loss" in metrics  # reduced over both ranks
    assert "test/mae_TEFF" in metrics and "eval/mae_TEFF" in metrics
    run, shards = tmp_path / "run", tmp_path / "shards"
    written = json.loads((run / "test_metrics.json").read_text())
    assert written["checkpoint"] and Path(written["checkpoint"]).exists()
    # the spawned ranks trained; the parent's trainer state is not sent back, the checkpoint is
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] > 0
    # the metrics of the whole test split came back from the spawned rank 0 ...
    assert_whole_split_once(written, shards)
    np.testing.assert_array_equal(objects["test_outputs"]["index"], np.arange(_test_rows(shards)))
    # ... and equal a single-process evaluation of the same checkpoint
    ref, ref_out = single_process_test_metrics(written["checkpoint"], shards)
    assert_same_metrics(written, json.loads(json.dumps(T.to_jsonable(ref))))
    np.testing.assert_allclose(objects["test_outputs"]["labels_pred"], ref_out["labels_pred"], rtol=1e-5, atol=1e-5)
    assert metrics["test/mae_TEFF"] == pytest.approx(ref["labels"]["TEFF"]["mae"], rel=1e-5)
    assert_sigma_scale_from_whole_val_split(run, written["checkpoint"], shards)


_DRIVER = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    a = json.loads(Path(sys.argv[1]).read_text())
    tmp = Path(a["tmp"])
    rank = os.environ.get("RANK") or os.environ.get("LOCAL_RANK") or "0"
    watched = tuple(str(tmp / d) for d in ("run", "shards"))
    writes = []

    def audit(event, args):  # every file this rank opens for writing, creates, renames or removes
        if event == "open":
            path, mode, flags = args
            write = any(c in mode for c in "wax+") if isinstance(mode, str) else \\
                bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        elif event in ("os.rename", "os.remove", "os.mkdir"):
            path, write = args[1] if event == "os.rename" else args[0], True
        else:
            return
        if write and isinstance(path, (str, bytes, os.PathLike)):
            path = os.path.abspath(os.fsdecode(path))
            if path.startswith(watched):
                writes.append(os.path.relpath(path, tmp))

    sys.addaudithook(audit)
    sys.path.insert(0, {tests!r})
    from test_train import make_cfg
    import stellarnet.workflows.train as T

    calls = []
    _ensure = T.ensure_shards
    T.ensure_shards = lambda cfg: calls.append("ensure_shards") or _ensure(cfg)
    survey = {{k: Path(v) for k, v in a["survey"].items()}}
    cfg = make_cfg(tmp, survey, a["cuts"], a["overrides"])
    metrics, objects = T.train(cfg)
    tr = objects["trainer"]
    (tmp / f"record-rank{{rank}}.json").write_text(json.dumps({{
        "rank": tr.global_rank, "world_size": tr.world_size, "global_step": tr.global_step,
        "writes": sorted(set(writes)), "calls": calls, "metrics": sorted(metrics),
        "test_n": (tr.lightning_module.test_metrics or {{}}).get("labels", {{}}).get("TEFF", {{}}).get("n"),
    }}))
    """
)


@pytest.mark.slow
@needs_gloo
@pytest.mark.parametrize("launcher", ["lightning", "torchrun"])
def test_ddp_subprocess_rank_zero_writes_only(tmp_path, tiny_survey, loose_cuts, launcher):
    driver = tmp_path / "driver.py"
    driver.write_text(_DRIVER.format(tests=str(Path(__file__).resolve().parent)))
    args = tmp_path / "args.json"
    args.write_text(json.dumps({
        "tmp": str(tmp_path), "cuts": loose_cuts, "overrides": [*DDP_CPU, "trainer.strategy=ddp"],
        "survey": {k: str(v) for k, v in tiny_survey.items() if isinstance(v, (str, os.PathLike))},
    }))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    for var in (*_RANK_VARS, "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    if launcher == "torchrun":  # both ranks start at once; rank 1 waits for rank 0's shards
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               str(driver), str(args)]
    else:  # Lightning starts rank 1 from trainer.fit
        cmd = [sys.executable, str(driver), str(args)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=900)
    assert res.returncode == 0, res.stderr[-6000:]
    rec = [json.loads((tmp_path / f"record-rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in rec] == [0, 1] and all(r["world_size"] == 2 for r in rec)
    assert rec[0]["global_step"] > 0
    # only rank 0 built the shards and wrote files
    assert rec[0]["calls"] == ["ensure_shards"] and rec[1]["calls"] == []
    assert rec[1]["writes"] == [], rec[1]["writes"]
    w0 = rec[0]["writes"]
    for expected in ("run/test_metrics.json", "run/model/data_spec.json", "run/evaluation.json",
                     "shards/manifest.json"):
        assert expected in w0, (expected, w0)
    assert ("shards/" + T.SHARDS_READY in w0) == (launcher == "torchrun")
    run, shards = tmp_path / "run", tmp_path / "shards"
    written = json.loads((run / "test_metrics.json").read_text())
    assert written["checkpoint"]
    # every rank holds the gathered metrics of the whole split; they equal one process's
    assert rec[0]["test_n"] == rec[1]["test_n"] == _test_rows(shards)
    assert_whole_split_once(written, shards)
    ref, _ = single_process_test_metrics(written["checkpoint"], shards)
    assert_same_metrics(written, json.loads(json.dumps(T.to_jsonable(ref))))
    assert "test/mae_TEFF" in rec[1]["metrics"]  # logged (synchronized) on every rank
    assert_sigma_scale_from_whole_val_split(run, written["checkpoint"], shards)
