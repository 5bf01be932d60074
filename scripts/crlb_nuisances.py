"""What the refinement's nuisance parameters cost at best: the Cramér–Rao bound of the four labels
when the fit must also determine, per star, a change of the LSF variance and a residual shift per
chip and a per-chip spline continuum correction (knots every 100 Å, as ``refine.fit``), relative to
the bound with the labels alone. Fisher matrix F = S/N² JᵀJ of the simulator's own spectral model
(Kurucz emulator + continuum normalization, white noise 1/S/N, every pixel usable); the nuisance
columns are ½ ∂²f/∂x² (LSF variance, pixels²), ∂f/∂x (shift, pixels) and f × B_k (continuum).

    python scripts/crlb_nuisances.py [--n 150] [--snr 150] [--out crlb_nuisances.json]

Writes, per population (the survey's default mix and the shift suite's ``population`` mix), the
median CRLB (K, dex, dex, dex) with the labels alone and the median ratio per nuisance set.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from stellarnet.io import grids
from stellarnet.evaluation.fisher import DEFAULT_STEPS, jacobian
from stellarnet.refinement.basis import continuum_spline_basis
from stellarnet.simulate.population import sample_population
from stellarnet.simulate.shifts import SHIFTED_MIX
from stellarnet.evaluation.spectral_model import emulator_model

NUISANCE_SETS = {"labels": (), "lsf": ("lsf",), "shift": ("shift",), "continuum": ("continuum",),
                 "lsf+shift+continuum": ("lsf", "shift", "continuum")}


def nuisance_columns(flux: np.ndarray, basis: np.ndarray, grid: str = "dr12") -> dict[str, np.ndarray]:
    """(P, k) derivative columns of one normalized model spectrum ``flux`` (P,) per nuisance kind."""
    lsf, shift = [], []
    for sl in grids.chip_slices(grid):
        d2, d1 = np.zeros(flux.size), np.zeros(flux.size)
        d2[sl] = 0.5 * np.gradient(np.gradient(flux[sl]))
        d1[sl] = np.gradient(flux[sl])
        lsf.append(d2)
        shift.append(d1)
    return {"lsf": np.stack(lsf, 1), "shift": np.stack(shift, 1), "continuum": basis * flux[:, None]}


def crlb_with_nuisances(J: np.ndarray, columns: dict[str, np.ndarray], kinds: tuple[str, ...],
                        snr: float) -> np.ndarray:
    """σ of the L labels (L,) from F = S/N² AᵀA, A = [J | the named nuisance columns]."""
    A = np.concatenate([J] + [columns[k] for k in kinds], 1)
    cov = np.linalg.pinv(A.T @ A * snr**2)
    return np.sqrt(np.diag(cov)[: J.shape[1]])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=150, help="stars per population")
    ap.add_argument("--snr", type=float, default=150.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="crlb_nuisances.json")
    args = ap.parse_args(argv)
    model = emulator_model()
    basis = continuum_spline_basis(grids.n_pixels(model.grid), model.grid, 100.0).numpy().astype(np.float64)
    rng = np.random.default_rng(args.seed)
    out: dict = {"snr": args.snr, "n": args.n, "label_names": list(model.label_names), "populations": {}}
    for name, mix in (("default", None), ("population", SHIFTED_MIX)):
        labels = sample_population(4 * args.n, rng, mix).labels
        labels = labels[np.all((labels >= model.lower) & (labels <= model.upper), 1)][: args.n]
        J = jacobian(model.fn, labels, steps=[DEFAULT_STEPS[k] for k in model.label_names],
                     label_names=model.label_names, bounds=(model.lower, model.upper))
        flux = model.fn(labels)
        sig = {k: [] for k in NUISANCE_SETS}
        for i in range(len(labels)):
            cols = nuisance_columns(flux[i], basis, model.grid)
            for k, kinds in NUISANCE_SETS.items():
                sig[k].append(crlb_with_nuisances(J[i], cols, kinds, args.snr))
        base = np.array(sig["labels"])
        ratio = {k: np.median(np.array(v) / base, 0) for k, v in sig.items()}
        out["populations"][name] = {"median_crlb": np.median(base, 0).tolist(),
                                    "median_ratio": {k: v.tolist() for k, v in ratio.items()}}
        print(name, "median CRLB", np.round(np.median(base, 0), 5))
        for k, v in ratio.items():
            print(f"  + {k:22s}", np.round(v, 3))
    Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
