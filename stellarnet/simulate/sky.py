"""Sky layout: APOGEE-like plate fields, star positions, Galactic coordinates, extinction.

Field centres are drawn from real APOGEE DR14 star positions (``apogee_dr14_gaia_positions.npz``,
astroNN, MIT), at least 3° apart, so the simulated footprint follows the real survey (disk,
bulge, halo, Kepler/K2 fields). Stars of a field lie uniformly within a 1.5° radius of its
centre (the APOGEE plate radius). Field names follow the APOGEE ``LLL±BB`` convention (Galactic
longitude / latitude of the centre). TELESCOPE: ``lco25m`` for Dec < −32°, mostly (80%) for
−32° ≤ Dec < −20°, and 3% of the northern fields; ``apo25m`` otherwise.

Each field also gets a design H limit (11.0, 12.2, 13.3 or 13.8 mag, with 1, 3, 6 or 12 visits;
the APOGEE-2 short / medium / long cohorts) used by :mod:`stellarnet.simulate.photometry`.

Extinction to infinity (K band, mag): A_K,∞ = 0.02 + 0.35 e^{−|b|/2.5°} (1 + 1.5 e^{−(l/30°)²}) × a
log-normal (σ = 0.3) patchiness factor per field; a star at distance d sees
A_K = A_K,∞ (1 − e^{−d sin|b| / 0.125 kpc}) with the path capped at 4 kpc (dust layer of
scale height 125 pc, e.g. Drimmel & Spergel 2001).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from stellarnet.common.paths import resource

__all__ = ["FieldLayout", "make_fields", "sample_positions", "galactic", "ak_infinity", "ak_at_distance", "real_positions"]

FIELD_RADIUS_DEG = 1.5
H_LIMITS = np.array([11.0, 12.2, 13.3, 13.8])
H_LIMIT_PROB = np.array([0.30, 0.50, 0.12, 0.08])
BASE_VISITS = np.array([1, 3, 6, 12])


@lru_cache(maxsize=1)
def real_positions() -> dict[str, np.ndarray]:
    """Real APOGEE DR14 × Gaia DR2 arrays (native-endian float64): RA, DEC (deg), parallax,
    parallax_error (mas), g (mag); rows with −9999 placeholders removed."""
    with np.load(resource("apogee_dr14_gaia_positions.npz")) as z:
        d = {k: np.asarray(z[k]).astype(np.float64) for k in ("RA", "DEC", "parallax", "parallax_error", "g")}
    ok = (d["RA"] > -999) & (d["DEC"] > -999) & ~((d["RA"] == 0) & (d["DEC"] == 0))
    return {k: v[ok] for k, v in d.items()}


def galactic(ra: np.ndarray, dec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(GLON, GLAT) in degrees from ICRS RA, Dec (degrees), via astropy."""
    from astropy import units as u
    from astropy.coordinates import SkyCoord

    c = SkyCoord(ra=np.asarray(ra) * u.deg, dec=np.asarray(dec) * u.deg, frame="icrs").galactic
    return np.asarray(c.l.deg), np.asarray(c.b.deg)


def _angsep(ra1: np.ndarray, dec1: np.ndarray, ra2: np.ndarray, dec2: np.ndarray) -> np.ndarray:
    """Angular separation (deg), haversine; broadcasts."""
    r1, d1, r2, d2 = map(np.radians, (ra1, dec1, ra2, dec2))
    s = np.sin((d2 - d1) / 2) ** 2 + np.cos(d1) * np.cos(d2) * np.sin((r2 - r1) / 2) ** 2
    return np.degrees(2 * np.arcsin(np.sqrt(np.clip(s, 0, 1))))


@dataclass
class FieldLayout:
    """Plate fields: centre RA/Dec/GLON/GLAT (deg), name, telescope, design H limit (mag),
    base number of visits, A_K to infinity (mag)."""

    ra: np.ndarray
    dec: np.ndarray
    glon: np.ndarray
    glat: np.ndarray
    name: np.ndarray
    telescope: np.ndarray
    h_limit: np.ndarray
    base_visits: np.ndarray
    ak_inf: np.ndarray

    def __len__(self) -> int:
        return int(self.ra.shape[0])

    def nearest_other(self, i: np.ndarray) -> np.ndarray:
        """Index of the nearest other field for each field index in ``i`` (itself if only one)."""
        i = np.asarray(i)
        if len(self) == 1:
            return np.zeros_like(i)
        sep = _angsep(self.ra[i][:, None], self.dec[i][:, None], self.ra[None, :], self.dec[None, :])
        sep[np.arange(i.shape[0]), i] = np.inf
        return np.argmin(sep, axis=1)


