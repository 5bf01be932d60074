"""Readers for the GALAH DR3 and LAMOST DR7 (LRS) stellar-parameter catalogues.

Both catalogues are read with :func:`stellarnet.io.catalogs.read_allstar` (memory-mapped,
column-selective, big-endian → native, stripped strings, −9999/−999 → NaN in float columns,
case-insensitive column names), quality cuts are applied on the survey's own columns, and the
result is mapped onto one common schema (:data:`COMMON_COLUMNS`):

=================  ==========================================================  ======
column             meaning                                                     unit
=================  ==========================================================  ======
``SURVEY_ID``      spectrum id (GALAH ``sobject_id``, LAMOST ``obsid``)
``STAR_ID``        star id (GALAH ``star_id``, LAMOST ``designation``)
``RA``, ``DEC``    position (GALAH: Gaia DR2, epoch 2015.5; LAMOST: ICRS)      deg
``TEFF``           effective temperature (+ ``TEFF_ERR``)                      K
``LOGG``           surface gravity (+ ``LOGG_ERR``)                            dex
``FE_H``           [Fe/H] (+ ``FE_H_ERR``)                                     dex
``ALPHA_FE``       [α/Fe] (+ ``ALPHA_FE_ERR``); NaN where absent (LAMOST LRS)  dex
``TMASS_ID``       2MASS designation (``hhmmssss+ddmmsss``), "" where absent
``GAIA_ID``        Gaia (E)DR3 source id (int64), 0 where absent
=================  ==========================================================  ======

The column mapping and the cuts are plain data (the Hydra group ``conf/survey/*.yaml`` holds the
same content as :data:`GALAH_DR3` / :data:`LAMOST_DR7`). A mapping value is one source column
name or a list of candidates (the first present wins); ``None`` means "not provided by this
survey" (filled with NaN / "" / 0).

Cut specifications (ordered mapping name → spec, applied to the *source* columns):

* ``{column: c, eq|ne|gt|ge|lt|le: value}`` keep rows where the comparison holds (NaN fails);
* ``{finite: [c1, c2, ...]}`` keep rows where all listed columns are finite;
* ``{unique: c, by: s}`` keep one row per value of ``c``, the one with the largest ``s``;
* any spec may add ``mask: [COMMON_COLUMN, ...]``: rows failing the test are kept but those
  common-schema columns are set to NaN (e.g. GALAH ``flag_alpha_fe != 0`` blanks only [α/Fe]);
* ``reason``: free text for the report; ``enabled: false`` skips the cut.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stellarnet.common.files import to_plain
from stellarnet.io.catalogs import CatalogFormatError, MissingColumnError, allstar_columns, read_allstar
from stellarnet.preparation.cuts import apply_cuts

__all__ = [
    "COMMON_COLUMNS",
    "LABEL_COLUMNS",
    "GALAH_DR3",
    "LAMOST_DR7",
    "SURVEYS",
    "SurveySpec",
    "SurveyCatalog",
    "CatalogFormatError",
    "MissingColumnError",
    "survey_spec",
    "read_survey",
    "read_galah",
    "read_lamost",
    "apply_survey_cuts",
    "normalize_tmass_id",
]

#: Float label columns of the common schema (value, error) in K / dex.
LABEL_COLUMNS: tuple[str, ...] = (
    "TEFF", "TEFF_ERR", "LOGG", "LOGG_ERR", "FE_H", "FE_H_ERR", "ALPHA_FE", "ALPHA_FE_ERR",
)
#: The common schema every survey reader returns (in this order).
COMMON_COLUMNS: tuple[str, ...] = (
    "SURVEY_ID", "STAR_ID", "RA", "DEC", *LABEL_COLUMNS, "TMASS_ID", "GAIA_ID",
)
_FLOAT_COLUMNS = ("RA", "DEC", *LABEL_COLUMNS)
_STRING_COLUMNS = ("STAR_ID", "TMASS_ID")
_REQUIRED_COMMON = ("RA", "DEC", "TEFF", "LOGG", "FE_H")


@dataclass(frozen=True)
class SurveySpec:
    """How to read one survey catalogue.

    name: short name ("galah", "lamost"); path: file path relative to the survey root;
    hdu: table HDU; columns: common column → source column (str, list of candidates, or None);
    cuts: ordered cut specs (module docstring).
    """

    name: str
    path: str
    columns: Mapping[str, str | Sequence[str] | None]
    cuts: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    hdu: int | str = 1

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "SurveySpec":
        """Build from a plain mapping / OmegaConf node with keys name, path, columns, cuts, hdu."""
        cfg = to_plain(cfg)
        return cls(
            name=str(cfg["name"]),
            path=str(cfg["path"]),
            columns=dict(cfg["columns"]),
            cuts=dict(cfg.get("cuts") or {}),
            hdu=cfg.get("hdu", 1),
        )


GALAH_DR3 = SurveySpec(
    name="galah",
    path="galah/GALAH_DR3_main_allstar_v2.fits",
    columns={
        "SURVEY_ID": "sobject_id",
        "STAR_ID": "star_id",
        "RA": ["ra_dr2", "ra"],
        "DEC": ["dec_dr2", "dec"],
        "TEFF": "teff", "TEFF_ERR": "e_teff",
        "LOGG": "logg", "LOGG_ERR": "e_logg",
        "FE_H": "fe_h", "FE_H_ERR": "e_fe_h",
        "ALPHA_FE": "alpha_fe", "ALPHA_FE_ERR": "e_alpha_fe",
        "TMASS_ID": "tmass_id",
        "GAIA_ID": ["dr3_source_id", "source_id"],
    },
    cuts={
        "flag_sp": {"column": "flag_sp", "eq": 0, "reason": "stellar-parameter flag set"},
        "flag_fe_h": {"column": "flag_fe_h", "eq": 0, "reason": "[Fe/H] flagged"},
        "snr": {"column": "snr_c3_iraf", "gt": 30, "reason": "S/N (red camera) <= 30"},
        "flag_repeat": {"column": "flag_repeat", "eq": 0, "reason": "not the best repeat"},
        "finite": {"finite": ["teff", "logg", "fe_h"], "reason": "non-finite parameters"},
        "flag_alpha_fe": {
            "column": "flag_alpha_fe", "eq": 0, "mask": ["ALPHA_FE", "ALPHA_FE_ERR"],
            "reason": "[alpha/Fe] flagged (only [alpha/Fe] blanked)",
        },
    },
)

LAMOST_DR7 = SurveySpec(
    name="lamost",
    path="lamost/LAMOST_LRS_DR7_v2_stellar.fits",
    columns={
        "SURVEY_ID": "obsid",
        "STAR_ID": "designation",
        "RA": "ra",
        "DEC": "dec",
        "TEFF": "teff", "TEFF_ERR": "teff_err",
        "LOGG": "logg", "LOGG_ERR": "logg_err",
        "FE_H": "feh", "FE_H_ERR": "feh_err",
        "ALPHA_FE": None, "ALPHA_FE_ERR": None,
        "TMASS_ID": None,
        "GAIA_ID": None,
    },
    cuts={
        "snrg": {"column": "snrg", "gt": 20, "reason": "S/N (g band) <= 20"},
        "finite": {"finite": ["teff", "logg", "feh"], "reason": "non-finite parameters"},
        "unique": {"unique": "designation", "by": "snrg",
                   "reason": "repeat spectrum (highest snrg kept)"},
    },
)

SURVEYS: dict[str, SurveySpec] = {"galah": GALAH_DR3, "lamost": LAMOST_DR7}


@dataclass
class SurveyCatalog:
    """A survey catalogue in the common schema.

    data: DataFrame with :data:`COMMON_COLUMNS` (index 0..n-1);
    cut_report: DataFrame (name, reason, before, removed, masked, kept);
    name: survey name; path: the file read; n_read: rows in the file.
    """

    data: pd.DataFrame
    cut_report: pd.DataFrame
    name: str
    path: Path
    n_read: int



def survey_spec(survey: str | SurveySpec | Mapping[str, Any]) -> SurveySpec:
    """A :class:`SurveySpec` from a name ("galah"/"lamost"), a spec, or a config mapping."""
    if isinstance(survey, SurveySpec):
        return survey
    if isinstance(survey, str):
        try:
            return SURVEYS[survey.lower()]
        except KeyError:
            raise ValueError(f"unknown survey {survey!r}; known: {sorted(SURVEYS)}") from None
    return SurveySpec.from_config(survey)


def normalize_tmass_id(ids: Sequence[Any] | pd.Series) -> np.ndarray:
    """2MASS designations in one canonical form for matching (object array of str).

    Strips blanks, upper-cases and removes the prefixes ``2MASS``, ``2M`` and ``J``, so
    APOGEE ``2M16003728-1844282``, GALAH ``16003728-1844282`` and ``2MASS J16003728-1844282``
    compare equal. Missing/empty/"nan" ids → "".
    """
    out = np.empty(len(ids), dtype=object)
    for i, v in enumerate(np.asarray(ids, dtype=object)):
        if v is None or (isinstance(v, float) and not np.isfinite(v)):
            out[i] = ""
            continue
        s = v.decode("ascii", "replace") if isinstance(v, bytes) else str(v)
        s = s.strip().upper().replace(" ", "")
        if s.startswith("2MASS") and len(s) > 5 and (s[5] == "J" or s[5].isdigit()):
            s = s[5:]
        for prefix in ("2M", "J"):
            if s.startswith(prefix) and len(s) > len(prefix) and s[len(prefix)].isdigit():
                s = s[len(prefix):]
        out[i] = "" if s in ("", "NAN", "NONE", "N/A") else s
    return out


def _candidates(value: str | Sequence[str] | None) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


def _resolve(available: Sequence[str], names: Sequence[str]) -> str | None:
    """The first of ``names`` present in ``available`` (case-insensitive), as spelled in the file."""
    upper = {a.upper(): a for a in available if isinstance(a, str)}  # a damaged header can leave a column unnamed
    for n in names:
        if n.upper() in upper:
            return upper[n.upper()]
    return None


def _cut_columns(cuts: Mapping[str, Mapping[str, Any]]) -> list[str]:
    cols: list[str] = []
    for spec in cuts.values():
        if not spec.get("enabled", True):
            continue
        for key in ("column", "flag"):
            if key in spec:
                cols.append(str(spec[key]))
        cols.extend(str(c) for c in spec.get("finite", []) or [])
        if "unique" in spec:
            cols.extend([str(spec["unique"]), str(spec["by"])])
    return cols


def apply_survey_cuts(
    df: pd.DataFrame,
    cuts: Mapping[str, Mapping[str, Any]],
    mask_targets: Mapping[str, Sequence[str]] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Apply ordered cut specs (:func:`stellarnet.preparation.cuts.apply_cuts`, the one cut engine) to
    a raw survey frame, its column names looked up case-insensitively (survey tables spell them their
    own way). ``mask_targets`` maps a common column named in a spec's ``mask`` to the frame columns to
    blank. Returns (kept frame, report DataFrame with columns name, criterion, reason, before, removed,
    masked, kept). Raises :class:`MissingColumnError` naming every cut column that is absent."""
    cols = list(df.columns)
    missing = sorted({c for c in _cut_columns(cuts) if _resolve(cols, [c]) is None})
    if missing:
        raise MissingColumnError(missing, "survey table (columns used by quality cuts)", cols)
    resolved = {}
    for name, spec in cuts.items():
        spec = dict(spec)
        for key in ("column", "flag", "unique", "by"):
            if key in spec:
                spec[key] = _resolve(cols, [spec[key]])
        if "finite" in spec:
            spec["finite"] = [_resolve(cols, [c]) for c in spec["finite"]]
        resolved[name] = spec
    kept, report = apply_cuts(df, resolved, mask_targets=mask_targets, allow_empty=True)
    return kept, report.to_frame(masked=True)


