"""Benchmark the survey simulator: spectra generation rate and rate with aspcapStar writing.

Usage: python scripts/bench_simulate.py [--out outputs/bench/simulate.json] [--n-spectra 4096]
       [--n-files 2000] [--threads 2] [--workdir DIR]

Measures (stars/s): the emulator alone; noisy normalized spectra on the 8,575 grid
(emulator + instrument + noise + bad pixels + ``continuum_normalize`` + ``gap_insert``) with 1 and
``--threads`` threads; a full ``simulate_survey`` with aspcapStar files (spectra phase only, and
end to end). Writes JSON (also printed) with the machine's CPU count and load average, since the
rates depend on both, and the process CPU time per star (``*_cpu_ms_per_star``), which does not
depend on other processes' load: 1000 / that = the rate one idle core would give.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import write_result  # noqa: E402

from stellarnet.physics.kurucz import load_emulator  # noqa: E402
from stellarnet.simulate.instrument import iter_spectra  # noqa: E402
from stellarnet.simulate.population import sample_population  # noqa: E402
from stellarnet.simulate.survey import simulate_survey  # noqa: E402


def _rate(n: int, seconds: float) -> float:
    return round(n / seconds, 1) if seconds > 0 else float("inf")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="outputs/bench/simulate.json")
    ap.add_argument("--n-spectra", type=int, default=4096)
    ap.add_argument("--n-files", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", default=None, help="where the benchmark survey is written (default: a temp dir)")
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    pop = sample_population(args.n_spectra, rng)
    snr = np.exp(rng.normal(np.log(100), 0.4, args.n_spectra))
    emu = load_emulator()
    emu(pop.labels[:256])  # warm-up
    res: dict[str, object] = {
        "machine": {"cpus": os.cpu_count(), "loadavg_before": os.getloadavg(), "python": platform.python_version()},
        "n_spectra": args.n_spectra,
    }
    t = time.perf_counter()
    c = time.process_time()
    emu(pop.labels)
    res["emulator_stars_per_s"] = _rate(args.n_spectra, time.perf_counter() - t)
    res["emulator_cpu_ms_per_star"] = round((time.process_time() - c) / args.n_spectra * 1e3, 4)
    for th in sorted({1, args.threads}):
        t = time.perf_counter()
        c = time.process_time()
        n = sum(b.flux.shape[0] for b in iter_spectra(pop.labels, snr, 1, threads=th))
        res[f"spectra_stars_per_s_threads{th}"] = _rate(n, time.perf_counter() - t)
        # CPU time of this process (all its threads): load-independent cost per star
        res[f"spectra_cpu_ms_per_star_threads{th}"] = round((time.process_time() - c) / n * 1e3, 4)

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_sim_"))
    root = work / "survey"
    try:
        t = time.perf_counter()
        paths = simulate_survey(root, n_stars=args.n_files, seed=1, progress=False, overwrite=True, threads=args.threads)
        total = time.perf_counter() - t
        info = json.loads(paths["simulation"].read_text())
        rows = info["counts"]["rows"]
        res["survey"] = {
            "n_stars": args.n_files, "rows_with_files": rows, "timing_s": info["timing"],
            "spectra_plus_files_stars_per_s": _rate(rows, info["timing"]["spectra_s"]),
            "end_to_end_stars_per_s": _rate(rows, total),
            "bytes_on_disk": sum(p.stat().st_size for p in root.rglob("*") if p.is_file()),
        }
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    res["machine"]["loadavg_after"] = os.getloadavg()  # type: ignore[index]
    write_result(args.out, res)


if __name__ == "__main__":
    main()
