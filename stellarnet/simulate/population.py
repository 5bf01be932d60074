"""Stellar population: true labels, evolutionary stage, mass and surface abundances.

Every star gets Teff (K), logg (dex, cgs), [Fe/H], [α/Fe] inside the emulator box, a stage
(``MS``, ``SG``, ``RGB``, ``RC``; codes 0..3 as in ``stellarnet.preparation.classes.STAGES``), a mass
(M☉) and [C/Fe], [N/Fe], [Mg/Fe]. Components:

* **RGB** — resampled from real APOGEE DR17 giant labels (``dr17_rgb_labels.npy``; Teff, logg,
  [Fe/H], [α/M] used as [α/Fe]); rows outside the emulator box are not drawn. The real giant sample
  contains clump stars, so rows inside the red-clump locus are kept with probability 0.35 only
  (the RC component below replaces them).
* **RC** — core-He-burning giants with a nearly standard luminosity: log L/L☉ ~ N(1.79, 0.06)
  (giving M_Ks ≈ −1.6, Alves 2000; Hawkins et al. 2017), mass ~ N(1.2, 0.15) M☉,
  Teff ≈ 4,780 − 450·[Fe/H] K (± 70 K; metal-poor clump stars are hotter, cf. Bovy et al. 2014
  Teff_ref = 4,607 − 382.5·[Fe/H]); logg follows from g ∝ M Teff⁴ / L (≈ 2.3–2.6).
* **SG** — a track from the turn-off (Teff ≈ 6,100 K, logg ≈ 4.0) to the base of the RGB
  (≈ 5,000 K, logg ≈ 3.55), hotter for metal-poor stars.
* **MS** — dwarfs with Teff 4,000–6,950 K on a main sequence: logg_ZAMS(Teff) ≈ 4.72 at 4,000 K
  → 4.33 at 6,900 K minus an age term growing with Teff (up to 0.3 dex); mass ≈ (Teff/5772)^1.8.
* A **metal-poor tail** (the emulator box ends at [Fe/H] = −0.99): giants with [Fe/H] ∈
  [−0.97, −0.6], [α/Fe] ≈ 0.3, lower mass.

Disk chemistry for the synthetic components: [Fe/H] ~ N(−0.05, 0.22); 80% low-α
([α/Fe] = −0.08·[Fe/H] ± 0.03) and 20% high-α ([α/Fe] = 0.12 − 0.20·[Fe/H] ± 0.04, capped at 0.35).

Mixing: [C/N] by stage (first dredge-up and extra mixing; Martig et al. 2016, Masseron &
Gilmore 2015): MS/SG ≈ 0, RGB ≈ −0.25 − 0.35 (M − 1) (−0.1 more above the bump, logg < 2),
RC ≈ −0.45 − 0.35 (M − 1); ± 0.05 dex.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Mapping

import numpy as np

from stellarnet.common.labels import STAGES
from stellarnet.common.paths import resource
from stellarnet.physics.kurucz import load_emulator

__all__ = ["STAGES", "DEFAULT_MIX", "Population", "sample_population", "rc_teff_ref", "rgb_label_pool"]

#: Default fractions; "MP" = metal-poor giant tail (stage RGB). Normalized to sum 1.
DEFAULT_MIX: dict[str, float] = {"RGB": 0.52, "RC": 0.20, "SG": 0.08, "MS": 0.17, "MP": 0.03}

G_CGS = 6.674e-8  # cm³ g⁻¹ s⁻²
M_SUN = 1.989e33  # g
R_SUN = 6.957e10  # cm
TEFF_SUN = 5772.0  # K
LOGG_SUN = 4.438  # dex
MBOL_SUN = 4.74  # mag


@dataclass
class Population:
    """True properties of N stars (all arrays length N).

    teff [K], logg [dex cgs], fe_h [dex], alpha_fe [dex], stage (int code into :data:`STAGES`),
    mass [M☉], radius [R☉], lum [L☉], m_bol [mag], c_fe, n_fe, mg_fe [dex], metal_poor (bool: the
    metal-poor tail component).
    """

    teff: np.ndarray
    logg: np.ndarray
    fe_h: np.ndarray
    alpha_fe: np.ndarray
    stage: np.ndarray
    mass: np.ndarray
    radius: np.ndarray
    lum: np.ndarray
    m_bol: np.ndarray
    c_fe: np.ndarray
    n_fe: np.ndarray
    mg_fe: np.ndarray
    metal_poor: np.ndarray

    def __len__(self) -> int:
        return int(self.teff.shape[0])

    @property
    def labels(self) -> np.ndarray:
        """(N, 4) float64 emulator labels [Teff, logg, [Fe/H], [α/Fe]]."""
        return np.stack([self.teff, self.logg, self.fe_h, self.alpha_fe], axis=1)

    @property
    def stage_name(self) -> np.ndarray:
        return np.asarray(STAGES)[self.stage]

    def take(self, idx: np.ndarray) -> "Population":
        return Population(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})

    @staticmethod
    def concat(parts: list["Population"]) -> "Population":
        return Population(**{f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(Population)})


def rc_teff_ref(fe_h: np.ndarray) -> np.ndarray:
    """Bovy et al. (2014) reference temperature Teff_ref = −382.5·[Fe/H] + 4,607 K."""
    return -382.5 * np.asarray(fe_h) + 4607.0


@lru_cache(maxsize=1)
def rgb_label_pool() -> np.ndarray:
    """Real DR17 giant labels (Teff, logg, [Fe/H], [α/M]) inside the emulator box (0.5% margin)."""
    lab = np.load(resource("dr17_rgb_labels.npy")).astype(np.float64)
    emu = load_emulator()
    width = emu.x_max - emu.x_min
    lo, hi = emu.x_min + 0.005 * width, emu.x_max - 0.005 * width
    ok = np.all(np.isfinite(lab), axis=1) & np.all((lab >= lo) & (lab <= hi), axis=1)
    return lab[ok]


def _in_rc_locus(teff: np.ndarray, logg: np.ndarray, fe_h: np.ndarray) -> np.ndarray:
    """Bovy et al. 2014 RC logg window 1.8 ≤ logg ≤ 0.0018 (Teff − Teff_ref) + 2.5, logg ≥ 2.2."""
    upper = 0.0018 * (teff - rc_teff_ref(fe_h)) + 2.5
    return (logg >= 2.2) & (logg <= upper) & (teff > 4400) & (teff < 5200)


def _disk_chemistry(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    fe_h = np.clip(rng.normal(-0.05, 0.22, n), -0.95, 0.48)
    high = rng.random(n) < 0.2
    alpha = np.where(
        high,
        np.minimum(0.12 - 0.20 * fe_h, 0.35) + rng.normal(0, 0.04, n),
        -0.08 * fe_h + rng.normal(0, 0.03, n),
    )
    return fe_h, np.clip(alpha, -0.2, 0.45)


def _logg_from(mass: np.ndarray, teff: np.ndarray, lum: np.ndarray) -> np.ndarray:
    """logg = logg☉ + log M + 4 log(Teff/Teff☉) − log L (M, L in solar units)."""
    return LOGG_SUN + np.log10(mass) + 4 * np.log10(teff / TEFF_SUN) - np.log10(lum)


def _sample_rgb(rng: np.random.Generator, n: int) -> tuple[np.ndarray, ...]:
    pool = rgb_label_pool()
    out = np.empty((0, 4))
    while out.shape[0] < n:  # rejection of clump-locus rows with probability 0.65
        draw = pool[rng.integers(0, pool.shape[0], size=int(1.5 * (n - out.shape[0])) + 16)]
        keep = ~_in_rc_locus(draw[:, 0], draw[:, 1], draw[:, 2]) | (rng.random(draw.shape[0]) < 0.35)
        out = np.concatenate([out, draw[keep]])
    out = out[:n]
    fe_h, alpha = out[:, 2], out[:, 3]
    # older / alpha-rich / metal-poor giants are less massive
    mass = np.clip(rng.normal(1.25 + 0.3 * fe_h - 0.8 * np.clip(alpha - 0.1, 0, None), 0.25), 0.8, 2.5)
    return out[:, 0], out[:, 1], fe_h, alpha, mass


def _sample_mp(rng: np.random.Generator, n: int) -> tuple[np.ndarray, ...]:
    emu = load_emulator()
    fe_h = rng.uniform(-0.97, -0.6, n)
    alpha = np.clip(rng.normal(0.30, 0.05, n), 0.1, 0.45)
    logg = rng.uniform(0.6, 3.2, n)
    # metal-poor RGB: hotter at given logg; Teff ≈ 4,050 + 330·logg + 150 (for [Fe/H] ≈ −0.8) ± 60 K
    teff = 4200.0 + 330.0 * logg - 250.0 * (fe_h + 0.8) + rng.normal(0, 60, n)
    teff = np.clip(teff, emu.x_min[0] + 20, emu.x_max[0] - 20)
    mass = np.clip(rng.normal(0.85, 0.07, n), 0.7, 1.1)
    return teff, logg, fe_h, alpha, mass


def _sample_rc(rng: np.random.Generator, n: int) -> tuple[np.ndarray, ...]:
    fe_h, alpha = _disk_chemistry(rng, n)
    fe_h = np.clip(fe_h, -0.8, 0.45)
    teff = 4780.0 - 450.0 * fe_h + rng.normal(0, 70, n)
    mass = np.clip(rng.normal(1.2, 0.15, n), 0.85, 1.8)
    lum = 10 ** rng.normal(1.79, 0.06, n)
    logg = np.clip(_logg_from(mass, teff, lum), 2.25, 2.7)
    return teff, logg, fe_h, alpha, mass


def _sample_sg(rng: np.random.Generator, n: int) -> tuple[np.ndarray, ...]:
    fe_h, alpha = _disk_chemistry(rng, n)
    t = rng.random(n)
    teff = 6100.0 - 1100.0 * t - 350.0 * fe_h + rng.normal(0, 80, n)
    logg = 4.02 - 0.47 * t + rng.normal(0, 0.06, n)
    mass = np.clip(rng.normal(1.15 + 0.2 * fe_h, 0.12, n), 0.85, 1.6)
    return np.clip(teff, 4850, 6900), np.clip(logg, 3.45, 4.12), fe_h, alpha, mass


def _sample_ms(rng: np.random.Generator, n: int) -> tuple[np.ndarray, ...]:
    fe_h, alpha = _disk_chemistry(rng, n)
    # APOGEE dwarfs: broad Teff distribution peaking near 5,200 K
    teff = np.clip(rng.normal(5300.0, 650.0, n), 4000.0, 6950.0)
    x = (teff - 4000.0) / 2900.0
    logg_zams = 4.72 - 0.39 * x
    age_term = rng.random(n) * (0.05 + 0.25 * x)
    logg = np.clip(logg_zams - age_term + rng.normal(0, 0.03, n), 4.0, 4.8)
    mass = np.clip((teff / TEFF_SUN) ** 1.8 * 10 ** (0.1 * fe_h), 0.5, 1.6)
    return teff, logg, fe_h, alpha, mass


def _cn(rng: np.random.Generator, stage: np.ndarray, mass: np.ndarray, logg: np.ndarray, fe_h: np.ndarray, alpha: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = stage.shape[0]
    cn = rng.normal(0.0, 0.05, n)
    cn += np.where(stage == STAGES.index("SG"), -0.03, 0.0)
    rgb = stage == STAGES.index("RGB")
    cn += np.where(rgb, -0.25 - 0.35 * (mass - 1.0) - 0.10 * (logg < 2.0), 0.0)
    rc = stage == STAGES.index("RC")
    cn += np.where(rc, -0.45 - 0.35 * (mass - 1.0), 0.0)
    giant = rgb | rc
    # carbon drops after dredge-up; α-rich stars slightly C-enhanced
    c_fe = rng.normal(0.0, 0.05, n) + 0.3 * alpha - np.where(giant, 0.12, 0.0) - 0.05 * fe_h
    n_fe = c_fe - cn
    return c_fe, n_fe


def sample_population(n: int, rng: np.random.Generator, mix: Mapping[str, float] | None = None) -> Population:
    """Draw ``n`` stars. ``mix``: fractions for keys ``RGB, RC, SG, MS, MP`` (normalized).

    Component sizes are fixed fractions (rounded), so the population is deterministic given the
    generator state. Stars are shuffled.
    """
    mix = dict(DEFAULT_MIX if mix is None else mix)
    unknown = set(mix) - set(DEFAULT_MIX)
    if unknown:
        raise ValueError(f"unknown population components {sorted(unknown)}; use {sorted(DEFAULT_MIX)}")
    keys = [k for k in ("RGB", "RC", "SG", "MS", "MP") if mix.get(k, 0) > 0]
    frac = np.array([float(mix[k]) for k in keys])
    if (frac < 0).any() or frac.sum() <= 0:
        raise ValueError(f"invalid mix {mix}")
    frac = frac / frac.sum()
    counts = np.floor(frac * n).astype(int)
    counts[np.argmax(frac)] += n - counts.sum()
    samplers = {"RGB": _sample_rgb, "RC": _sample_rc, "SG": _sample_sg, "MS": _sample_ms, "MP": _sample_mp}
    stage_of = {"RGB": "RGB", "RC": "RC", "SG": "SG", "MS": "MS", "MP": "RGB"}
    cols: list[np.ndarray] = []
    stage_l, mp_l = [], []
    for k, c in zip(keys, counts):
        teff, logg, fe_h, alpha, mass = samplers[k](rng, int(c))
        cols.append(np.stack([teff, logg, fe_h, alpha, mass], axis=1))
        stage_l.append(np.full(int(c), STAGES.index(stage_of[k]), np.int16))
        mp_l.append(np.full(int(c), k == "MP"))
    arr = np.concatenate(cols) if cols else np.empty((0, 5))
    stage = np.concatenate(stage_l) if stage_l else np.empty(0, np.int16)
    metal_poor = np.concatenate(mp_l) if mp_l else np.empty(0, bool)
    perm = rng.permutation(n)
    arr, stage, metal_poor = arr[perm], stage[perm], metal_poor[perm]
    emu = load_emulator()
    width = emu.x_max - emu.x_min
    labels = np.clip(arr[:, :4], emu.x_min + 0.002 * width, emu.x_max - 0.002 * width)
    teff, logg, fe_h, alpha = labels.T
    mass = arr[:, 4]
    radius = np.sqrt(G_CGS * mass * M_SUN / 10**logg) / R_SUN
    lum = radius**2 * (teff / TEFF_SUN) ** 4
    m_bol = MBOL_SUN - 2.5 * np.log10(lum)
    c_fe, n_fe = _cn(rng, stage, mass, logg, fe_h, alpha)
    mg_fe = 1.05 * alpha + rng.normal(0.0, 0.03, n)
    return Population(
        teff=teff, logg=logg, fe_h=fe_h, alpha_fe=alpha, stage=stage, mass=mass, radius=radius,
        lum=lum, m_bol=m_bol, c_fe=c_fe, n_fe=n_fe, mg_fe=mg_fe, metal_poor=metal_poor,
    )
