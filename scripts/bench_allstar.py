"""Benchmark reading a DR17-size allStar: write a 733,901-row simulated catalogue (catalogue only,
the full simulated column set) and time ``stellarnet.io.catalogs.read_allstar`` for a typical
column selection, with peak RSS (``resource.getrusage`` ru_maxrss and /proc VmHWM), in a fresh
subprocess started from a small parent (so the RSS is the reader's own).

Usage: python scripts/bench_allstar.py [--out outputs/bench/allstar.json] [--rows 733901]
       [--workdir outputs/bench/allstar_survey] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import write_result  # noqa: E402

from stellarnet.simulate.allstar import ALLSTAR_NAME  # noqa: E402

COLUMNS = [
    "APOGEE_ID", "TELESCOPE", "FIELD", "SNR", "TEFF", "TEFF_ERR", "LOGG", "LOGG_ERR", "FE_H", "FE_H_ERR",
    "ALPHA_M", "ALPHA_M_ERR", "M_H", "ASPCAPFLAG", "STARFLAG", "EXTRATARG", "PARAMFLAG", "J", "H", "K",
    "AK_TARG", "GAIAEDR3_PARALLAX", "GAIAEDR3_PARALLAX_ERROR",
]

_CHILD = r"""
import json, resource, sys, time
def hwm():
    # VmHWM: this process's own peak RSS (kB); ru_maxrss can carry the parent's peak over exec
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return -1
from stellarnet.io.catalogs import read_allstar
imported = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
hwm_imported = hwm()
cols = json.loads(sys.argv[2]) or None
t = time.perf_counter()
df = read_allstar(sys.argv[1], columns=cols)
dt = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": dt, "rows": len(df), "n_columns": df.shape[1],
                  "peak_rss_mb": peak / 1024, "rss_after_imports_mb": imported / 1024,
                  "vmhwm_peak_mb": hwm() / 1024, "vmhwm_after_imports_mb": hwm_imported / 1024,
                  "df_memory_mb": float(df.memory_usage(deep=True).sum()) / 2**20}))
"""


def n_stars_for(rows: int, dup_fraction: float) -> int:
    """Unique stars n with n + round(dup_fraction·n) == rows."""
    n = int(rows / (1 + dup_fraction))
    for cand in range(max(1, n - 50), n + 50):
        if cand + int(round(dup_fraction * cand)) == rows:
            return cand
    raise ValueError(f"no star count gives exactly {rows} rows")


def read_in_subprocess(path: Path, columns: list[str] | None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    res = subprocess.run([sys.executable, "-c", _CHILD, str(path), json.dumps(columns)], capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="outputs/bench/allstar.json")
    ap.add_argument("--rows", type=int, default=733_901)
    ap.add_argument("--workdir", default="outputs/bench/allstar_survey")
    ap.add_argument("--keep", action="store_true", help="keep the written catalogue")
    args = ap.parse_args()

    dup = 0.03
    n = n_stars_for(args.rows, dup)
    root = Path(args.workdir)
    t = time.perf_counter()
    # in a subprocess, so that this (parent) process stays small: on Linux ru_maxrss survives
    # fork + exec, and the readers below must not inherit the simulator's peak
    code = (
        "import sys; from stellarnet.simulate.survey import simulate_survey; "
        f"simulate_survey({str(root)!r}, n_stars={n}, seed=2017, spectra=False, external=False, "
        f"dup_fraction={dup}, progress=False, overwrite=True, stars_per_field=300)"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    write_s = time.perf_counter() - t
    path = root / ALLSTAR_NAME
    res = {
        "rows": args.rows, "unique_stars": n, "file": str(path), "file_size_mb": path.stat().st_size / 2**20,
        "simulate_catalogue_s": write_s, "columns": COLUMNS,
        "read_selected": read_in_subprocess(path, COLUMNS),
        "read_all_columns": read_in_subprocess(path, None),
        "cpus": os.cpu_count(), "loadavg": os.getloadavg(),
    }
    if res["read_selected"]["rows"] != args.rows:
        raise AssertionError(f"read {res['read_selected']['rows']} rows, expected {args.rows}")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    write_result(args.out, res)


if __name__ == "__main__":
    main()
