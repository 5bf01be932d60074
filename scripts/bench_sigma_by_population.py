"""Is σ honest for every kind of star, not only on average? A model folder on the shift suite's simulated
stars (in memory, as ``scripts/bench_shift.py``), the refined labels scored against the truth per true
population: giants, subgiants, dwarfs of 4,300–6,100 K, and the dwarfs at the edges of the training set
(hot ≥ 6,100 K, cool ≤ 4,300 K), where few training stars shape the emulator. Per group and label: RMS z,
1σ coverage, RMS error and median σ, and the share of stars with |z| > 3 in some label. Several
``--model`` folders are scored on the same stars.

    python scripts/bench_sigma_by_population.py --model <run>/model [--model <other>/model]
        [--shifts none,population] [--n 3000] [--seed 0] [--snr-min 100] [--out sigma_by_population.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from stellarnet.benchmarks.shift_suite import simulate
from stellarnet.common.files import write_json
from stellarnet.network.model_folder import load_model
from stellarnet.preparation.spectra import prepare_spectrum
from stellarnet.simulate.population import STAGES
from stellarnet.simulate.shifts import shift_suite

#: Teff limits (K) of the dwarfs at the training set's edges
HOT_DWARF_K = 6100.0
COOL_DWARF_K = 4300.0


def population_groups(truth: np.ndarray, stage: np.ndarray) -> dict[str, np.ndarray]:
    """Boolean masks of the groups, from the true labels (N, L; Teff first) and stage codes (N,)."""
    code = {name: k for k, name in enumerate(STAGES)}
    teff, dwarf = truth[:, 0], stage == code["MS"]
    return {"giants": (stage == code["RGB"]) | (stage == code["RC"]), "subgiants": stage == code["SG"],
            f"dwarfs {COOL_DWARF_K:.0f}-{HOT_DWARF_K:.0f} K": dwarf & (teff > COOL_DWARF_K) & (teff < HOT_DWARF_K),
            f"dwarfs >= {HOT_DWARF_K:.0f} K": dwarf & (teff >= HOT_DWARF_K),
            f"dwarfs <= {COOL_DWARF_K:.0f} K": dwarf & (teff <= COOL_DWARF_K), "all": np.ones(len(stage), bool)}


def group_metrics(labels: np.ndarray, sigma: np.ndarray, truth: np.ndarray, rows: np.ndarray) -> dict[str, Any]:
    """RMS z, 1σ coverage, RMS error, median σ per label and the share with |z| > 3 in some label."""
    if not rows.any():
        return {"n": 0, "rms_z": [], "coverage_1sigma": [], "rms_error": [], "median_sigma": [], "frac_abs_z_gt_3": None}
    err = labels[rows] - truth[rows]
    z = err / sigma[rows]
    return {"n": int(rows.sum()), "rms_z": np.sqrt(np.mean(z**2, 0)).round(3).tolist(),
            "coverage_1sigma": np.mean(np.abs(z) < 1, 0).round(3).tolist(),
            "rms_error": np.sqrt(np.mean(err**2, 0)).round(5).tolist(),
            "median_sigma": np.median(sigma[rows], 0).round(5).tolist(),
            "frac_abs_z_gt_3": round(float(np.mean((np.abs(z) > 3).any(1))), 4)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", required=True, help="model folder (repeat to compare)")
    ap.add_argument("--shifts", default="none,population")
    ap.add_argument("--n", type=int, default=3000, help="stars per shift")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--snr-min", type=float, default=100.0)
    ap.add_argument("--out", default="sigma_by_population.json")
    args = ap.parse_args(argv)
    predictors = {m: load_model(m) for m in args.model}
    out: dict[str, Any] = {"models": args.model, "n_stars": args.n, "seed": args.seed, "snr_min": args.snr_min,
                           "label_names": next(iter(predictors.values())).label_names, "shifts": {}}
    for name, shift in shift_suite(args.shifts.split(",")).items():
        sim = simulate(shift, args.n, args.seed)
        groups = population_groups(sim["labels"], sim["stage"])
        for model, predictor in predictors.items():
            flux, err, good = prepare_spectrum(sim["flux"], sim["flux_err"], None, grid=predictor.grid,
                                               normalized=True, allow_empty=True)
            pred = predictor.predict(flux, err, pix_mask=good)
            used = (pred["refine_flag"] == 0) if "refine_flag" in pred else np.ones(args.n, bool)
            used &= sim["snr"] >= args.snr_min
            out["shifts"].setdefault(name, {})[model] = {
                g: group_metrics(pred["labels"], pred["sigma_total"], sim["labels"], rows & used)
                for g, rows in groups.items()}
            for g, m in out["shifts"][name][model].items():
                print(f"{name:11s} {Path(model).parent.name[:20]:20s} {g:22s} n={m['n']:5d} rms z {m['rms_z']} "
                      f"|z|>3 {m['frac_abs_z_gt_3']}")
    write_json(args.out, out)
    print(json.dumps({"written": args.out}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
