"""Data loading alone: batches/s of ``StellarDataModule.train_dataloader()`` (shuffled HDF5 shard
reads + standardization + collation), for num_workers 0, 1, 2.

Usage:
    python scripts/bench_datamodule.py [--dataset data/shards/sim_dr12] [--batch-size 128]
        [--batches 200] [--warmup 5] [--workers 0,1,2] [--out outputs/bench/datamodule.json]

Compare with ``scripts/bench_train.py`` (samples/s of a training step): when the loader delivers
several times more samples/s than the training loop consumes, data loading is not the
bottleneck. Each setting runs in a fresh child process; the first ``--warmup`` batches (worker
start-up, file opening) are timed separately (``startup_s``). Pass ``--verify`` to include the
SHA-256 check of every shard in ``setup`` (done once per run by the DataModule).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _bench_common import (  # noqa: E402
    ROOT,
    ForeignCPU,
    busy_warning,
    finish,
    machine_info,
    run_child_measured,
)

_CHILD = r"""
import json, sys, time
a = json.loads(sys.argv[1])
import torch
torch.set_num_threads(1)
from stellarnet.dataset.datamodule import StellarDataModule
t = time.perf_counter()
dm = StellarDataModule(a["dataset"], batch_size=a["batch_size"], num_workers=a["workers"], verify=a["verify"])
dm.setup("fit")
setup_s = time.perf_counter() - t
n_train = len(dm.datasets["train"])
loader = dm.train_dataloader()
done, samples, t_start = 0, 0, None
t = time.perf_counter()
while done < a["warmup"] + a["batches"]:
    for batch in loader:
        if done == a["warmup"]:
            t_start = time.perf_counter()
            startup = t_start - t
        if done >= a["warmup"]:
            samples += int(batch["flux"].shape[0])
        done += 1
        if done >= a["warmup"] + a["batches"]:
            break
dt = time.perf_counter() - t_start
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
print(json.dumps({"num_workers": a["workers"], "batch_size": a["batch_size"], "timed_batches": a["batches"],
                  "batches_per_s": a["batches"] / dt, "samples_per_s": samples / dt, "startup_s": startup,
                  "setup_s": setup_s, "verify_sha256": a["verify"], "train_rows": n_train,
                  "peak_rss_main_mb": hwm()}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default=str(ROOT / "data/shards/sim_dr12"))
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--workers", default="0,1,2")
    ap.add_argument("--verify", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "outputs/bench/datamodule.json"))
    args = ap.parse_args()
    res: dict = {"machine": machine_info(), "warning": busy_warning(), "dataset": args.dataset, "runs": []}
    _fc = ForeignCPU().__enter__()  # CPU used by other processes meanwhile
    for w in [int(x) for x in args.workers.split(",")]:
        child = {"dataset": args.dataset, "batch_size": args.batch_size, "workers": w, "batches": args.batches,
                 "warmup": args.warmup, "verify": args.verify}
        r = run_child_measured(["-c", _CHILD, json.dumps(child)])
        print(json.dumps(r), flush=True)
        res["runs"].append(r)
    finish(res, _fc, args.out)


if __name__ == "__main__":
    main()
