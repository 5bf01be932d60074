"""Calibrating labels onto another survey's scale: a polynomial in the labels fitted to the matched
stars' differences (saved as JSON), and applied to a catalogue."""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stellarnet.common.stats import robust_scatter
from stellarnet.crossval.offsets import (
    DEFAULT_LABELS,
    TREND_AXES,
    UNITS,
    LabelMap,
    _check_aligned,
    _values,
    resolve_labels,
)
from stellarnet.crossval.robust_fit import robust_linear_fit

# --------------------------------------------------------------------------- calibration

CALIBRATION_FORMAT = "stellarnet-crossval-calibration"


def _exponents(n_features: int, degree: int) -> list[tuple[int, ...]]:
    """All monomial exponent tuples of total degree ≤ degree (constant first)."""
    out: list[tuple[int, ...]] = []
    for d in range(degree + 1):
        for combo in itertools.combinations_with_replacement(range(n_features), d):
            e = [0] * n_features
            for k in combo:
                e[k] += 1
            out.append(tuple(e))
    return out


@dataclass
class Calibration:
    """Per-label transformation reference → survey scale (plain data, JSON round-trip).

    ``calibrated = reference_value + Σ_k coef_k · Π_f x_f^{e_kf}`` with scaled features
    ``x_f = (column_f − center_f)/scale_f``. survey / reference: names; degree: total polynomial
    degree; features: [{"name", "column", "center", "scale"}]; exponents: one list per term;
    labels: name → {"input_column", "output_column", "coefficients", "n_train"}.
    """

    survey: str
    reference: str
    degree: int
    features: list[dict[str, Any]]
    exponents: list[list[int]]
    labels: dict[str, dict[str, Any]]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict (format tag + version)."""
        return {"format": CALIBRATION_FORMAT, "version": 1, "survey": self.survey,
                "reference": self.reference, "degree": int(self.degree),
                "model": "output = input + sum_k coefficients[k] * prod_f x_f**exponents[k][f]; "
                         "x_f = (column_f - center_f) / scale_f",
                "features": self.features, "exponents": self.exponents, "labels": self.labels}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the calibration as JSON; returns the path."""
        path = Path(path)
        path.write_text(json.dumps(self.as_dict(), indent=2))
        return path

    @classmethod
    def load(cls, src: "str | os.PathLike | Mapping[str, Any] | Calibration") -> "Calibration":
        """From a JSON path, a dict (as written by :meth:`as_dict`) or a Calibration."""
        if isinstance(src, Calibration):
            return src
        d = dict(src) if isinstance(src, Mapping) else json.loads(Path(src).read_text())
        if d.get("format") != CALIBRATION_FORMAT:
            raise ValueError(f"not a {CALIBRATION_FORMAT} file (format={d.get('format')!r})")
        return cls(survey=d["survey"], reference=d["reference"], degree=int(d["degree"]),
                   features=list(d["features"]), exponents=[list(e) for e in d["exponents"]],
                   labels=dict(d["labels"]))

    def design(self, df: pd.DataFrame) -> np.ndarray:
        """(n, n_terms) design matrix of the scaled feature monomials (NaN where inputs are)."""
        missing = [f["column"] for f in self.features if f["column"] not in df.columns]
        if missing:
            raise KeyError(f"calibration needs feature column(s) {missing}; frame has {list(df.columns)}")
        X = np.column_stack([(_values(df, f["column"]) - f["center"]) / f["scale"]
                             for f in self.features]) if self.features else np.zeros((len(df), 0))
        E = np.asarray(self.exponents, dtype=float).reshape(len(self.exponents), len(self.features))
        with np.errstate(invalid="ignore"):
            return np.prod(X[:, None, :] ** E[None, :, :], axis=2)


