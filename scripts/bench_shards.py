"""Survey-scale data preparation: allStar reading + cuts, and the HDF5 shard build rate.

Usage:
    python scripts/bench_shards.py [--sections allstar,default,large] [--rows 733901]
        [--survey data/sim_survey] [--large-stars 100000] [--workdir data/bench_tmp] [--keep]
        [--out outputs/bench/shards.json]

Sections (each measured in a fresh child process; peak RSS = its /proc VmHWM, and for the shard
build also the largest peak of its worker processes, ``ru_maxrss`` of RUSAGE_CHILDREN):

* ``allstar``: a DR17-size (``--rows`` = 733,901 rows) simulated allStar, catalogue only (as in
  ``scripts/bench_allstar.py``), then ``read_allstar`` with the default columns and the columns
  ``build_shards`` requires, ``apply_cuts`` with ``conf/data/cuts/dr17_science.yaml``, and the
  rest of the catalogue stage of ``build_shards`` (photometric features, classes, splits).
  Goal: ≤ 20 s and ≤ 2 GB.
* ``default``: ``build_shards`` of the default survey (``--survey``, 20,000 stars) with the
  default data config (dr12 grid, 2,048 rows per shard, 2 workers, dr17_science cuts) into a
  temporary directory: stars/s = rows written / wall time.
* ``large``: simulate a ``--large-stars`` survey with aspcapStar files under ``--workdir``
  (check free disk first: ~120 kB per star), then build its shards the same way. Removed
  afterwards unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _bench_common import (  # noqa: E402
    ROOT,
    ForeignCPU,
    busy_warning,
    finish,
    machine_info,
    run_child,
)

_CUTS = ROOT / "stellarnet/conf/data/cuts/dr17_science.yaml"

_ALLSTAR_CHILD = r"""
import json, sys, time
a = json.loads(sys.argv[1])
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
import numpy as np
from omegaconf import OmegaConf
from stellarnet.io.catalogs import read_allstar
from stellarnet.preparation.cuts import apply_cuts
from stellarnet.preparation.photometry import photometric_features
from stellarnet.preparation.classes import derive_classes
from stellarnet.preparation.splits import assign_splits
after_imports = hwm()
cuts = OmegaConf.to_container(OmegaConf.load(a["cuts"]), resolve=True)
required = ["APOGEE_ID", "TELESCOPE", "FIELD", "RA", "DEC", "SNR", "TEFF", "LOGG", "FE_H", "ALPHA_M",
            "TEFF_ERR", "LOGG_ERR", "FE_H_ERR", "ALPHA_M_ERR"]  # what build_shards asks for
t = time.perf_counter()
df = read_allstar(a["path"], required=required)
read_s = time.perf_counter() - t
hwm_read = hwm()
t = time.perf_counter()
kept, report = apply_cuts(df, cuts)
cuts_s = time.perf_counter() - t
t = time.perf_counter()
phot = photometric_features(kept)
classes = derive_classes(kept, None)
split = assign_splits(kept, {"train": 0.8, "val": 0.1, "test": 0.1}, by="FIELD", seed=42)
rest_s = time.perf_counter() - t
print(json.dumps({"rows": len(df), "columns": int(df.shape[1]), "kept": len(kept), "read_s": read_s,
                  "cuts_s": cuts_s, "features_classes_splits_s": rest_s, "total_s": read_s + cuts_s + rest_s,
                  "df_memory_mb": float(df.memory_usage(deep=True).sum()) / 2**20,
                  "rss_after_imports_mb": after_imports, "peak_rss_after_read_mb": hwm_read,
                  "peak_rss_mb": hwm(), "cut_report": report.to_frame().to_dict(orient="records")}))
"""

_BUILD_CHILD = r"""
import json, sys, time, resource
a = json.loads(sys.argv[1])
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
from omegaconf import OmegaConf
from stellarnet.dataset.shards import build_shards
cuts = OmegaConf.to_container(OmegaConf.load(a["cuts"]), resolve=True)
t = time.perf_counter()
m = build_shards(a["allstar"], a["out"], cuts, spectra_root=a["root"], grid="dr12", rows_per_shard=2048,
                 split={"by": "FIELD", "fractions": {"train": 0.8, "val": 0.1, "test": 0.1}, "seed": 42},
                 n_workers=a["workers"], progress=False)
