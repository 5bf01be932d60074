"""Spectrum-file reading speed: files/s on one core, the fast FITS path vs astropy, warm and cold cache.

    python scripts/bench_reader.py [--root data/sim_survey] [--n 2000] [--repeats 3] \
        [--out outputs/bench/reader.json]

Reads ``--n`` aspcapStar files of the survey below ``--root`` (and the two real DR17 apStar files,
many times) with ``stellarnet.io.spectra.read_aspcapstar(path, header=False)`` — what ``predict``
does per star — and ``read_apstar``, once through :func:`stellarnet.io.fitsfile.open_fits` (the
default) and once with it disabled (astropy's ``fits.open``, the code before), interleaved in each of
``--repeats`` rounds. **warm**: the files are in the page cache (read once before); **cold**: each
file's cached pages are dropped just before it is read (``posix_fadvise(DONTNEED)``, not timed; no
root needed), so the disk is
read — on a shared machine whose disk is busy the cold numbers vary most. One process, one thread:
the rate per core. Also ``prepare_spectrum`` (masking + continuum normalization), the rest of a
star's preprocessing, for scale.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stellarnet.io import spectra  # noqa: E402
from stellarnet.preparation import spectra as prep_spectra  # noqa: E402
from stellarnet.io.fitsfile import UnsupportedFITS  # noqa: E402
from stellarnet.common.paths import resource  # noqa: E402


def _drop_cache(paths: list[Path]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _refuse(path: Any) -> Any:
    raise UnsupportedFITS("disabled for the benchmark")


def _rate(paths: list[Path], read: Callable[[Path], Any], fast: bool, cold: bool) -> float:
    real = spectra.open_fits
    spectra.open_fits = real if fast else _refuse
    try:
        total = 0.0
        for p in paths:
            if cold:  # this file's pages dropped just before it is read (files may repeat)
                _drop_cache([p])
            t0 = time.perf_counter()
            read(p)
            total += time.perf_counter() - t0
        return len(paths) / total
    finally:
        spectra.open_fits = real


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=str(ROOT / "data/sim_survey"))
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "outputs/bench/reader.json"))
    args = ap.parse_args(argv)
    aspcap = sorted(Path(args.root).rglob("aspcapStar-*.fits"))[: args.n]
    if not aspcap:
        raise SystemExit(f"no aspcapStar files below {args.root}")
    apstar = [Path(resource(n)) for n in ("apStar-dr17-2M17335483-2753043.fits", "apStar-dr17-2M19485057+5005279.fits")]
    apstar_many = apstar * max(1, min(500, args.n) // 2)
    readers = {
        "aspcapStar": (aspcap, lambda p: spectra.read_aspcapstar(p, header=False)),
        "apStar (real DR17, 5 and 2 rows)": (apstar_many, lambda p: spectra.read_apstar(p)),
    }
    for paths, read in readers.values():  # warm the cache
        for p in paths[:50]:
            read(p)
        for p in paths:
            p.read_bytes()
    rounds: list[dict[str, Any]] = []
    for r in range(args.repeats):
        row: dict[str, Any] = {}
        for name, (paths, read) in readers.items():
            for cold in (False, True):
                for fast in (True, False):
                    key = f"{name} | {'cold' if cold else 'warm'} | {'fast' if fast else 'astropy'}"
                    row[key] = _rate(paths, read, fast, cold)
        # the rest of the per-star preprocessing, for scale
        specs = [spectra.read_aspcapstar(p, header=False) for p in aspcap[:500]]
        t0 = time.perf_counter()
        for s in specs:
            prep_spectra.prepare_spectrum(s.flux, s.flux_err, s.pixmask, grid="dr12", normalized=True)
        row["prepare_spectrum (dr12) per star"] = len(specs) / (time.perf_counter() - t0)
        rounds.append(row)
        print(f"round {r + 1}: " + "; ".join(f"{k}: {v:,.0f}/s" for k, v in row.items()), flush=True)
    best = {k: max(rd[k] for rd in rounds) for k in rounds[0]}
    ratios = {}
    for name in readers:
        for cache in ("warm", "cold"):
            ratios[f"{name} | {cache}"] = best[f"{name} | {cache} | fast"] / best[f"{name} | {cache} | astropy"]
    out = {"n_aspcapstar_files": len(aspcap), "n_apstar_reads": len(apstar_many), "repeats": args.repeats,
           "files_per_s_best": best, "fast_over_astropy": ratios, "rounds": rounds,
           "load_1min": os.getloadavg()[0], "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps({"best files/s": {k: round(v) for k, v in best.items()},
                      "fast / astropy": {k: round(v, 2) for k, v in ratios.items()}}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
