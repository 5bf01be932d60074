"""External survey catalogues in the GALAH DR3 and LAMOST DR7 LRS formats.

Values are truth + injected offsets/trends + noise:
``survey − truth = const + teff_slope_per_1000K·(Teff_true − 5000)/1000 + feh_slope·[Fe/H]_true``
+ N(0, reported error). The injected coefficients are written to ``truth/injected_offsets.json``
(:data:`DEFAULT_OFFSETS`, overridable from the config).

* **GALAH DR3** (``galah/GALAH_DR3_main_allstar_v2.fits``): a southern (Dec < +10°) subset of the
  APOGEE stars plus GALAH-only stars; positions ``ra_dr2``/``dec_dr2`` at the Gaia epoch 2015.5
  (APOGEE positions are 2MASS, epoch 2000: a star moves by pm × 15.5 yr, > 1″ for pm > 65
  mas/yr) with 0.05″ jitter; ``tmass_id``/``star_id`` = 2MASS designation, ``dr3_source_id`` =
  Gaia EDR3 id. e_teff ≈ 60 + 2500/snr K; ``flag_sp`` ≠ 0 (bits 1, 2, 4, …) for ~6% with
  corrupted parameters and for snr_c3 < 10; ``flag_fe_h``/``flag_alpha_fe`` ≠ 0 for a few %
  (values NaN in a third of them); repeats: ~4% of stars have a second, lower-S/N row with
  ``flag_repeat = 1``.
* **LAMOST DR7 LRS** (``lamost/LAMOST_LRS_DR7_v2_stellar.fits``, the A/F/G/K catalogue: no
  [α/Fe], no M stars): a northern (−10° < Dec < 65°) subset plus LAMOST-only stars; 0.2″
  astrometric jitter; ``designation`` = ``J`` + HHMMSS.ss±DDMMSS.s; ~1% rows with −9999
  (failed LASP values) and low-``snrg`` rows with large errors; ~8% repeated observations
  (new ``obsid``, same designation).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from stellarnet.common.files import atomic_write_text
from stellarnet.simulate.allstar import write_fits_table

__all__ = [
    "DEFAULT_OFFSETS", "GALAH_NAME", "LAMOST_NAME", "GALAH_DTYPES", "LAMOST_DTYPES",
    "apply_offsets", "galah_columns", "lamost_columns", "lamost_designation", "resolve_offsets",
    "write_galah", "write_lamost", "write_offsets",
]

GALAH_NAME = "galah/GALAH_DR3_main_allstar_v2.fits"
LAMOST_NAME = "lamost/LAMOST_LRS_DR7_v2_stellar.fits"

DEFAULT_OFFSETS: dict[str, dict[str, dict[str, float]]] = {
    "galah": {
        "teff": {"const": 30.0, "teff_slope_per_1000K": 20.0, "feh_slope": 0.0},
        "logg": {"const": 0.04, "teff_slope_per_1000K": 0.02, "feh_slope": 0.0},
        "fe_h": {"const": -0.03, "teff_slope_per_1000K": 0.01, "feh_slope": 0.05},
        "alpha_fe": {"const": 0.02, "teff_slope_per_1000K": 0.0, "feh_slope": -0.05},
    },
    "lamost": {
        "teff": {"const": -50.0, "teff_slope_per_1000K": -25.0, "feh_slope": 30.0},
        "logg": {"const": 0.10, "teff_slope_per_1000K": -0.05, "feh_slope": 0.0},
        "feh": {"const": -0.04, "teff_slope_per_1000K": 0.02, "feh_slope": 0.08},
    },
}

GALAH_DTYPES: list[tuple[str, str, tuple[int, ...]]] = [
    ("sobject_id", ">i8", ()), ("star_id", "S16", ()), ("tmass_id", "S16", ()), ("dr3_source_id", ">i8", ()),
    ("ra_dr2", ">f8", ()), ("dec_dr2", ">f8", ()),
    ("teff", ">f8", ()), ("e_teff", ">f8", ()), ("logg", ">f8", ()), ("e_logg", ">f8", ()),
    ("fe_h", ">f8", ()), ("e_fe_h", ">f8", ()), ("flag_fe_h", ">i8", ()),
    ("alpha_fe", ">f8", ()), ("e_alpha_fe", ">f8", ()), ("flag_alpha_fe", ">i8", ()),
    ("flag_sp", ">i8", ()), ("snr_c3_iraf", ">f8", ()), ("flag_repeat", ">i8", ()),
]
LAMOST_DTYPES: list[tuple[str, str, tuple[int, ...]]] = [
    ("obsid", ">i8", ()), ("designation", "S19", ()), ("ra", ">f8", ()), ("dec", ">f8", ()),
    ("teff", ">f4", ()), ("teff_err", ">f4", ()), ("logg", ">f4", ()), ("logg_err", ">f4", ()),
    ("feh", ">f4", ()), ("feh_err", ">f4", ()), ("rv", ">f4", ()), ("rv_err", ">f4", ()),
    ("snrg", ">f4", ()), ("snri", ">f4", ()), ("class", "S8", ()), ("subclass", "S8", ()),
]


def apply_offsets(coef: Mapping[str, float], teff_true: np.ndarray, feh_true: np.ndarray) -> np.ndarray:
    """const + teff_slope_per_1000K·(Teff − 5000)/1000 + feh_slope·[Fe/H] (truth units)."""
    return (
        float(coef.get("const", 0.0))
        + float(coef.get("teff_slope_per_1000K", 0.0)) * (np.asarray(teff_true) - 5000.0) / 1000.0
        + float(coef.get("feh_slope", 0.0)) * np.asarray(feh_true)
    )


def _shift_position(ra: np.ndarray, dec: np.ndarray, dra_mas: np.ndarray, ddec_mas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Move positions by (Δα cos δ, Δδ) in mas."""
    cosd = np.maximum(np.cos(np.radians(dec)), 1e-6)
    return (ra + dra_mas / 3.6e6 / cosd) % 360.0, np.clip(dec + ddec_mas / 3.6e6, -90.0, 90.0)


