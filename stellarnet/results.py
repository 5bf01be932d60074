"""Prediction catalogues: one row per star with labels, σ (aleatoric, epistemic, total) and classes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
from astropy.table import Table


def predictions_frame(chunk: Mapping[str, Any], pred: Mapping[str, Any], label_names: list[str],
                      class_tasks: Mapping[str, list[str]] | None = None) -> pd.DataFrame:
    """Table of one chunk: APOGEE_ID, labels, σ per kind, class probabilities and classes."""
    out: dict[str, Any] = {"APOGEE_ID": np.asarray(chunk["apogee_id"]).astype(str)}
    for key in ("ra", "dec", "snr", "split"):
        if key in chunk:
            out[key.upper()] = np.asarray(chunk[key])
    for j, name in enumerate(label_names):
        out[name] = pred["labels"][:, j]
        out[f"{name}_SIGMA_ALEATORIC"] = pred["sigma_aleatoric"][:, j]
        out[f"{name}_SIGMA_EPISTEMIC"] = pred["sigma_epistemic"][:, j]
        out[f"{name}_SIGMA"] = pred["sigma_total"][:, j]
    for task, probs in pred["class_probs"].items():
        names = (class_tasks or {}).get(task)
        for k in range(probs.shape[1]):
            cname = names[k] if names else str(k)
            out[f"P_{task.upper()}_{cname}"] = probs[:, k]
        out[task.upper()] = np.asarray(pred["classes"][task]).astype(str)
    errors = np.asarray(chunk.get("error", [""] * len(out["APOGEE_ID"]))).astype(str)
    out["READ_ERROR"] = errors
    df = pd.DataFrame(out)
    bad = errors != ""
    if bad.any():  # never report numbers for a spectrum that could not be read
        num = df.select_dtypes(include=[np.floating]).columns
        df.loc[bad, [c for c in num if c not in ("RA", "DEC", "SNR")]] = np.nan
    return df


def write_predictions(df: pd.DataFrame, out_dir: str | Path, stem: str = "predictions") -> dict[str, Path]:
    """Write FITS and CSV atomically (temp file + rename); returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out_dir / f"{stem}.csv", "fits": out_dir / f"{stem}.fits"}
    tmp = paths["csv"].with_name(paths["csv"].name + ".tmp")
    df.to_csv(tmp, index=False)
    os.replace(tmp, paths["csv"])
    tmp = paths["fits"].with_name(paths["fits"].name + ".tmp")
    Table.from_pandas(df).write(tmp, format="fits", overwrite=True)
    os.replace(tmp, paths["fits"])
    return paths
