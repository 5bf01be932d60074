"""Benchmark: network vs tree baselines against the TRUE labels of the simulated survey.

The pipeline scores every method against the catalogue labels (what a real user has); on the
simulated survey those carry ~50-100 K / 0.05 dex of catalogue noise, which hides the
difference between methods. This script (a benchmark, allowed to read the simulation's truth
file) scores the network and the tree baselines on the test split against the truth, and against
the catalogue, and writes JSON + markdown.

    python scripts/compare_vs_truth.py --dataset data/shards/sim_dr12 --model logs/pipeline/train/model \
        --truth data/sim_survey/truth/truth.fits --out outputs/bench/vs_truth
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from astropy.table import Table

from stellarnet.dataset.reader import ShardReader
from stellarnet.dataset.manifest import load_manifest
from stellarnet.evaluation.metrics import classification_report, regression_metrics
from stellarnet.evaluation.split_predictions import class_codes, load_split, predict_split
from stellarnet.network.model_folder import load_model
from stellarnet.workflows.baselines import run_baselines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="data/shards/sim_dr12")
    ap.add_argument("--model", required=True, help="model folder or checkpoint")
    ap.add_argument("--truth", default="data/sim_survey/truth/truth.fits")
    ap.add_argument("--methods", default="lightgbm,xgboost")
    ap.add_argument("--out", default="outputs/bench/vs_truth")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    manifest = load_manifest(args.dataset)
    names = manifest["label_names"]
    tasks = list(manifest["class_tasks"])
    meta = {"label_names": names, "class_tasks": tasks, "class_names": manifest["class_tasks"]}
    splits = {s: {**load_split(args.dataset, s), **meta} for s in ("train", "val", "test")}
    reader = ShardReader(args.dataset, "test", manifest, verify=False)
    ids = np.char.decode(reader.read_all(("apogee_id",))["apogee_id"]).astype(str)
    truth = Table.read(args.truth).to_pandas().drop_duplicates("APOGEE_ID").set_index("APOGEE_ID")
    truth.index = truth.index.astype(str).str.strip()
    true_labels = truth.loc[ids, names].to_numpy(np.float64)
    stage_truth = truth.loc[ids, "STAGE_CODE"].to_numpy(np.int64)
    test = splits["test"]

    preds: dict[str, dict] = {}
    t0 = time.perf_counter()
    predictor = load_model(args.model)
    p, rate = predict_split(predictor, test)
    preds["stellarnet"] = {"labels": p["labels"], "classes": class_codes(p, tasks), "predict_rate": rate}
    cfg = {"methods": args.methods.split(","), "n_jobs": -1, "features": "spectra_pca"}
    res = run_baselines(splits["train"], splits["val"], test, cfg, return_predictions=True)
    for m, r in res.items():
        if r.get("skipped"):
            continue
        preds[m] = {"labels": r["_predictions"]["labels"], "classes": r["_predictions"]["classes"],
                    "predict_rate": r.get("predict_rate"), "train_time_s": r.get("train_time_s")}

    table: dict[str, dict] = {}
    for m, pr in preds.items():
        row: dict = {"predict_rate": pr.get("predict_rate"), "train_time_s": pr.get("train_time_s")}
        for j, lab in enumerate(names):
            row[f"{lab}_mae_truth"] = regression_metrics(pr["labels"][:, j], true_labels[:, j])["mae"]
            row[f"{lab}_mae_catalogue"] = regression_metrics(pr["labels"][:, j], test["labels"][:, j])["mae"]
        cls = classification_report(pr["classes"], test["classes"], tasks, manifest["class_tasks"])
        for t in tasks:
            row[f"{t}_acc_catalogue"] = cls[t]["accuracy"]
        stage_pred = np.asarray(pr["classes"])[:, tasks.index("stage")]
        row["stage_acc_truth"] = float(np.mean(stage_pred == stage_truth))
        table[m] = row
    (out / "vs_truth.json").write_text(json.dumps({"n_test": len(ids), "results": table}, indent=1))
    cols = [f"{lab}_mae_truth" for lab in names] + [f"{lab}_mae_catalogue" for lab in names] + \
           [f"{t}_acc_catalogue" for t in tasks] + ["stage_acc_truth"]
    lines = ["| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for m, row in table.items():
        lines.append(f"| {m} | " + " | ".join(f"{row[c]:.4g}" for c in cols) + " |")
    md = f"# Test split (n={len(ids)}): MAE vs truth and vs catalogue\n\n" + "\n".join(lines) + "\n"
    (out / "vs_truth.md").write_text(md)
    print(md)
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