dt = time.perf_counter() - t
rows = sum(s["rows"] for s in m["shards"])
import os
size = sum(os.path.getsize(os.path.join(a["out"], s["file"])) for s in m["shards"])
print(json.dumps({"rows_written": rows, "shards": len(m["shards"]), "failed": len(m["spectra_failed"]),
                  "allstar_rows": m["cut_report"][0]["before"] if m["cut_report"] else None,
                  "seconds": dt, "stars_per_s": rows / dt, "n_workers": a["workers"], "shard_bytes": size,
                  "peak_rss_main_mb": hwm(),
                  "peak_rss_worker_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def _simulate(root: Path, n: int, spectra: bool, **kw) -> float:
    code = (
        "from stellarnet.simulate.survey import simulate_survey; "
        f"simulate_survey({str(root)!r}, n_stars={n}, seed=2017, spectra={spectra}, external=False, "
        f"progress=False, overwrite=True, **{kw!r})"
    )
    t = time.perf_counter()
    run_child(["-c", code + "; print('{}')"])
    return time.perf_counter() - t


def section_allstar(rows: int, workdir: Path, keep: bool) -> dict:
    from bench_allstar import n_stars_for

    from stellarnet.simulate.allstar import ALLSTAR_NAME

    dup = 0.03
    n = n_stars_for(rows, dup)
    root = workdir / "allstar_dr17size"
    sim_s = _simulate(root, n, False, dup_fraction=dup, stars_per_field=300)
    path = root / ALLSTAR_NAME
    out = {"rows": rows, "unique_stars": n, "file_size_mb": path.stat().st_size / 2**20, "simulate_s": sim_s}
    out.update(run_child(["-c", _ALLSTAR_CHILD, json.dumps({"path": str(path), "cuts": str(_CUTS)})]))
    if not keep:
        shutil.rmtree(root, ignore_errors=True)
    return out


def section_build(allstar: Path, root: Path, out_dir: Path, workers: int) -> dict:
    shutil.rmtree(out_dir, ignore_errors=True)
    with ForeignCPU() as fc:
        r = run_child(["-c", _BUILD_CHILD, json.dumps({"allstar": str(allstar), "root": str(root), "out": str(out_dir),
                                                       "cuts": str(_CUTS), "workers": workers})])
    r["foreign_cpu_fraction"] = fc.result()["foreign_cpu_fraction"]
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default="allstar,default,large")
    ap.add_argument("--rows", type=int, default=733_901)
    ap.add_argument("--survey", default=str(ROOT / "data/sim_survey"))
    ap.add_argument("--large-stars", type=int, default=100_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--workdir", default=str(ROOT / "data/bench_tmp"))
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "outputs/bench/shards.json"))
    args = ap.parse_args()

    from stellarnet.simulate.allstar import ALLSTAR_NAME

    sections = args.sections.split(",")
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    res: dict = {"machine": machine_info(), "warning": busy_warning(), "cuts": str(_CUTS.relative_to(ROOT))}
    _fc = ForeignCPU().__enter__()  # CPU used by other processes meanwhile
    if "allstar" in sections:
        res["allstar"] = section_allstar(args.rows, work, args.keep)
        print(json.dumps({k: v for k, v in res["allstar"].items() if k != "cut_report"}), flush=True)
    if "default" in sections:
        survey = Path(args.survey)
        res["build_default"] = {"survey": str(survey),
                                **section_build(survey / ALLSTAR_NAME, survey, work / "shards_default", args.workers)}
        print(json.dumps(res["build_default"]), flush=True)
        if not args.keep:
            shutil.rmtree(work / "shards_default", ignore_errors=True)
    if "large" in sections:
        root = work / f"sim_{args.large_stars}"
        free = shutil.disk_usage(work).free
        need = args.large_stars * 125_000 * 1.3
        if free < need:
            raise SystemExit(f"only {free / 1e9:.1f} GB free under {work}; {need / 1e9:.1f} GB needed for "
                             f"{args.large_stars} stars (use --large-stars 50000 and extrapolate)")
        sim_s = _simulate(root, args.large_stars, True)
        info = json.loads((root / "simulation.json").read_text())
        files = list((root / "apogee").rglob("aspcapStar-*.fits"))
        large = {"n_stars": args.large_stars, "simulate_s": sim_s,
                 "simulate_stars_per_s": len(files) / sim_s, "simulation_timing": info.get("timing"),
                 "spectra_files": len(files), "spectra_bytes": sum(p.stat().st_size for p in files),
                 "disk_free_before_gb": free / 1e9}
        large.update(section_build(root / ALLSTAR_NAME, root, work / "shards_large", args.workers))
        res["build_large"] = large
        print(json.dumps(large), flush=True)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
            shutil.rmtree(work / "shards_large", ignore_errors=True)
    if not args.keep:
        try:
            work.rmdir()
        except OSError:
            pass
    finish(res, _fc, args.out)


if __name__ == "__main__":
    main()
