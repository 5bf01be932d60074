"""allStar catalogue rows (DR17 ``allStar-dr17-synspec_rev1.fits`` layout) and their writer.

One row per (star, field, telescope): a few % of stars get a second, lower-S/N row in another
field/telescope with the same ``APOGEE_ID`` and ``EXTRATARG`` bit 4 (DUPLICATE) set on the lower-S/N
row. Column names and FITS dtypes follow the "allStar schema" of ``docs/architecture.md`` exactly.

Measured labels = truth + N(0, σ) with the reported σ (calibrated errors) —
TEFF_ERR = (30 + 3000/SNR) K × 1.5 for Teff < 4,000 K or > 6,000 K; LOGG_ERR = 0.03 + 3/SNR;
FE_H_ERR = 0.008 + 1/SNR; ALPHA_M_ERR = 0.01 + 1.5/SNR; C_FE/N_FE/MG_FE errors 0.02 + 2/SNR,
0.03 + 3/SNR, 0.01 + 1.5/SNR dex. ``M_H`` ≈ ``FE_H`` (ASPCAP's scaled-solar [M/H], measured with
its own 0.01 dex scatter) and ``ALPHA_M`` is [α/M] as in DR17: the measured [α/Fe] + ``FE_H`` −
``M_H``, so that ``ALPHA_M + M_H − FE_H`` is the measured [α/Fe] (the truth file has [M/H] = [Fe/H]).

Flags (names from :mod:`stellarnet.io.bitmasks`):

* ASPCAPFLAG: SN_WARN (SNR < 70), SN_BAD (SNR < 30); STAR_BAD for SN_BAD and for ~2.5% "failed"
  rows whose labels are corrupted (Teff ± 600 K, logg ± 0.8, [Fe/H] ± 0.3; with CHI2_BAD,
  COLORTE_BAD or ROTATION_BAD; [M/H], [Fe/H], [α/M] NaN in 30% of them); TEFF_WARN / LOGG_WARN
  near the grid edges; ROTATION_WARN for 20% of dwarfs hotter than 6,200 K; COLORTE_WARN for
  2%; STAR_WARN whenever a WARN bit is set.
* STARFLAG: LOW_SNR if a visit has S/N < 5 (visit S/N = SNR/√NVISITS × log-normal(0.35));
  BRIGHT_NEIGHBOR 3% (×2 at |b| < 5°), VERY_BRIGHT_NEIGHBOR 0.3%; PERSIST_HIGH/MED/LOW for
  4/4/6% of APO rows; BAD_PIXELS when bad-pixel runs cover > 2% of the pixels;
  SUSPECT_RV_COMBINATION for half of the binaries with VSCATTER > 5 km/s. ANDFLAG = bits set in
  every visit (all of them for one visit; positional bits always; persistence 30%).
* EXTRATARG: DUPLICATE (bit 4) on the lower-S/N row of a repeated star; NOT_MAIN (bit 0) 8%.
* PARAMFLAG (9,): on the LOGG entry SPEC_RC (24) / SPEC_RGB (25) from the true stage of giants with
  3% swapped (misclassification), LOGG_CAL_MS (26) for dwarfs and subgiants; GRIDEDGE_WARN on
  TEFF near the box edges.
* VSCATTER: 0 for one visit; single stars VERR·χ; binaries (truth ``IS_BINARY``, 15%)
  log-uniform 1–30 km/s.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stellarnet.common.files import atomic_open
from stellarnet.io.bitmasks import ASPCAPFLAG, EXTRATARG, PARAM_ORDER, PARAMFLAG, STARFLAG
from stellarnet.simulate.instrument import MAX_BAD_RUNS
from stellarnet.simulate.population import STAGES

__all__ = [
    "ALLSTAR_NAME", "ALLSTAR_DTYPES", "RowPlan", "plan_rows", "allstar_columns", "write_allstar",
    "tmass_designation", "unique_designations", "write_fits_table",
]

ALLSTAR_NAME = "allStar-dr17-synspec_rev1.fits"
N_PIX_DR12 = 7214

#: (column, numpy dtype, shape) in file order — the architecture.md allStar schema.
ALLSTAR_DTYPES: list[tuple[str, str, tuple[int, ...]]] = (
    [("APOGEE_ID", "S30", ()), ("TELESCOPE", "S8", ()), ("FIELD", "S20", ())]
    + [(c, ">f8", ()) for c in ("RA", "DEC", "GLON", "GLAT")]
    + [(c, ">f4", ()) for c in ("J", "J_ERR", "H", "H_ERR", "K", "K_ERR", "AK_TARG", "AK_WISE", "SFD_EBV")]
    + [("GAIAEDR3_SOURCE_ID", ">i8", ())]
    + [(c, ">f8", ()) for c in ("GAIAEDR3_PARALLAX", "GAIAEDR3_PARALLAX_ERROR", "GAIAEDR3_PMRA", "GAIAEDR3_PMDEC")]
    + [(c, ">f4", ()) for c in ("GAIAEDR3_PHOT_G_MEAN_MAG", "GAIAEDR3_PHOT_BP_MEAN_MAG", "GAIAEDR3_PHOT_RP_MEAN_MAG", "SNR")]
    + [("NVISITS", ">i4", ())]
    + [(c, ">f4", ()) for c in ("VHELIO_AVG", "VSCATTER", "VERR")]
    + [("STARFLAG", ">i8", ()), ("STARFLAGS", "S256", ()), ("ANDFLAG", ">i8", ()), ("ANDFLAGS", "S256", ())]
    + [("EXTRATARG", ">i4", ()), ("ASPCAPFLAG", ">i8", ()), ("ASPCAPFLAGS", "S256", ())]
    + [
        (c, ">f4", ())
        for c in (
            "TEFF", "TEFF_ERR", "LOGG", "LOGG_ERR", "M_H", "M_H_ERR", "ALPHA_M", "ALPHA_M_ERR",
            "FE_H", "FE_H_ERR", "C_FE", "C_FE_ERR", "N_FE", "N_FE_ERR", "MG_FE", "MG_FE_ERR",
        )
    ]
    + [("PARAM", ">f4", (9,)), ("PARAMFLAG", ">i4", (9,))]
)


# ---------------------------------------------------------------------------------------------
# identifiers


def tmass_designation(ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    """2MASS-style designations ``HHMMSSss±DDMMSSs`` (truncated, as 2MASS does) from degrees."""
    ra = np.asarray(ra, np.float64) % 360.0
    dec = np.asarray(dec, np.float64)
    rs = np.floor(ra / 15.0 * 3600.0 * 100.0 + 1e-6).astype(np.int64)  # hundredths of a second
    rs = np.minimum(rs, 24 * 3600 * 100 - 1)
    hh, rem = np.divmod(rs, 360000)
    mm, ss = np.divmod(rem, 6000)
    ds = np.floor(np.abs(dec) * 3600.0 * 10.0 + 1e-6).astype(np.int64)  # tenths of an arcsec
    dd, rem = np.divmod(ds, 36000)
    dm, dsec = np.divmod(rem, 600)
    sign = np.where(dec < 0, "-", "+")
    out = [
        f"{h:02d}{m:02d}{s:04d}{g}{d:02d}{x:02d}{y:03d}"
        for h, m, s, g, d, x, y in zip(hh.tolist(), mm.tolist(), ss.tolist(), sign.tolist(), dd.tolist(), dm.tolist(), dsec.tolist())
    ]
    return np.array(out, dtype="U16")


def unique_designations(ra: np.ndarray, dec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Designations made unique by nudging the RA of colliding stars by 0.15″; returns
    ``(designation, ra)`` (the possibly nudged RA in degrees)."""
    ra = np.array(ra, np.float64)
    for _ in range(100):
        des = tmass_designation(ra, dec)
        _, first, counts = np.unique(des, return_index=True, return_counts=True)
        if (counts == 1).all():
            return des, ra
        dup = np.ones(des.size, bool)
        dup[first] = False  # keep the first of each group, nudge the others
        ra[dup] = (ra[dup] + 0.15 / 3600.0) % 360.0
    raise RuntimeError("could not make designations unique")


