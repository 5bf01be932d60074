"""Refinement-stage benchmark: spectra/s of ``Predictor.predict`` with and without the χ² refinement.

    python scripts/bench_refine.py --model <run>/model [--n 2048] [--threads 1,2] [--out outputs/bench/refine.json]

The model folder must hold ``emulator.pt`` (``python -m stellarnet.refinement`` or a training run with
``refine.enabled``). Each configuration runs in a fresh process on the first ``--n`` spectra of the
test split (in memory: no file reading), after one warm-up call on 64 spectra; the JSON has spectra/s,
the child's peak RSS, and the CPU other processes used meanwhile.
"""

from __future__ import annotations

import argparse
import json

from _bench_common import ROOT, ForeignCPU, busy_warning, finish, machine_info, run_child_measured

_CHILD = r"""
import json, sys, time
import torch
from _bench_common import vmhwm_mb
from stellarnet.evaluation.split_predictions import load_split
from stellarnet.network.model_folder import load_model
a = json.loads(sys.argv[1])
torch.set_num_threads(a["threads"])
p = load_model(a["model"])
d = load_split(a["dataset"], "test")
n = min(a["n"], len(d["flux"]))
args = (d["flux"][:n], d["flux_err"][:n], d["photometry"][:n], d["pix_mask"][:n])
p.predict(*(x[:64] for x in args), refine=a["refine"], batch_size=a["batch_size"])
t0 = time.perf_counter()
out = p.predict(*args, refine=a["refine"], batch_size=a["batch_size"])
dt = time.perf_counter() - t0
r = {**a, "n": n, "seconds": dt, "spectra_per_s": n / dt, "peak_rss_mb": vmhwm_mb()}
if a["refine"]:
    r["refined_fraction"] = float((out["refine_flag"] == 0).mean())
print(json.dumps(r))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model folder with emulator.pt")
    ap.add_argument("--dataset", default=str(ROOT / "data/shards/sim_dr12"))
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--out", default=str(ROOT / "outputs/bench/refine.json"))
    args = ap.parse_args()
    res: dict = {"machine": machine_info(), "warning": busy_warning(), "runs": []}
    fc = ForeignCPU().__enter__()
    for threads in (int(t) for t in args.threads.split(",")):
        for refine in (False, True):
            child = {"model": args.model, "dataset": args.dataset, "n": args.n, "threads": threads,
                     "refine": refine, "batch_size": args.batch_size}
            r = run_child_measured(["-c", _CHILD, json.dumps(child)], env={"PYTHONPATH": f"{ROOT}:{ROOT / 'scripts'}"})
            print(json.dumps(r), flush=True)
            res["runs"].append(r)
    finish(res, fc, args.out)


if __name__ == "__main__":
    main()
