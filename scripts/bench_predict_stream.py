"""Prediction over a DR17-size catalogue (733,901 stars) in bounded memory, with RSS sampled.

Usage:
    python scripts/bench_predict_stream.py [--ckpt ...] [--dataset data/shards/sim_dr12]
        [--n 733901] [--chunk-size 1024] [--batch-size 128] [--mc-samples 0] [--threads 2]
        [--modes stream,accumulate] [--out outputs/bench/predict_stream.json]

Spectra: chunks of already preprocessed shard spectra (``stellarnet.dataset.chunks.open_chunks``),
cycled until ``--n`` stars (reading 733,901 FITS files is measured per star in
``bench_inference.py``/``bench_shards.py`` instead; here the question is memory). Each mode runs
in a fresh child process, with its RSS sampled every 0.2 s and after every chunk:

* ``stream``: ``Predictor.predict`` → ``stellarnet.io.predictions.predictions_frame`` per chunk, each
  chunk appended to the CSV and to a FITS binary table whose header (NAXIS2 = n) is written first
  and whose rows are written as big-endian records as they come (:class:`stellarnet.io.predictions.PredictionWriter`).
  Memory is bounded by one chunk. The FITS file is re-read (memmap) at the end and checked
  against the CSV row count and the first chunk.
* ``accumulate``: what ``stellarnet/workflows/predict.py`` does today: keep every chunk's frame, then
  ``pd.concat`` and ``results.write_predictions`` (CSV + ``Table.from_pandas`` FITS). Here the
  model is run on the first chunk only and its predictions reused for every chunk (memory, not
  speed, is measured: the frames are the same size), so this mode is fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _bench_common import (  # noqa: E402
    ROOT,
    ForeignCPU,
    RSSSampler,
    busy_warning,
    find_checkpoint,
    finish,
    machine_info,
    rss_mb,
    run_child_measured,
    vmhwm_mb,
)

#: widths of string columns in the FITS table (longer values are truncated)


def cycled_chunks(dataset: str, n: int, chunk_size: int) -> Iterator[dict]:
    """Shard chunks, cycled over the dataset until ``n`` stars were yielded."""
    from stellarnet.dataset.chunks import as_numpy, open_chunks
    from stellarnet.dataset.manifest import load_manifest

    chunks = open_chunks(dataset, load_manifest(dataset)["grid"], chunk_size)
    done = 0
    while done < n:
        for chunk in (as_numpy(chunks[i]) for i in range(len(chunks))):
            chunk.pop("chunk_index")
            take = min(len(chunk["flux"]), n - done)
            if take < len(chunk["flux"]):
                chunk = {k: v[:take] for k, v in chunk.items()}
            yield chunk
            done += take
            if done >= n:
                return


def child(a: dict) -> dict:
    import numpy as np
    import pandas as pd
    import torch

    from stellarnet.network.model_folder import load_model
    from stellarnet.io.predictions import PredictionWriter, predictions_frame, write_predictions

    torch.set_num_threads(a["threads"])
    predictor = load_model(a["ckpt"])
    out_dir = Path(a["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    trace: list[tuple[int, float]] = []
    timers = {"model_s": 0.0, "frame_s": 0.0, "write_s": 0.0}
    n = a["n"]
    t_all = time.perf_counter()
    with RSSSampler(0.2) as sampler:
        done = 0
        if a["mode"] == "stream":
            writer = PredictionWriter(out_dir, n)  # what stellarnet.predict uses
            first = None
            for chunk in cycled_chunks(a["dataset"], n, a["chunk_size"]):
                t = time.perf_counter()
                pred = predictor.predict(chunk["flux"], chunk["flux_err"], photometry=chunk["photometry"],
                                         pix_mask=chunk["pix_mask"], mc_samples=a["mc_samples"],
                                         batch_size=a["batch_size"])
                t1 = time.perf_counter()
                df = predictions_frame(chunk, pred, predictor.label_names, predictor.class_tasks)
                t2 = time.perf_counter()
                if first is None:
                    first = df.copy()
                writer.write(df)
                t3 = time.perf_counter()
                timers["model_s"] += t1 - t
                timers["frame_s"] += t2 - t1
                timers["write_s"] += t3 - t2
                done += len(df)
                trace.append((done, rss_mb()))
            paths = writer.close()
        else:
            frames = []
            pred0 = None
            for chunk in cycled_chunks(a["dataset"], n, a["chunk_size"]):
                m = len(chunk["flux"])
                t = time.perf_counter()
                if pred0 is None:
                    pred0 = predictor.predict(chunk["flux"], chunk["flux_err"], photometry=chunk["photometry"],
                                              pix_mask=chunk["pix_mask"], mc_samples=a["mc_samples"],
                                              batch_size=a["batch_size"])
                pred = {k: ({t_: v_[:m] for t_, v_ in v.items()} if isinstance(v, dict) else v[:m])
                        for k, v in pred0.items()}
                t1 = time.perf_counter()
                frames.append(predictions_frame(chunk, pred, predictor.label_names, predictor.class_tasks))
                t2 = time.perf_counter()
                timers["model_s"] += t1 - t
                timers["frame_s"] += t2 - t1
                done += m
                trace.append((done, rss_mb()))
            t = time.perf_counter()
            table = pd.concat(frames, ignore_index=True)
            del frames
            trace.append((done, rss_mb()))
            paths = write_predictions(table, out_dir)
            timers["write_s"] += time.perf_counter() - t
            first = table.iloc[: a["chunk_size"]].copy()
            del table
    total = time.perf_counter() - t_all
    peak_run = vmhwm_mb()  # before the check below (its memmap reads count as RSS)

    # check the output: row counts and the first chunk round trip
    from astropy.io import fits

    with fits.open(paths["fits"], memmap=True) as h:
        data = h[1].data
        n_fits = len(data)
        ok_ids = bool(np.all(np.char.strip(data["APOGEE_ID"][: len(first)].astype(str)) == first["APOGEE_ID"].to_numpy().astype(str)))
        ok_teff = bool(np.allclose(data["TEFF"][: len(first)], first["TEFF"].to_numpy(), equal_nan=True))
    with open(paths["csv"]) as f:
        n_csv = sum(1 for _ in f) - 1
    step = max(1, len(trace) // 60)
    return {"mode": a["mode"], "stars": done, "total_s": total,
            "spectra_per_s": done / total if a["mode"] == "stream" else None, **timers,
            "peak_rss_mb": peak_run, "peak_rss_incl_check_mb": vmhwm_mb(), "sampled_max_rss_mb": sampler.max_mb,
            "rss_first_chunk_mb": trace[0][1] if trace else None,
            "rss_at_25pct_mb": trace[len(trace) // 4][1] if trace else None,
            "rss_at_end_mb": trace[-1][1] if trace else None,
            "rss_trace": trace[::step] + ([trace[-1]] if trace and (len(trace) - 1) % step else []),
            "fits_rows": n_fits, "csv_rows": n_csv, "first_chunk_matches": ok_ids and ok_teff,
            "csv_mb": paths["csv"].stat().st_size / 2**20, "fits_mb": paths["fits"].stat().st_size / 2**20,
            "chunk_size": a["chunk_size"], "batch_size": a["batch_size"], "mc_samples": a["mc_samples"],
            "threads": a["threads"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default=None)
    ap.add_argument("--dataset", default=str(ROOT / "data/shards/sim_dr12"))
    ap.add_argument("--n", type=int, default=733_901)
    ap.add_argument("--chunk-size", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--mc-samples", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--modes", default="stream,accumulate")
    ap.add_argument("--workdir", default=None, help="where the prediction files go (default: a temp dir)")
    ap.add_argument("--out", default=str(ROOT / "outputs/bench/predict_stream.json"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    import shutil
    import tempfile

    ckpt = find_checkpoint(args.ckpt)
    if ckpt is None or not ckpt.exists():
        raise SystemExit("no checkpoint: pass --ckpt (see scripts/bench_inference.py)")
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_stream_"))
    res: dict = {"machine": machine_info(), "warning": busy_warning(), "checkpoint": str(ckpt), "runs": []}
    _fc = ForeignCPU().__enter__()  # CPU used by other processes meanwhile
    try:
        for mode in args.modes.split(","):
            a = {"mode": mode, "ckpt": str(ckpt), "dataset": args.dataset, "n": args.n,
                 "chunk_size": args.chunk_size, "batch_size": args.batch_size, "mc_samples": args.mc_samples,
                 "threads": args.threads, "out_dir": str(work / mode)}
            r = run_child_measured([str(Path(__file__).resolve()), "--child", json.dumps(a)])
            print(json.dumps({k: v for k, v in r.items() if k != "rss_trace"}), flush=True)
            res["runs"].append(r)
            shutil.rmtree(work / mode, ignore_errors=True)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    finish(res, _fc, args.out)


if __name__ == "__main__":
    main()
