"""Inference throughput on CPU: the model alone (``Predictor.predict`` on in-memory arrays) and
``stellarnet.predict.predict`` end to end (allStar → aspcapStar files → preprocessing → model →
predictions.fits / .csv).

Usage:
    python scripts/bench_inference.py [--ckpt logs/apogee/runs/<run>/checkpoints/last.ckpt]
        [--dataset data/shards/sim_dr12] [--n 4096] [--allstar data/sim_survey/allStar-dr17-synspec_rev1.fits]
        [--e2e-rows 0 (all)] [--skip-e2e] [--out outputs/bench/inference.json]

Model alone: spectra from the shard dataset (test split first) are held in memory and predicted
with every combination of torch threads (1, 2), batch size, fp32 vs bf16 autocast, with
``mc_samples`` 0 (one deterministic pass; ``predict``'s MC-dropout passes re-run only the dense
heads) and 20 (the ``conf/predict.yaml`` default; at the largest thread count only). The best of ``--repeats`` timed passes over
``--n`` spectra is reported (spectra/s), after one warm-up pass. Also: ``torch.inference_mode``
vs ``torch.no_grad`` around the raw ``predict_batch`` forward, and the conv/batch-norm fused copy
(``Predictor(fuse=True)``, the default) vs unfused.

End to end: ``predict(cfg)`` with ``conf/predict.yaml`` composed by Hydra, in a fresh child
process (peak RSS = that process's VmHWM), with the time split into reading + preprocessing,
model and writing. Default checkpoint: the newest ``logs/*/runs/*/checkpoints/last.ckpt``.
Weights do not change the speed, so any checkpoint of the default architecture will do.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _bench_common import (  # noqa: E402
    ROOT,
    ForeignCPU,
    busy_warning,
    find_checkpoint,
    finish,
    machine_info,
    run_child,
    vmhwm_mb,
)

_E2E_CHILD = r"""
import json, sys, time
from pathlib import Path
from hydra import compose, initialize_config_dir
from omegaconf import open_dict
import stellarnet.predict as P
from stellarnet.paths import CONF_DIR
a = json.loads(sys.argv[1])
import torch
torch.set_num_threads(a["threads"])
with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
    cfg = compose(config_name="predict", overrides=[f"ckpt_path={a['ckpt']}", f"input={a['input']}",
                                                     f"output_dir={a['out_dir']}", *a["overrides"]])
timers = {"model_s": 0.0, "write_s": 0.0}
_load, _Writer = P.load_model, P.PredictionWriter
def load_model(path):
    pred = _load(path)
    inner = pred.predict
    def timed(*args, **kw):
        t = time.perf_counter(); r = inner(*args, **kw); timers["model_s"] += time.perf_counter() - t; return r
    pred.predict = timed
    return pred
class TimedWriter(_Writer):
    def write(self, df):
        t = time.perf_counter(); super().write(df); timers["write_s"] += time.perf_counter() - t
    def close(self):
        t = time.perf_counter(); r = super().close(); timers["write_s"] += time.perf_counter() - t; return r
P.load_model, P.PredictionWriter = load_model, TimedWriter
with open_dict(cfg):
    cfg.paths.output_dir = a["out_dir"]
t = time.perf_counter()
summary, paths = P.predict(cfg)
total = time.perf_counter() - t
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
n = summary["stars"]
print(json.dumps({"stars": n, "total_s": total, "spectra_per_s": n / total, **timers,
                  "read_preprocess_s": total - timers["model_s"] - timers["write_s"],
                  "read_errors": summary["read_errors"],
                  "peak_rss_mb": hwm(), "batch_size": int(cfg.batch_size), "chunk_size": int(cfg.chunk_size),
                  "mc_samples": int(cfg.mc_samples), "threads": a["threads"],
                  "csv_mb": Path(paths["csv"]).stat().st_size / 2**20,
                  "fits_mb": Path(paths["fits"]).stat().st_size / 2**20}))
