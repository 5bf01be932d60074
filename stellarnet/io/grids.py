"""APOGEE wavelength grids and gap (chip) layouts.

Combined spectra live on an 8,575-pixel log-linear vacuum grid,
λ_i = 10**(4.179 + 6e-6 i) Å. Gap removal keeps three chip ranges (end exclusive) of it:

* ``dr17``: 246:3274, 3585:6080, 6344:8335 → 7,514 pixels (astroNN ``gap_delete``, dr=17)
* ``dr12``: 322:3242, 3648:6048, 6412:8306 → 7,214 pixels (The Cannon / The Payne grid)
"""

from __future__ import annotations

import numpy as np

N_PIX_FULL = 8575
LOGLAM0 = 4.179  # log10 Å, CRVAL1 of the combined-spectrum grid
DLOGLAM = 6e-6  # CDELT1 (dex per pixel)
#: km/s per pixel of the log-λ grid: c · ln 10 · DLOGLAM ≈ 4.14
KMS_PER_PIXEL = 299_792.458 * float(np.log(10.0)) * DLOGLAM
#: APOGEE's line-spread-function σ in pixels (R ≈ 22,500: FWHM = λ/R ≈ 3.2 pixels)
LSF_SIGMA_PIX = 1.0 / (22_500 * float(np.log(10.0)) * DLOGLAM) / 2.3548

CHIP_RANGES: dict[str, tuple[tuple[int, int], ...]] = {
    "dr17": ((246, 3274), (3585, 6080), (6344, 8335)),
    "dr12": ((322, 3242), (3648, 6048), (6412, 8306)),
}
GRID_ALIASES = {"7514": "dr17", "7214": "dr12", 7514: "dr17", 7214: "dr12"}


def grid_name(grid: str | int) -> str:
    """Canonical grid name ('dr17' or 'dr12') from a name or a pixel count."""
    g = GRID_ALIASES.get(grid, grid)
    if g not in CHIP_RANGES:
        raise ValueError(f"unknown APOGEE grid {grid!r}; use 'dr17' (7514 px) or 'dr12' (7214 px)")
    return g


def n_pixels(grid: str | int) -> int:
    """Number of pixels of a gap-removed grid."""
    return sum(b - a for a, b in CHIP_RANGES[grid_name(grid)])


def grid_indices(grid: str | int) -> np.ndarray:
    """Indices into the 8,575 grid that a gap-removed grid keeps."""
    return np.concatenate([np.arange(a, b) for a, b in CHIP_RANGES[grid_name(grid)]])


def chip_slices(grid: str | int) -> list[slice]:
    """Slices of the three chips (blue, green, red) within a gap-removed grid."""
    out, start = [], 0
    for a, b in CHIP_RANGES[grid_name(grid)]:
        out.append(slice(start, start + b - a))
        start += b - a
    return out


def wavelength_full(crval1: float = LOGLAM0, cdelt1: float = DLOGLAM, naxis1: int = N_PIX_FULL) -> np.ndarray:
    """Vacuum wavelength (Å) of a log-linear grid (defaults: the 8,575 combined grid)."""
    return 10.0 ** (crval1 + cdelt1 * np.arange(naxis1))


def wavelength(grid: str | int) -> np.ndarray:
    """Vacuum wavelength (Å) of a gap-removed grid."""
    return wavelength_full()[grid_indices(grid)]


def gap_delete(spectra: np.ndarray, grid: str | int = "dr17") -> np.ndarray:
    """Remove the chip gaps: (..., 8575) → (..., 7514 or 7214)."""
    spectra = np.asarray(spectra)
    if spectra.shape[-1] != N_PIX_FULL:
        raise ValueError(
            f"gap_delete expects spectra on the {N_PIX_FULL}-pixel combined grid, got last axis "
            f"of length {spectra.shape[-1]}"
        )
    ranges = CHIP_RANGES[grid_name(grid)]
    return np.concatenate([spectra[..., a:b] for a, b in ranges], axis=-1)  # slices: no index array


def gap_insert(spectra: np.ndarray, grid: str | int = "dr17", fill: float = 0.0) -> np.ndarray:
    """Inverse of :func:`gap_delete`: place a gap-removed spectrum on the 8,575 grid."""
    spectra = np.asarray(spectra)
    n = n_pixels(grid)
    if spectra.shape[-1] != n:
        raise ValueError(f"expected last axis {n} for grid {grid!r}, got {spectra.shape[-1]}")
    out = np.empty(spectra.shape[:-1] + (N_PIX_FULL,), dtype=spectra.dtype)
    prev = start = 0
    for a, b in CHIP_RANGES[grid_name(grid)]:  # contiguous slice copies, gaps filled once
        out[..., prev:a] = fill
        out[..., a:b] = spectra[..., start:start + b - a]
        start += b - a
        prev = b
    out[..., prev:] = fill
    return out
