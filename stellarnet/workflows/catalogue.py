"""Results catalogue: one row per star that passed the cuts (every split of the shard dataset).

Columns (in this order):

* ``APOGEE_ID``, ``RA``, ``DEC`` (deg), ``SNR``, ``SPLIT`` (train / val / test);
* per label (``TEFF`` [K], ``LOGG``, ``FE_H``, ``ALPHA_FE`` [dex]): the prediction and its σ
  ``<L>_ERR`` (total), ``<L>_ERR_ALEATORIC``, ``<L>_ERR_EPISTEMIC``, same unit;
* class probabilities ``P_<TASK>_<class>`` and the most probable class ``<TASK>``
  (all as written by :func:`stellarnet.io.predictions.predictions_frame`);
* calibrated labels on external survey scales, one column per calibrated label and survey
  (e.g. ``TEFF_GALAH``, ``FE_H_LAMOST``; :func:`stellarnet.crossval.calibration.apply_calibration` of the
  cross-survey calibration fitted with stellarnet as the reference);
* flags: ``READ_ERROR`` (message; empty when the spectrum was read fine), ``FLAG_READ_ERROR``,
  ``N_FEATURE_OUTLIERS`` (engineered features flagged as robust-z outliers in the feature table),
  ``FEATURE_OUTLIERS`` (their names, comma separated), ``FLAG_FEATURE_OUTLIER``
  (``N_FEATURE_OUTLIERS > 0``; −1 / False where the star has no feature-table row).

Files are written atomically by :func:`stellarnet.io.tables.write_table`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stellarnet.io.tables import FORMATS, write_table

__all__ = ["feature_flags", "build_catalogue", "write_catalogue"]


def feature_flags(features: pd.DataFrame) -> pd.DataFrame:
    """Per star of a feature table (:func:`stellarnet.features.tabular.build_feature_table`):
    ``APOGEE_ID``, ``SPLIT`` (if the table has ``split``), ``N_FEATURE_OUTLIERS``,
    ``FEATURE_OUTLIERS`` (names of the features flagged ``<feature>_OUTLIER``)."""
    if "APOGEE_ID" not in features.columns:
        raise KeyError("feature table has no APOGEE_ID column")
    flag_cols = [c for c in features.columns if c.endswith("_OUTLIER")]
    flags = features[flag_cols].fillna(False).astype(bool).to_numpy() if flag_cols else np.zeros((len(features), 0), bool)
    names = np.array([c[: -len("_OUTLIER")] for c in flag_cols], dtype=object)
    out = pd.DataFrame({"APOGEE_ID": features["APOGEE_ID"].astype(str).str.strip().to_numpy()})
    if "split" in features.columns:
        out["SPLIT"] = features["split"].astype(str).to_numpy()
    out["N_FEATURE_OUTLIERS"] = flags.sum(axis=1).astype(np.int64)
    out["FEATURE_OUTLIERS"] = [",".join(names[row]) for row in flags]
    return out


def build_catalogue(
    predictions: pd.DataFrame,
    calibrations: Mapping[str, Any] | Sequence[Any] = (),
    features: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """The results catalogue (schema: module docstring) from a predictions table
    (:func:`stellarnet.io.predictions.predictions_frame` rows for every star), cross-survey calibrations
    (:class:`~stellarnet.crossval.calibration.Calibration` objects, their dicts or JSON paths; a mapping
    name → calibration or a sequence) and the feature table (flags; optional).
    """
    from stellarnet.crossval.calibration import Calibration, apply_calibration

    if "APOGEE_ID" not in predictions.columns:
        raise KeyError("predictions have no APOGEE_ID column")
    cat = predictions.copy()
    cat["APOGEE_ID"] = cat["APOGEE_ID"].astype(str).str.strip()
    if "READ_ERROR" not in cat.columns:
        cat["READ_ERROR"] = ""
    cat["READ_ERROR"] = cat["READ_ERROR"].fillna("").astype(str)
    items = calibrations.values() if isinstance(calibrations, Mapping) else calibrations
    for calib in items:
        cal = Calibration.load(calib)
        cat = apply_calibration(cat, cal)
    cat["FLAG_READ_ERROR"] = cat["READ_ERROR"].str.len() > 0
    if features is not None:
        flags = feature_flags(features)
        on = ["APOGEE_ID", "SPLIT"] if "SPLIT" in flags.columns and "SPLIT" in cat.columns else ["APOGEE_ID"]
        flags = flags.drop_duplicates(on, keep="first")
        if "SPLIT" in flags.columns and "SPLIT" not in on:
            flags = flags.drop(columns="SPLIT")
        cat = cat.merge(flags, on=on, how="left", validate="m:1")
        missing = cat["N_FEATURE_OUTLIERS"].isna()
        cat["N_FEATURE_OUTLIERS"] = cat["N_FEATURE_OUTLIERS"].fillna(-1).astype(np.int64)
        cat["FEATURE_OUTLIERS"] = cat["FEATURE_OUTLIERS"].fillna("").astype(str)
        cat["FLAG_FEATURE_OUTLIER"] = (cat["N_FEATURE_OUTLIERS"] > 0) & ~missing
    if len(cat) != len(predictions):  # pragma: no cover - guarded by validate="m:1"
        raise RuntimeError("joining the flags changed the number of rows")
    front = [c for c in ("APOGEE_ID", "RA", "DEC", "SNR", "SPLIT") if c in cat.columns]
    flags_cols = [c for c in ("READ_ERROR", "FLAG_READ_ERROR", "N_FEATURE_OUTLIERS", "FEATURE_OUTLIERS",
                              "FLAG_FEATURE_OUTLIER") if c in cat.columns]
    rest = [c for c in cat.columns if c not in front and c not in flags_cols]
    return cat[front + rest + flags_cols].reset_index(drop=True)


def write_catalogue(df: pd.DataFrame, out_dir: str | os.PathLike, stem: str = "catalogue",
                    formats: Sequence[str] = ("fits", "csv")) -> dict[str, Path]:
    """Write the catalogue in each of ``formats`` (fits, csv, parquet); returns format → path."""
    out_dir = Path(out_dir)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ValueError(f"unknown catalogue formats {unknown}; known: {sorted(FORMATS)}")
    return {f: write_table(df, out_dir / f"{stem}{FORMATS[f]}", f) for f in formats}
