"""Missing values and outliers in the feature table: per-column policies (NaN kept or median-imputed),
robust statistics fitted on the training split, robust-z outlier flags."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from stellarnet.common.files import to_plain
from stellarnet.common.stats import MAD_TO_SIGMA

MISSING_POLICIES: tuple[str, ...] = ("nan", "median")




# --------------------------------------------------------------------------- missing / outliers


def resolve_missing_policies(
    columns: Sequence[str], spec: Mapping[str, Any] | None, known: Sequence[str] = ()
) -> dict[str, str]:
    """Missing-value policy (``nan`` or ``median``) for each feature column.

    ``spec``: ``{default: nan|median, features: {name-or-pattern: policy}}``. Exact names win,
    then the first matching fnmatch pattern, then ``default``. An exact name that is neither a
    feature column nor in ``known`` (features switched off in this run) is an error (catches
    typos); ``*_ERR`` columns are always ``nan``.
    """
    spec = dict(to_plain(spec) or {})
    default = str(spec.get("default", "nan"))
    rules = {str(k): str(v) for k, v in dict(spec.get("features") or {}).items()}
    for key, pol in [("default", default), *rules.items()]:
        if pol not in MISSING_POLICIES:
            raise ValueError(f"missing policy for {key!r} must be one of {MISSING_POLICIES}, got {pol!r}")
    exact = {k: v for k, v in rules.items() if not any(ch in k for ch in "*?[")}
    patterns = [(k, v) for k, v in rules.items() if k not in exact]
    unknown = sorted(set(exact) - set(columns) - set(known))
    if unknown:
        raise ValueError(f"missing-value policy given for unknown feature column(s) {unknown}")
    out = {}
    for c in columns:
        if c.endswith("_ERR"):
            out[c] = "nan"
        elif c in exact:
            out[c] = exact[c]
        else:
            out[c] = next((v for k, v in patterns if fnmatch.fnmatchcase(c, k)), default)
    return out


def fit_robust_stats(df: pd.DataFrame, columns: Sequence[str]) -> dict[str, dict[str, float]]:
    """``{column: {median, scale, n}}`` over the finite values of ``df`` (scale = 1.4826 MAD,
    falling back to the standard deviation where the MAD is 0; NaN if no finite value)."""
    out = {}
    for c in columns:
        x = df[c].to_numpy(dtype=float)
        x = x[np.isfinite(x)]
        if x.size == 0:
            out[c] = {"median": float("nan"), "scale": float("nan"), "n": 0}
            continue
        med = float(np.median(x))
        scale = MAD_TO_SIGMA * float(np.median(np.abs(x - med)))
        if not scale > 0:
            scale = float(np.std(x))
        out[c] = {"median": med, "scale": scale, "n": int(x.size)}
    return out


def flag_outliers(
    df: pd.DataFrame, stats: Mapping[str, Mapping[str, float]], threshold: float
) -> pd.DataFrame:
    """Bool DataFrame ``<column>_OUTLIER``: |x − median| / scale > ``threshold`` (NaN x → False;
    columns whose scale is 0/NaN are never flagged)."""
    if not threshold > 0:
        raise ValueError(f"outlier threshold must be > 0, got {threshold!r}")
    out = {}
    for c, st in stats.items():
        x = df[c].to_numpy(dtype=float)
        scale = float(st["scale"])
        if not (np.isfinite(scale) and scale > 0):
            out[f"{c}_OUTLIER"] = np.zeros(len(df), bool)
            continue
        with np.errstate(invalid="ignore"):
            out[f"{c}_OUTLIER"] = np.abs(x - float(st["median"])) / scale > threshold
    return pd.DataFrame(out, index=df.index)


def impute_missing(
    df: pd.DataFrame, policies: Mapping[str, str], stats: Mapping[str, Mapping[str, float]]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Fill NaN in the ``median``-policy columns with ``stats[col]["median"]``.

    Returns (a copy of ``df`` with those columns filled, a bool DataFrame ``<col>_IMPUTED``
    marking the filled cells). ``nan``-policy columns are left as they are.
    """
    df = df.copy()
    flags = {}
    for c, pol in policies.items():
        if pol != "median":
            continue
        miss = ~np.isfinite(df[c].to_numpy(dtype=float))
        med = float(stats[c]["median"])
        if miss.any() and np.isfinite(med):
            df.loc[miss, c] = med
        flags[f"{c}_IMPUTED"] = miss & np.isfinite(med)
    return df, pd.DataFrame(flags, index=df.index)