def fit_calibration(
    reference: pd.DataFrame,
    survey: pd.DataFrame,
    labels: LabelMap = DEFAULT_LABELS,
    features: Sequence[str] = ("teff", "logg", "fe_h"),
    degree: int = 1,
    train_fraction: float = 0.5,
    seed: int = 0,
    survey_name: str = "survey",
    reference_name: str = "apogee",
    axes: Mapping[str, tuple[str, float, float]] = TREND_AXES,
) -> tuple[Calibration, pd.DataFrame]:
    """Fit reference → survey transformations on a random training part, validate on the rest.

    Per label, the robust fit models Δ = survey − reference as a polynomial of total degree
    ``degree`` in the scaled reference features (names of :data:`TREND_AXES`), so that
    ``survey ≈ reference + poly(features)``. The split is one seeded random permutation of the
    matched pairs (``train_fraction`` for training). Returns (calibration, validation report)
    with per label: n_train, n_val and, on the validation part, median / robust scatter / RMS of
    survey − reference before and survey − calibrated after (label units).
    """
    _check_aligned(reference, survey)
    if not 0 < train_fraction < 1:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    lab = resolve_labels(reference, survey, labels)
    feats = []
    for fname in features:
        axis_label, center, scale = axes[fname]
        if axis_label not in lab:
            raise KeyError(f"calibration feature {fname!r} needs label {axis_label!r} on both sides")
        feats.append({"name": fname, "column": lab[axis_label][0], "center": float(center),
                      "scale": float(scale)})
    exps = [list(e) for e in _exponents(len(feats), degree)]
    calib = Calibration(survey=survey_name, reference=reference_name, degree=int(degree),
                        features=feats, exponents=exps, labels={})
    n = len(reference)
    perm = np.random.default_rng(seed).permutation(n)
    n_train = int(round(train_fraction * n))
    train = np.zeros(n, dtype=bool)
    train[perm[:n_train]] = True
    X = calib.design(reference)
    rows = []
    for name, (rc, sc) in lab.items():
        ref = _values(reference, rc)
        sur = _values(survey, sc)
        d = sur - ref
        ok = np.isfinite(d) & np.all(np.isfinite(X), axis=1)
        tr, va = ok & train, ok & ~train
        if tr.sum() < X.shape[1] + 1 or va.sum() < 2:
            continue
        fit = robust_linear_fit(X[tr], d[tr], n_boot=0)
        calib.labels[name] = {"input_column": rc, "output_column": f"{name.upper()}_{survey_name.upper()}",
                              "survey_column": sc, "coefficients": [float(c) for c in fit.coef],
                              "n_train": int(tr.sum())}
        after = sur[va] - (ref[va] + X[va] @ fit.coef)
        before = d[va]
        rows.append({"label": name, "unit": UNITS.get(name, ""), "n_train": int(tr.sum()),
                     "n_val": int(va.sum()),
                     "before_median": float(np.median(before)), "before_scatter": robust_scatter(before),
                     "before_rms": float(np.sqrt(np.mean(before**2))),
                     "after_median": float(np.median(after)), "after_scatter": robust_scatter(after),
                     "after_rms": float(np.sqrt(np.mean(after**2)))})
    cols = ["label", "unit", "n_train", "n_val", "before_median", "before_scatter", "before_rms",
            "after_median", "after_scatter", "after_rms"]
    return calib, pd.DataFrame(rows, columns=cols).set_index("label")


def apply_calibration(
    df: pd.DataFrame, calib: "Calibration | Mapping[str, Any] | str | os.PathLike"
) -> pd.DataFrame:
    """Copy of ``df`` with one calibrated column per label (``output_column`` of the JSON,
    e.g. ``TEFF_GALAH``), in the survey's scale and the label's unit; NaN where inputs are NaN.

    calib: a :class:`Calibration`, its dict, or the path of its JSON file.
    """
    cal = Calibration.load(calib)
    missing = [v["input_column"] for v in cal.labels.values() if v["input_column"] not in df.columns]
    if missing:
        raise KeyError(f"calibration needs label column(s) {missing}; frame has {list(df.columns)}")
    X = cal.design(df)
    out = df.copy()
    for spec in cal.labels.values():
        out[spec["output_column"]] = _values(df, spec["input_column"]) + X @ np.asarray(
            spec["coefficients"], dtype=float)
    return out