"""


def load_arrays(dataset: Path, n: int) -> dict:
    import numpy as np

    from stellarnet.data.shards import ShardReader, load_manifest

    manifest = load_manifest(dataset)
    parts: dict[str, list] = {"flux": [], "flux_err": [], "pix_mask": [], "photometry": []}
    have = 0
    for split in ("test", "val", "train"):
        reader = ShardReader(dataset, split, manifest=manifest, verify=False)
        if len(reader) == 0:
            continue
        take = min(n - have, len(reader))
        rows = reader.rows(np.arange(take), fields=tuple(parts))
        for k in parts:
            parts[k].append(rows[k])
        reader.close()
        have += take
        if have >= n:
            break
    arrays = {k: np.concatenate(v) for k, v in parts.items()}
    if have < n:  # tile a small dataset up to n
        reps = -(-n // have)
        arrays = {k: np.concatenate([v] * reps)[:n] for k, v in arrays.items()}
    arrays["pix_mask"] = arrays["pix_mask"].astype(np.float32)
    return arrays


def time_predict(predictor, arrays, batch_size: int, mc: int, bf16: bool, repeats: int) -> float:
    import contextlib

    import torch

    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    n = len(arrays["flux"])
    best = float("inf")
    with ctx:
        # warm-up (oneDNN primitive creation, allocator)
        predictor.predict(arrays["flux"][: 2 * batch_size], arrays["flux_err"][: 2 * batch_size],
                          photometry=arrays["photometry"][: 2 * batch_size],
                          pix_mask=arrays["pix_mask"][: 2 * batch_size], mc_samples=mc, batch_size=batch_size, seed=0)
        for _ in range(repeats):
            t = time.perf_counter()
            predictor.predict(arrays["flux"], arrays["flux_err"], photometry=arrays["photometry"],
                              pix_mask=arrays["pix_mask"], mc_samples=mc, batch_size=batch_size, seed=0)
            best = min(best, time.perf_counter() - t)
    return n / best


def time_forward(predictor, arrays, batch_size: int, mode: str, repeats: int) -> float:
    """Raw ``predict_batch`` over pre-made tensors (no numpy preprocessing), under ``mode``."""
    import torch

    net = predictor.net.eval()
    n = len(arrays["flux"])
    phot, pmask = predictor.standardize_photometry(arrays["photometry"], n)
    ts = [torch.from_numpy(a) for a in (arrays["flux"], arrays["flux_err"], arrays["pix_mask"], phot, pmask)]
    guard = torch.inference_mode if mode == "inference_mode" else torch.no_grad
    best = float("inf")
    with guard():
        net.predict_batch(*[t[:batch_size] for t in ts])
        for _ in range(repeats):
            t0 = time.perf_counter()
            for s in range(0, n, batch_size):
                net.predict_batch(*[t[s:s + batch_size] for t in ts])
            best = min(best, time.perf_counter() - t0)
    return n / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default=None)
    ap.add_argument("--dataset", default=str(ROOT / "data/shards/sim_dr12"))
    ap.add_argument("--n", type=int, default=4096, help="spectra per timed pass (model alone)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch-sizes", default="32,64,128,256,512,1024")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--allstar", default=str(ROOT / "data/sim_survey/allStar-dr17-synspec_rev1.fits"))
    ap.add_argument("--e2e-threads", type=int, default=2)
    ap.add_argument("--e2e-overrides", default="", help="extra predict.yaml overrides, comma separated")
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "outputs/bench/inference.json"))
    args = ap.parse_args()

    import torch

    from stellarnet.models.inference import Predictor, load_model, load_module

    ckpt = find_checkpoint(args.ckpt)
    if ckpt is None or not ckpt.exists():
        raise SystemExit("no checkpoint: pass --ckpt or train one (python -m stellarnet.train +experiment=apogee "
                         "trainer.max_epochs=1 +trainer.limit_train_batches=5 test=false paths.log_dir=/tmp/bench_logs)")
    res: dict = {"machine": machine_info(), "warning": busy_warning(), "checkpoint": str(ckpt),
                 "n_spectra": args.n, "repeats": args.repeats}
    _fc = ForeignCPU().__enter__()  # CPU used by other processes meanwhile
    predictor = load_model(ckpt)
    res["model"] = {"grid": predictor.grid, "n_pixels": predictor.n_pixels,
                    "parameters": sum(p.numel() for p in predictor.module.parameters())}
    arrays = load_arrays(Path(args.dataset), args.n)

    sweep = []
    max_threads = max(int(x) for x in args.threads.split(","))
    for th in [int(x) for x in args.threads.split(",")]:
        torch.set_num_threads(th)
        for bs in [int(x) for x in args.batch_sizes.split(",")]:
            for bf16 in (False, True):
                for mc in ((0, 20) if th == max_threads else (0,)):  # mc 20 only at full threads
                    with ForeignCPU() as fc:
                        rate = time_predict(predictor, arrays, bs, mc, bf16, args.repeats)
                    row = {"threads": th, "batch_size": bs, "precision": "bf16-autocast" if bf16 else "fp32",
                           "mc_samples": mc, "spectra_per_s": round(rate, 1),
                           "foreign_cpu_fraction": fc.result()["foreign_cpu_fraction"]}
                    print(json.dumps(row), flush=True)
                    sweep.append(row)
    res["model_alone_sweep"] = sweep
    best = max(sweep, key=lambda r: r["spectra_per_s"])
    res["model_alone_best"] = best
    best_mc0 = {k: max((r for r in sweep if r["mc_samples"] == 0 and r["threads"] == k), key=lambda r: r["spectra_per_s"])
                for k in {r["threads"] for r in sweep}}
    res["model_alone_best_by_threads_mc0"] = {str(k): v for k, v in best_mc0.items()}

    # inference_mode vs no_grad; fused vs unfused (threads 2, fp32, best fp32 mc0 batch size)
    torch.set_num_threads(max(int(x) for x in args.threads.split(",")))
    bs = max((r for r in sweep if r["precision"] == "fp32" and r["mc_samples"] == 0
              and r["threads"] == torch.get_num_threads()), key=lambda r: r["spectra_per_s"])["batch_size"]
    res["grad_mode"] = {m: round(time_forward(predictor, arrays, bs, m, args.repeats), 1)
                        for m in ("inference_mode", "no_grad")}
    res["grad_mode"]["batch_size"] = bs
    unfused = Predictor(load_module(ckpt), fuse=False)
    res["fusion"] = {"batch_size": bs, "fused_spectra_per_s": round(time_predict(predictor, arrays, bs, 0, False, args.repeats), 1),
                     "unfused_spectra_per_s": round(time_predict(unfused, arrays, bs, 0, False, args.repeats), 1)}
    res["model_alone_peak_rss_mb"] = round(vmhwm_mb(), 1)

    if not args.skip_e2e:
        import tempfile

        e2e = []
        with tempfile.TemporaryDirectory(prefix="bench_pred_") as tmp:
            base = [o for o in args.e2e_overrides.split(",") if o]
            for label, over in (("defaults (batch_size 1024, mc_samples 20)", []),
                                ("batch_size 128, mc_samples 0", ["batch_size=128", "mc_samples=0"])):
                child = {"ckpt": str(ckpt), "input": args.allstar, "out_dir": str(Path(tmp) / str(len(e2e))),
                         "threads": args.e2e_threads, "overrides": base + over}
                with ForeignCPU() as fc:
                    r = run_child(["-c", _E2E_CHILD, json.dumps(child)])
                r["config"] = label
                r["foreign_cpu_fraction"] = fc.result()["foreign_cpu_fraction"]
                print(json.dumps(r), flush=True)
                e2e.append(r)
        res["end_to_end"] = e2e
    finish(res, _fc, args.out)


if __name__ == "__main__":
    main()
