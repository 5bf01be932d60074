"""Features derived from catalogue columns: colours and absolute magnitudes (mag), the reduced proper
motion H = m + 5 log10(μ / mas yr⁻¹) − 10 (mag), and abundance ratios (dex)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from stellarnet.common.files import to_plain
from stellarnet.preparation.photometry import MIN_PARALLAX_SNR, PHOT_FEATURES, photometric_features

_MAG_LIMIT = 50.0  # |mag| >= this is a placeholder value, not a magnitude


# --------------------------------------------------------------------------- catalogue features


def _num(df: pd.DataFrame, name: str) -> np.ndarray:
    """Column as a writable float64 array (NaN where absent or non-numeric)."""
    if name not in df.columns:
        return np.full(len(df), np.nan)
    v = pd.to_numeric(df[name], errors="coerce").to_numpy(dtype=float, na_value=np.nan)
    return np.array(v, dtype=float, copy=True)


def reduced_proper_motion(
    k_mag: np.ndarray, a_k: np.ndarray, pmra: np.ndarray, pmdec: np.ndarray
) -> np.ndarray:
    """Dereddened reduced proper motion (mag): ``H_K = (K − A_K) + 5 log10(μ/1000) + 5``.

    ``μ = sqrt(pmra² + pmdec²)`` in mas/yr (Gaia ``pmra`` already includes cos δ), so μ/1000 is
    in arcsec/yr. NaN where K or μ is missing, K is a placeholder (|K| ≥ 50) or μ ≤ 0.
    """
    k = np.asarray(k_mag, dtype=float)
    ak = np.asarray(a_k, dtype=float)
    mu = np.hypot(np.asarray(pmra, dtype=float), np.asarray(pmdec, dtype=float))
    with np.errstate(invalid="ignore", divide="ignore"):
        ok = np.isfinite(k) & (np.abs(k) < _MAG_LIMIT) & np.isfinite(mu) & (mu > 0) & np.isfinite(ak)
        return np.where(ok, k - ak + 5.0 * np.log10(np.where(ok, mu, 1.0) / 1000.0) + 5.0, np.nan)


def colour_magnitude_features(
    df: pd.DataFrame,
    min_parallax_snr: float = MIN_PARALLAX_SNR,
    reduced_pm: bool = True,
    rpm_only_without_parallax: bool = True,
) -> pd.DataFrame:
    """:func:`stellarnet.preparation.photometry.photometric_features` (``PHOT_FEATURES``) plus ``A_K``
    (mag) and, if ``reduced_pm``, ``H_K`` (mag, :func:`reduced_proper_motion`). With
    ``rpm_only_without_parallax`` H_K is NaN where the parallax is good (ϖ > 0 and
    ϖ/σ_ϖ > ``min_parallax_snr``, i.e. where ``M_K`` can be used instead)."""
    phot = photometric_features(df, min_parallax_snr=min_parallax_snr, with_extinction=True)
    out = phot[list(PHOT_FEATURES)].astype(float)
    out["A_K"] = phot["A_K"].astype(float)
    if reduced_pm:
        hk = reduced_proper_motion(_num(df, "K"), out["A_K"].to_numpy(), _num(df, "GAIAEDR3_PMRA"),
                                   _num(df, "GAIAEDR3_PMDEC"))
        if rpm_only_without_parallax:
            plx, eplx = _num(df, "GAIAEDR3_PARALLAX"), _num(df, "GAIAEDR3_PARALLAX_ERROR")
            with np.errstate(invalid="ignore", divide="ignore"):
                good_plx = (plx > 0) & (eplx > 0) & (plx / eplx > min_parallax_snr)
            hk = np.where(good_plx, np.nan, hk)
        out["H_K"] = hk
    return out


def abundance_ratios(df: pd.DataFrame, ratios: Mapping[str, Sequence[str]]) -> pd.DataFrame:
    """Abundance-ratio features (dex) from allStar ``X_FE`` columns.

    ``ratios``: name → ``[a]`` (the column itself, e.g. ``MG_FE``) or ``[a, b]`` (``a − b``, e.g.
    ``C_N: [C_FE, N_FE]`` gives [C/N] = [C/Fe] − [N/Fe]). Absent columns give NaN.
    """
    out = {}
    for name, cols in to_plain(ratios).items():
        cols = [cols] if isinstance(cols, str) else list(cols)
        if len(cols) == 1:
            out[str(name)] = _num(df, cols[0])
        elif len(cols) == 2:
            out[str(name)] = _num(df, cols[0]) - _num(df, cols[1])
        else:
            raise ValueError(f"abundance ratio {name!r}: give [a] or [a, b] column names, got {cols!r}")
    return pd.DataFrame(out, index=df.index)
