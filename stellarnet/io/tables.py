"""Tables on disk: FITS / CSV / parquet, written atomically (temporary file in the same directory,
then ``os.replace``)."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from stellarnet.common.files import atomic_path

__all__ = ["FORMATS", "write_table"]

FORMATS: dict[str, str] = {"fits": ".fits", "csv": ".csv", "parquet": ".parquet"}


def write_table(df: pd.DataFrame, path: str | os.PathLike, fmt: str | None = None) -> Path:
    """Write ``df`` as FITS / CSV / parquet (``fmt``, else from the suffix) atomically."""
    path = Path(path)
    fmt = (fmt or path.suffix.lstrip(".")).lower()
    if fmt == "fit":
        fmt = "fits"
    if fmt not in FORMATS:
        raise ValueError(f"unknown table format {fmt!r}; known: {sorted(FORMATS)}")
    with atomic_path(path) as tmp:
        if fmt == "csv":
            df.to_csv(tmp, index=False)
        elif fmt == "parquet":
            df.to_parquet(tmp, engine="pyarrow", index=False)
        else:
            from astropy.table import Table

            Table.from_pandas(_fits_safe(df)).write(tmp, format="fits", overwrite=True)
    return path


def _fits_safe(df: pd.DataFrame) -> pd.DataFrame:
    """FITS cannot hold Python objects / empty strings of width 0: object columns → str."""
    out = df.copy()
    for c in out.columns:
        if out[c].dtype == object:
            s = out[c].fillna("").astype(str)
            out[c] = s.where(s.str.len() > 0, " ") if (s.str.len() == 0).all() else s
    return out
