"""Prediction catalogues: one row per star with labels, their errors and classes, ASPCAP-style.

Per label ``<L>`` (``TEFF`` [K], ``LOGG``, ``FE_H``, ``ALPHA_FE`` [dex]): ``<L>`` (the estimate),
``<L>_ERR`` (the total 1σ error, what to use), and its parts ``<L>_ERR_ALEATORIC`` (noise; for
refined labels the χ² fit's σ, calibrated) and ``<L>_ERR_EPISTEMIC`` (MC-dropout spread). With a
χ²-refined model (an ``emulator.pt`` in the model folder) the label columns hold the refined labels
and also ``<L>_NET`` / ``<L>_NET_ERR`` (the network's estimate), ``REFINE_CHI2`` (reduced χ² of the
fit) and ``REFINE_FLAG`` (0 refined, 1 kept the network's labels, 2 not tried), and with member emulators
``<L>_ERR_EMULATOR`` (the emulator's own error, a part of ``<L>_ERR``). Every catalogue has
``STELLARNET_FLAG``, a per-star quality bitmask (:data:`stellarnet.io.bitmasks.STELLARNET_FLAG`,
documented in ``docs/robustness.md``), and ``READ_ERROR`` (empty when the spectrum was read).

Units are in the FITS header (``TUNITn``) and, for the CSV, in the sidecar
``<stem>.columns.json`` (:func:`column_units`); provenance (stellarnet version, model folder and its
hash, training data, date) in FITS keywords and the sidecar.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
from astropy.table import Table

from stellarnet.common.errors import StellarnetError
from stellarnet.common.files import atomic_path


def predictions_frame(chunk: Mapping[str, Any], pred: Mapping[str, Any], label_names: list[str],
                      class_tasks: Mapping[str, list[str]] | None = None) -> pd.DataFrame:
    """Table of one chunk: APOGEE_ID, labels, σ per kind, class probabilities and classes."""
    out: dict[str, Any] = {"APOGEE_ID": np.asarray(chunk["apogee_id"]).astype(str)}
    for key in ("ra", "dec", "snr", "telescope", "field", "split"):
        if key in chunk:
            out[key.upper()] = np.asarray(chunk[key])
    for j, name in enumerate(label_names):
        out[name] = pred["labels"][:, j]
        out[f"{name}_ERR"] = pred["sigma_total"][:, j]
        out[f"{name}_ERR_ALEATORIC"] = pred["sigma_aleatoric"][:, j]
        out[f"{name}_ERR_EPISTEMIC"] = pred["sigma_epistemic"][:, j]
        if "labels_network" in pred:  # χ²-refined: the network's own estimate too
            out[f"{name}_NET"] = pred["labels_network"][:, j]
            out[f"{name}_NET_ERR"] = pred["sigma_network"][:, j]
        if "refine_emulator_spread" in pred:  # the emulator's own error, part of <L>_ERR
            out[f"{name}_ERR_EMULATOR"] = np.asarray(pred["refine_emulator_spread"][:, j], np.float32)
    if "refine_flag" in pred:
        out["REFINE_CHI2"] = pred["refine_chi2"]
        out["REFINE_FLAG"] = np.asarray(pred["refine_flag"]).astype(np.int16)
        if "refine_companion" in pred:
            out["REFINE_COMPANION"] = np.asarray(pred["refine_companion"], np.float32)
    if "stellarnet_flag" in pred:  # bits: stellarnet.io.bitmasks.STELLARNET_FLAG, docs/robustness.md
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
    """Raise :class:`OutputExistsError` naming the existing ``paths`` unless ``overwrite``
    (ValueError when ``overwrite`` is not a boolean, e.g. ``overwrite=yes`` on the command line)."""
    if not isinstance(overwrite, bool):
        raise ValueError(f"overwrite must be true or false, got overwrite={overwrite!r}")
    existing = [str(p) for p in paths if Path(p).exists()]
    if existing and not overwrite:
        raise OutputExistsError(
            f"{existing[0]} already exists{f' (and {len(existing) - 1} more)' if len(existing) > 1 else ''}: "
            "an earlier run's output is never replaced silently; choose another output_dir, or pass overwrite=true"
        )


#: Units and meanings of the non-label catalogue columns (labels and their errors: the model's units).
FIXED_COLUMNS: dict[str, tuple[str, str]] = {
    "APOGEE_ID": ("", "star identifier (allStar APOGEE_ID, the spectrum header's OBJID, or the file name)"),
    "RA": ("deg", "right ascension (J2000)"), "DEC": ("deg", "declination (J2000)"),
    "SNR": ("", "S/N per pixel of the spectrum (catalogue)"), "SPLIT": ("", "shard split the star is in"),
    "TELESCOPE": ("", "telescope (spectrum header)"), "FIELD": ("", "field (spectrum header)"),
    "REFINE_CHI2": ("", "reduced chi2 of the spectral fit"),
    "REFINE_FLAG": ("", "0 refined, 1 network labels kept (fit failed or moved too far), 2 not refined"),
    "REFINE_COMPANION": ("", "the fit residuals' match to the star's own lines at 12-100 km/s (in sigma): "
                             "a double-lined binary above 8 (BINARY_CANDIDATE)"),
    "STELLARNET_FLAG": ("", "quality bitmask, stellarnet.io.bitmasks.STELLARNET_FLAG (docs/robustness.md)"),
    "READ_ERROR": ("", "why the spectrum could not be used (empty: fine)"),
}


def column_units(columns: Sequence[str], label_names: Sequence[str], label_units: Sequence[str]) -> dict[str, dict[str, str]]:
    """``{column: {"unit", "description"}}`` for a catalogue's columns (one home for what they mean)."""
    unit_of = dict(zip(label_names, label_units))
    out: dict[str, dict[str, str]] = {}
    for col in columns:
        if col in FIXED_COLUMNS:
            unit, text = FIXED_COLUMNS[col]
        elif col in unit_of:
            unit, text = unit_of[col], f"{col} estimate"
        elif col.startswith("P_"):
            unit, text = "", f"probability of class {col[2:]}"
        else:
            base = next((n for n in label_names if col.startswith(n + "_")), None)
            suffix = col[len(base) + 1:] if base else ""
            parts = {"ERR": "total 1-sigma error (use this)", "ERR_ALEATORIC": "1-sigma error part: noise / spectral fit",
                     "ERR_EPISTEMIC": "1-sigma error part: model (MC dropout)", "NET": "the network's estimate",
                     "NET_ERR": "1-sigma error of the network's estimate (grown where it and the refinement disagree)",
                     "ERR_EMULATOR": "1-sigma error part: the spectrum emulator's own (spread over its members)"}
            if base and suffix in parts:
                unit, text = unit_of[base], f"{base}: {parts[suffix]}"
            else:
                unit, text = "", "most probable class" if col.lower() in ("stage", "spectral_type", "luminosity_class") else ""
        out[col] = {"unit": unit, "description": text}
    return out


