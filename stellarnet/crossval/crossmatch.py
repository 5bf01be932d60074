"""One-to-one crossmatch of a reference catalogue (APOGEE) with a survey catalogue.

Matching runs in stages; a star matched in one stage is not offered to later ones:

1. ``gaia``: equal Gaia source ids (reference ``GAIAEDR3_SOURCE_ID`` vs survey ``GAIA_ID``),
   where both columns exist and the ids are > 0;
2. ``tmass``: equal 2MASS designations (reference ``APOGEE_ID`` without ``2M`` vs survey
   ``TMASS_ID``), where both exist and are not empty;
3. ``position``: sky separation below ``radius_arcsec`` (``SkyCoord.search_around_sky``).

Id matches are preferred because APOGEE positions are 2MASS (epoch ~2000) while e.g. GALAH's are
Gaia (epoch 2015.5): a high-proper-motion star moves by arcseconds and may fall on an unrelated
neighbour. In every stage each reference and each survey star is used at most once: candidate
pairs are accepted in order of increasing separation (greedy closest-pair assignment). A pair is
"ambiguous" when either member had more than one candidate in its stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from astropy import units as u
from astropy.coordinates import SkyCoord, search_around_sky

from stellarnet.preparation.surveys import normalize_tmass_id

__all__ = ["NoMatchError", "MatchResult", "crossmatch", "greedy_one_to_one"]

_PAIR_COLUMNS = ["ref_index", "survey_index", "sep_arcsec", "method", "n_candidates"]


class NoMatchError(RuntimeError):
    """No reference star found a survey counterpart (message gives radius and catalogue sizes)."""


@dataclass
class MatchResult:
    """Result of :func:`crossmatch`.

    pairs: DataFrame with ``ref_index``, ``survey_index`` (0-based *row positions* in the frames
    passed to :func:`crossmatch`), ``sep_arcsec`` (arcsec; NaN when a position is missing),
    ``method`` ("gaia", "tmass", "position") and ``n_candidates`` (candidates seen by the pair's
    members in its stage, 1 = unambiguous).
    n_reference / n_survey: catalogue sizes; n_ambiguous: pairs chosen among several candidates;
    radius_arcsec: position-match radius; methods: which id stages could run.
    """

    pairs: pd.DataFrame
    n_reference: int
    n_survey: int
    n_ambiguous: int
    radius_arcsec: float
    methods: dict[str, bool] = field(default_factory=dict)

    @property
    def n_matched(self) -> int:
        """Number of one-to-one pairs."""
        return len(self.pairs)

    def counts(self) -> dict[str, Any]:
        """n_apogee, n_survey, n_matched, n_ambiguous and matches per method."""
        by = self.pairs["method"].value_counts()
        return {
            "n_apogee": int(self.n_reference),
            "n_survey": int(self.n_survey),
            "n_matched": int(self.n_matched),
            "n_ambiguous": int(self.n_ambiguous),
            "by_method": {m: int(by.get(m, 0)) for m in ("gaia", "tmass", "position")},
            "id_match_available": dict(self.methods),
            "radius_arcsec": float(self.radius_arcsec),
        }

    def separation_summary(self) -> dict[str, dict[str, float]]:
        """Separation quantiles (arcsec) for all pairs and per method: n, median, p90, p99, max."""
        out: dict[str, dict[str, float]] = {}
        groups = {"all": self.pairs}
        groups.update({m: g for m, g in self.pairs.groupby("method")})
        for name, g in groups.items():
            s = g["sep_arcsec"].to_numpy(dtype=float)
            s = s[np.isfinite(s)]
            if len(s) == 0:
                out[name] = {"n": 0}
                continue
            q = np.quantile(s, [0.5, 0.9, 0.99])
            out[name] = {"n": int(len(s)), "median": float(q[0]), "p90": float(q[1]),
                         "p99": float(q[2]), "max": float(s.max())}
        return out

    def summary(self) -> dict[str, Any]:
        """Counts plus separation summary (JSON-ready)."""
        return {**self.counts(), "separation_arcsec": self.separation_summary()}

    def matched_frames(
        self, reference: pd.DataFrame, survey: pd.DataFrame
    ) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Row-aligned (reference rows, survey rows) of the pairs, both with a 0..n-1 index."""
        ref = reference.iloc[self.pairs["ref_index"].to_numpy()].reset_index(drop=True)
        sur = survey.iloc[self.pairs["survey_index"].to_numpy()].reset_index(drop=True)
        return ref, sur

    def join(
        self,
        reference: pd.DataFrame,
        survey: pd.DataFrame,
        ref_prefix: str = "REF_",
        survey_prefix: str = "SUR_",
    ) -> pd.DataFrame:
        """One row per pair: prefixed reference and survey columns + sep_arcsec and method."""
        ref, sur = self.matched_frames(reference, survey)
        out = pd.concat([ref.add_prefix(ref_prefix), sur.add_prefix(survey_prefix)], axis=1)
        out["sep_arcsec"] = self.pairs["sep_arcsec"].to_numpy()
        out["match_method"] = self.pairs["method"].to_numpy()
        return out


