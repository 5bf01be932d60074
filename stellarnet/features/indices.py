"""Spectral indices (equivalent widths and band depths) on continuum-normalized APOGEE spectra.

An index window has a central band ``[lo, hi]`` and up to two pseudo-continuum side bands (blue,
red); all wavelengths are **vacuum Å** (APOGEE spectra are on a vacuum grid). The window table
lives in ``conf/features/default.yaml`` (``indices.windows``).

Measurement (per spectrum, per window)
--------------------------------------
* Pixel weights ``w_i`` (Å) are the overlap of each pixel's extent with a band, so a band edge
  that falls inside a pixel counts that pixel fractionally. Pixel extents come from the midpoints
  between neighbouring pixel centres (chip gaps of a gap-removed grid are detected and not
  bridged). The weights are computed once per (wavelength grid, window table) and reused.
* Pseudo-continuum ``F_c(λ)`` (``continuum="linear"``): the straight line through the
  weighted-mean flux of the good pixels of each side band, placed at the weighted-mean wavelength
  of those pixels. A side band is usable when at most ``max_masked_fraction_continuum`` of its
  width is masked or off the grid; with only one usable side band ``F_c`` is flat at that band's
  level, with none the index is NaN. ``continuum="unity"`` uses ``F_c = 1`` (spectra that are
  already continuum-normalized).
* Equivalent width ``EW = Σ w_i g_i (1 − F_i/F_c,i)`` (Å) over the central band, g_i = 1 for
  good and 0 for masked pixels: masked pixels are excluded (they add nothing; a masked line wing
  costs little, a masked line core biases the EW low, which ``max_masked_fraction`` bounds).
* Band depth ``D = Σ w_i g_i (1 − F_i/F_c,i) / Σ w_i g_i`` (dimensionless): the mean depth of
  the good pixels. Without masked pixels ``EW = W · D`` with ``W = hi − lo`` the band width.
* If more than ``max_masked_fraction`` of the central band is masked (or off the grid) the index
  and its error are NaN.
* Errors: ``σ_EW² = Σ (w_i g_i σ_i / F_c,i)²`` and ``σ_D = σ_EW / Σ w_i g_i``, plus, with
  ``continuum_error=True``, the first-order propagated noise of the two side-band mean fluxes
  (independent pixels).

Masked pixels are those with ``pix_mask == 0`` and any pixel with non-finite flux or non-finite /
non-positive error. Everything is vectorized over the spectra: ``flux`` is (N, P).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stellarnet.common.files import to_plain

__all__ = [
    "KINDS",
    "CONTINUUM_MODES",
    "IndexWindow",
    "IndexMeasurer",
    "air_to_vacuum",
    "brackett_wavelength",
    "default_windows",
    "load_windows",
    "measure_indices",
    "pixel_edges",
]

#: Index kinds: ``ew`` equivalent width (Å), ``depth`` mean fractional band depth (dimensionless).
KINDS: tuple[str, ...] = ("ew", "depth")
#: Pseudo-continuum modes (see module docstring).
CONTINUUM_MODES: tuple[str, ...] = ("linear", "unity")

_RYDBERG_H = 109677.5834  # cm^-1, Rydberg constant for hydrogen (reduced-mass corrected)


def air_to_vacuum(wavelength_air: float | np.ndarray) -> float | np.ndarray:
    """Vacuum wavelength (Å) from an air wavelength (Å), valid above 2000 Å.

    Refractive index of Morton (2000) / Ciddor (1996) as used by VALD:
    ``n = 1 + 8.336624212083e-5 + 2.408926869968e-2/(130.1065924522 − s²)
    + 1.599740894897e-4/(38.92568793293 − s²)`` with ``s = 10⁴/λ_air`` (µm⁻¹).
    In the H band ``λ_vac − λ_air ≈ 4.4 Å``.
    """
    lam = np.asarray(wavelength_air, dtype=float)
    s2 = (1e4 / lam) ** 2
    n = 1.0 + 8.336624212083e-5 + 2.408926869968e-2 / (130.1065924522 - s2) + 1.599740894897e-4 / (
        38.92568793293 - s2
    )
    out = lam * n
    return float(out) if out.ndim == 0 else out


def brackett_wavelength(n_upper: int) -> float:
    """Vacuum wavelength (Å) of the hydrogen Brackett line n_upper → 4 (Rydberg formula).

    E.g. Br11 16,811.2 Å, Br12 16,411.7 Å, Br13 16,113.8 Å, Br16 15,560.8 Å.
    """
    if int(n_upper) <= 4:
        raise ValueError(f"Brackett lines need an upper level > 4, got {n_upper}")
    n = int(n_upper)
    return 1e8 / (_RYDBERG_H * (1.0 / 16.0 - 1.0 / n**2))


def _band(value: Any, what: str) -> tuple[float, float] | None:
    if value is None:
        return None
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be [lo, hi] in Å or null, got {value!r}") from None
    if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
        raise ValueError(f"{what} must satisfy lo < hi (finite, Å), got [{lo}, {hi}]")
    return (lo, hi)


@dataclass(frozen=True)
class IndexWindow:
    """One index definition; bands are [lo, hi] in vacuum Å.

    ``name`` is an identifier (e.g. ``FE1_15212``); the output columns are ``<KIND>_<name>`` and
    ``<KIND>_<name>_ERR`` (e.g. ``EW_FE1_15212`` in Å, ``DEPTH_CO_16194`` dimensionless).
    """

    name: str
    species: str
    kind: str
    band: tuple[float, float]
    blue: tuple[float, float] | None = None
    red: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if not self.name or not str(self.name).replace("_", "").isalnum():
            raise ValueError(f"index name must be a non-empty identifier (letters, digits, _), got {self.name!r}")
        if self.kind not in KINDS:
            raise ValueError(f"index {self.name}: kind must be one of {KINDS}, got {self.kind!r}")
        band = _band(self.band, f"index {self.name} band")
        blue = _band(self.blue, f"index {self.name} blue band")
        red = _band(self.red, f"index {self.name} red band")
        assert band is not None
        object.__setattr__(self, "band", band)
        object.__setattr__(self, "blue", blue)
        object.__setattr__(self, "red", red)
        if blue is not None and blue[1] > band[0]:
            raise ValueError(f"index {self.name}: blue band {blue} must end at or before the central band {band}")
        if red is not None and red[0] < band[1]:
            raise ValueError(f"index {self.name}: red band {red} must start at or after the central band {band}")

    @property
    def column(self) -> str:
        """Output column of the index value."""
        return f"{self.kind.upper()}_{self.name}"

    @property
    def err_column(self) -> str:
        """Output column of the index error."""
        return f"{self.column}_ERR"

    @property
    def width(self) -> float:
        """Central band width (Å)."""
        return self.band[1] - self.band[0]

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any]) -> IndexWindow:
        """Build from a config entry ``{name, species, kind, band, blue, red, ...}`` (extra keys
        such as ``air``, ``vacuum`` or ``note`` are documentation and ignored here)."""
        missing = [k for k in ("name", "kind", "band") if k not in m]
        if missing:
            raise ValueError(f"index window entry {dict(m)!r} lacks {missing}")
        return cls(
            name=str(m["name"]),
            species=str(m.get("species", "")),
            kind=str(m["kind"]).lower(),
            band=m["band"],
            blue=m.get("blue"),
            red=m.get("red"),
        )



def default_windows(path: str | Path | None = None) -> list[IndexWindow]:
    """The window table of ``conf/features/default.yaml`` (or the features config at ``path``)."""
    from omegaconf import OmegaConf

    from stellarnet.common.paths import CONF_DIR

    p = Path(path) if path is not None else CONF_DIR / "features" / "default.yaml"
    cfg = OmegaConf.to_container(OmegaConf.load(p), resolve=False)
    if not isinstance(cfg, dict) or "indices" not in cfg:
        raise ValueError(f"{p} has no 'indices' section")
    return load_windows(cfg["indices"])


def load_windows(spec: Any = None) -> list[IndexWindow]:
    """Windows from ``None`` (the default table), an ``indices`` config mapping with ``windows``,
    or a sequence of mappings / :class:`IndexWindow`. Names must be unique."""
    spec = to_plain(spec)
    if spec is None:
        return default_windows()
    if isinstance(spec, Mapping):
        if "windows" not in spec:
            raise ValueError("an indices config mapping needs a 'windows' list")
        spec = spec["windows"]
    out = [w if isinstance(w, IndexWindow) else IndexWindow.from_mapping(w) for w in spec]
    names = [w.column for w in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"duplicate index windows: {dup}")
    return out


# --------------------------------------------------------------------------- pixel plans


def pixel_edges(wavelength: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper edges (Å) of each pixel of a monotonically increasing wavelength grid.

    Edges sit halfway between neighbouring pixel centres. Where the spacing to one neighbour is
    more than 1.5× the spacing to the other (a chip gap in a gap-removed grid, or the grid end),
    the smaller spacing is used on both sides, so pixels never extend across a gap.
    """
    lam = np.asarray(wavelength, dtype=float)
    if lam.ndim != 1 or lam.size < 2:
        raise ValueError("wavelength must be a 1-D array of at least 2 pixels (Å)")
    d = np.diff(lam)
    if not np.all(d > 0):
        raise ValueError("wavelength must be strictly increasing")
    left = np.concatenate([[d[0]], d])
    right = np.concatenate([d, [d[-1]]])
    left = np.where(left > 1.5 * right, right, left)
    right = np.where(right > 1.5 * left, left, right)
    return lam - 0.5 * left, lam + 0.5 * right