def lamost_designation(ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    """LAMOST designations ``JHHMMSS.ss±DDMMSS.s`` from degrees."""
    ra = np.asarray(ra) % 360.0
    dec = np.asarray(dec)
    rs = np.round(ra / 15.0 * 3600.0 * 100.0).astype(np.int64) % (24 * 360000)
    hh, rem = np.divmod(rs, 360000)
    mm, ss = np.divmod(rem, 6000)
    ds = np.round(np.abs(dec) * 36000.0).astype(np.int64)
    dd, rem = np.divmod(ds, 36000)
    dm, dsec = np.divmod(rem, 600)
    sign = np.where(dec < 0, "-", "+")
    return np.array(
        [
            f"J{h:02d}{m:02d}{s // 100:02d}.{s % 100:02d}{g}{d:02d}{x:02d}{y // 10:02d}.{y % 10:d}"
            for h, m, s, g, d, x, y in zip(hh.tolist(), mm.tolist(), ss.tolist(), sign.tolist(), dd.tolist(), dm.tolist(), dsec.tolist())
        ],
        dtype="U19",
    )


def _sobject_ids(rng: np.random.Generator, n: int) -> np.ndarray:
    """GALAH-like 15-digit sobject_id: YYMMDD + 4-digit run + plate (1/2) + 3-digit pivot."""
    days = rng.integers(0, 1900, n)  # 2013-12-01 onwards
    base = np.datetime64("2013-12-01") + days.astype("timedelta64[D]")
    ymd = np.array([int(str(d).replace("-", "")[2:]) for d in base], np.int64)
    run = rng.integers(1, 60, n)
    plate = rng.integers(1, 3, n)
    pivot = rng.integers(1, 393, n)
    ids = ymd * 10**9 + run * 10**5 + plate * 10**4 + pivot
    # make unique (pivot collisions)
    _, first = np.unique(ids, return_index=True)
    dup = np.ones(n, bool)
    dup[first] = False
    while dup.any():
        ids[dup] += rng.integers(1, 9, int(dup.sum())) * 10**3
        _, first = np.unique(ids, return_index=True)
        dup = np.ones(n, bool)
        dup[first] = False
    return ids


def galah_columns(stars: dict[str, np.ndarray], rng: np.random.Generator, offsets: Mapping[str, Mapping[str, float]], repeat_fraction: float = 0.04) -> dict[str, np.ndarray]:
    """GALAH DR3 rows for ``stars`` (keys ``tmass_id, ra, dec, pmra, pmdec, gaia_id, teff, logg,
    fe_h, alpha_fe, vmag`` (V in mag, for the S/N)), with repeats."""
    n = len(stars["teff"])
    rep = np.flatnonzero(rng.random(n) < repeat_fraction)
    idx = np.concatenate([np.arange(n), rep])
    m = idx.size
    g = lambda k: np.asarray(stars[k])[idx]  # noqa: E731
    teff, logg, feh, alpha = g("teff"), g("logg"), g("fe_h"), g("alpha_fe")
    snr = np.clip(45.0 * 10 ** (-0.2 * (g("vmag") - 13.0)) * np.exp(rng.normal(0, 0.35, m)), 3.0, 400.0)
    snr[n:] *= rng.uniform(0.3, 0.9, rep.size)
    # flag_repeat = 0 for the best (highest S/N) row of each star
    first_best = np.ones(m, bool)
    better_second = snr[n:] > snr[rep]
    first_best[rep[better_second]] = False
    first_best[n:] = better_second
    e = {
        "teff": 60.0 + 2500.0 / snr,
        "logg": 0.12 + 4.0 / snr,
        "fe_h": 0.05 + 2.0 / snr,
        "alpha_fe": 0.03 + 1.5 / snr,
    }
    truth = {"teff": teff, "logg": logg, "fe_h": feh, "alpha_fe": alpha}
    val = {k: truth[k] + apply_offsets(offsets[k], teff, feh) + e[k] * rng.normal(0, 1, m) for k in truth}
    bitv = np.array([1, 2, 4, 8, 16, 32, 256])
    flag_sp = np.where(rng.random(m) < 0.06, rng.choice(bitv, m), 0)
    flag_sp = np.where(snr < 10, flag_sp | 64, flag_sp)
    corrupt = flag_sp != 0
    k = int(corrupt.sum())
    val["teff"][corrupt] += rng.normal(0, 400, k)
    val["logg"][corrupt] += rng.normal(0, 0.6, k)
    val["fe_h"][corrupt] += rng.normal(0, 0.3, k)
    flag_fe = np.where(corrupt | (rng.random(m) < 0.03), rng.choice([1, 2, 3], m), 0)
    flag_al = np.where(corrupt | (rng.random(m) < 0.06), rng.choice([1, 2, 3], m), 0)
    val["fe_h"][(flag_fe > 0) & (rng.random(m) < 0.33)] = np.nan
    val["alpha_fe"][(flag_al > 0) & (rng.random(m) < 0.33)] = np.nan
    dt_yr = 15.5  # J2000 (2MASS) → J2015.5 (Gaia DR2)
    ra2, dec2 = _shift_position(g("ra"), g("dec"), g("pmra") * dt_yr + rng.normal(0, 50, m), g("pmdec") * dt_yr + rng.normal(0, 50, m))
    tm = g("tmass_id")
    return {
        "sobject_id": _sobject_ids(rng, m), "star_id": tm, "tmass_id": tm, "dr3_source_id": g("gaia_id"),
        "ra_dr2": ra2, "dec_dr2": dec2,
        "teff": val["teff"], "e_teff": e["teff"], "logg": val["logg"], "e_logg": e["logg"],
        "fe_h": val["fe_h"], "e_fe_h": e["fe_h"], "flag_fe_h": flag_fe,
        "alpha_fe": val["alpha_fe"], "e_alpha_fe": e["alpha_fe"], "flag_alpha_fe": flag_al,
        "flag_sp": flag_sp, "snr_c3_iraf": snr, "flag_repeat": np.where(first_best, 0, 1),
    }


def _subclass(teff: np.ndarray, logg: np.ndarray) -> np.ndarray:
    """MK-like subclass from Teff (Pecaut & Mamajek 2013 dwarf scale; giants use the same)."""
    t = np.array([3900, 4100, 4400, 4600, 4900, 5100, 5300, 5500, 5700, 5900, 6100, 6400, 6700, 7000, 7300])
    names = np.array(["K7", "K5", "K4", "K3", "K2", "K1", "K0", "G8", "G5", "G2", "G0", "F8", "F5", "F3", "F2", "F0"])
    return names[np.searchsorted(t, teff)]


def lamost_columns(stars: dict[str, np.ndarray], rng: np.random.Generator, offsets: Mapping[str, Mapping[str, float]], repeat_fraction: float = 0.08) -> dict[str, np.ndarray]:
    """LAMOST DR7 LRS rows for ``stars`` (keys ``ra, dec, teff, logg, fe_h, vhelio, gmag``)."""
    n = len(stars["teff"])
    rep = np.flatnonzero(rng.random(n) < repeat_fraction)
    idx = np.concatenate([np.arange(n), rep])
    m = idx.size
    g = lambda k: np.asarray(stars[k])[idx]  # noqa: E731
    teff, logg, feh = g("teff"), g("logg"), g("fe_h")
    snrg = np.clip(60.0 * 10 ** (-0.3 * (g("gmag") - 14.5)) * np.exp(rng.normal(0, 0.4, m)), 2.0, 900.0)
    snri = snrg * np.exp(rng.normal(0.4, 0.1, m))
    e = {"teff": 30.0 + 1500.0 / snrg, "logg": 0.05 + 2.0 / snrg, "feh": 0.03 + 1.0 / snrg}
    truth = {"teff": teff, "logg": logg, "feh": feh}
    val = {k: truth[k] + apply_offsets(offsets[k], teff, feh) + e[k] * rng.normal(0, 1, m) for k in truth}
    rv_err = 3.0 + 100.0 / snrg
    rv = g("vhelio") + 5.0 + rv_err * rng.normal(0, 1, m)  # LAMOST RV zero point ≈ +5 km/s
    failed = rng.random(m) < 0.01
    err_out = {k: e[k].copy() for k in e}
    for k in val:
        val[k] = np.where(failed, -9999.0, val[k])
        err_out[k] = np.where(failed, -9999.0, err_out[k])
    ra, dec = _shift_position(g("ra"), g("dec"), rng.normal(0, 200, m), rng.normal(0, 200, m))
    des = lamost_designation(g("ra"), g("dec"))  # one designation per star
    obsid = 100_000_000 + rng.choice(700_000_000, size=m, replace=False)
    return {
        "obsid": obsid.astype(np.int64), "designation": des, "ra": ra, "dec": dec,
        "teff": val["teff"], "teff_err": err_out["teff"], "logg": val["logg"], "logg_err": err_out["logg"],
        "feh": val["feh"], "feh_err": err_out["feh"], "rv": rv, "rv_err": rv_err,
        "snrg": snrg, "snri": snri, "class": np.full(m, "STAR"), "subclass": _subclass(teff, logg),
    }


def resolve_offsets(overrides: Mapping[str, Any] | None) -> dict[str, dict[str, dict[str, float]]]:
    """:data:`DEFAULT_OFFSETS` updated with ``overrides`` (same nesting)."""
    out = copy.deepcopy(DEFAULT_OFFSETS)
    for survey, labels in (overrides or {}).items():
        if survey not in out:
            raise KeyError(f"unknown survey {survey!r} in offsets; use {sorted(out)}")
        for label, coefs in (labels or {}).items():
            if label not in out[survey]:
                raise KeyError(f"unknown label {label!r} for {survey}; use {sorted(out[survey])}")
            for c, v in (coefs or {}).items():
                if c not in ("const", "teff_slope_per_1000K", "feh_slope"):
                    raise KeyError(f"unknown offset term {c!r}")
                out[survey][label][c] = float(v)
    return out


def write_offsets(path: str | Path, offsets: Mapping[str, Any]) -> Path:
    """Write the injected offsets JSON (atomically)."""
    return atomic_write_text(path, json.dumps(offsets, indent=2, sort_keys=True))


def write_galah(path: str | Path, columns: dict[str, np.ndarray]) -> Path:
    return write_fits_table(path, columns, GALAH_DTYPES)


def write_lamost(path: str | Path, columns: dict[str, np.ndarray]) -> Path:
    return write_fits_table(path, columns, LAMOST_DTYPES)