def to_qtable(pred: Mapping[str, Any], label_names: Sequence[str], label_units: Sequence[str],
              class_tasks: Mapping[str, list[str]] | None = None) -> Any:
    """A :meth:`Predictor.predict` result as an astropy ``QTable``: the catalogue's columns
    (:func:`predictions_frame`) with units from :func:`column_units` (K, dex) and descriptions."""
    import astropy.units as u
    from astropy.table import QTable

    n = len(pred["labels"])
    frame = predictions_frame({"apogee_id": np.array([str(i) for i in range(n)], dtype=object)}, pred,
                              list(label_names), class_tasks)
    frame = frame.drop(columns=["APOGEE_ID", "READ_ERROR"])
    meta = column_units(list(frame.columns), label_names, label_units)
    table = QTable()
    for col in frame.columns:
        values = frame[col].to_numpy()
        unit = meta[col]["unit"]
        table[col] = values * u.Unit(unit) if unit else values
        table[col].info.description = meta[col]["description"]
    return table


def write_predictions(df: pd.DataFrame, out_dir: str | Path, stem: str = "predictions") -> dict[str, Path]:
    """Write FITS and CSV atomically (temp file + rename); returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out_dir / f"{stem}.csv", "fits": out_dir / f"{stem}.fits"}
    with atomic_path(paths["csv"]) as tmp:
        df.to_csv(tmp, index=False)
    with atomic_path(paths["fits"]) as tmp:
        Table.from_pandas(df).write(tmp, format="fits", overwrite=True)
    return paths


#: Fixed widths (characters) of string columns in streamed FITS output; others get DEFAULT_STR_WIDTH.
STR_WIDTHS = {"APOGEE_ID": 64, "SPLIT": 8, "READ_ERROR": 240, "TELESCOPE": 16, "FIELD": 32}
#: Provenance entries → (FITS keyword, comment) of the catalogue header (long values use CONTINUE cards).
PROVENANCE_KEYWORDS = {
    "stellarnet_version": ("SNVERS", "stellarnet version that wrote this catalogue"),
    "model": ("SNMODEL", "model folder or checkpoint used"),
    "model_sha256": ("SNMHASH", "SHA-256 of the model weights (+ emulator)"),
    "training_data": ("SNTRAIN", "what the model was trained on"),
    "training_cuts": ("SNCUTS", "quality cuts of the training data"),
    "refined": ("SNREFINE", "labels chi2-refined with the spectral emulator"),
    "input": ("SNINPUT", "input of the prediction run"),
    "date": ("DATE", "UTC time the catalogue was written"),
}
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

    def __init__(self, out_dir: str | Path, n_rows: int, stem: str = "predictions", overwrite: bool = False,
                 label_names: Sequence[str] = (), label_units: Sequence[str] = (),
                 provenance: Mapping[str, Any] | None = None):
        self.out_dir = Path(out_dir)
        self.paths = {"csv": self.out_dir / f"{stem}.csv", "fits": self.out_dir / f"{stem}.fits",
                      "columns": self.out_dir / f"{stem}.columns.json"}
        check_not_overwriting(self.paths.values(), overwrite)
        self.label_names, self.label_units = list(label_names), list(label_units)
        self.provenance = dict(provenance or {})
        self._columns: dict[str, dict[str, str]] = {}
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
        self._columns = column_units(list(first.columns), self.label_names, self.label_units)
        for name in first.columns:
            dt = first[name].dtype
            code = _FITS_CODES.get((dt.kind, dt.itemsize)) if dt.kind in "fi" else None
            if code is None and dt.kind in "fi":  # e.g. int16, float16
                code = ("D", ">f8") if dt.kind == "f" else ("K", ">i8")
            if code is None:
                w = STR_WIDTHS.get(name, DEFAULT_STR_WIDTH)
                code = (f"{w}A", f"S{w}")
            fields.append((name, code[1]))
            cols.append(fits.Column(name=name, format=code[0], unit=self._columns[name]["unit"] or None))
        self._dtype = np.dtype(fields)
        hdu = fits.BinTableHDU.from_columns(cols, nrows=0)
        hdu.header["NAXIS2"] = self.n_rows
        hdu.header["EXTNAME"] = "PREDICTIONS"
        for key, (fits_key, comment) in PROVENANCE_KEYWORDS.items():
            if self.provenance.get(key) is not None:
                hdu.header[fits_key] = (str(self.provenance[key]), comment)
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
        if self._fits is None:  # no chunk was written (an empty input): an empty table still has a header
            self._open_fits(pd.DataFrame({"APOGEE_ID": np.array([], dtype=object)}))
        with open(self._tmp["columns"], "w") as fh:
            fh.write(json.dumps({"columns": self._columns, "provenance": self.provenance}, indent=1, default=str))
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


# ----------------------------------------------------------------------------------------------
# part files: one per chunk, written by whichever process predicted it, merged in chunk order

PART_PATTERN = "part-{:07d}.npz"


def part_path(parts_dir: str | Path, chunk_index: int) -> Path:
    return Path(parts_dir) / PART_PATTERN.format(int(chunk_index))


def write_part(parts_dir: str | Path, chunk_index: int, frame: pd.DataFrame) -> Path:
    """One chunk's catalogue rows as ``part-<k>.npz`` (columns in order; strings as fixed-width
    unicode, so that reading needs no pickle), written atomically."""
    from stellarnet.common.files import atomic_open

    arrays = {"__columns__": np.array(list(frame.columns), dtype=str)}
    for i, name in enumerate(frame.columns):
        col = frame[name].to_numpy()
        arrays[f"c{i}"] = col.astype(str) if col.dtype == object else col
    path = part_path(parts_dir, chunk_index)
    with atomic_open(path, "wb") as fh:
        np.savez(fh, **arrays)
    return path


def read_part(path: str | Path) -> pd.DataFrame:
    """The frame of :func:`write_part` (string columns back to object dtype)."""
    with np.load(path, allow_pickle=False) as z:
        names = [str(n) for n in z["__columns__"]]
        data = {}
        for i, name in enumerate(names):
            col = z[f"c{i}"]
            data[name] = col.astype(object) if col.dtype.kind == "U" else col
    return pd.DataFrame(data)


def finished_parts(parts_dir: str | Path) -> set[int]:
    """Chunk indices whose part file exists (complete: parts are renamed into place when written)."""
    out = set()
    for p in Path(parts_dir).glob("part-*.npz"):
        try:
            out.add(int(p.stem.split("-")[1]))
        except (IndexError, ValueError):
            continue
    return out


class MissingPartsError(StellarnetError, RuntimeError):
    """A prediction run ended with chunks that have no part file (a process died): rerun to resume."""


def iter_parts(parts_dir: str | Path, n_chunks: int) -> Iterator[pd.DataFrame]:
    """Every chunk's rows, in chunk (= input) order, one part at a time. Raises
    :class:`MissingPartsError` naming the chunks without a part before yielding anything."""
    missing = sorted(set(range(n_chunks)) - finished_parts(parts_dir))
    if missing:
        raise MissingPartsError(f"{len(missing)} of {n_chunks} chunks have no part file in {parts_dir} (e.g. "
                                f"{missing[:5]}): a process stopped early; rerun the same command to predict "
                                f"only those")
    for k in range(n_chunks):
        yield read_part(part_path(parts_dir, k))
