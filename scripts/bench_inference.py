"""Inference throughput on CPU: the model alone (``Predictor.predict`` on in-memory arrays) and
``stellarnet.workflows.predict.predict`` end to end (allStar → aspcapStar files → preprocessing → model →
predictions.fits / .csv).

Usage:
    python scripts/bench_inference.py [--ckpt logs/apogee/runs/<run>/checkpoints/last.ckpt]
        [--dataset data/shards/sim_dr12] [--n 4096] [--allstar data/sim_survey/allStar-dr17-synspec_rev1.fits]
        [--e2e-rows 0 (all)] [--e2e-workers 0,1,2] [--e2e-configs "defaults;mc_samples=0"] [--e2e-repeats 1]
        [--e2e-baseline-repo DIR] [--e2e-only | --skip-e2e] [--out outputs/bench/inference.json]

Model alone: spectra from the shard dataset (test split first) are held in memory and predicted
with every combination of torch threads (1, 2), batch size, fp32 vs bf16 autocast, with
``mc_samples`` 0 (one deterministic pass; ``predict``'s MC-dropout passes re-run only the dense
heads) and 20 (the ``conf/predict.yaml`` default; at the largest thread count only). The best of ``--repeats`` timed passes over
``--n`` spectra is reported (spectra/s), after one warm-up pass. Also: ``torch.inference_mode``
vs ``torch.no_grad`` around the raw ``predict_batch`` forward, and the conv/batch-norm fused copy
(``Predictor(fuse=True)``, the default) vs unfused.

End to end: ``predict(cfg)`` with ``conf/predict.yaml`` composed by Hydra, in a fresh child
process per run (peak RSS = that process's VmHWM; ``worker_peak_rss_mb`` = the largest reader
process, read before it stops), for each ``--e2e-configs`` entry × ``--e2e-workers`` value (``num_workers``: reader
processes). The time splits into model loading, the model (``Predictor.predict``), writing, and
``waiting_for_spectra_s`` (the rest: the main process waiting for / doing the reading and
preprocessing, and building the chunk tables); ``cpu_s_main`` / ``cpu_s_workers`` are the CPU
seconds of the main process and its reader processes. ``--e2e-rows N`` predicts the first N allStar
rows; the spectrum files are read once first (``--no-warm-cache`` to skip) so that every run finds
them in the page cache. ``--e2e-baseline-repo`` adds runs of another checkout (e.g. ``git archive
HEAD`` unpacked in /tmp), interleaved with the current ones in each of the ``--e2e-repeats``
rounds, for before/after numbers on the same machine, data and load. Default checkpoint: the
newest ``logs/*/runs/*/checkpoints/last.ckpt`` (a model folder works too). Weights do not change
the speed, so any checkpoint of the default architecture will do.

End to end only, 3,000 stars, HEAD (unpacked in /tmp/stellarnet_head) vs the working tree:
    mkdir -p /tmp/stellarnet_head && git archive HEAD | tar -x -C /tmp/stellarnet_head
    python scripts/bench_inference.py --e2e-only --ckpt logs/pipeline/train/model --e2e-rows 3000 \
        --e2e-workers 0,1,2 --e2e-configs "defaults;mc_samples=0" --e2e-repeats 2 \
        --e2e-baseline-repo /tmp/stellarnet_head --out outputs/bench/predict_e2e.json
"""

from __future__ import annotations

import argparse
import json
import os
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
import json, os, resource, sys, time
from pathlib import Path
a = json.loads(sys.argv[1])
sys.path.insert(0, a["repo"])  # the checkout under test comes first
import torch
torch.set_num_threads(a["threads"])  # what predict finds; it sets its own count unless torch_threads=null
from hydra import compose, initialize_config_dir
from omegaconf import open_dict
import stellarnet.workflows.predict as P
import stellarnet.network.inference as I  # noqa: E402
from stellarnet.network.model_folder import load_model  # noqa: E402
import stellarnet.io.predictions as R
from stellarnet.common.paths import CONF_DIR
with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
    cfg = compose(config_name="predict", overrides=[f"ckpt_path={a['ckpt']}", f"input={a['input']}",
                                                     f"output_dir={a['out_dir']}", *a["overrides"]])