# ---------------------------------------------------------------------------------------------
# rows


@dataclass
class RowPlan:
    """Catalogue rows. ``star`` indexes the per-star arrays; ``is_dup`` marks the lower-S/N
    duplicate rows; ``field`` indexes the field layout (FIELD name source); ``telescope`` strings;
    ``snr`` per pixel; ``nvisits``; ``bad_start``/``bad_len`` (R, MAX_BAD_RUNS) bad-pixel runs on
    the 7,214 grid; ``persist`` 0 none / 1 low / 2 med / 3 high."""

    star: np.ndarray
    is_dup: np.ndarray
    field: np.ndarray
    telescope: np.ndarray
    snr: np.ndarray
    nvisits: np.ndarray
    bad_start: np.ndarray
    bad_len: np.ndarray
    persist: np.ndarray

    def __len__(self) -> int:
        return int(self.star.shape[0])


def draw_detector_defects(rng: np.random.Generator, n: int, mean_runs: float = 2.0,
                          persist_cuts: tuple[float, float, float] = (0.04, 0.08, 0.14)
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bad-pixel runs and persistence for ``n`` spectra: ``(bad_start, bad_len, persist)``.

    Poisson(``mean_runs``) runs per spectrum (at most :data:`MAX_BAD_RUNS`), lengths geometric
    (p = 0.08, mean 12.5 pixels, at most 120), starts uniform on the 7,214 grid; persistence level
    3 / 2 / 1 (high / med / low) where a uniform draw is below ``persist_cuts`` (cumulative), else 0."""
    n_runs = np.minimum(rng.poisson(mean_runs, n), MAX_BAD_RUNS)
    bad_len = np.where(np.arange(MAX_BAD_RUNS)[None, :] < n_runs[:, None], rng.geometric(0.08, (n, MAX_BAD_RUNS)), 0)
    bad_len = np.minimum(bad_len, 120)
    bad_start = rng.integers(0, N_PIX_DR12, (n, MAX_BAD_RUNS))
    u = rng.random(n)
    persist = np.where(u < persist_cuts[0], 3, np.where(u < persist_cuts[1], 2, np.where(u < persist_cuts[2], 1, 0)))
    return bad_start, bad_len, persist


def plan_rows(
    n_stars: int,
    field: np.ndarray,
    dec: np.ndarray,
    snr: np.ndarray,
    nvisits: np.ndarray,
    layout: Any,
    rng: np.random.Generator,
    dup_fraction: float = 0.03,
) -> RowPlan:
    """Primary rows for every star plus duplicate rows for ``dup_fraction`` of them."""
    n_dup = int(round(dup_fraction * n_stars))
    dup_star = np.sort(rng.choice(n_stars, size=n_dup, replace=False)) if n_dup else np.empty(0, int)
    f2 = layout.nearest_other(field[dup_star]) if n_dup else np.empty(0, int)
    tel1 = layout.telescope[field]
    both = (dec[dup_star] > -35) & (dec[dup_star] < 15)
    other = np.where(tel1[dup_star] == "apo25m", "lco25m", "apo25m")
    same_field = f2 == field[dup_star]  # one-field layouts: the duplicate must differ in telescope
    tel2 = np.where(both | same_field, other, layout.telescope[f2]) if n_dup else np.empty(0, "U6")
    snr2 = np.maximum(3.0, snr[dup_star] * rng.uniform(0.3, 0.8, n_dup))
    nv2 = np.maximum(1, nvisits[dup_star] // 3)
    star = np.concatenate([np.arange(n_stars), dup_star])
    n_rows = star.size
    bad_start, bad_len, persist = draw_detector_defects(rng, n_rows)
    telescope = np.concatenate([tel1, tel2]).astype("U6")
    persist = np.where(telescope == "apo25m", persist, 0).astype(np.int8)
    return RowPlan(
        star=star,
        is_dup=np.concatenate([np.zeros(n_stars, bool), np.ones(n_dup, bool)]),
        field=np.concatenate([field, f2]),
        telescope=telescope,
        snr=np.concatenate([snr, snr2]).astype(np.float32),
        nvisits=np.concatenate([nvisits, nv2]).astype(np.int32),
        bad_start=bad_start.astype(np.int32),
        bad_len=bad_len.astype(np.int32),
        persist=persist,
    )


def _names(mask: Any, values: np.ndarray) -> np.ndarray:
    """Comma-joined flag names per value (computed once per unique value)."""
    uniq, inv = np.unique(values, return_inverse=True)
    names = np.array([",".join(mask.decode(int(v))) for v in uniq], dtype="S256")
    return names[inv]


def allstar_columns(
    plan: RowPlan,
    stars: dict[str, np.ndarray],
    layout: Any,
    rng: np.random.Generator,
    star_bad_fraction: float = 0.025,
    alpha_missing_fraction: float = 0.03,
) -> dict[str, np.ndarray]:
    """All allStar columns (native numpy arrays; strings unpadded) for the planned rows.

    ``stars``: per-star truth arrays with keys ``apogee_id, ra, dec, glon, glat, teff, logg,
    fe_h, alpha_fe, c_fe, n_fe, mg_fe, stage, J, H, K, J_ERR, H_ERR, K_ERR, G, BP, RP, a_k,
    ak_inf, gaia_id, gaia_matched, parallax, parallax_error, pmra, pmdec, vhelio, is_binary``.
    """
    s = plan.star
    n = len(plan)
    snr = plan.snr.astype(np.float64)
    g = lambda k: np.asarray(stars[k])[s]  # noqa: E731
    teff, logg, feh, alpha = g("teff"), g("logg"), g("fe_h"), g("alpha_fe")
    stage = g("stage")
    col: dict[str, np.ndarray] = {}
    col["APOGEE_ID"] = np.char.add("2M", g("apogee_id").astype("U16"))
    col["TELESCOPE"] = plan.telescope
    col["FIELD"] = layout.name[plan.field]
    for k in ("RA", "DEC", "GLON", "GLAT"):
        col[k] = g(k.lower())
    for k in ("J", "J_ERR", "H", "H_ERR", "K", "K_ERR"):
        col[k] = g(k)
    ak = g("a_k")
    col["AK_TARG"] = ak + rng.normal(0, 0.03, n)  # RJCE scatter
    col["AK_WISE"] = ak + rng.normal(0, 0.04, n)
    col["SFD_EBV"] = g("ak_inf") / 0.306 * np.exp(rng.normal(0, 0.05, n))  # A_K/E(B−V) ≈ 0.306
    matched = g("gaia_matched")
    col["GAIAEDR3_SOURCE_ID"] = np.where(matched, g("gaia_id"), 0)
    for k, src in (("PARALLAX", "parallax"), ("PARALLAX_ERROR", "parallax_error"), ("PMRA", "pmra"), ("PMDEC", "pmdec")):
        col["GAIAEDR3_" + k] = np.where(matched, g(src), np.nan)
    for b in ("G", "BP", "RP"):
        col[f"GAIAEDR3_PHOT_{b}_MEAN_MAG"] = np.where(matched, g(b), np.nan)
    col["SNR"] = snr
    nv = plan.nvisits
    col["NVISITS"] = nv
    verr = 0.05 + 15.0 / snr
    binary = g("is_binary")
    col["VERR"] = verr
    chi = np.sqrt(rng.chisquare(np.maximum(nv - 1, 1), n) / np.maximum(nv - 1, 1))
    vs_single = verr * np.sqrt(nv) * chi * 0.8
    vs_bin = 10 ** rng.uniform(0.0, np.log10(30.0), n)
    col["VSCATTER"] = np.where(nv > 1, np.where(binary, vs_bin, vs_single), 0.0)
    col["VHELIO_AVG"] = g("vhelio") + rng.normal(0, 1, n) * verr + np.where(binary, rng.normal(0, 5, n), 0)

    # --- STARFLAG / ANDFLAG
    sf = np.zeros(n, np.int64)
    af = np.zeros(n, np.int64)
    bit = lambda m, name: np.int64(1) << np.int64(m.bit(name))  # noqa: E731
    visit_min = snr / np.sqrt(nv) * np.exp(-np.abs(rng.normal(0, 0.35, n)) * np.sqrt(np.log(nv + 1)))
    visit_max = snr / np.sqrt(nv) * np.exp(np.abs(rng.normal(0, 0.2, n)))
    sf |= np.where(visit_min < 5, bit(STARFLAG, "LOW_SNR"), 0)
    af |= np.where(visit_max < 5, bit(STARFLAG, "LOW_SNR"), 0)
    lowb = np.abs(col["GLAT"]) < 5
    u = rng.random(n)
    bn = u < np.where(lowb, 0.06, 0.03)
    vbn = u < 0.003
    sf |= np.where(bn, bit(STARFLAG, "BRIGHT_NEIGHBOR"), 0) | np.where(vbn, bit(STARFLAG, "VERY_BRIGHT_NEIGHBOR"), 0)
    af |= np.where(bn, bit(STARFLAG, "BRIGHT_NEIGHBOR"), 0) | np.where(vbn, bit(STARFLAG, "VERY_BRIGHT_NEIGHBOR"), 0)
    pbits = np.array([0, bit(STARFLAG, "PERSIST_LOW"), bit(STARFLAG, "PERSIST_MED"), bit(STARFLAG, "PERSIST_HIGH")], np.int64)
    sf |= pbits[plan.persist]
    af |= np.where((nv == 1) | (rng.random(n) < 0.3), pbits[plan.persist], 0)
    frac_bad = plan.bad_len.sum(axis=1) / N_PIX_DR12
    sf |= np.where(frac_bad > 0.02, bit(STARFLAG, "BAD_PIXELS"), 0)
    af |= np.where((frac_bad > 0.02) & (nv == 1), bit(STARFLAG, "BAD_PIXELS"), 0)
    rvbad = binary & (col["VSCATTER"] > 5) & (rng.random(n) < 0.5)
    sf |= np.where(rvbad, bit(STARFLAG, "SUSPECT_RV_COMBINATION"), 0)
    af = np.where(nv == 1, sf, af & sf)
    col["STARFLAG"], col["ANDFLAG"] = sf, af
    col["STARFLAGS"], col["ANDFLAGS"] = _names(STARFLAG, sf), _names(STARFLAG, af)

    # --- EXTRATARG
    et = np.where(plan.is_dup, np.int64(1) << EXTRATARG.bit("DUPLICATE"), 0)
    et |= np.where(rng.random(n) < 0.08, np.int64(1) << EXTRATARG.bit("NOT_MAIN"), 0)
    col["EXTRATARG"] = et.astype(np.int32)

    # --- labels with errors
    hot_cool = np.where((teff < 4000) | (teff > 6000), 1.5, 1.0)
    errs = {
        "TEFF": (30.0 + 3000.0 / snr) * hot_cool,
        "LOGG": 0.03 + 3.0 / snr,
        "FE_H": 0.008 + 1.0 / snr,
        "ALPHA_M": 0.01 + 1.5 / snr,
        "C_FE": 0.02 + 2.0 / snr,
        "N_FE": 0.03 + 3.0 / snr,
        "MG_FE": 0.01 + 1.5 / snr,
    }
    truth = {"TEFF": teff, "LOGG": logg, "FE_H": feh, "ALPHA_M": alpha, "C_FE": g("c_fe"), "N_FE": g("n_fe"), "MG_FE": g("mg_fe")}
    meas = {k: truth[k] + errs[k] * rng.normal(0, 1, n) for k in truth}
    meas["M_H"] = meas["FE_H"] + rng.normal(0, 0.01, n)
    errs["M_H"] = np.sqrt(errs["FE_H"] ** 2 + 0.01**2)

    # --- ASPCAPFLAG
    af_bits = np.zeros(n, np.int64)
    b = lambda name: np.int64(1) << np.int64(ASPCAPFLAG.bit(name))  # noqa: E731
    af_bits |= np.where(snr < 70, b("SN_WARN"), 0)
    sn_bad = snr < 30
    af_bits |= np.where(sn_bad, b("SN_BAD"), 0)
    failed = rng.random(n) < star_bad_fraction
    why = rng.integers(0, 3, n)
    af_bits |= np.where(failed, np.array([b("CHI2_BAD"), b("COLORTE_BAD"), b("ROTATION_BAD")])[why], 0)
    af_bits |= np.where(failed | sn_bad, b("STAR_BAD"), 0)
    edge_t = (teff < 3650) | (teff > 6850)
    edge_g = (logg < 0.5) | (logg > 5.0)
    af_bits |= np.where(edge_t, b("TEFF_WARN"), 0) | np.where(edge_g, b("LOGG_WARN"), 0)
    af_bits |= np.where((teff > 6200) & (logg > 3.8) & (rng.random(n) < 0.2), b("ROTATION_WARN"), 0)
    af_bits |= np.where(rng.random(n) < 0.02, b("COLORTE_WARN"), 0)
    warn_mask = np.int64(sum(1 << i for i in range(15) if i != 7))
    af_bits |= np.where((af_bits & warn_mask) != 0, b("STAR_WARN"), 0)
    col["ASPCAPFLAG"] = af_bits
    col["ASPCAPFLAGS"] = _names(ASPCAPFLAG, af_bits)
    # corrupted labels of failed fits
    nf = int(failed.sum())
    meas["TEFF"][failed] += rng.choice([-1, 1], nf) * rng.uniform(300, 900, nf)
    meas["LOGG"][failed] += rng.normal(0, 0.8, nf)
    meas["FE_H"][failed] += rng.normal(0, 0.3, nf)
    meas["M_H"][failed] = meas["FE_H"][failed] + rng.normal(0, 0.05, nf)
    meas["ALPHA_M"][failed] += rng.normal(0, 0.15, nf)
    nan_fit = failed & (rng.random(n) < 0.3)
    for k in ("FE_H", "M_H", "ALPHA_M", "C_FE", "N_FE", "MG_FE"):
        meas[k][nan_fit] = np.nan
    meas["ALPHA_M"][rng.random(n) < alpha_missing_fraction] = np.nan
    cn_missing = (teff > 6000) | (rng.random(n) < 0.02)
    meas["C_FE"][cn_missing] = np.nan
    meas["N_FE"][cn_missing] = np.nan
    meas["MG_FE"][rng.random(n) < 0.01] = np.nan
    # the stars' abundance ratio is [α/Fe] ("ALPHA_M" above); allStar reports [α/M] = [α/Fe] + [Fe/H] − [M/H]
    meas["ALPHA_M"] = meas["ALPHA_M"] + meas["FE_H"] - meas["M_H"]
    for k in ("TEFF", "LOGG", "M_H", "ALPHA_M", "FE_H", "C_FE", "N_FE", "MG_FE"):
        col[k] = meas[k]
        col[k + "_ERR"] = np.where(np.isfinite(meas[k]), errs[k], np.nan)

    # --- PARAM / PARAMFLAG (order PARAM_ORDER)
    vmicro = 10 ** (0.226 - 0.0228 * logg + 0.0297 * logg**2 - 0.0113 * logg**3)  # Holtzman+2015
    dwarf = logg > 3.8
    vsini = np.where(dwarf, np.abs(rng.normal(3.0, 2.0, n)) + np.where(teff > 6200, rng.exponential(8.0, n), 0), np.nan)
    param = np.full((n, 9), np.nan)
    pvals = {
        "TEFF": meas["TEFF"], "LOGG": meas["LOGG"], "VMICRO": vmicro, "M_H": meas["M_H"],
        "C_M": meas["C_FE"] + meas["FE_H"] - meas["M_H"], "N_M": meas["N_FE"] + meas["FE_H"] - meas["M_H"],
        "ALPHA_M": meas["ALPHA_M"], "VSINI": vsini, "O_M": meas["ALPHA_M"] + rng.normal(0, 0.03, n),
    }
    for i, name in enumerate(PARAM_ORDER):
        param[:, i] = pvals[name]
    col["PARAM"] = param
    pf = np.zeros((n, 9), np.int64)
    il = PARAM_ORDER.index("LOGG")
    it = PARAM_ORDER.index("TEFF")
    rc, rgb = STAGES.index("RC"), STAGES.index("RGB")
    swap = rng.random(n) < 0.03
    spec_rc = np.where(swap, stage == rgb, stage == rc)
    spec_rgb = np.where(swap, stage == rc, stage == rgb)
    pf[:, il] |= np.where(spec_rc, 1 << PARAMFLAG.bit("SPEC_RC"), 0)
    pf[:, il] |= np.where(spec_rgb, 1 << PARAMFLAG.bit("SPEC_RGB"), 0)
    pf[:, il] |= np.where(~(spec_rc | spec_rgb), 1 << PARAMFLAG.bit("LOGG_CAL_MS"), 0)
    pf[:, it] |= np.where(edge_t, 1 << PARAMFLAG.bit("GRIDEDGE_WARN"), 0)
    pf[:, il] |= np.where(edge_g, 1 << PARAMFLAG.bit("GRIDEDGE_WARN"), 0)
    col["PARAMFLAG"] = pf.astype(np.int32)
    return col


# ---------------------------------------------------------------------------------------------
# writing


def write_fits_table(path: str | Path, columns: dict[str, np.ndarray], dtypes: list[tuple[str, str, tuple[int, ...]]], extname: str | None = None) -> Path:
    """Write a binary-table FITS file (HDU0 empty primary, HDU1 table) atomically (temp file +
    rename). Strings are **space**-padded to their width as in the real SDSS files (astropy's
    writer would NUL-pad them, so the table bytes are written here, with astropy's header);
    float columns keep NaN; ``|b1`` columns become FITS logicals ('T'/'F')."""
    from astropy.io import fits

    path = Path(path)
    n = len(next(iter(columns.values())))
    logical = np.dtype([(name, dt, shape) for name, dt, shape in dtypes])
    raw_dt = np.dtype([(name, "S1" if dt == "|b1" else dt, shape) for name, dt, shape in dtypes])
    if raw_dt.itemsize != logical.itemsize:
        raise AssertionError("row layout mismatch")
    raw = np.zeros(n, dtype=raw_dt)
    for name, dt, shape in dtypes:
        v = np.asarray(columns[name])
        if dt == "|b1":
            raw[name] = np.where(v.astype(bool), b"T", b"F")
        elif dt.startswith("S"):
            width = int(dt[1:])
            if v.dtype.kind == "U":
                v = np.char.encode(v, "ascii")
            raw[name] = np.char.ljust(v.astype(dt), width)
        else:
            if v.shape[1:] != shape:
                raise ValueError(f"column {name}: shape {v.shape[1:]} != {shape}")
            raw[name] = v
    header = fits.BinTableHDU(data=np.zeros(1, dtype=logical), name=extname).header
    header["NAXIS2"] = n
    head = fits.PrimaryHDU().header.tostring().encode("ascii") + header.tostring().encode("ascii")
    with atomic_open(path, "wb") as fh:
        fh.write(head)
        fh.write(memoryview(raw).cast("B"))
        fh.write(b"\0" * ((-raw.nbytes) % 2880))
    return path


def write_allstar(path: str | Path, columns: dict[str, np.ndarray]) -> Path:
    """Write the allStar table (schema :data:`ALLSTAR_DTYPES`) atomically."""
    missing = [c for c, _, _ in ALLSTAR_DTYPES if c not in columns]
    if missing:
        raise KeyError(f"allStar columns missing: {missing}")
    return write_fits_table(path, columns, ALLSTAR_DTYPES)