def read_survey(
    path: str | os.PathLike,
    spec: str | SurveySpec | Mapping[str, Any],
    apply_cuts: bool = True,
) -> SurveyCatalog:
    """Read a survey catalogue file, apply its quality cuts and map it to the common schema.

    path: the FITS file; spec: survey name, :class:`SurveySpec` or config mapping;
    apply_cuts: False → no quality cuts (report empty).

    Raises FileNotFoundError, :class:`CatalogFormatError` (not a FITS table) and
    :class:`MissingColumnError` naming every absent mapped or cut column.
    """
    spec = survey_spec(spec)
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{spec.name} catalogue not found: {path}")
    available = allstar_columns(path, hdu=spec.hdu)

    source: dict[str, str | None] = {}
    missing: list[str] = []
    for common in COMMON_COLUMNS:
        cands = _candidates(spec.columns.get(common))
        if not cands:
            source[common] = None
            continue
        hit = _resolve(available, cands)
        if hit is None:
            missing.append(" or ".join(cands) + f" (for {common})")
        source[common] = hit
    for req in _REQUIRED_COMMON:
        if not _candidates(spec.columns.get(req)):
            raise ValueError(f"survey spec {spec.name!r} maps no source column to {req}")
    cuts = spec.cuts if apply_cuts else {}
    cut_cols = _cut_columns(cuts)
    missing += [c for c in dict.fromkeys(cut_cols) if _resolve(available, [c]) is None]
    if missing:
        raise MissingColumnError(missing, f"{spec.name} catalogue {path}", available)

    read_cols = list(dict.fromkeys(
        [s for s in source.values() if s is not None] + [_resolve(available, [c]) for c in cut_cols]
    ))
    raw = read_allstar(path, columns=read_cols, hdu=spec.hdu).reset_index(drop=True)
    n_read = len(raw)
    mask_targets = {c: [s] for c, s in source.items() if s is not None}
    kept, report = apply_survey_cuts(raw, cuts, mask_targets)

    out: dict[str, np.ndarray] = {}
    n = len(kept)
    for common in COMMON_COLUMNS:
        s = source[common]
        if common in _FLOAT_COLUMNS:
            out[common] = (kept[s].to_numpy(dtype=np.float64) if s else np.full(n, np.nan))
        elif common == "TMASS_ID":
            out[common] = normalize_tmass_id(kept[s]) if s else np.full(n, "", dtype=object)
        elif common == "GAIA_ID":
            out[common] = _gaia_ids(kept[s].to_numpy()) if s else np.zeros(n, dtype=np.int64)
        elif common in _STRING_COLUMNS:
            out[common] = (kept[s].astype(str).to_numpy(dtype=object) if s
                           else np.full(n, "", dtype=object))
        else:  # SURVEY_ID: keep its native type
            out[common] = kept[s].to_numpy() if s else np.arange(n)
    data = pd.DataFrame(out, columns=list(COMMON_COLUMNS))
    for c in LABEL_COLUMNS:  # −9999 sentinels in integer-typed source columns, just in case
        data.loc[data[c] <= -999, c] = np.nan
    return SurveyCatalog(data=data, cut_report=report, name=spec.name, path=path, n_read=n_read)


def _gaia_ids(values: np.ndarray) -> np.ndarray:
    """Gaia source ids as int64 with 0 for missing (NaN, masked, negative, non-numeric)."""
    if values.dtype.kind in "iu":
        ids = values.astype(np.int64)
    elif values.dtype.kind == "f":
        ids = np.where(np.isfinite(values), values, 0).astype(np.int64)
    else:
        ids = pd.to_numeric(pd.Series(values), errors="coerce").fillna(0).to_numpy(np.int64)
    ids[ids < 0] = 0
    return ids


def read_galah(path: str | os.PathLike, spec: SurveySpec | Mapping[str, Any] = GALAH_DR3,
               apply_cuts: bool = True) -> SurveyCatalog:
    """Read ``GALAH_DR3_main_allstar_v2.fits`` (see :func:`read_survey`)."""
    return read_survey(path, spec, apply_cuts=apply_cuts)


def read_lamost(path: str | os.PathLike, spec: SurveySpec | Mapping[str, Any] = LAMOST_DR7,
                apply_cuts: bool = True) -> SurveyCatalog:
    """Read the LAMOST DR7 LRS stellar-parameter catalogue (see :func:`read_survey`)."""
    return read_survey(path, spec, apply_cuts=apply_cuts)
