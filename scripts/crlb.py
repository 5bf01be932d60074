"""Cramér–Rao bound benchmark: the best possible σ per label for the stars of a shard split.

    python scripts/crlb.py --dataset data/shards/sim_dr12 --split test --out outputs/bench/crlb.json \
        [--max-stars 2000] [--predictions predictions.csv] [--truth auto|<truth.fits>] \
        [--per-star crlb_per_star.csv]

The spectral model (``stellarnet.evaluation.spectral_model.emulator_model``, shared with
``python -m stellarnet.evaluate``) is the Kurucz emulator followed by the same continuum
normalization the survey files carry (``continuum_normalize(..., grid="dr12")`` on the Cannon
continuum pixels, unit weights — see ``stellarnet.simulate.instrument``; the smooth per-chip
instrument throughput of the simulation is a nuisance the normalization removes and is not
modelled). Its Jacobian
(central differences, 10 K / 0.02 / 0.01 / 0.01 dex) and two noise models give the per-star
CRLB (:mod:`stellarnet.evaluation.crlb`):

* ``flux_err``: the shard's own per-pixel normalized errors, masked pixels (``pix_mask`` = 0)
  excluded (this includes the error inflation at model-mismatch pixels of the files);
* ``snr``: white noise 1/SNR per pixel, same mask.

Only stars inside the emulator's label box are used (the emulator extrapolates badly outside).
The bound is evaluated at the catalogue labels, or at the true labels with ``--truth`` (this is
a benchmark script and may use the simulation's truth file; the library does not). With
``--predictions`` (CSV with APOGEE_ID and TEFF, LOGG, FE_H, ALPHA_FE, as written by
``python -m stellarnet.predict``), MAE / CRLB is reported per label per SNR bin for giants
(stage RGB or RC) and for all stars, against the catalogue labels and, with ``--truth``, the
true labels. Prints markdown tables and writes one JSON file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stellarnet.dataset.reader import ShardReader
from stellarnet.dataset.manifest import load_manifest
from stellarnet.evaluation.fisher import DEFAULT_STEPS
from stellarnet.evaluation.crlb_summary import GAUSS_MAE_FACTOR, RATIO_DEFINITION, crlb_by_bin, crlb_table_markdown, mae_over_crlb
from stellarnet.evaluation.crlb import GIANT_STAGES, GOAL_SNR, NOISE_DESCRIPTIONS, NOISE_MODELS, box_selection, compute_crlb, crlb_goal, subset_rows, to_model_grid
from stellarnet.evaluation.metrics import DEFAULT_SNR_EDGES
from stellarnet.evaluation.report import to_jsonable
from stellarnet.physics.kurucz import LABEL_NAMES
from stellarnet.evaluation.spectral_model import MODEL_GRID, emulator_model

STAGE_NAMES = ("MS", "SG", "RGB", "RC")
GIANT_CODES = tuple(STAGE_NAMES.index(s) for s in GIANT_STAGES)  # RGB, RC


def read_truth(path: Path, ids: np.ndarray) -> np.ndarray:
    """True labels (N, 4) for ``ids`` from a truth FITS table keyed by APOGEE_ID (NaN if absent)."""
    from astropy.table import Table

    t = Table.read(path, hdu=1)
    df = pd.DataFrame({"APOGEE_ID": np.char.strip(np.asarray(t["APOGEE_ID"]).astype(str)),
                       **{n: np.asarray(t[n], np.float64) for n in LABEL_NAMES}})
    df = df.drop_duplicates("APOGEE_ID").set_index("APOGEE_ID")
    return df.reindex(ids)[list(LABEL_NAMES)].to_numpy(np.float64)


def read_predictions(path: Path, ids: np.ndarray) -> np.ndarray:
    """Predicted labels (N, 4) for ``ids`` from a predictions CSV (NaN where absent)."""
    df = pd.read_csv(path)
    missing = [c for c in ("APOGEE_ID", *LABEL_NAMES) if c not in df.columns]
    if missing:
        raise SystemExit(f"{path}: missing columns {missing} (expected APOGEE_ID, {', '.join(LABEL_NAMES)})")
    df["APOGEE_ID"] = df["APOGEE_ID"].astype(str).str.strip()
    df = df.drop_duplicates("APOGEE_ID").set_index("APOGEE_ID")
    return df.reindex(ids)[list(LABEL_NAMES)].to_numpy(np.float64)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", required=True, help="shard dataset directory (with manifest.json)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--out", default="outputs/bench/crlb.json")
    ap.add_argument("--max-stars", type=int, default=None, help="random subset of this many stars (seeded)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--predictions", default=None, help="predictions CSV (APOGEE_ID, TEFF, LOGG, FE_H, ALPHA_FE)")
    ap.add_argument("--truth", default=None,
                    help="truth FITS keyed by APOGEE_ID, or 'auto' (<spectra_root>/truth/truth.fits from the manifest)")
    ap.add_argument("--per-star", default=None,
                    help="also write a CSV of per-star bounds (APOGEE_ID, SNR, STAGE, <LABEL>_CRLB, <LABEL>_CRLB_SNR)")
    ap.add_argument("--chunk", type=int, default=128)
    args = ap.parse_args(argv)

    manifest = load_manifest(args.dataset)
    names = list(manifest["label_names"])
    if names[: len(LABEL_NAMES)] != list(LABEL_NAMES):
        raise SystemExit(f"dataset labels {names} do not start with the emulator labels {LABEL_NAMES}")
    grid = manifest["grid"]
    reader = ShardReader(args.dataset, args.split, manifest, verify=False)
    if len(reader) == 0:
        raise SystemExit(f"split {args.split!r} of {args.dataset} has no rows")
    d = reader.read_all(("labels", "snr", "pix_mask", "flux_err", "classes", "apogee_id"))
    reader.close()
    n_split = int(d["snr"].shape[0])
    rows = subset_rows(n_split, args.max_stars, args.seed)
    ids = np.char.strip(d["apogee_id"][rows].astype(str))
    cat = d["labels"][rows, : len(LABEL_NAMES)].astype(np.float64)
    snr = d["snr"][rows].astype(np.float64)
    stage = d["classes"][rows, 2].astype(int) if d["classes"].ndim == 2 and d["classes"].shape[1] > 2 else None

    truth_path = None
    if args.truth == "auto":
        root = manifest.get("sources", {}).get("spectra_root")
        cand = Path(root) / "truth" / "truth.fits" if root else None
        truth_path = cand if cand is not None and cand.exists() else None
        if truth_path is None:
            print("no truth file found next to the survey; using catalogue labels", file=sys.stderr)
    elif args.truth:
        truth_path = Path(args.truth)
    truth = read_truth(truth_path, ids) if truth_path is not None else None
    at = truth if truth is not None else cat  # labels at which the bound is evaluated

    model = emulator_model()
    if tuple(model.label_names) != tuple(LABEL_NAMES):
        raise SystemExit(f"spectral model labels {model.label_names} differ from {LABEL_NAMES}")
    inside, _ = box_selection(at, snr, model.lower, model.upper)
    sel = np.flatnonzero(inside)
    print(f"{args.dataset} [{args.split}]: {n_split} stars, {rows.size} selected, {sel.size} inside the "
          f"emulator box (labels from {'truth' if truth is not None else 'catalogue'})", file=sys.stderr)
    if sel.size == 0:
        raise SystemExit("no star inside the emulator label box")

    good = to_model_grid(d["pix_mask"][rows[sel]].astype(bool), grid, MODEL_GRID, False)
    ferr = to_model_grid(d["flux_err"][rows[sel]].astype(np.float64), grid, MODEL_GRID, np.inf)
    crlb = compute_crlb(model.fn, at[sel], snr[sel], ferr, good, model.bounds, chunk=args.chunk,
                        steps=[DEFAULT_STEPS[n] for n in LABEL_NAMES],
                        progress=lambda line: print(f"  {line}", file=sys.stderr, flush=True))
    snr_s = snr[sel]
    stage_s = stage[sel] if stage is not None else None
    giant = np.isin(stage_s, GIANT_CODES) if stage_s is not None else None
    edges = list(DEFAULT_SNR_EDGES)

    result: dict[str, Any] = {
        "dataset": str(args.dataset), "split": args.split, "grid": grid, "model_grid": MODEL_GRID,
        "n_split": n_split, "n_selected": int(rows.size), "n_in_box": int(sel.size),
        "labels_at": "truth" if truth is not None else "catalogue",
        "truth_file": str(truth_path) if truth_path else None,
        "label_names": list(LABEL_NAMES), "label_units": ["K", "dex", "dex", "dex"],
        "snr_edges": edges, "steps": [DEFAULT_STEPS[n] for n in LABEL_NAMES],
        "emulator_box": {n: [float(a), float(b)] for n, a, b in zip(LABEL_NAMES, model.lower, model.upper)},
        "noise_models": {k: NOISE_DESCRIPTIONS[k] for k in NOISE_MODELS},
        "crlb": {},
    }
    groups: dict[str, np.ndarray] = {"all": np.ones(sel.size, bool)}
    if stage_s is not None:
        groups["giants"] = giant
        for code, nm in enumerate(STAGE_NAMES):
            if np.any(stage_s == code):
                groups[nm] = stage_s == code
    for noise in NOISE_MODELS:
        result["crlb"][noise] = {g: crlb_by_bin(crlb[noise], snr_s, edges=edges, mask=m) for g, m in groups.items()}
    for g in groups:
        print(crlb_table_markdown(result["crlb"]["flux_err"][g], "median",
                                  title=f"median CRLB σ — {g} (noise: shard flux_err)"))
        print()
    print(crlb_table_markdown(result["crlb"]["snr"]["all"], "median", title="median CRLB σ — all (noise: 1/SNR)"))
    print()

    if args.predictions:
        pred = read_predictions(Path(args.predictions), ids[sel])
        n_matched = int(np.all(np.isfinite(pred), axis=1).sum())
        print(f"predictions: {n_matched}/{sel.size} stars matched by APOGEE_ID", file=sys.stderr)
        refs = {"catalogue": cat[sel]}
        if truth is not None:
            refs["truth"] = truth[sel]
        comp: dict[str, Any] = {"n_matched": n_matched, "definition": RATIO_DEFINITION + "; noise model flux_err",
                                "gauss_mae_factor": GAUSS_MAE_FACTOR}
        for ref_name, ref in refs.items():
            res = pred - ref
            block: dict[str, Any] = {}
            for g in ("giants", "all"):
                if g not in groups:
                    continue
                block[g] = mae_over_crlb(res, crlb["flux_err"], snr_s, edges=edges, mask=groups[g])
                print(crlb_table_markdown(block[g], "ratio", title=f"MAE/CRLB (σ_achieved/σ_CRLB) — {g} vs {ref_name}"))
                print()
            if "giants" in groups:
                block["goal_giants_snr_ge_100"] = crlb_goal(res, crlb["flux_err"], snr_s, groups["giants"],
                                                            label_names=LABEL_NAMES)
                print(f"goal (giants, SNR >= {GOAL_SNR:g}, vs {ref_name}): " + ", ".join(
                    f"{n} {v['ratio']:.2f}" + {True: " ok", False: " >2x", None: " (no stars)"}[v["within_2x"]]
                    for n, v in block["goal_giants_snr_ge_100"].items()))
            comp[ref_name] = block
        result["mae_over_crlb"] = comp

    if args.per_star:
        ps = Path(args.per_star)
        ps.parent.mkdir(parents=True, exist_ok=True)
        table = pd.DataFrame({"APOGEE_ID": ids[sel], "SNR": snr_s,
                              "STAGE": stage_s if stage_s is not None else np.full(sel.size, -1)})
        for j, n in enumerate(LABEL_NAMES):
            table[f"{n}_CRLB"] = crlb["flux_err"][:, j]
            table[f"{n}_CRLB_SNR"] = crlb["snr"][:, j]
        table.to_csv(ps.with_name(ps.name + ".tmp"), index=False)
        os.replace(ps.with_name(ps.name + ".tmp"), ps)
        result["per_star_file"] = str(ps)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(to_jsonable(result), indent=1))
    os.replace(tmp, out)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
