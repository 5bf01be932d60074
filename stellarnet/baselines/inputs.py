"""The baselines' feature matrices: PCA coefficients, photometry and engineered tabular features,
concatenated, with median imputation of missing values."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def fit_medians(x: np.ndarray) -> np.ndarray:
    """Column medians of ``x`` ignoring NaN (0 for all-NaN columns), for imputation."""
    x = np.asarray(x, dtype=float)
    if x.size == 0:
        return np.zeros(x.shape[1] if x.ndim == 2 else 0)
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            med = np.nanmedian(x, axis=0)
    return np.where(np.isfinite(med), med, 0.0)


def impute(x: np.ndarray, medians: np.ndarray) -> np.ndarray:
    """Replace non-finite entries of column j by ``medians[j]``."""
    x = np.array(x, dtype=np.float32, copy=True)
    bad = ~np.isfinite(x)
    if bad.any():
        x[bad] = np.broadcast_to(np.asarray(medians, dtype=np.float32), x.shape)[bad]
    return x


def assemble_features(pca_feats: np.ndarray | None, photometry: np.ndarray | None,
                      tabular: np.ndarray | None = None) -> np.ndarray:
    """Concatenate PCA coefficients (N, k), photometric features (N, F) and tabular features
    (N, T), any of which may be None (NaN kept)."""
    parts = [np.asarray(a, dtype=np.float32) for a in (pca_feats, photometry, tabular)
             if a is not None and np.asarray(a).size > 0]
    if not parts:
        raise ValueError("no features: give PCA coefficients, photometry or tabular features")
    n = len(parts[0])
    return np.concatenate([a.reshape(n, -1) for a in parts], axis=1)


def tabular_features(table: Any, apogee_id: Sequence[str], split: str | None = None, *,
                     include: Sequence[str] | None = None,
                     exclude: Sequence[str] = ()) -> tuple[np.ndarray, list[str]]:
    """(N, T) float32 matrix and column names from a feature table (a DataFrame from
    :func:`stellarnet.features.tabular.build_feature_table`), rows aligned to ``apogee_id``
    (within ``split`` when the table has a ``split`` column). Columns: the table's feature columns
    (``attrs["feature_stats"]["features"]``, else every numeric non-ID column) matching an
    ``include`` pattern (fnmatch; None = all) and no ``exclude`` pattern; booleans become 0/1.
    Stars missing from the table get NaN rows (a warning is logged).
    """
    import fnmatch

    import pandas as pd

    df = table
    if split is not None and "split" in df.columns:
        df = df[df["split"].astype(str) == split]
    stats = (df.attrs or {}).get("feature_stats") or {}
    cols = list(stats.get("features") or [])
    if not cols:
        skip = {"APOGEE_ID", "RA", "DEC", "FIELD", "row_index", "split", "SNR"}
        cols = [c for c in df.columns if c not in skip and pd.api.types.is_numeric_dtype(df[c])]
    cols = [c for c in cols if (include is None or any(fnmatch.fnmatchcase(c, p) for p in include))
            and not any(fnmatch.fnmatchcase(c, p) for p in exclude)]
    if not cols:
        raise ValueError("no tabular feature columns left after include/exclude")
    ids = df["APOGEE_ID"].astype(str).str.strip().to_numpy()
    pos = pd.Index(ids).get_indexer(pd.Index([str(a).strip() for a in apogee_id]))
    if pd.Index(ids).has_duplicates:
        first = pd.Series(np.arange(len(ids)), index=ids).groupby(level=0).first()
        pos = first.reindex([str(a).strip() for a in apogee_id]).fillna(-1).to_numpy(dtype=np.int64)
    vals = df[cols].astype(float).to_numpy(dtype=np.float32)
    out = np.full((len(pos), len(cols)), np.nan, dtype=np.float32)
    hit = pos >= 0
    out[hit] = vals[pos[hit]]
    if not hit.all():
        log.warning("%d of %d stars have no row in the feature table%s: NaN features", int((~hit).sum()), len(pos),
                    f" (split {split})" if split else "")
    return out, cols