timers = {"load_s": 0.0, "model_s": 0.0, "write_s": 0.0}
seen = {}
_load, _Writer, _predict = load_model, R.PredictionWriter, I.Predictor.predict
def load_model(*args, **kw):
    t = time.perf_counter(); r = _load(*args, **kw); timers["load_s"] += time.perf_counter() - t; return r
def predict(self, *args, **kw):
    seen["batch_size"] = kw.get("batch_size"); seen["threads"] = torch.get_num_threads()
    t = time.perf_counter(); r = _predict(self, *args, **kw); timers["model_s"] += time.perf_counter() - t; return r
class TimedWriter(_Writer):
    def write(self, df):
        t = time.perf_counter(); super().write(df); timers["write_s"] += time.perf_counter() - t
    def close(self):
        t = time.perf_counter(); r = super().close(); timers["write_s"] += time.perf_counter() - t; return r
load_model, I.Predictor.predict, R.PredictionWriter = load_model, predict, TimedWriter
worker_hwm = []  # VmHWM of each reader process, read just before the pool shuts down
try:
    import stellarnet.dataset.sources as S
    _close = S.SpectrumFileReader.close
    def close(self):
        for pid in list(getattr(self._pool, "_processes", None) or {}):
            try:
                worker_hwm.extend(int(l.split()[1]) / 1024 for l in open(f"/proc/{pid}/status") if l.startswith("VmHWM:"))
            except OSError:
                pass
        _close(self)
    S.SpectrumFileReader.close = close
except (ImportError, AttributeError):  # a checkout without reader processes
    pass
if hasattr(P, "load_model"):  # older predict.py imported these at module level
    P.load_model = load_model
if hasattr(P, "PredictionWriter"):
    P.PredictionWriter = TimedWriter
with open_dict(cfg):
    cfg.paths.output_dir = a["out_dir"]
t = time.perf_counter()
summary, paths = P.predict(cfg)
total = time.perf_counter() - t
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)  # kids: the reader processes (reaped)
n = summary["stars"]
print(json.dumps({"stars": n, "total_s": total, "spectra_per_s": n / total, **timers,
                  "waiting_for_spectra_s": total - timers["load_s"] - timers["model_s"] - timers["write_s"],
                  "read_errors": summary["read_errors"],
                  "num_workers": summary.get("num_workers", 0), "torch_threads": seen.get("threads"),
                  "precision": summary.get("precision", "32"), "batch_size": seen.get("batch_size"),
                  "chunk_size": int(cfg.chunk_size), "mc_samples": int(cfg.mc_samples),
                  "cpu_s_main": me.ru_utime + me.ru_stime, "cpu_s_workers": kids.ru_utime + kids.ru_stime,
                  "peak_rss_mb": hwm(), "worker_peak_rss_mb": max(worker_hwm, default=None),
                  "csv_mb": Path(paths["csv"]).stat().st_size / 2**20,
                  "fits_mb": Path(paths["fits"]).stat().st_size / 2**20}))
