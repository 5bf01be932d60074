"""Dereddened colours and absolute magnitudes from allStar photometry (survey-facts §9).

Extinction: A_Ks from ``AK_TARG`` (RJCE, used for targeting); where that is NaN or a negative
sentinel (< −0.5 mag: −1, −999, −9999) ``AK_WISE`` is used; where both are unusable A_Ks = 0
and the source flag says so. Small negative RJCE values (−0.5 ≤ A_Ks < 0, noise) are clipped to 0.
Other bands scale with :data:`EXTINCTION_RATIOS` (A_X / A_Ks): J 2.5, H 1.55 (Indebetouw et al.
2005), V 8.8, G 0.79·8.8, BP 1.0·8.8, RP 0.59·8.8.

Features (:data:`PHOT_FEATURES`, all in mag):

* ``JH0 = (J − H) − (A_J − A_H)``, ``HK0 = (H − Ks) − (A_H − A_Ks)``, ``JK0 = (J − Ks) − 1.5 A_Ks``
* ``BPRP0 = (BP − RP) − (A_BP − A_RP)``
* ``M_K = Ks − A_Ks − 5 log10(1000/ϖ) + 5``, ``M_G = G − A_G − 5 log10(1000/ϖ) + 5`` (ϖ in mas),
  only where ϖ > 0 and ϖ/σ_ϖ > ``min_parallax_snr`` (5), else NaN.

Missing inputs (absent columns, NaN, |mag| ≥ 50 placeholder values) give NaN features, never
an error.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = [
    "PHOT_FEATURES",
    "EXTINCTION_RATIOS",
    "AK_SOURCES",
    "MIN_PARALLAX_SNR",
    "k_extinction",
    "photometric_features",
]

PHOT_FEATURES: tuple[str, ...] = ("JH0", "HK0", "JK0", "BPRP0", "M_K", "M_G")

_A_V = 8.8
#: A_X / A_Ks per band (survey-facts §9).
EXTINCTION_RATIOS: dict[str, float] = {
    "J": 2.5,
    "H": 1.55,
    "K": 1.0,
    "V": _A_V,
    "G": 0.79 * _A_V,
    "BP": 1.0 * _A_V,
    "RP": 0.59 * _A_V,
}

#: Codes of the ``AK_SOURCE`` column returned by :func:`k_extinction`.
AK_SOURCES: tuple[str, ...] = ("AK_TARG", "AK_WISE", "none")

MIN_PARALLAX_SNR = 5.0
_AK_SENTINEL_BELOW = -0.5  # A_Ks below this (mag) is a missing-value marker, not a measurement
_MAG_LIMIT = 50.0  # |mag| >= this is a placeholder (99.99, -9999), not a magnitude

COLUMNS = {
    "J": "J",
    "H": "H",
    "K": "K",
    "G": "GAIAEDR3_PHOT_G_MEAN_MAG",
    "BP": "GAIAEDR3_PHOT_BP_MEAN_MAG",
    "RP": "GAIAEDR3_PHOT_RP_MEAN_MAG",
    "PARALLAX": "GAIAEDR3_PARALLAX",
    "PARALLAX_ERROR": "GAIAEDR3_PARALLAX_ERROR",
}


def _col(df: pd.DataFrame, name: str) -> np.ndarray:
    """Column as float64 (NaN where absent)."""
    if name not in df.columns:
        return np.full(len(df), np.nan)
    vals = pd.to_numeric(df[name], errors="coerce").to_numpy(dtype=float, na_value=np.nan)
    return np.array(vals, dtype=float, copy=True)  # writable (pandas copy-on-write views are not)


def _mag(df: pd.DataFrame, name: str) -> np.ndarray:
    m = _col(df, name)
    m[~(np.abs(m) < _MAG_LIMIT)] = np.nan
    return m


def k_extinction(df: pd.DataFrame) -> pd.DataFrame:
    """A_Ks (mag) per row and where it came from.

    Returns a DataFrame (index of ``df``) with ``A_K`` (float, mag, ≥ 0) and ``AK_SOURCE``
    (int: 0 ``AK_TARG``, 1 ``AK_WISE``, 2 none → A_K = 0).
    """
    targ = _col(df, "AK_TARG")
    wise = _col(df, "AK_WISE")

    def usable(a: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore"):
            return np.isfinite(a) & (a >= _AK_SENTINEL_BELOW)

    ok_t, ok_w = usable(targ), usable(wise)
    ak = np.where(ok_t, targ, np.where(ok_w, wise, 0.0))
    ak = np.clip(ak, 0.0, None)
    src = np.where(ok_t, 0, np.where(ok_w, 1, 2)).astype(np.int8)
    return pd.DataFrame({"A_K": ak, "AK_SOURCE": src}, index=df.index)


def photometric_features(
    df: pd.DataFrame,
    min_parallax_snr: float = MIN_PARALLAX_SNR,
    with_extinction: bool = False,
) -> pd.DataFrame:
    """Dereddened colours and absolute magnitudes (mag), columns :data:`PHOT_FEATURES`.

    ``min_parallax_snr``: absolute magnitudes only where ϖ/σ_ϖ exceeds it (and ϖ > 0).
    ``with_extinction``: also return ``A_K`` and ``AK_SOURCE`` (see :func:`k_extinction`).
    The result has the index of ``df``; absent input columns give NaN features.
    """
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"photometric_features needs a pandas DataFrame, got {type(df).__name__}")
    if not np.isfinite(min_parallax_snr) or min_parallax_snr < 0:
        raise ValueError(f"min_parallax_snr must be a finite number >= 0, got {min_parallax_snr!r}")
    ext = k_extinction(df)
    ak = ext["A_K"].to_numpy()
    a = {band: r * ak for band, r in EXTINCTION_RATIOS.items()}

    j, h, k = (_mag(df, COLUMNS[b]) for b in ("J", "H", "K"))
    g, bp, rp = (_mag(df, COLUMNS[b]) for b in ("G", "BP", "RP"))
    plx = _col(df, COLUMNS["PARALLAX"])
    eplx = _col(df, COLUMNS["PARALLAX_ERROR"])

    with np.errstate(invalid="ignore", divide="ignore"):
        good_plx = (plx > 0) & (eplx > 0) & (plx / eplx > min_parallax_snr)
        safe_plx = np.where(good_plx, plx, 1.0)
        dist_mod = np.where(good_plx, 5.0 * np.log10(1000.0 / safe_plx) - 5.0, np.nan)
        out = pd.DataFrame(
            {
                "JH0": (j - h) - (a["J"] - a["H"]),
                "HK0": (h - k) - (a["H"] - a["K"]),
                "JK0": (j - k) - (a["J"] - a["K"]),
                "BPRP0": (bp - rp) - (a["BP"] - a["RP"]),
                "M_K": k - a["K"] - dist_mod,
                "M_G": g - a["G"] - dist_mod,
            },
            index=df.index,
        )
    if with_extinction:
        out["A_K"] = ext["A_K"]
        out["AK_SOURCE"] = ext["AK_SOURCE"]
    return out


def standardize_photometry(features: np.ndarray, mean: np.ndarray, std: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Photometric features (N, F) in physical units (mag; NaN = missing) → ``(z, present)`` float32:
    ``z = (x − mean) / std`` with 0 where missing, ``present`` 1 / 0. The one standardization of the
    network's photometric inputs, in training (the dataset) and in prediction (the ``Predictor``);
    ``mean`` / ``std`` are the training split's (the manifest's / model folder's ``phot_mean`` / ``phot_std``)."""
    x = np.asarray(features, dtype=np.float64)
    present = np.isfinite(x)
    z = np.where(present, (x - np.asarray(mean, np.float64)) / np.asarray(std, np.float64), 0.0)
    return z.astype(np.float32), present.astype(np.float32)
