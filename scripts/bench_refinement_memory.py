"""Peak memory of the refinement build against the size of the training split.

    python scripts/bench_refinement_memory.py --model <run>/model [--dataset data/shards/sim_dr12]
        [--sizes 10000,100000] [--settings "memory_gb=0;memory_gb=4"] [--epochs 1]
        [--out outputs/bench/refinement_memory.json]

For each size a shard dataset is made whose training split has that many rows: the training shards
of ``--dataset`` repeated (hard links, so their SHA-256 and build hash stay valid; the spectra
repeat, which changes the work per star, not the memory per star), validation and test as they are.
Then ``python -m stellarnet.refinement`` builds the stage of a copy of the model folder in a fresh
process with every star of the split (``refine.max_stars=null``) and each ``--settings`` entry (Hydra
overrides under ``refine.``, ``;``-separated), and its peak RSS (VmHWM) and wall time are recorded.
``--epochs`` (default 1) and ``refine.calibration_degree=0`` keep it short: the label-calibration pass
reads and fits the training stars block by block as the network-label pass before it does, so it
changes the time, not the peak.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _bench_common import ROOT, ForeignCPU, finish, machine_info

MODEL_FILES = ("model.pt", "config.yaml", "data_spec.json", "provenance.json")


def scaled_dataset(source: Path, out: Path, train_rows: int) -> int:
    """``out``: ``source`` with its training shards repeated (hard links) up to ``train_rows`` rows
    (whole shards: the last may overshoot); returns the training rows written."""
    manifest = json.loads((source / "manifest.json").read_text())
    train = [s for s in manifest["shards"] if s["split"] == "train"]
    shards = [s for s in manifest["shards"] if s["split"] != "train"]
    out.mkdir(parents=True)
    for s in shards:
        os.link(source / s["file"], out / s["file"])
    total, k = 0, 0
    while total < train_rows:
        s = train[k % len(train)]
        name = f"train-{k:05d}.h5"
        os.link(source / s["file"], out / name)
        shards.append({**s, "file": name})
        total += s["rows"]
        k += 1
    manifest["shards"] = shards
    manifest["split_rows"] = {**manifest.get("split_rows", {}), "train": total}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return total


def run_build(model: Path, dataset: Path, workdir: Path, overrides: list[str]) -> dict:
    folder = workdir / "model"
    folder.mkdir(parents=True)
    for name in MODEL_FILES:
        if (model / name).exists():
            shutil.copy2(model / name, folder / name)
    cmd = [sys.executable, "-c",
           "import resource, runpy, sys, json\n"
           "sys.argv = ['stellarnet.refinement'] + sys.argv[1:]\n"
           "try:\n    runpy.run_module('stellarnet.refinement', run_name='__main__')\n"
           "except SystemExit as e:\n    assert not e.code, e.code\n"
           "print(json.dumps({'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))",
           f"ckpt_path={folder}", f"dataset_dir={dataset}", f"hydra.run.dir={workdir / 'run'}",
           "refine.max_stars=null", "refine.calibration_degree=0", *overrides]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT),
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"refinement build failed:\n{res.stderr[-3000:]}")
    line = [ln for ln in res.stdout.splitlines() if ln.startswith('{"peak_rss_mb"')][-1]
    summary = json.loads((folder / "refinement.json").read_text())
    return {**json.loads(line), "wall_s": round(wall, 1), "stars": summary["training"]["stars"],
            "streamed": summary["training"].get("streamed"), "chi2_per_pixel": summary["training"]["chi2_per_pixel"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a model folder (model.pt)")
    ap.add_argument("--dataset", default=str(ROOT / "data/shards/sim_dr12"))
    ap.add_argument("--sizes", default="10000,100000", help="training-split rows, comma-separated")
    ap.add_argument("--settings", default="memory_gb=0;memory_gb=4",
                    help="';'-separated refine.* overrides, each 'k=v,k=v' (one build per entry and size)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "outputs/bench/refinement_memory.json"))
    args = ap.parse_args(argv)
    session = ForeignCPU().__enter__()
    res: dict = {"machine": machine_info(), "model": args.model, "dataset": args.dataset, "epochs": args.epochs,
                 "runs": []}
    with tempfile.TemporaryDirectory(prefix="refmem_") as tmp:
        for size in [int(s) for s in args.sizes.split(",")]:
            data = Path(tmp) / f"data_{size}"
            rows = scaled_dataset(Path(args.dataset), data, size)
            for k, entry in enumerate(s for s in args.settings.split(";") if s.strip()):
                overrides = [f"refine.{kv.strip()}" for kv in entry.split(",") if kv.strip()]
                r = run_build(Path(args.model), data, Path(tmp) / f"run_{size}_{k}",
                              [*overrides, f"refine.epochs={args.epochs}"])
                r.update({"train_rows": rows, "settings": entry})
                print(json.dumps(r), flush=True)
                res["runs"].append(r)
            shutil.rmtree(data)
    finish(res, session, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