"""


def subset_allstar(allstar: Path, rows: int, out_dir: Path) -> Path:
    """The first ``rows`` rows of ``allstar`` as a new allStar file in ``out_dir`` (0: ``allstar`` itself)."""
    if rows <= 0:
        return allstar
    from astropy.io import fits
    from astropy.table import Table

    table = Table.read(allstar, hdu=1)[:rows]
    out = out_dir / allstar.name
    fits.HDUList([fits.PrimaryHDU(), fits.table_to_hdu(table)]).writeto(out, overwrite=True)
    return out


def warm_page_cache(allstar: Path, spectra_root: Path, kind: str = "aspcapStar") -> dict:
    """Read every spectrum file of ``allstar`` once, so that each timed run finds them in the page
    cache (a cold read of the default survey costs ~20 ms per file on this VM's disk, 10x the CPU)."""
    from stellarnet.io.catalogs import read_allstar
    from stellarnet.io.layout import spectrum_path

    df = read_allstar(allstar, columns=["APOGEE_ID", "TELESCOPE", "FIELD"])
    t, nbytes = time.perf_counter(), 0
    for tel, field, aid in zip(df["TELESCOPE"], df["FIELD"], df["APOGEE_ID"]):
        p = spectrum_path(spectra_root, kind, tel, field, aid)
        if p.exists():
            nbytes += len(p.read_bytes())
    return {"files": len(df), "mb": round(nbytes / 2**20, 1), "seconds": round(time.perf_counter() - t, 2)}


def load_arrays(dataset: Path, n: int) -> dict:
    import numpy as np

    from stellarnet.dataset.reader import ShardReader
    from stellarnet.dataset.manifest import load_manifest

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


def _git_head(repo: Path) -> str | None:
    import subprocess

    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("+changes" if dirty else "") if out.returncode == 0 else None
    except OSError:
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default=None)
    ap.add_argument("--dataset", default=str(ROOT / "data/shards/sim_dr12"))
    ap.add_argument("--n", type=int, default=4096, help="spectra per timed pass (model alone)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch-sizes", default="32,64,128,256,512,1024")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--allstar", default=str(ROOT / "data/sim_survey/allStar-dr17-synspec_rev1.fits"))
    ap.add_argument("--e2e-rows", type=int, default=0, help="end to end: first N allStar rows only (0: all)")
    ap.add_argument("--e2e-threads", type=int, default=2,
                    help="torch threads set before predict() (predict's torch_threads=auto then sets its own)")
    ap.add_argument("--e2e-overrides", default="", help="extra predict.yaml overrides for every run, comma separated")
    ap.add_argument("--e2e-configs", default="defaults;mc_samples=0",
                    help="';'-separated runs, each 'defaults' or comma-separated predict.yaml overrides "
                         "(one that sets num_workers runs once, not once per --e2e-workers value)")
    ap.add_argument("--e2e-workers", default="0,1,2",
                    help="num_workers values, each run with every config; 'none' = do not set it "
                         "(a checkout whose predict.yaml has no num_workers)")
    ap.add_argument("--e2e-repeats", type=int, default=1,
                    help="rounds over all runs; the fastest round of each run is reported (all are kept)")
    ap.add_argument("--e2e-repo", default=None, help="run predict from this checkout instead of this one")
    ap.add_argument("--e2e-baseline-repo", default=None,
                    help="also run this checkout (e.g. `git archive HEAD` unpacked in /tmp), interleaved with the "
                         "current runs in every repeat round")
    ap.add_argument("--e2e-baseline-configs", default="defaults;batch_size=128,mc_samples=0",
                    help="';'-separated configs for the baseline checkout (its predict.yaml keys)")
    ap.add_argument("--e2e-baseline-label", default=None, help="free text stored with the baseline")
    ap.add_argument("--e2e-label", default=None, help="free text stored with the results (e.g. 'before: HEAD ef20b74')")
    ap.add_argument("--no-warm-cache", action="store_true",
                    help="do not read the spectrum files once before the timed runs")
    ap.add_argument("--e2e-only", action="store_true", help="skip the model-alone sweep")
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--out", default=None,
                    help="JSON output (default outputs/bench/inference.json; with --e2e-only outputs/bench/predict_e2e.json)")
    args = ap.parse_args()
    if args.out is None:
        args.out = str(ROOT / "outputs/bench" / ("predict_e2e.json" if args.e2e_only else "inference.json"))

    import torch

    from stellarnet.network.inference import Predictor
    from stellarnet.network.model_folder import load_model, load_module

    ckpt = find_checkpoint(args.ckpt)
    if ckpt is None or not ckpt.exists():
        raise SystemExit("no checkpoint: pass --ckpt or train one (python -m stellarnet.train +experiment=apogee "
                         "trainer.max_epochs=1 +trainer.limit_train_batches=5 test=false paths.log_dir=/tmp/bench_logs)")
    res: dict = {"machine": machine_info(), "warning": busy_warning(), "checkpoint": str(ckpt),
                 "n_spectra": args.n, "repeats": args.repeats}
    _fc = ForeignCPU().__enter__()  # CPU used by other processes meanwhile
    if not args.e2e_only:
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

        repo = Path(args.e2e_repo).resolve() if args.e2e_repo else ROOT
        allstar = Path(args.allstar).resolve()
        split = lambda text, sep: [x.strip() for x in text.split(sep) if x.strip()]  # noqa: E731
        # (variant, checkout, config, num_workers setting); every repeat round runs them all in turn,
        # so that a change in the machine's load hits the baseline and the current code alike
        runs = [("current", repo, c, w) for c in split(args.e2e_configs, ";")
                for w in (["none"] if "num_workers=" in c else split(args.e2e_workers, ","))]
        if args.e2e_baseline_repo:
            base_repo = Path(args.e2e_baseline_repo).resolve()
            runs = [("baseline", base_repo, c, "none") for c in split(args.e2e_baseline_configs, ";")] + runs
        results: dict[int, list[dict]] = {i: [] for i in range(len(runs))}
        with tempfile.TemporaryDirectory(prefix="bench_pred_") as tmp:
            inp = subset_allstar(allstar, args.e2e_rows, Path(tmp))
            base = [o for o in args.e2e_overrides.split(",") if o] + [f"spectra_root={allstar.parent}"]
            res["end_to_end_input"] = {"allstar": str(allstar), "rows": args.e2e_rows or "all", "label": args.e2e_label,
                                       "current": {"repo": str(repo), "git_head": _git_head(repo)}}
            if args.e2e_baseline_repo:
                res["end_to_end_input"]["baseline"] = {"repo": str(base_repo), "git_head": _git_head(base_repo),
                                                       "label": args.e2e_baseline_label}
            if not args.no_warm_cache:
                res["end_to_end_input"]["page_cache_warm_up"] = warm_page_cache(inp, allstar.parent)
            for rep in range(args.e2e_repeats):
                for i, (variant, checkout, label, w) in enumerate(runs):
                    over = [] if label == "defaults" else split(label, ",")
                    child = {"ckpt": str(Path(ckpt).resolve()), "input": str(inp), "repo": str(checkout),
                             "out_dir": str(Path(tmp) / f"run{i}_{rep}"), "threads": args.e2e_threads,
                             "overrides": base + over + ([] if w == "none" else [f"num_workers={w}"])}
                    load = [round(x, 2) for x in os.getloadavg()]
                    with ForeignCPU() as fc:
                        r = run_child(["-c", _E2E_CHILD, json.dumps(child)], env={"PYTHONPATH": str(checkout)})
                    r.update(variant=variant, config=label, num_workers_setting=w, repeat=rep, loadavg_before=load,
                             foreign_cpu_fraction=fc.result()["foreign_cpu_fraction"],
                             cpu_ms_per_star=1e3 * (r["cpu_s_main"] + r["cpu_s_workers"]) / max(r["stars"], 1))
                    print(json.dumps(r), flush=True)
                    results[i].append(r)
        e2e = []
        for i in range(len(runs)):  # the fastest repeat of each run, with the others' rates
            best = dict(max(results[i], key=lambda x: x["spectra_per_s"]))
            best["all_spectra_per_s"] = [round(x["spectra_per_s"], 1) for x in results[i]]
            best["all_foreign_cpu_fraction"] = [x["foreign_cpu_fraction"] for x in results[i]]
            e2e.append(best)
        res["end_to_end"] = e2e
        res["end_to_end_all_runs"] = [r for i in range(len(runs)) for r in results[i]]
    finish(res, _fc, args.out)


if __name__ == "__main__":
    main()