@dataclass(frozen=True)
class _BandPlan:
    start: int  # first pixel (inclusive)
    stop: int  # last pixel (exclusive)
    weight: np.ndarray  # (k,) overlap of each pixel with the band, Å
    lam: np.ndarray  # (k,) pixel centres, Å
    width: float  # nominal band width, Å


def _plan_band(lo_e: np.ndarray, hi_e: np.ndarray, lam: np.ndarray, band: tuple[float, float] | None) -> _BandPlan | None:
    if band is None:
        return None
    lo, hi = band
    overlap = np.clip(np.minimum(hi_e, hi) - np.maximum(lo_e, lo), 0.0, None)
    idx = np.flatnonzero(overlap > 0)
    if idx.size == 0:
        return None
    s, e = int(idx[0]), int(idx[-1]) + 1
    return _BandPlan(s, e, overlap[s:e].copy(), lam[s:e].copy(), hi - lo)


@dataclass(frozen=True)
class _WindowPlan:
    window: IndexWindow
    central: _BandPlan | None
    blue: _BandPlan | None
    red: _BandPlan | None


class IndexMeasurer:
    """Measures a window table on spectra sampled on one wavelength grid (Å, vacuum).

    The per-window pixel ranges and weights are computed in the constructor; :meth:`measure` is
    then vectorized over spectra. See the module docstring for the estimator and its errors.
    """

    def __init__(
        self,
        wavelength: np.ndarray,
        windows: Sequence[IndexWindow] | None = None,
        continuum: str = "linear",
        continuum_error: bool = True,
        max_masked_fraction: float = 0.25,
        max_masked_fraction_continuum: float = 0.5,
    ) -> None:
        if continuum not in CONTINUUM_MODES:
            raise ValueError(f"continuum must be one of {CONTINUUM_MODES}, got {continuum!r}")
        for name, v in (("max_masked_fraction", max_masked_fraction),
                        ("max_masked_fraction_continuum", max_masked_fraction_continuum)):
            if not (0.0 <= float(v) < 1.0):
                raise ValueError(f"{name} must be in [0, 1), got {v!r}")
        self.wavelength = np.asarray(wavelength, dtype=float)
        self.windows = load_windows(windows)
        self.continuum = continuum
        self.continuum_error = bool(continuum_error)
        self.max_masked_fraction = float(max_masked_fraction)
        self.max_masked_fraction_continuum = float(max_masked_fraction_continuum)
        lo_e, hi_e = pixel_edges(self.wavelength)
        self.plans = [
            _WindowPlan(w, _plan_band(lo_e, hi_e, self.wavelength, w.band),
                        _plan_band(lo_e, hi_e, self.wavelength, w.blue),
                        _plan_band(lo_e, hi_e, self.wavelength, w.red))
            for w in self.windows
        ]

    @property
    def columns(self) -> list[str]:
        """Output columns: value then error for each window, in table order."""
        out: list[str] = []
        for w in self.windows:
            out += [w.column, w.err_column]
        return out

    # ------------------------------------------------------------------ internals
    def _side(self, plan: _BandPlan | None, flux: np.ndarray, err: np.ndarray, good: np.ndarray, n: int):
        """(usable, mean flux, mean λ, variance of the mean flux) per spectrum for a side band."""
        if plan is None:
            z = np.zeros(n)
            return np.zeros(n, bool), z, z, z
        sl = slice(plan.start, plan.stop)
        u = plan.weight[None, :] * good[:, sl]
        usum = u.sum(axis=1)
        ok = (usum > 0) & (1.0 - usum / plan.width <= self.max_masked_fraction_continuum + 1e-12)
        safe = np.where(usum > 0, usum, 1.0)
        f = np.where(good[:, sl], flux[:, sl], 0.0)
        s = np.where(good[:, sl], err[:, sl], 0.0)
        mean_f = (u * f).sum(axis=1) / safe
        mean_l = (u * plan.lam[None, :]).sum(axis=1) / safe
        var = (u**2 * s**2).sum(axis=1) / safe**2
        return ok, mean_f, mean_l, var

    def _one(self, plan: _WindowPlan, flux: np.ndarray, err: np.ndarray, good: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = flux.shape[0]
        nan = np.full(n, np.nan)
        c = plan.central
        if c is None:
            return nan, nan.copy()
        sl = slice(c.start, c.stop)
        g = good[:, sl]
        wg = c.weight[None, :] * g  # (N, k) Å
        wsum = wg.sum(axis=1)
        valid = (wsum > 0) & (1.0 - wsum / c.width <= self.max_masked_fraction + 1e-12)
        f = np.where(g, flux[:, sl], 0.0)
        s = np.where(g, err[:, sl], 0.0)

        if self.continuum == "unity":
            fc = np.ones_like(f)
            a = b = None
        else:
            ok_b, fb, lb, vb = self._side(plan.blue, flux, err, good, n)
            ok_r, fr, lr, vr = self._side(plan.red, flux, err, good, n)
            both = ok_b & ok_r
            valid &= ok_b | ok_r
            dl = np.where(both, lr - lb, 1.0)
            dl = np.where(dl != 0, dl, 1.0)
            a = np.where(both[:, None], (lr[:, None] - c.lam[None, :]) / dl[:, None],
                         np.where(ok_b[:, None], 1.0, 0.0))
            b = 1.0 - a
            b = np.where((ok_b | ok_r)[:, None], b, 0.0)
            fc = a * fb[:, None] + b * fr[:, None]
        fc_bad = ((fc <= 0) | ~np.isfinite(fc)) & g
        valid &= ~fc_bad.any(axis=1)
        fc_safe = np.where(fc > 0, fc, 1.0)
        ratio = f / fc_safe
        safe_w = np.where(wsum > 0, wsum, 1.0)
        depth = (wg * (1.0 - ratio)).sum(axis=1) / safe_w
        var = ((wg * s / fc_safe) ** 2).sum(axis=1) / safe_w**2
        if a is not None and self.continuum_error:
            # ∂D/∂F_side = Σ w g F a / F_c² / Σ w g  (a → b for the red band)
            common = wg * f / fc_safe**2
            d_b = (common * a).sum(axis=1) / safe_w
            d_r = (common * b).sum(axis=1) / safe_w
            var = var + d_b**2 * np.where(ok_b, vb, 0.0) + d_r**2 * np.where(ok_r, vr, 0.0)
        scale = wsum if plan.window.kind == "ew" else 1.0  # EW = Σ w g (1 − F/F_c) = D · Σ w g
        value = np.where(valid, scale * depth, np.nan)
        error = np.where(valid, scale * np.sqrt(var), np.nan)
        return value, error

    # ------------------------------------------------------------------ public
    def measure(
        self, flux: np.ndarray, flux_err: np.ndarray, pix_mask: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        """Indices for spectra ``flux`` (N, P) or (P,), errors ``flux_err`` (same shape) and an
        optional ``pix_mask`` (1/True good, 0/False bad). Returns ``{column: (N,) float64}`` with
        the columns of :attr:`columns` (EW in Å, depth dimensionless; NaN where not measurable)."""
        flux = np.atleast_2d(np.asarray(flux, dtype=float))
        err = np.atleast_2d(np.asarray(flux_err, dtype=float))
        if flux.shape != err.shape:
            raise ValueError(f"flux {flux.shape} and flux_err {err.shape} shapes differ")
        if flux.shape[1] != self.wavelength.size:
            raise ValueError(
                f"spectra have {flux.shape[1]} pixels but the wavelength grid has {self.wavelength.size}"
            )
        good = np.isfinite(flux) & np.isfinite(err) & (err > 0)
        if pix_mask is not None:
            pm = np.atleast_2d(np.asarray(pix_mask))
            if pm.shape != flux.shape:
                raise ValueError(f"pix_mask {pm.shape} and flux {flux.shape} shapes differ")
            good &= pm.astype(bool)
        flux = np.where(good, flux, 0.0)
        err = np.where(good, err, 0.0)
        out: dict[str, np.ndarray] = {}
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            for plan in self.plans:
                v, e = self._one(plan, flux, err, good)
                out[plan.window.column] = v
                out[plan.window.err_column] = e
        return out

    def measure_frame(
        self, flux: np.ndarray, flux_err: np.ndarray, pix_mask: np.ndarray | None = None, index: Iterable | None = None
    ) -> pd.DataFrame:
        """:meth:`measure` as a DataFrame (columns :attr:`columns`)."""
        res = self.measure(flux, flux_err, pix_mask)
        return pd.DataFrame(res, columns=self.columns, index=index)

    def coverage(self) -> pd.DataFrame:
        """Per window: fraction (0–1) of the central, blue and red bands that the grid covers."""
        rows = []
        for p in self.plans:
            row = {"column": p.window.column}
            for key, bp, band in (("central", p.central, p.window.band), ("blue", p.blue, p.window.blue),
                                  ("red", p.red, p.window.red)):
                row[key] = np.nan if band is None else (0.0 if bp is None else float(bp.weight.sum() / bp.width))
            rows.append(row)
        return pd.DataFrame(rows)


_CACHE: dict[tuple, IndexMeasurer] = {}
_CACHE_MAX = 8


def measure_indices(
    wavelength: np.ndarray,
    flux: np.ndarray,
    flux_err: np.ndarray,
    pix_mask: np.ndarray | None = None,
    windows: Sequence[IndexWindow] | Mapping[str, Any] | None = None,
    continuum: str = "linear",
    continuum_error: bool = True,
    max_masked_fraction: float = 0.25,
    max_masked_fraction_continuum: float = 0.5,
) -> pd.DataFrame:
    """Measure index ``windows`` (default table if None) on spectra (N, P) sampled at
    ``wavelength`` (Å, vacuum). The pixel plan is cached per (grid, windows, settings)."""
    wins = tuple(load_windows(windows))
    lam = np.ascontiguousarray(wavelength, dtype=float)
    key = (hashlib.sha1(lam.tobytes()).hexdigest(), wins, continuum, bool(continuum_error),
           float(max_masked_fraction), float(max_masked_fraction_continuum))
    m = _CACHE.get(key)
    if m is None:
        m = IndexMeasurer(lam, list(wins), continuum, continuum_error, max_masked_fraction,
                          max_masked_fraction_continuum)
        if len(_CACHE) >= _CACHE_MAX:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = m
    return m.measure_frame(flux, flux_err, pix_mask)