def ak_infinity(glon: np.ndarray, glat: np.ndarray, patch: np.ndarray | None = None) -> np.ndarray:
    """A_K to infinity (mag) from Galactic l, b (deg); ``patch`` multiplies (patchiness)."""
    lw = (np.asarray(glon) + 180.0) % 360.0 - 180.0
    ak = 0.02 + 0.35 * np.exp(-np.abs(glat) / 2.5) * (1.0 + 1.5 * np.exp(-((lw / 30.0) ** 2)))
    return ak if patch is None else ak * patch


def ak_at_distance(ak_inf: np.ndarray, glat: np.ndarray, dist_kpc: np.ndarray) -> np.ndarray:
    """A_K (mag) to distance ``dist_kpc`` through a 125 pc dust layer (path capped at 4 kpc)."""
    sinb = np.maximum(np.abs(np.sin(np.radians(glat))), 1e-3)
    path = np.minimum(0.125 / sinb, 4.0)
    return ak_inf * (1.0 - np.exp(-np.asarray(dist_kpc) / path))


def make_fields(n_fields: int, rng: np.random.Generator, min_sep_deg: float = 3.0) -> FieldLayout:
    """``n_fields`` plate fields with centres drawn from real APOGEE positions."""
    if n_fields < 1:
        raise ValueError("n_fields must be ≥ 1")
    pos = real_positions()
    ra_l: list[float] = []
    dec_l: list[float] = []
    sep = min_sep_deg
    while len(ra_l) < n_fields:
        cand = rng.integers(0, pos["RA"].shape[0], size=4 * n_fields)
        for j in cand:
            r, d = pos["RA"][j], pos["DEC"][j]
            if ra_l and _angsep(np.array(ra_l), np.array(dec_l), r, d).min() < sep:
                continue
            ra_l.append(float(r))
            dec_l.append(float(d))
            if len(ra_l) == n_fields:
                break
        sep *= 0.8  # sky full at this separation: allow closer fields
    ra, dec = np.array(ra_l), np.array(dec_l)
    glon, glat = galactic(ra, dec)
    names: list[str] = []
    seen: dict[str, int] = {}
    for l, b in zip(glon, glat):
        base = f"{int(round(l)) % 360:03d}{int(round(b)):+03d}"
        k = seen.get(base, 0)
        seen[base] = k + 1
        names.append(base if k == 0 else f"{base}_{k + 1}")
    u = rng.random(n_fields)
    south = (dec < -32) | ((dec < -20) & (u < 0.8)) | ((dec >= -20) & (u < 0.03))
    telescope = np.where(south, "lco25m", "apo25m")
    cohort = rng.choice(len(H_LIMITS), size=n_fields, p=H_LIMIT_PROB)
    patch = np.exp(rng.normal(0.0, 0.3, n_fields))
    return FieldLayout(
        ra=ra, dec=dec, glon=glon, glat=glat, name=np.array(names), telescope=telescope,
        h_limit=H_LIMITS[cohort], base_visits=BASE_VISITS[cohort], ak_inf=ak_infinity(glon, glat, patch),
    )


def sample_positions(field: np.ndarray, layout: FieldLayout, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """RA, Dec (deg) uniform within :data:`FIELD_RADIUS_DEG` of each star's field centre."""
    n = field.shape[0]
    rho = np.radians(FIELD_RADIUS_DEG) * np.sqrt(rng.random(n))
    theta = rng.uniform(0, 2 * np.pi, n)
    ra0, dec0 = np.radians(layout.ra[field]), np.radians(layout.dec[field])
    # destination point on the sphere given bearing theta and angular distance rho
    sin_dec = np.sin(dec0) * np.cos(rho) + np.cos(dec0) * np.sin(rho) * np.cos(theta)
    dec = np.arcsin(np.clip(sin_dec, -1, 1))
    ra = ra0 + np.arctan2(np.sin(theta) * np.sin(rho) * np.cos(dec0), np.cos(rho) - np.sin(dec0) * sin_dec)
    return np.degrees(ra) % 360.0, np.degrees(dec)