def greedy_one_to_one(
    i: np.ndarray, j: np.ndarray, sep: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Closest-first one-to-one selection among candidate pairs.

    i, j: candidate pair members (integer labels); sep: pair distances (NaN = worst).
    Returns (chosen positions into the candidate arrays, n_candidates per chosen pair = the
    larger of the candidate counts of its two members).
    """
    i = np.asarray(i)
    j = np.asarray(j)
    if len(i) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    key = np.where(np.isfinite(sep), sep, np.inf)
    order = np.lexsort((j, i, key))  # by separation, ties broken deterministically
    used_i: set[int] = set()
    used_j: set[int] = set()
    chosen = []
    for k in order:
        a, b = int(i[k]), int(j[k])
        if a in used_i or b in used_j:
            continue
        used_i.add(a)
        used_j.add(b)
        chosen.append(k)
    chosen_arr = np.array(chosen, dtype=np.int64)
    _, inv_i, cnt_i = np.unique(i, return_inverse=True, return_counts=True)
    _, inv_j, cnt_j = np.unique(j, return_inverse=True, return_counts=True)
    ncand = np.maximum(cnt_i[inv_i], cnt_j[inv_j])[chosen_arr]
    return chosen_arr, ncand


def _coords(df: pd.DataFrame, ra: str, dec: str) -> tuple[np.ndarray, np.ndarray]:
    missing = [c for c in (ra, dec) if c not in df.columns]
    if missing:
        raise KeyError(f"position column(s) {missing} not in catalogue (columns: {list(df.columns)})")
    return df[ra].to_numpy(dtype=float), df[dec].to_numpy(dtype=float)


def _separation_arcsec(ra1: np.ndarray, dec1: np.ndarray, ra2: np.ndarray, dec2: np.ndarray) -> np.ndarray:
    """Great-circle separation (arcsec) of paired positions given in degrees (haversine)."""
    r1, d1, r2, d2 = (np.radians(x) for x in (ra1, dec1, ra2, dec2))
    h = np.sin((d2 - d1) / 2) ** 2 + np.cos(d1) * np.cos(d2) * np.sin((r2 - r1) / 2) ** 2
    return np.degrees(2 * np.arcsin(np.sqrt(np.clip(h, 0, 1)))) * 3600.0


def crossmatch(
    reference: pd.DataFrame,
    survey: pd.DataFrame,
    radius_arcsec: float = 1.0,
    use_gaia_id: bool = True,
    use_tmass_id: bool = True,
    id_max_sep_arcsec: float | None = None,
    ref_ra: str = "RA",
    ref_dec: str = "DEC",
    survey_ra: str = "RA",
    survey_dec: str = "DEC",
    ref_gaia: str = "GAIAEDR3_SOURCE_ID",
    survey_gaia: str = "GAIA_ID",
    ref_tmass: str = "APOGEE_ID",
    survey_tmass: str = "TMASS_ID",
) -> MatchResult:
    """Match ``reference`` (APOGEE-like) to ``survey`` (common schema) one-to-one.

    radius_arcsec: position-match radius (arcsec); use_gaia_id / use_tmass_id: run the id stages
    when both catalogues have the id columns; id_max_sep_arcsec: reject id pairs farther apart
    than this (arcsec; None = no limit; pairs without positions are kept).
    Positions in degrees. Raises :class:`NoMatchError` when nothing matches.
    """
    if not radius_arcsec > 0:
        raise ValueError(f"radius_arcsec must be > 0, got {radius_arcsec}")
    ra1, dec1 = _coords(reference, ref_ra, ref_dec)
    ra2, dec2 = _coords(survey, survey_ra, survey_dec)
    n1, n2 = len(reference), len(survey)
    if n1 == 0 or n2 == 0:
        empty = " and ".join(n for n, k in (("reference", n1), ("survey", n2)) if k == 0)
        raise NoMatchError(
            f"cannot crossmatch: the {empty} catalogue is empty ({n1} reference, {n2} survey stars); "
            "check the file and its quality cuts (the cut report says which cut removed every row)"
        )
    free1 = np.ones(n1, dtype=bool)
    free2 = np.ones(n2, dtype=bool)
    parts: list[pd.DataFrame] = []
    methods: dict[str, bool] = {}

    def accept(i: np.ndarray, j: np.ndarray, sep: np.ndarray, method: str) -> None:
        chosen, ncand = greedy_one_to_one(i, j, sep)
        ci, cj = i[chosen], j[chosen]
        free1[ci] = False
        free2[cj] = False
        parts.append(pd.DataFrame({
            "ref_index": ci.astype(np.int64), "survey_index": cj.astype(np.int64),
            "sep_arcsec": sep[chosen].astype(float), "method": method,
            "n_candidates": ncand.astype(np.int64),
        }))

    def id_stage(method: str, k1: np.ndarray, k2: np.ndarray, ok1: np.ndarray, ok2: np.ndarray) -> None:
        a = pd.DataFrame({"key": k1[ok1 & free1], "i": np.flatnonzero(ok1 & free1)})
        b = pd.DataFrame({"key": k2[ok2 & free2], "j": np.flatnonzero(ok2 & free2)})
        m = a.merge(b, on="key", how="inner")
        i, j = m["i"].to_numpy(np.int64), m["j"].to_numpy(np.int64)
        sep = _separation_arcsec(ra1[i], dec1[i], ra2[j], dec2[j])
        if id_max_sep_arcsec is not None:
            keep = ~(sep > id_max_sep_arcsec)
            i, j, sep = i[keep], j[keep], sep[keep]
        accept(i, j, sep, method)

    # an id stage "is available" when both sides have the column with at least one valid id
    methods["gaia"] = False
    if use_gaia_id and ref_gaia in reference.columns and survey_gaia in survey.columns:
        g1 = pd.to_numeric(reference[ref_gaia], errors="coerce").fillna(0).to_numpy(np.int64)
        g2 = pd.to_numeric(survey[survey_gaia], errors="coerce").fillna(0).to_numpy(np.int64)
        methods["gaia"] = bool((g1 > 0).any() and (g2 > 0).any())
        if methods["gaia"]:
            id_stage("gaia", g1, g2, g1 > 0, g2 > 0)
    methods["tmass"] = False
    if use_tmass_id and ref_tmass in reference.columns and survey_tmass in survey.columns:
        t1 = normalize_tmass_id(reference[ref_tmass])
        t2 = normalize_tmass_id(survey[survey_tmass])
        methods["tmass"] = bool((t1 != "").any() and (t2 != "").any())
        if methods["tmass"]:
            id_stage("tmass", t1, t2, t1 != "", t2 != "")

    ok1 = free1 & np.isfinite(ra1) & np.isfinite(dec1)
    ok2 = free2 & np.isfinite(ra2) & np.isfinite(dec2)
    if ok1.any() and ok2.any():
        idx1, idx2 = np.flatnonzero(ok1), np.flatnonzero(ok2)
        c1 = SkyCoord(ra1[idx1] * u.deg, dec1[idx1] * u.deg)
        c2 = SkyCoord(ra2[idx2] * u.deg, dec2[idx2] * u.deg)
        a, b, sep2d, _ = search_around_sky(c1, c2, radius_arcsec * u.arcsec)
        accept(idx1[a], idx2[b], sep2d.to_value(u.arcsec), "position")
    else:
        parts.append(pd.DataFrame({c: [] for c in _PAIR_COLUMNS}))

    pairs = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=_PAIR_COLUMNS)
    pairs = pairs.astype({"ref_index": np.int64, "survey_index": np.int64, "sep_arcsec": float,
                          "n_candidates": np.int64})
    pairs = pairs.sort_values("ref_index", kind="stable").reset_index(drop=True)
    if len(pairs) == 0:
        ids = [m for m, ok in methods.items() if ok]
        raise NoMatchError(
            f"no matches between the reference catalogue ({n1} stars) and the survey catalogue "
            f"({n2} stars) within radius {radius_arcsec} arcsec"
            + (f" or by id ({', '.join(ids)})" if ids else " (no id columns to match on)")
            + "; check the positions (degrees), the epoch and the radius"
        )
    n_amb = int((pairs["n_candidates"] > 1).sum())
    return MatchResult(pairs=pairs, n_reference=n1, n_survey=n2, n_ambiguous=n_amb,
                       radius_arcsec=float(radius_arcsec), methods=methods)
