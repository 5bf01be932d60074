"""Prediction catalogues: one row per star with labels, σ (aleatoric, epistemic, total) and classes.

With a χ²-refined model (an ``emulator.pt`` in the model folder) the label columns hold the refined
labels and also ``<LABEL>_NET`` / ``<LABEL>_NET_SIGMA`` (the network's estimate), ``REFINE_CHI2``
(reduced χ² of the fit) and ``REFINE_FLAG`` (0 refined, 1 kept the network's labels, 2 not tried).
Every catalogue has ``STELLARNET_FLAG``, a per-star quality bitmask
(:data:`stellarnet.data.bitmasks.STELLARNET_FLAG`, documented in ``docs/robustness.md``).
"""

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
        if "labels_network" in pred:  # χ²-refined: the network's own estimate too
            out[f"{name}_NET"] = pred["labels_network"][:, j]
            out[f"{name}_NET_SIGMA"] = pred["sigma_network"][:, j]
    if "refine_flag" in pred:
        out["REFINE_CHI2"] = pred["refine_chi2"]
        out["REFINE_FLAG"] = np.asarray(pred["refine_flag"]).astype(np.int16)
    if "stellarnet_flag" in pred:  # bits: stellarnet.data.bitmasks.STELLARNET_FLAG, docs/robustness.md
        out["STELLARNET_FLAG"] = np.asarray(pred["stellarnet_flag"]).astype(np.int32)
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


class OutputExistsError(FileExistsError):
    """An output file of an earlier run is in the way (pass ``overwrite=true`` to replace it)."""


def check_not_overwriting(paths: Any, overwrite: bool = False) -> None:
    """Raise :class:`OutputExistsError` naming the existing ``paths`` unless ``overwrite``."""
    existing = [str(p) for p in paths if Path(p).exists()]
    if existing and not overwrite:
        raise OutputExistsError(
            f"{existing[0]} already exists{f' (and {len(existing) - 1} more)' if len(existing) > 1 else ''}: "
            "an earlier run's output is never replaced silently; choose another output_dir, or pass overwrite=true"
        )


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


#: Fixed widths (characters) of string columns in streamed FITS output; others get DEFAULT_STR_WIDTH.
STR_WIDTHS = {"APOGEE_ID": 64, "SPLIT": 8, "READ_ERROR": 240}
DEFAULT_STR_WIDTH = 16
_FITS_CODES = {("f", 4): ("E", ">f4"), ("f", 8): ("D", ">f8"), ("i", 8): ("K", ">i8"), ("i", 4): ("J", ">i4"),
               ("i", 2): ("I", ">i2")}


class PredictionWriter:
    """Stream prediction chunks to CSV and FITS in bounded memory (the row count is known up front).

    The FITS binary table header (``NAXIS2 = n_rows``) is written from the first chunk's columns,
    then each chunk is appended as big-endian records; strings are fixed width (``STR_WIDTHS``,
    longer text is cut). Both files are written under temporary names and renamed by ``close``,
    so a killed run never leaves a truncated catalogue behind.
    """

    def __init__(self, out_dir: str | Path, n_rows: int, stem: str = "predictions", overwrite: bool = False):
        self.out_dir = Path(out_dir)
        self.paths = {"csv": self.out_dir / f"{stem}.csv", "fits": self.out_dir / f"{stem}.fits"}
        check_not_overwriting(self.paths.values(), overwrite)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.n_rows = int(n_rows)
        self._tmp = {k: p.with_name(p.name + ".tmp") for k, p in self.paths.items()}
        self._csv = open(self._tmp["csv"], "w", newline="")
        self._fits = None
        self._dtype: np.dtype | None = None
        self.written = 0

    def _open_fits(self, first: pd.DataFrame) -> None:
        from astropy.io import fits

        fields, cols = [], []
        for name in first.columns:
            dt = first[name].dtype
            code = _FITS_CODES.get((dt.kind, dt.itemsize)) if dt.kind in "fi" else None
            if code is None and dt.kind in "fi":  # e.g. int16, float16
                code = ("D", ">f8") if dt.kind == "f" else ("K", ">i8")
            if code is None:
                w = STR_WIDTHS.get(name, DEFAULT_STR_WIDTH)
                code = (f"{w}A", f"S{w}")
            fields.append((name, code[1]))
            cols.append(fits.Column(name=name, format=code[0]))
        self._dtype = np.dtype(fields)
        hdu = fits.BinTableHDU.from_columns(cols, nrows=0)
        hdu.header["NAXIS2"] = self.n_rows
        hdu.header["EXTNAME"] = "PREDICTIONS"
        self._fits = open(self._tmp["fits"], "wb")
        self._fits.write(fits.PrimaryHDU().header.tostring().encode("ascii"))
        self._fits.write(hdu.header.tostring().encode("ascii"))

    def write(self, df: pd.DataFrame) -> None:
        """Append one chunk (same columns every time)."""
        if self.written + len(df) > self.n_rows:
            raise ValueError(f"more rows than the {self.n_rows} announced")
        if self._fits is None:
            self._open_fits(df)
        df.to_csv(self._csv, index=False, header=self.written == 0)
        rec = np.empty(len(df), self._dtype)
        for name in self._dtype.names:
            col = df[name].to_numpy()
            if self._dtype[name].kind == "S":
                width = self._dtype[name].itemsize
                rec[name] = np.char.encode(col.astype(str), "ascii", errors="replace").astype(f"S{width}")
            else:
                rec[name] = col
        self._fits.write(rec.tobytes())
        self.written += len(df)

    def close(self) -> dict[str, Path]:
        """Finish both files (FITS padded to 2,880 bytes) and rename them into place."""
        if self.written != self.n_rows:
            self.abort()
            raise ValueError(f"wrote {self.written} rows, expected {self.n_rows}")
        self._csv.close()
        pad = (-self._fits.tell()) % 2880
        self._fits.write(b"\0" * pad)
        self._fits.close()
        for k, p in self.paths.items():
            os.replace(self._tmp[k], p)
        return dict(self.paths)

    def abort(self) -> None:
        """Close and delete the temporary files."""
        for fh in (self._csv, self._fits):
            if fh is not None and not fh.closed:
                fh.close()
        for p in self._tmp.values():
            if p.exists():
                p.unlink()
