"""Switchable perturbations that mirror how real APOGEE spectra differ from the default simulator.

A :class:`Shift` describes one observation-model change; :func:`stellarnet.simulate.instrument.observe_spectra`
applies it (``shift=None`` or ``Shift()`` leaves the default survey bit for bit as it was). Each
effect is one plain function here, so a test can check that it does what it says:

* :func:`broaden_lsf` — line-spread-function width × (1 + f), f per star (fibre-dependent):
  Gaussian convolution for f > 0, first-order deconvolution (unsharp masking) for f < 0.
  APOGEE's LSF: R ≈ 22,500, FWHM ≈ 3.2 pixels of the 6e-6 dex grid, σ ≈ 1.37 pixels.
* :func:`shift_velocity` — a radial-velocity zero-point residual (km/s): the spectrum is moved by
  v / :data:`~stellarnet.io.grids.KMS_PER_PIXEL` (≈ 4.14 km/s) pixels (cubic spline, per chip).
* :func:`normalize_convention` — another continuum-normalization convention: per-chip Chebyshev of
  another degree on another continuum-pixel set (``"cannon"``: degree 2 on The Cannon's pixels —
  the shards' own convention; ``"astronn"``: degree 3 on astroNN's DR17 continuum mask;
  ``"aspcap"``: degree 4 on all pixels with iterative asymmetric rejection, a pseudo-continuum
  from the upper envelope, as ASPCAP's FERRE normalization; ``"smooth"``: the inverse-variance
  weighted running mean under a Gaussian kernel exp(−Δλ²/L²), L = 50 Å, per chip — The Cannon's
  LAMOST convention, Ho et al. 2017 — a pseudo-continuum that follows the line blanketing on
  ~100 Å scales, which no low-order polynomial can undo).
* :func:`continuum_residual` — a smooth multiplicative residual ``1 + t x + q (x² − ⅓)`` across the
  whole spectrum (x ∈ [−1, 1] from the blue to the red end), t, q ~ U(−a, a) per star.
* :func:`corrupt_pixels` — outlier pixels (sky-line residuals, telluric residuals, unflagged
  cosmic rays): flux moved by many σ, error inflated by a finite factor, *not* flagged.
* :func:`add_detector_defects` — unflagged detector defects that the error array knows nothing of
  (error unchanged, no flag): cosmic-ray hits and hot pixels (single pixels + 10–200 σ), in half the
  stars one hot stretch of a column (a run of 5–20 pixels at 1.5–3 × the flux), and dead pixels that
  read ~0 — what a pipeline that flags less than APOGEE's leaves in a spectrum.
* error conventions — every error × a factor, or a flattened (per-star constant) error array.
* a lower S/N — the same stars observed with S/N × ``snr_scale`` (a survey's stars below the training
  set's S/N cut: the network must know that it knows less).
* persistence — the blue-chip persistence of the default simulator, for a larger share of stars.
* :func:`flag_pixels` — many scattered flagged pixels (runs of 1–3, e.g. around sky lines), properly
  flagged (huge error) — the default survey has ~0.5 bad-pixel runs per spectrum.
* :func:`add_companion` — an unresolved, double-lined binary (SB2): the spectrum of a cooler dwarf
  companion (same composition) at another radial velocity is added, with a flux ratio r per star:
  (primary + r · companion) / (1 + r). The truth stays the primary's labels. Not a calibration error
  but a star the training set has no like of: the fit cannot explain it, so its flags and σ must say so.
* :func:`correlate_noise` — pixel-to-pixel correlated noise, as in APOGEE's combined spectra: each
  visit is resampled (sinc interpolation) from its own detector pixels onto the common log-λ grid
  before the visits are added (Nidever et al. 2015), so neighbouring pixels share noise while the
  error array quotes each pixel's variance alone. A 3-tap kernel (a, b, a), b² + 2a² = 1, keeps the
  per-pixel variance and gives lag-1 correlation ρ = 2ab (ρ per star).

Population shifts (more dwarfs, metal-poor and hot stars) are a ``mix`` for
:func:`stellarnet.simulate.population.sample_population`, carried in :attr:`Shift.mix`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any, Mapping

import numpy as np
from numpy.polynomial import chebyshev
from scipy import ndimage

from stellarnet.common.paths import resource
from stellarnet.io import grids

__all__ = ["Shift", "SHIFT_SUITE", "broaden_lsf", "shift_velocity",
           "normalize_convention", "continuum_residual", "corrupt_pixels", "convention_pixels", "shift_suite",
           "flag_pixels", "correlate_noise", "noise_kernel", "add_companion", "draw_persistence",
           "add_detector_defects", "shared_residual_lines"]

GRID = "dr12"
CONVENTIONS = ("cannon", "astronn", "aspcap", "smooth")
#: the "smooth" convention's kernel scale L (Å) in exp(−Δλ²/L²) (Ho et al. 2017)
SMOOTH_L_ANGSTROM = 50.0
#: the largest lag-1 correlation a 3-tap unit-norm kernel (a, b, a) with b ≥ a can give: 1/√2
MAX_NOISE_CORRELATION = float(np.sqrt(0.5))


@dataclass(frozen=True)
class Shift:
    """One set of perturbations (all off by default).

    Attributes:
        lsf: (lo, hi) range of the fractional LSF-width change f per star (0.2 = 20 % broader).
        lsf_per_chip: draw f for each chip of a star independently (an LSF that differs from one
            detector to the next) instead of once per star.
        rv_kms: half-width (km/s) of a uniform radial-velocity zero-point residual per star.
        normalization: continuum convention, one of :data:`CONVENTIONS` (None: the default one).
        continuum_tilt: half-width of the uniform tilt t and curvature q of a smooth multiplicative
            continuum residual (0.02 = up to ±2 %).
        outlier_fraction: (lo, hi) range of the fraction of pixels per star that are corrupted.
        outlier_err_factor: (lo, hi) range of the factor by which a corrupted pixel's error grows.
        defects: (lo, hi) range of the fraction of pixels per star hit by unflagged detector defects
            with an ordinary error (:func:`add_detector_defects`; None: none).
        err_scale: (lo, hi) range of a per-star factor on the reported error array.
        err_flat: report a flat error array (the star's median error at every good pixel).
        persistence_fraction: share of stars (0–1) given blue-chip persistence (None: as planned).
        masked_fraction: (lo, hi) range of the fraction of pixels per star flagged bad in short
            scattered runs (:func:`flag_pixels`; None: only the default survey's bad-pixel runs).
        noise_correlation: (lo, hi) range of the lag-1 correlation ρ of the noise per star
            (:func:`correlate_noise`; the reported errors stay the per-pixel σ; None: white noise).
        companion_flux_ratio: (lo, hi) range of the flux ratio r of an unresolved companion per star
            (:func:`add_companion`; None: single stars).
        companion_velocity_kms: (lo, hi) range of the companion's |radial-velocity difference| (km/s).
        mix: population mix (keys of ``population.DEFAULT_MIX``; None: the default mix).
        snr_scale: factor on every star's S/N (0.25: a quarter; the suite scores the S/N bin scaled alike).
        shared_residual: largest depth of the absorption residuals every spectrum shares at the same pixels
            (:func:`shared_residual_lines`; 0: none).
    """

    lsf: tuple[float, float] | None = None
    lsf_per_chip: bool = False
    rv_kms: float = 0.0
    normalization: str | None = None
    continuum_tilt: float = 0.0
    outlier_fraction: tuple[float, float] | None = None
    outlier_err_factor: tuple[float, float] = (3.0, 10.0)
    defects: tuple[float, float] | None = None
    err_scale: tuple[float, float] | None = None
    err_flat: bool = False
    persistence_fraction: float | None = None
    masked_fraction: tuple[float, float] | None = None
    noise_correlation: tuple[float, float] | None = None
    companion_flux_ratio: tuple[float, float] | None = None
    companion_velocity_kms: tuple[float, float] = (10.0, 60.0)
    mix: Mapping[str, float] | None = field(default=None, hash=False)
    snr_scale: float = 1.0
    shared_residual: float = 0.0

    def __post_init__(self) -> None:
        if self.normalization is not None and self.normalization not in CONVENTIONS:
            raise ValueError(f"normalization must be one of {CONVENTIONS}, got {self.normalization!r}")
        for name in ("lsf", "outlier_fraction", "defects", "err_scale", "outlier_err_factor", "masked_fraction",
                     "noise_correlation", "companion_flux_ratio", "companion_velocity_kms"):
            v = getattr(self, name)
            if v is not None and (len(v) != 2 or v[0] > v[1]):
                raise ValueError(f"{name} must be a (lo, hi) pair with lo <= hi, got {v!r}")
        if self.lsf is not None and self.lsf[0] <= -0.5:
            raise ValueError(f"lsf change must be > -0.5, got {self.lsf}")
        if self.noise_correlation is not None and not 0 <= self.noise_correlation[0] <= self.noise_correlation[1] < MAX_NOISE_CORRELATION:
            raise ValueError(f"noise_correlation must lie in [0, {MAX_NOISE_CORRELATION:.3f}), got {self.noise_correlation}")
        if self.companion_flux_ratio is not None and self.companion_flux_ratio[0] < 0:
            raise ValueError(f"companion_flux_ratio must be >= 0, got {self.companion_flux_ratio}")
        if not 0 <= self.shared_residual < 0.5:
            raise ValueError(f"shared_residual must be in [0, 0.5), got {self.shared_residual}")
        if not self.snr_scale > 0:
            raise ValueError(f"snr_scale must be > 0, got {self.snr_scale}")
        if self.persistence_fraction is not None and not 0 <= self.persistence_fraction <= 1:
            raise ValueError(f"persistence_fraction must be in [0, 1], got {self.persistence_fraction}")

    @property
    def is_null(self) -> bool:
        return self == Shift()

    def to_dict(self) -> dict[str, Any]:
        return {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in asdict(self).items()}


#: a population the training set under-represents: more dwarfs, subgiants, metal-poor and hot stars
SHIFTED_MIX: dict[str, float] = {"RGB": 0.25, "RC": 0.12, "SG": 0.15, "MS": 0.38, "MP": 0.10}

#: the suite: one entry per real-data effect, then all combined
SHIFT_SUITE: dict[str, Shift] = {
    "none": Shift(),
    "norm_astronn": Shift(normalization="astronn"),
    "norm_aspcap": Shift(normalization="aspcap"),
    "norm_smooth": Shift(normalization="smooth"),
    "continuum_2pc": Shift(continuum_tilt=0.02),
    "outliers_2pc": Shift(outlier_fraction=(0.005, 0.05)),
    "defects": Shift(defects=(0.002, 0.01)),
    "lsf_20pc": Shift(lsf=(-0.2, 0.2)),
    "lsf_chips": Shift(lsf=(-0.2, 0.2), lsf_per_chip=True),
    "rv_1kms": Shift(rv_kms=1.0),
    "persistence": Shift(persistence_fraction=0.4),
    "masked_pixels": Shift(masked_fraction=(0.02, 0.08)),
    "correlated_noise": Shift(noise_correlation=(0.1, 0.4)),
    "err_x2": Shift(err_scale=(2.0, 2.0)),
    "err_flat": Shift(err_flat=True),
    "shared_residual": Shift(shared_residual=0.04),
    "population": Shift(mix=SHIFTED_MIX),
    # the same stars at a quarter of the S/N (12-100; scored at 25-50), below the training cut SNR > 70
    "low_snr": Shift(snr_scale=0.25),
    # every star an unresolved double-lined binary (a few per cent of real APOGEE stars): not in `combined`
    "sb2": Shift(companion_flux_ratio=(0.1, 0.5), companion_velocity_kms=(10.0, 60.0)),
    "combined": Shift(lsf=(-0.15, 0.25), rv_kms=1.0, normalization="aspcap", continuum_tilt=0.02,
                      outlier_fraction=(0.005, 0.03), err_scale=(0.7, 1.5), persistence_fraction=0.2,
                      mix=SHIFTED_MIX),
    # a stress test beyond the ranges above (about twice each effect): does σ still grow with the error?
    "combined_2x": Shift(lsf=(-0.3, 0.4), rv_kms=2.0, normalization="aspcap", continuum_tilt=0.04,
                         outlier_fraction=(0.01, 0.06), err_scale=(0.5, 2.0), persistence_fraction=0.4,
                         mix=SHIFTED_MIX),
}


def shift_suite(names: Any = None) -> dict[str, Shift]:
    """The named shifts of :data:`SHIFT_SUITE` (all when ``names`` is None); KeyError naming unknown ones."""
    if names is None:
        return dict(SHIFT_SUITE)
    unknown = [n for n in names if n not in SHIFT_SUITE]
    if unknown:
        raise KeyError(f"unknown shifts {unknown}; the suite has {list(SHIFT_SUITE)}")
    return {n: SHIFT_SUITE[n] for n in names}


def _per_chip(spectra: np.ndarray, fn: Any, per_star: np.ndarray) -> np.ndarray:
    """``fn(chip flux, value)`` on every chip of every star; ``per_star`` (N,) one value per star, or
    (N, 3) one per chip."""
    out = np.array(spectra, dtype=np.float32, copy=True)
    per_star = np.asarray(per_star)
    for c, sl in enumerate(grids.chip_slices(GRID)):
        for i, p in enumerate(per_star):
            out[i, sl] = fn(out[i, sl], float(p[c] if np.ndim(p) else p))
    return out


def broaden_lsf(model: np.ndarray, change: np.ndarray) -> np.ndarray:
    """LSF width × (1 + change) per star (``change`` (N,)) or per chip of each star ((N, 3)), (N, 7214)
    un-normalized model flux; change > −0.5."""
    change = np.asarray(change, np.float64)

    def one(chip: np.ndarray, f: float) -> np.ndarray:
        if f == 0.0:
            return chip
        s = grids.LSF_SIGMA_PIX * np.sqrt(abs((1.0 + f) ** 2 - 1.0))
        smooth = ndimage.gaussian_filter1d(chip, s, mode="nearest")
        return smooth if f > 0 else chip + (chip - smooth)  # first-order deconvolution when narrower

    return _per_chip(model, one, change)


def noise_kernel(rho: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 3-tap kernel (a, b, a) with unit norm (b² + 2a² = 1) and lag-1 correlation 2ab = ``rho``
    (b ≥ a), per value of ``rho`` in [0, :data:`MAX_NOISE_CORRELATION`): float64 arrays a, b."""
    rho = np.asarray(rho, np.float64)
    if np.any(rho < 0) or np.any(rho >= MAX_NOISE_CORRELATION):
        raise ValueError(f"rho must lie in [0, {MAX_NOISE_CORRELATION:.3f})")
    a = np.sqrt((1.0 - np.sqrt(1.0 - 2.0 * rho**2)) / 4.0)
    return a, np.sqrt(1.0 - 2.0 * a**2)


def correlate_noise(noise: np.ndarray, rho: np.ndarray) -> np.ndarray:
    """Unit-variance white noise (N, 7214) → noise with lag-1 correlation ``rho`` (N,) per star.

    Per chip, x'ᵢ = a xᵢ₋₁ + b xᵢ + a xᵢ₊₁ with b² + 2a² = 1 and 2ab = ρ (lag-2 correlation a²);
    each pixel keeps unit variance (the chip's end pixels: b² + a²)."""
    a, b = noise_kernel(rho)
    a, b = a.astype(np.float32)[:, None], b.astype(np.float32)[:, None]
    out = np.empty_like(noise)
    for sl in grids.chip_slices(GRID):
        x = noise[:, sl]
        y = b * x
        y[:, 1:] += a * x[:, :-1]
        y[:, :-1] += a * x[:, 1:]
        out[:, sl] = y
    return out


def draw_persistence(n: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Persistence levels (n,) int for a shift's ``persistence_fraction``: each star hit with probability
    ``fraction``, a hit star's level drawn from 1 low, 2 med, 3 high (0: none)."""
    hit = rng.random(n) < fraction
    return np.where(hit, rng.integers(1, 4, n), 0)


#: the companion of :func:`add_companion`: a main-sequence dwarf (logg, dex) with Teff (K) between this and
#: 300 K below the primary (at most :data:`COMPANION_TEFF_MAX`)
COMPANION_LOGG = 4.6
COMPANION_TEFF_MIN = 3600.0
COMPANION_TEFF_MAX = 5800.0


def add_companion(model: np.ndarray, labels: np.ndarray, flux_ratio: tuple[float, float],
                  velocity_kms: tuple[float, float], rng: np.random.Generator, emulator: Any) -> np.ndarray:
    """Each spectrum (N, 7214) model flux (the emulator's un-normalized flux) of the primaries with
    ``labels`` (N, 4) [Teff K, logg, [Fe/H], [α/Fe]] blended with a dwarf companion's:
    (primary + r · companion) / (1 + r), the companion scaled to the primary's continuum level (the 95th
    percentile of each spectrum) so that r ~ U(``flux_ratio``) is the H-band continuum flux ratio; the
    companion moved by ±U(``velocity_kms``) km/s (random sign), Teff ~ U(:data:`COMPANION_TEFF_MIN`,
    min(Teff − 300 K, :data:`COMPANION_TEFF_MAX`)), logg :data:`COMPANION_LOGG`, the primary's
    composition. ``emulator``: labels (N, 4) → flux (N, 7214)."""
    labels = np.atleast_2d(np.asarray(labels, np.float64))
    n = labels.shape[0]
    hi = np.clip(labels[:, 0] - 300.0, COMPANION_TEFF_MIN + 1.0, COMPANION_TEFF_MAX)
    comp = labels[:, :4].copy()
    comp[:, 0] = rng.uniform(COMPANION_TEFF_MIN, hi)
    comp[:, 1] = COMPANION_LOGG
    ratio = rng.uniform(flux_ratio[0], flux_ratio[1], n)
    dv = rng.uniform(velocity_kms[0], velocity_kms[1], n) * rng.choice([-1.0, 1.0], n)
    second = shift_velocity(np.asarray(emulator(comp), np.float32), dv)
    level = np.percentile(model, 95, axis=1) / np.percentile(second, 95, axis=1)
    second = second * level[:, None]
    return ((model + ratio[:, None] * second) / (1.0 + ratio[:, None])).astype(np.float32)


def shift_velocity(model: np.ndarray, v_kms: np.ndarray) -> np.ndarray:
    """Move each spectrum by ``v_kms`` (km/s, positive = redshift) on the log-λ grid (cubic spline)."""
    px = np.asarray(v_kms, np.float64) / grids.KMS_PER_PIXEL
    return _per_chip(model, lambda chip, p: ndimage.shift(chip, p, order=3, mode="nearest") if p else chip, px)


@lru_cache(maxsize=None)
def convention_pixels(convention: str) -> np.ndarray | None:
    """Continuum pixels (7214,) of a convention (None for ``"aspcap"``: all pixels, iteratively clipped)."""
    if convention == "cannon":  # The Cannon's continuum pixels (the default survey's convention)
        with np.load(resource("cannon_continuum_pixels_7214.npz")) as z:
            return np.asarray(z["pixels_cannon"]).astype(bool)
    if convention == "astronn":  # astroNN's DR17 mask, moved onto the DR12-era grid
        dr17 = np.load(resource("dr17_continuum_mask_7514.npy")).astype(np.float32)
        return grids.gap_delete(grids.gap_insert(dr17, "dr17", 0.0), GRID) > 0.5
    if convention in ("aspcap", "smooth"):
        return None
    raise ValueError(f"unknown convention {convention!r}; use one of {CONVENTIONS}")


_DEGREE = {"cannon": 2, "astronn": 3, "aspcap": 4}


def normalize_convention(flux: np.ndarray, err: np.ndarray, bad: np.ndarray | None,
                         convention: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Continuum-normalize (N, 7214) un-normalized spectra by ``convention`` → (flux, err, continuum)."""
    if convention == "smooth":
        return _normalize_smooth(flux, err, bad)
    pix = convention_pixels(convention)
    degree = _DEGREE[convention]
    flux = np.asarray(flux, np.float64)
    err = np.asarray(err, np.float64)
    good = np.isfinite(flux) & np.isfinite(err) & (err > 0)
    if bad is not None:
        good &= ~np.asarray(bad, bool)
    cont = np.ones_like(flux)
    for sl in grids.chip_slices(GRID):
        x = np.linspace(-1.0, 1.0, sl.stop - sl.start)
        v = chebyshev.chebvander(x, degree)
        use = good[:, sl] & (pix[sl][None, :] if pix is not None else True)
        if pix is not None:  # a fixed pixel set: every star's weighted least squares at once
            cols = np.flatnonzero(pix[sl])
            w = np.where(use[:, cols], 1.0 / np.where(use[:, cols], err[:, sl][:, cols], 1.0) ** 2, 0.0)
            vc = v[cols]
            k = vc.shape[1]
            normal = (w @ (vc[:, :, None] * vc[:, None, :]).reshape(len(cols), k * k)).reshape(-1, k, k)
            rhs = (w * np.where(use[:, cols], flux[:, sl][:, cols], 0.0)) @ vc
            cont[:, sl] = np.linalg.solve(normal, rhs[..., None])[..., 0] @ v.T
            continue
        for i in range(flux.shape[0]):
            f = flux[i, sl]
            u = use[i].copy()
            for it in range(1 if pix is not None else 6):
                coef, *_ = np.linalg.lstsq(v[u] / err[i, sl][u, None], f[u] / err[i, sl][u], rcond=None)
                c = v @ coef
                if pix is None:  # ASPCAP-like upper envelope: drop points below the fit (absorption lines),
                    r = (f - c) / err[i, sl]  # and, once the fit sits on the envelope, spikes above it
                    u = good[i, sl] & (r > -0.5) & ((r < 4.0) if it >= 3 else True)
                    if u.sum() < 4 * (degree + 1):
                        break
            cont[i, sl] = c
    return (flux / cont).astype(np.float32), (err / cont).astype(np.float32), cont.astype(np.float32)


def _normalize_smooth(flux: np.ndarray, err: np.ndarray, bad: np.ndarray | None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``"smooth"`` convention: per chip, Σ w f/σ² / Σ w/σ² with w = exp(−Δλ²/L²) over the good pixels."""
    flux = np.asarray(flux, np.float64)
    err = np.asarray(err, np.float64)
    good = np.isfinite(flux) & np.isfinite(err) & (err > 0)
    if bad is not None:
        good &= ~np.asarray(bad, bool)
    ivar = np.where(good, 1.0 / np.where(good, err, 1.0) ** 2, 0.0)
    fw = np.where(good, flux, 0.0) * ivar
    wave = grids.wavelength(GRID)
    cont = np.ones_like(flux)
    for sl in grids.chip_slices(GRID):
        angstrom_per_pixel = float(np.median(np.diff(wave[sl])))
        sigma_pix = SMOOTH_L_ANGSTROM / np.sqrt(2.0) / angstrom_per_pixel  # exp(−Δ²/L²) = Gaussian of σ = L/√2
        num = ndimage.gaussian_filter1d(fw[:, sl], sigma_pix, axis=1, mode="constant", cval=0.0)
        den = ndimage.gaussian_filter1d(ivar[:, sl], sigma_pix, axis=1, mode="constant", cval=0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            c = num / den
        cont[:, sl] = np.where(np.isfinite(c) & (c > 0), c, 1.0)
    return (flux / cont).astype(np.float32), (err / cont).astype(np.float32), cont.astype(np.float32)


def continuum_residual(n: int, amplitude: float, rng: np.random.Generator) -> np.ndarray:
    """(N, 7214) multiplicative residuals ``1 + t x + q (x² − ⅓)``, t, q ~ U(−amplitude, amplitude);
    x runs from −1 at the blue end to +1 at the red end of the spectrum (chips together)."""
    x = np.linspace(-1.0, 1.0, grids.n_pixels(GRID))
    t = rng.uniform(-amplitude, amplitude, (n, 1))
    q = rng.uniform(-amplitude, amplitude, (n, 1))
    return (1.0 + t * x + q * (x**2 - 1.0 / 3.0)).astype(np.float32)


#: :func:`shared_residual_lines`: how many, their Gaussian σ (pixels) and the seed of their positions
SHARED_RESIDUAL_LINES = 40
SHARED_RESIDUAL_SIGMA_PIX = 1.5
_SHARED_RESIDUAL_SEED = 20261207


def shared_residual_lines(depth: float) -> np.ndarray:
    """(7214,) multiplicative residual that every spectrum of a survey shares at the same pixels:
    :data:`SHARED_RESIDUAL_LINES` Gaussian absorption dips (σ 1.5 px) of depth U(0.25, 1) × ``depth``
    at fixed positions (a fixed seed) — an imperfect correction of features at fixed wavelengths of
    the spectra as a reader returns them (telluric or sky residuals of stars at similar velocities,
    another reduction's artefacts); the quoted errors do not know about them."""
    rng = np.random.default_rng(_SHARED_RESIDUAL_SEED)
    p = grids.n_pixels(GRID)
    x = np.arange(p)
    dips = np.zeros(p)
    for centre, d in zip(rng.uniform(10, p - 10, SHARED_RESIDUAL_LINES),
                         rng.uniform(0.25, 1.0, SHARED_RESIDUAL_LINES) * depth):
        dips += d * np.exp(-0.5 * ((x - centre) / SHARED_RESIDUAL_SIGMA_PIX) ** 2)
    return np.clip(1.0 - dips, 0.05, 1.0).astype(np.float32)


def flag_pixels(shape: tuple[int, int], fraction: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    """(N, P) bool: per star about a fraction U(lo, hi) of the pixels in scattered runs of 1–3 pixels
    (mean 1.75), as the pixels a pipeline flags around sky lines, bad columns and cosmic-ray hits."""
    n, p = shape
    frac = rng.uniform(fraction[0], fraction[1], (n, 1))
    run = rng.random((n, p)) < frac / 1.75  # run starts
    out = run.copy()
    for _ in range(2):  # each run grows by one more pixel with probability ½, twice
        run = np.roll(run, 1, axis=1) & (rng.random((n, p)) < 0.5)
        run[:, 0] = False
        out |= run
    return out


def add_detector_defects(flux: np.ndarray, err: np.ndarray, fraction: tuple[float, float],
                         rng: np.random.Generator, protect: np.ndarray | None = None) -> np.ndarray:
    """Unflagged detector defects, in place, the error left as it was: a fraction U(fraction) of each
    star's pixels hit — nine in ten by a cosmic ray or a hot pixel (flux + U(10, 200) σ), one in ten
    dead (flux U(−1, 1) σ: no signal) — and in half the stars one hot stretch of a column, a run of
    U(5, 20) pixels at U(1.5, 3) × the flux. ``protect`` pixels (already flagged) are left alone.
    Returns the boolean (N, P) mask of the pixels changed."""
    n, p = flux.shape
    kept = None if protect is None else flux[protect]
    hit = np.zeros((n, p), bool)
    frac = rng.uniform(fraction[0], fraction[1], n)
    for i in range(n):
        idx = rng.choice(p, size=int(round(frac[i] * p)), replace=False)
        dead = rng.random(idx.size) < 0.1
        flux[i, idx[~dead]] += (rng.uniform(10.0, 200.0, (~dead).sum()) * err[i, idx[~dead]]).astype(flux.dtype)
        flux[i, idx[dead]] = (rng.uniform(-1.0, 1.0, dead.sum()) * err[i, idx[dead]]).astype(flux.dtype)
        hit[i, idx] = True
        if rng.random() < 0.5:
            start, length = int(rng.integers(0, p - 20)), int(rng.integers(5, 21))
            flux[i, start:start + length] *= np.float32(rng.uniform(1.5, 3.0))
            hit[i, start:start + length] = True
    if protect is not None:  # flagged pixels keep what the flagging gave them
        flux[protect] = kept
        hit &= ~protect
    return hit


def corrupt_pixels(flux: np.ndarray, err: np.ndarray, fraction: tuple[float, float],
                   err_factor: tuple[float, float], rng: np.random.Generator,
                   protect: np.ndarray | None = None) -> np.ndarray:
    """Corrupt a fraction U(fraction) of each star's pixels in place: flux += ±U(5, 30) σ (two thirds
    downward, as sky-line and telluric residuals; one third upward, as cosmic rays) and σ ×
    U(err_factor) — finite, not flagged. ``protect`` pixels (e.g. already bad) are left alone.
    Returns the boolean (N, P) mask of corrupted pixels."""
    n, p = flux.shape
    hit = np.zeros((n, p), bool)
    frac = rng.uniform(fraction[0], fraction[1], n)
    for i in range(n):
        k = int(round(frac[i] * p))
        idx = rng.choice(p, size=k, replace=False)
        if protect is not None:
            idx = idx[~protect[i, idx]]
        hit[i, idx] = True
        sign = np.where(rng.random(idx.size) < 2 / 3, -1.0, 1.0)
        flux[i, idx] += (sign * rng.uniform(5.0, 30.0, idx.size) * err[i, idx]).astype(flux.dtype)
        err[i, idx] *= rng.uniform(err_factor[0], err_factor[1], idx.size).astype(err.dtype)
    return hit
