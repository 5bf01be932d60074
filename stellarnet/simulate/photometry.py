"""Photometry and astrometry consistent with Teff, logg, mass, distance and extinction.

Relations (all magnitudes Vega; colours intrinsic, subscript 0):

* Luminosity: R = sqrt(G M / g), L = R² (Teff/5772 K)⁴, M_bol = 4.74 − 2.5 log L
  (see :mod:`stellarnet.simulate.population`).
* Bolometric correction in V: Flower (1996) polynomials in log Teff with the corrected
  coefficients of Torres (2010, AJ 140, 1158) — BC_V(Sun) = −0.08.
* (V − Ks)0 from Teff and [Fe/H]: the giant IRFM calibration of Alonso, Arribas & Martínez-Roger
  (1999, A&AS 140, 261), eqs. for 0.2 ≤ V−K ≤ 2.5 and 2.0 ≤ V−K ≤ 4.9, inverted numerically
  (also used for dwarfs, a < 0.1 mag approximation). BC_K = BC_V + (V−K); M_Ks = M_bol − BC_K.
  Check: a red-clump star (4,750 K, L ≈ 56 L☉) gets M_Ks ≈ −1.6.
* (J − Ks)0 for giants: 0.55 at 5,000 K, 0.65 at 4,700, 0.75 at 4,400, 0.90 at 4,000,
  1.10 at 3,700 K (approximate IRFM scale, survey facts §9; extended to 0.45 at 5,500,
  0.36 at 6,000, 0.28 at 6,500, 0.22 at 7,000 and 1.25 at 3,500 K); dwarfs (logg ≥ 4) bluer by
  0.03 mag, blended linearly over 3.5 < logg < 4.
* (H − Ks)0 ≈ 0.22 (J − Ks)0 − 0.01 (2MASS stellar locus, approximate).
* Gaia: (BP − RP)0 from Teff (approximate Casagrande et al. 2021 scale: 0.82 at 5,772 K,
  1.13 at 5,000 K, 1.40 at 4,500 K, 1.82 at 4,000 K, 2.55 at 3,600 K); G − V from Riello et al.
  (2021, A&A 649, A3) Table C2: G − V = −0.02704 + 0.01424x − 0.2156x² + 0.01426x³, x = BP − RP;
  G − RP ≈ 0.03 + 0.56x − 0.02x² (approximate EDR3 locus).
* Extinction (survey facts §9; Indebetouw et al. 2005, Cardelli-like law): A_J = 2.5 A_K,
  A_H = 1.55 A_K, A_V = 8.8 A_K, A_G = 0.79 A_V, A_BP = 1.0 A_V, A_RP = 0.59 A_V.
* Distances: the apparent H magnitude is drawn from the field's design cohort (H limit
  11.0–13.8, H = limit + 0.3 − Exp(0.9 mag), ≥ 7), then μ = H − M_H − A_H (A_H depends on distance:
  two fixed-point iterations), distance capped at 30 kpc (H recomputed).
* Parallax: ϖ = 1000/d[pc] + zero point −0.017 mas (Lindegren et al. 2021) + N(0, σϖ), with
  σϖ(G) the median of the real DR14×Gaia DR2 ``parallax_error`` in 0.5-mag G bins × 0.8 (EDR3
  improvement) × log-normal(0.25) scatter. Proper motions from tangential velocities
  (σ = 35 km/s disk, 150 km/s metal-poor tail): μ = v_t / (4.74 d[kpc]) mas/yr.
* 2MASS errors: σ = sqrt(0.02² + (0.03·10^{0.4(m − 13.5)})²) (≈ 0.02 bright, 0.036 at 13.5);
  Gaia mean-magnitude errors 0.0003–0.01 mag; Gaia unmatched (source id 0, NaN) for G > 20.7
  and 1.5% at random.
* SNR per pixel: ≈ 80–100 at H = 12.2 for 3 visits (APOGEE design S/N 100; Majewski et al.
  2017): 80 · 10^{−0.2 (H − 12.2)} sqrt(N_visits / 3) × log-normal(0.4) (weather, seeing,
  fibre losses); visits completed ~ Binomial(planned + 1, 0.7), ≥ 1. The resulting SNR
  distribution has median ≈ 100, 1% below ≈ 30 and 1% above ≈ 550.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from stellarnet.simulate.population import STAGES, Population
from stellarnet.simulate.sky import FieldLayout, ak_at_distance, real_positions

__all__ = [
    "EXT", "bc_v", "v_minus_k", "bc_k", "jk0", "hk0", "bp_rp0", "absolute_magnitudes",
    "Photometry", "observe", "parallax_error_of_g", "mag_err_2mass",
]

#: A_X / A_Ks (survey facts §9).
EXT: dict[str, float] = {"J": 2.5, "H": 1.55, "K": 1.0, "V": 8.8, "G": 0.79 * 8.8, "BP": 1.0 * 8.8, "RP": 0.59 * 8.8}
PARALLAX_ZP = -0.017  # mas, Lindegren et al. 2021


def bc_v(teff: np.ndarray) -> np.ndarray:
    """V-band bolometric correction (mag), Flower 1996 with Torres 2010 coefficients."""
    lt = np.log10(np.asarray(teff, np.float64))
    c1 = [-0.190537291496456e05, 0.155144866764412e05, -0.421278819301717e04, 0.381476328422343e03]
    c2 = [-0.370510203809015e05, 0.385672629965804e05, -0.150651486316025e05, 0.261724637119416e04, -0.170623810323864e03]
    c3 = [-0.118115450538963e06, 0.137145973583929e06, -0.636233812100225e05, 0.147412923562646e05, -0.170587278406872e04, 0.788731721804990e02]
    p = lambda c: sum(ci * lt**i for i, ci in enumerate(c))  # noqa: E731
    return np.where(lt < 3.70, p(c1), np.where(lt < 3.90, p(c2), p(c3)))


def _theta_alonso(x: np.ndarray, feh: float) -> np.ndarray:
    """θ = 5040/Teff from V−K = x (Alonso et al. 1999 giants), the two ranges joined at 2.2."""
    t1 = 0.5558 + 0.2105 * x + 0.001981 * x**2 - 0.009965 * x * feh + 0.01325 * feh - 0.002726 * feh**2
    t2 = 0.3770 + 0.3660 * x - 0.03170 * x**2 - 0.003074 * x * feh - 0.002765 * feh - 0.002973 * feh**2
    return np.where(x <= 2.2, t1, t2)


@lru_cache(maxsize=1)
def _vk_table() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    fehs = np.array([-1.0, -0.5, 0.0, 0.5])
    x = np.linspace(0.2, 5.6, 2000)
    thetas = np.stack([np.maximum.accumulate(_theta_alonso(x, f)) for f in fehs])
    return fehs, x, thetas


def v_minus_k(teff: np.ndarray, fe_h: np.ndarray) -> np.ndarray:
    """(V − Ks)0 (mag) for Teff (K), [Fe/H] (dex), inverting Alonso et al. 1999."""
    teff = np.asarray(teff, np.float64)
    fe_h = np.clip(np.broadcast_to(np.asarray(fe_h, np.float64), teff.shape), -1.0, 0.5)
    fehs, x, thetas = _vk_table()
    theta = 5040.0 / teff
    vk = np.stack([np.interp(theta, th, x) for th in thetas])  # (4, N)
    j = np.clip(np.searchsorted(fehs, fe_h) - 1, 0, len(fehs) - 2)
    w = (fe_h - fehs[j]) / (fehs[j + 1] - fehs[j])
    idx = np.arange(teff.size)
    flat = vk.reshape(len(fehs), -1)
    return ((1 - w.ravel()) * flat[j.ravel(), idx] + w.ravel() * flat[j.ravel() + 1, idx]).reshape(teff.shape)


def bc_k(teff: np.ndarray, fe_h: np.ndarray) -> np.ndarray:
    """Ks-band bolometric correction (mag): BC_V + (V − Ks)."""
    return bc_v(teff) + v_minus_k(teff, fe_h)


_JK_T = np.array([3500, 3700, 4000, 4400, 4700, 5000, 5500, 6000, 6500, 7000], float)
_JK_C = np.array([1.25, 1.10, 0.90, 0.75, 0.65, 0.55, 0.45, 0.36, 0.28, 0.22])
_BPRP_T = np.array([3500, 3600, 3800, 4000, 4250, 4500, 4750, 5000, 5500, 5772, 6000, 6500, 7000], float)
_BPRP_C = np.array([2.80, 2.55, 2.10, 1.82, 1.58, 1.40, 1.25, 1.13, 0.92, 0.82, 0.74, 0.60, 0.48])


def jk0(teff: np.ndarray, logg: np.ndarray) -> np.ndarray:
    """Intrinsic (J − Ks)0 (mag); dwarfs 0.03 bluer than giants at fixed Teff."""
    giant = np.interp(teff, _JK_T, _JK_C)
    dwarfness = np.clip((np.asarray(logg) - 3.5) / 0.5, 0.0, 1.0)
    return giant - 0.03 * dwarfness


def hk0(jk: np.ndarray) -> np.ndarray:
    """Intrinsic (H − Ks)0 (mag) from (J − Ks)0."""
    return 0.22 * np.asarray(jk) - 0.01


def bp_rp0(teff: np.ndarray) -> np.ndarray:
    """Intrinsic Gaia (BP − RP)0 (mag) from Teff (K)."""
    return np.interp(teff, _BPRP_T, _BPRP_C)


def absolute_magnitudes(pop: Population) -> dict[str, np.ndarray]:
    """Absolute magnitudes M_J, M_H, M_K (2MASS), M_G, M_BP, M_RP (Gaia), M_V (mag)."""
    m_k = pop.m_bol - bc_k(pop.teff, pop.fe_h)
    jk = jk0(pop.teff, pop.logg)
    hk = hk0(jk)
    m_v = m_k + v_minus_k(pop.teff, pop.fe_h)
    x = bp_rp0(pop.teff)
    m_g = m_v + (-0.02704 + 0.01424 * x - 0.2156 * x**2 + 0.01426 * x**3)
    m_rp = m_g - (0.03 + 0.56 * x - 0.02 * x**2)
    return {"J": m_k + jk, "H": m_k + hk, "K": m_k, "V": m_v, "G": m_g, "BP": m_rp + x, "RP": m_rp}


@lru_cache(maxsize=1)
def _plx_err_table() -> tuple[np.ndarray, np.ndarray]:
    pos = real_positions()
    g, e = pos["g"], pos["parallax_error"]
    ok = (g > 3) & (g < 22) & (e > 0) & np.isfinite(e)
    edges = np.arange(4.0, 21.5, 0.5)
    centres, med = [], []
    for a, b in zip(edges[:-1], edges[1:]):
        sel = ok & (g >= a) & (g < b)
        if sel.sum() >= 20:
            centres.append(0.5 * (a + b))
            med.append(np.median(e[sel]))
    return np.array(centres), np.array(med)


def parallax_error_of_g(g: np.ndarray) -> np.ndarray:
    """Median Gaia DR2 parallax error (mas) of real APOGEE stars at G (mag), × 0.8 for EDR3."""
    c, m = _plx_err_table()
    lg = np.interp(np.asarray(g), c, np.log(m))
    # extrapolate faint end with the photon-noise slope (σ ∝ 10^{0.2 G})
    faint = np.asarray(g) > c[-1]
    lg = np.where(faint, np.log(m[-1]) + 0.2 * np.log(10) * (np.asarray(g) - c[-1]), lg)
    return 0.8 * np.exp(lg)


def mag_err_2mass(m: np.ndarray) -> np.ndarray:
    """Approximate 2MASS photometric error (mag) at magnitude m."""
    return np.sqrt(0.02**2 + (0.03 * 10 ** (0.4 * (np.asarray(m) - 13.5))) ** 2)


@dataclass
class Photometry:
    """Per-star observables. Distances in pc, extinction in mag, magnitudes observed (with
    extinction and noise), errors in mag, parallax/errors in mas, proper motions in mas/yr.
    ``abs_*`` are the true absolute magnitudes; ``h_true`` the noiseless apparent H."""

    dist_pc: np.ndarray
    a_k: np.ndarray
    abs_mag: dict[str, np.ndarray]
    mag: dict[str, np.ndarray]
    mag_err: dict[str, np.ndarray]
    h_true: np.ndarray
    parallax: np.ndarray
    parallax_error: np.ndarray
    pmra: np.ndarray
    pmdec: np.ndarray
    gaia_matched: np.ndarray
    nvisits: np.ndarray
    snr: np.ndarray


def observe(
    pop: Population, field: np.ndarray, glat: np.ndarray, layout: FieldLayout, rng: np.random.Generator
) -> Photometry:
    """Distances, extinction, apparent photometry with errors, parallaxes and SNR for each star."""
    n = len(pop)
    absm = absolute_magnitudes(pop)
    limit = layout.h_limit[field]
    h = limit + 0.3 - rng.exponential(0.9, n)
    low = h < 7.0
    h[low] = rng.uniform(7.0, limit[low])
    ak_inf = layout.ak_inf[field]
    ak = 0.5 * ak_inf
    for _ in range(3):
        mu = h - absm["H"] - EXT["H"] * ak
        dist_kpc = 10 ** (mu / 5.0 + 1.0) / 1000.0
        ak = ak_at_distance(ak_inf, glat, dist_kpc)
    far = dist_kpc > 30.0
    dist_kpc = np.minimum(dist_kpc, 30.0)
    ak = ak_at_distance(ak_inf, glat, dist_kpc)
    mu = 5.0 * np.log10(dist_kpc * 1000.0) - 5.0
    h_true = absm["H"] + mu + EXT["H"] * ak
    h_true = np.where(far, h_true, h)
    mag: dict[str, np.ndarray] = {}
    err: dict[str, np.ndarray] = {}
    for b in ("J", "H", "K"):
        m = absm[b] + mu + EXT[b] * ak
        e = mag_err_2mass(m)
        mag[b] = m + rng.normal(0, 1, n) * e
        err[b] = e * np.exp(rng.normal(0, 0.1, n))
    for b, e0 in (("G", 0.0003), ("BP", 0.002), ("RP", 0.0015)):
        m = absm[b] + mu + EXT[b] * ak
        e = e0 + 0.002 * 10 ** (0.4 * (m - 17.0))
        mag[b] = m + rng.normal(0, 1, n) * e
        err[b] = e
    matched = (mag["G"] < 20.7) & (rng.random(n) > 0.015)
    plx_err = parallax_error_of_g(mag["G"]) * np.exp(rng.normal(0, 0.25, n))
    plx = 1.0 / dist_kpc + PARALLAX_ZP + rng.normal(0, 1, n) * plx_err
    sig_v = np.where(pop.metal_poor, 150.0, 35.0)
    vt_ra, vt_dec = rng.normal(0, 1, (2, n)) * sig_v
    pmra = vt_ra / (4.74 * dist_kpc)
    pmdec = vt_dec / (4.74 * dist_kpc)
    nvis = np.maximum(1, rng.binomial(layout.base_visits[field] + 1, 0.7))
    snr = 80.0 * 10 ** (-0.2 * (h_true - 12.2)) * np.sqrt(nvis / 3.0) * np.exp(rng.normal(0, 0.4, n))
    snr = np.clip(snr, 3.0, 2000.0)
    return Photometry(
        dist_pc=dist_kpc * 1000.0, a_k=ak, abs_mag=absm, mag=mag, mag_err=err, h_true=h_true,
        parallax=plx, parallax_error=plx_err, pmra=pmra, pmdec=pmdec, gaia_matched=matched,
        nvisits=nvis.astype(np.int32), snr=snr,
    )


def stage_index(name: str) -> int:
    """Stage code of ``name`` in :data:`STAGES`."""
    return STAGES.index(name)
