"""Kill -9 in the middle of a shard build / a training run, rerun, and end where a clean run ends.

Both tests run the real code in a subprocess and SIGKILL it (no cleanup handlers run), so they
check what is on disk after a crash: shards are renamed into place only when complete, the
manifest is written last, and Lightning's ``last.ckpt`` lets training resume to the same step.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from stellarnet.dataset.manifest import verify_dataset

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _wait_for(proc: subprocess.Popen, ready, timeout: float, what: str) -> None:
    """Poll until ``ready()`` is true; fail with the child's output if it exits or times out first."""
    t0 = time.monotonic()
    while not ready():
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            pytest.fail(f"the child exited (rc={proc.returncode}) before {what}:\n{out[-4000:]}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.005)


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


# ---------------------------------------------------------------------------------- shard build
BUILD = textwrap.dedent(
    """
    import json, sys
    from stellarnet.dataset.shards import build_shards
    allstar, out, root, cuts = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    build_shards(allstar, out, cuts, spectra_root=root, grid="dr12", rows_per_shard=64, n_workers=1,
                 progress=False,
                 split={"by": "FIELD", "fractions": {"train": 0.6, "val": 0.2, "test": 0.2}, "seed": 1})
    """
)


def test_killed_shard_build_resumes_to_the_clean_manifest(tiny_survey, tiny_shards, loose_cuts, tmp_path):
    """Same arguments as the ``tiny_shards`` fixture (the clean build); kill after the first shard."""
    clean = json.loads((tiny_shards / "manifest.json").read_text())
    n_shards = len(clean["shards"])
    assert n_shards >= 4
    out = tmp_path / "shards"
    args = [sys.executable, "-c", BUILD, str(tiny_survey["allstar"]), str(out), str(tiny_survey["root"]),
            json.dumps(loose_cuts)]
    proc = subprocess.Popen(args, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for(proc, lambda: out.exists() and any(out.glob("*.h5")), 300, "the first shard file")
    _kill(proc)
    done = sorted(p.name for p in out.glob("*.h5"))
    assert not (out / "manifest.json").exists(), "the build finished before the kill; nothing was tested"
    assert 1 <= len(done) < n_shards

    from stellarnet.dataset.shards import build_shards

    manifest = build_shards(tiny_survey["allstar"], out, loose_cuts, spectra_root=tiny_survey["root"],
                            grid="dr12", rows_per_shard=64, n_workers=1, progress=False,
                            split={"by": "FIELD", "fractions": {"train": 0.6, "val": 0.2, "test": 0.2},
                                   "seed": 1})
    assert manifest == clean
    assert json.loads((out / "manifest.json").read_text()) == clean
    verify_dataset(out)  # every shard present with its SHA-256
    assert not list(out.glob("*.tmp*")), "stale temporary files left behind"
    assert sorted(p.name for p in out.glob("*.h5")) == sorted(s["file"] for s in clean["shards"])


# ------------------------------------------------------------------------------------- training
def _train_cmd(survey: dict, shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "stellarnet.train", "+experiment=apogee", "trainer=default", "model=small",
        "logger=tensorboard", f"hydra.run.dir={run_dir}",
        f"data.survey.allstar={survey['allstar']}", f"data.survey.spectra_root={survey['root']}",
        f"data.shards.out_dir={shards}", "data.shards.rows_per_shard=64", "data.shards.n_workers=1",
        "data.shards.split.fractions.train=0.6", "data.shards.split.fractions.val=0.2",
        "data.shards.split.fractions.test=0.2",
        # loosen the science cuts so the 400-star survey keeps enough stars
        "data.cuts.snr.min=20", "data.cuts.vscatter=null", "data.cuts.starflag=null",
        "data.cuts.teff_range=null", "data.cuts.logg_range=null",
        "data.datamodule.batch_size=32", "data.datamodule.num_workers=0",
        "trainer.enable_progress_bar=false", "trainer.max_epochs=3", "trainer.log_every_n_steps=1",
        "~callbacks.early_stopping", "test=false", "refine.enabled=false", *extra,
    ]


def _run(cmd: list[str], timeout: float) -> None:
    res = subprocess.run(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         timeout=timeout)
    assert res.returncode == 0, res.stdout[-4000:]


def _loads(path: Path) -> dict | None:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - still being written
        return None


def test_killed_training_resumes_to_the_same_global_step(tiny_survey, tmp_path):
    shards = tmp_path / "shards"
    # uninterrupted reference run (also builds the shards the other runs reuse)
    _run(_train_cmd(tiny_survey, shards, tmp_path / "ref"), timeout=900)
    ref = torch.load(tmp_path / "ref" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ref["epoch"] == 2 and ref["global_step"] > 0
    steps_per_epoch = ref["global_step"] // 3
    assert ref["global_step"] == 3 * steps_per_epoch

    run = tmp_path / "killed"
    last = run / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen(_train_cmd(tiny_survey, shards, run), env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    # kill as soon as the first epoch's last.ckpt is complete (loadable), i.e. during epoch 2
    _wait_for(proc, lambda: last.exists() and _loads(last) is not None, 600, "last.ckpt")
    _kill(proc)
    ck = torch.load(last, map_location="cpu", weights_only=True)
    assert ck["global_step"] < ref["global_step"], "the run finished before the kill; nothing was tested"
    assert ck["global_step"] % steps_per_epoch == 0

    _run(_train_cmd(tiny_survey, shards, tmp_path / "resumed", f"ckpt_path={last}"), timeout=900)
    final = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert final["global_step"] == ref["global_step"]
    assert final["epoch"] == ref["epoch"]
