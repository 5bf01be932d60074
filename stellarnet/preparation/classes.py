"""Class labels derived from stellar labels: spectral type, luminosity class, evolutionary stage.

All functions return integer codes with −1 = undefined (NaN input, outside every interval).
Thresholds live in ``conf/data/classes/default.yaml`` (Hydra group ``data/classes``).

* Spectral type from Teff (K): F [6000, 7300), G [5300, 6000), K [3900, 5300), M < 3900 →
  codes index :data:`SPECTRAL_TYPES`; hotter/cooler than every interval → −1.
* Luminosity class from logg (dex): I < 0.5, II [0.5, 1.0), III [1.0, 3.5), IV [3.5, 4.0),
  V ≥ 4.0 → codes index :data:`LUMINOSITY_CLASSES`.
  (With custom thresholds, the code is the position of the key in the thresholds mapping.)
* Evolutionary stage → :data:`STAGES` = MS 0, SG 1, RGB 2, RC 3. Kiel diagram first:
  logg ≥ 4.1 → MS; 3.5 ≤ logg < 4.1 and Teff ≥ 4800 K → SG; 3.5 ≤ logg < 4.1 and Teff < 4800 K
  (base of the giant branch) or logg < 3.5 → giant. Giants are RC or RGB: PARAMFLAG[LOGG] bit
  24 SPEC_RC / 25 SPEC_RGB decide when either is set, else Bovy et al. (2014):
  1.8 ≤ logg ≤ 0.0018 (Teff − Teff_ref) + 2.5, Teff_ref = −382.5 [Fe/H] + 4607 K, and
  0.5 ≤ (J−Ks)0 ≤ 0.8 where (J−Ks)0 is given and finite. Teff or logg NaN → −1; [Fe/H] NaN → −1
  only for giants that need the Bovy test.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from stellarnet.common.files import to_plain
from stellarnet.common.labels import CLASS_TASKS, LUMINOSITY_CLASSES, SPECTRAL_TYPES, STAGES
from stellarnet.io.bitmasks import PARAM_ORDER, PARAMFLAG

__all__ = [
    "SPECTRAL_TYPES",
    "LUMINOSITY_CLASSES",
    "STAGES",
    "CLASS_TASKS",
    "MS",
    "SG",
    "RGB",
    "RC",
    "DEFAULT_SPECTRAL_THRESHOLDS",
    "DEFAULT_LUMINOSITY_THRESHOLDS",
    "DEFAULT_STAGE_CONFIG",
    "load_class_config",
    "class_names",
    "spectral_type",
    "luminosity_class",
    "evolutionary_stage",
    "derive_classes",
]

MS, SG, RGB, RC = 0, 1, 2, 3

Interval = Sequence[float | None]

DEFAULT_SPECTRAL_THRESHOLDS: dict[str, tuple[float | None, float | None]] = {
    "F": (6000.0, 7300.0),
    "G": (5300.0, 6000.0),
    "K": (3900.0, 5300.0),
    "M": (None, 3900.0),
}
DEFAULT_LUMINOSITY_THRESHOLDS: dict[str, tuple[float | None, float | None]] = {
    "I": (None, 0.5),
    "II": (0.5, 1.0),
    "III": (1.0, 3.5),
    "IV": (3.5, 4.0),
    "V": (4.0, None),
}
DEFAULT_STAGE_CONFIG: dict[str, Any] = {
    "giant_logg_max": 3.5,
    "subgiant_logg_max": 4.1,
    "subgiant_teff_min": 4800.0,
    "use_paramflag": True,
    "rc_logg_min": 1.8,
    "rc_logg_slope": 0.0018,
    "rc_logg_intercept": 2.5,
    "rc_teff_ref_zero": 4607.0,
    "rc_teff_ref_feh_slope": -382.5,
    "rc_jk0_range": (0.5, 0.8),
}

_SPEC_RC = 1 << PARAMFLAG.bit("SPEC_RC")
_SPEC_RGB = 1 << PARAMFLAG.bit("SPEC_RGB")



def load_class_config(path: str | None = None) -> dict[str, Any]:
    """The class-threshold mapping from ``conf/data/classes/default.yaml`` (or ``path``)."""
    from omegaconf import OmegaConf

    from stellarnet.common.paths import CONF_DIR

    p = CONF_DIR / "data" / "classes" / "default.yaml" if path is None else path
    cfg = OmegaConf.to_container(OmegaConf.load(p), resolve=True)
    if not isinstance(cfg, dict):
        raise ValueError(f"{p} must hold a mapping with spectral_type/luminosity_class/stage")
    return cfg


def _intervals(
    thresholds: Mapping[str, Interval] | None, default: Mapping[str, Interval], what: str
) -> tuple[list[str], np.ndarray, np.ndarray]:
    th = to_plain(thresholds) if thresholds is not None else default
    if not isinstance(th, Mapping) or not th:
        raise ValueError(f"{what} thresholds must be a non-empty mapping name -> [lo, hi]")
    names, lo, hi = [], [], []
    for name, iv in th.items():
        if isinstance(iv, (str, bytes)) or not isinstance(iv, Sequence) or len(iv) != 2:
            raise ValueError(
                f"{what} threshold for {name!r} must be [lo, hi] (null = open), got {iv!r}"
            )
        a = -np.inf if iv[0] is None else float(iv[0])
        b = np.inf if iv[1] is None else float(iv[1])
        if not a < b:
            raise ValueError(f"{what} threshold for {name!r}: lower bound {a} >= upper {b}")
        names.append(str(name))
        lo.append(a)
        hi.append(b)
    lo_a, hi_a = np.array(lo), np.array(hi)
    order = np.argsort(lo_a)
    if np.any(lo_a[order][1:] < hi_a[order][:-1]):
        raise ValueError(f"{what} thresholds overlap: {dict(th)!r}")
    return names, lo_a, hi_a


def _bin(values: Any, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    x = np.asarray(values, dtype=float)
    out = np.full(x.shape, -1, dtype=np.int64)
    for code, (a, b) in enumerate(zip(lo, hi)):
        out[(x >= a) & (x < b)] = code  # NaN compares False → stays −1
    return out


def _scalar_or_array(out: np.ndarray) -> np.ndarray | int:
    return int(out) if out.ndim == 0 else out


def class_names(cfg: Mapping[str, Any] | None = None) -> dict[str, tuple[str, ...]]:
    """Names of the codes of each class task under ``cfg`` (default: the shipped config)."""
    cfg = load_class_config() if cfg is None else to_plain(cfg)
    st = cfg.get("spectral_type")
    lc = cfg.get("luminosity_class")
    return {
        "spectral_type": tuple(st) if st else SPECTRAL_TYPES,
        "luminosity_class": tuple(lc) if lc else LUMINOSITY_CLASSES,
        "stage": STAGES,
    }


def spectral_type(
    teff: Any, thresholds: Mapping[str, Interval] | None = None
) -> np.ndarray | int:
    """Spectral-type code from Teff (K): [lo, hi) intervals, default :data:`SPECTRAL_TYPES`
    order; −1 outside every interval or NaN. Scalar in → int out."""
    names, lo, hi = _intervals(thresholds, DEFAULT_SPECTRAL_THRESHOLDS, "spectral_type")
    return _scalar_or_array(_bin(teff, lo, hi))


def luminosity_class(
    logg: Any, thresholds: Mapping[str, Interval] | None = None
) -> np.ndarray | int:
    """Luminosity-class code from logg (dex): [lo, hi) intervals, default
    :data:`LUMINOSITY_CLASSES` order (I=0 … V=4); −1 for NaN. Scalar in → int out."""
    names, lo, hi = _intervals(thresholds, DEFAULT_LUMINOSITY_THRESHOLDS, "luminosity_class")
    return _scalar_or_array(_bin(logg, lo, hi))


def _stage_cfg(cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    c = dict(DEFAULT_STAGE_CONFIG)
    if cfg is not None:
        cfg = to_plain(cfg)
        unknown = set(cfg) - set(DEFAULT_STAGE_CONFIG)
        if unknown:
            raise ValueError(
                f"unknown stage config key(s) {sorted(unknown)}; known: {sorted(DEFAULT_STAGE_CONFIG)}"
            )
        c.update(cfg)
    if not c["giant_logg_max"] <= c["subgiant_logg_max"]:
        raise ValueError(
            f"stage config: giant_logg_max {c['giant_logg_max']} must be <= "
            f"subgiant_logg_max {c['subgiant_logg_max']}"
        )
    return c


def evolutionary_stage(
    teff: Any,
    logg: Any,
    feh: Any,
    paramflag_logg: Any = None,
    jk0: Any = None,
    cfg: Mapping[str, Any] | None = None,
) -> np.ndarray | int:
    """Evolutionary-stage code (0 MS, 1 SG, 2 RGB, 3 RC, −1 undefined); rules in the module
    docstring. ``teff`` K, ``logg`` dex, ``feh`` dex, ``paramflag_logg`` the PARAMFLAG integer of
    the LOGG entry (NaN/None = unknown), ``jk0`` (J−Ks)0 in mag, ``cfg`` the ``stage`` section of
    the class config. Inputs broadcast; scalar in → int out."""
    c = _stage_cfg(cfg)
    t, g, f = np.broadcast_arrays(
        np.asarray(teff, dtype=float), np.asarray(logg, dtype=float), np.asarray(feh, dtype=float)
    )
    shape = t.shape
    out = np.full(shape, -1, dtype=np.int64)
    known = np.isfinite(t) & np.isfinite(g)

    ms = known & (g >= c["subgiant_logg_max"])
    band = known & (g >= c["giant_logg_max"]) & (g < c["subgiant_logg_max"])
    sg = band & (t >= c["subgiant_teff_min"])
    giant = known & ((g < c["giant_logg_max"]) | (band & (t < c["subgiant_teff_min"])))
    out[ms] = MS
    out[sg] = SG

    decided = np.zeros(shape, dtype=bool)
    if paramflag_logg is not None and c["use_paramflag"]:
        pf = np.broadcast_to(np.asarray(paramflag_logg, dtype=float), shape)
        pf_ok = np.isfinite(pf)
        pfi = np.where(pf_ok, pf, 0).astype(np.int64)
        is_rc = pf_ok & ((pfi & _SPEC_RC) != 0)
        is_rgb = pf_ok & ((pfi & _SPEC_RGB) != 0) & ~is_rc
        out[giant & is_rc] = RC
        out[giant & is_rgb] = RGB
        decided = is_rc | is_rgb

    todo = giant & ~decided
    with np.errstate(invalid="ignore"):
        teff_ref = c["rc_teff_ref_feh_slope"] * f + c["rc_teff_ref_zero"]
        upper = c["rc_logg_slope"] * (t - teff_ref) + c["rc_logg_intercept"]
        rc = (g >= c["rc_logg_min"]) & (g <= upper)
        win = c.get("rc_jk0_range")
        if jk0 is not None and win is not None:
            j = np.broadcast_to(np.asarray(jk0, dtype=float), shape)
            lo = -np.inf if win[0] is None else float(win[0])
            hi = np.inf if win[1] is None else float(win[1])
            rc &= ~np.isfinite(j) | ((j >= lo) & (j <= hi))
    feh_ok = np.isfinite(f)
    out[todo & feh_ok & rc] = RC
    out[todo & feh_ok & ~rc] = RGB
    return _scalar_or_array(out)


def _paramflag_logg(df: pd.DataFrame) -> np.ndarray | None:
    if "PARAMFLAG_LOGG" in df.columns:
        return pd.to_numeric(df["PARAMFLAG_LOGG"], errors="coerce").to_numpy(
            dtype=float, na_value=np.nan
        )
    if "PARAMFLAG" in df.columns:  # unexpanded object column of (9,) arrays
        i = PARAM_ORDER.index("LOGG")
        return np.array(
            [float(np.asarray(v)[i]) if np.size(v) > i else np.nan for v in df["PARAMFLAG"]]
        )
    return None


def derive_classes(df: pd.DataFrame, cfg: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """Class codes for every row of ``df``: columns ``spectral_type``, ``luminosity_class``,
    ``stage`` (int64, −1 undefined), index of ``df``.

    Reads ``TEFF`` (K), ``LOGG`` (dex), ``FE_H`` (dex) (required), and ``PARAMFLAG_LOGG`` (or
    the ``PARAMFLAG`` array column) and ``JK0`` (mag) when present. ``cfg``: mapping with
    ``spectral_type``, ``luminosity_class`` and ``stage`` sections (default: the shipped
    ``conf/data/classes/default.yaml``); a missing section uses the built-in defaults.
    """
    from stellarnet.io.catalogs import MissingColumnError

    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"derive_classes needs a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in ("TEFF", "LOGG", "FE_H") if c not in df.columns]
    if missing:
        raise MissingColumnError(missing, "the catalogue passed to derive_classes")
    cfg = load_class_config() if cfg is None else to_plain(cfg)
    if not isinstance(cfg, Mapping):
        raise TypeError(f"cfg must be a mapping (data.classes config), got {type(cfg).__name__}")
    unknown = set(cfg) - set(CLASS_TASKS)
    if unknown:
        raise ValueError(f"unknown class config section(s) {sorted(unknown)}; known: {CLASS_TASKS}")

    def num(col: str) -> np.ndarray:
        return pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=float, na_value=np.nan)

    teff, logg, feh = num("TEFF"), num("LOGG"), num("FE_H")
    jk0 = num("JK0") if "JK0" in df.columns else None
    return pd.DataFrame(
        {
            "spectral_type": np.asarray(spectral_type(teff, cfg.get("spectral_type")), np.int64),
            "luminosity_class": np.asarray(
                luminosity_class(logg, cfg.get("luminosity_class")), np.int64
            ),
            "stage": np.asarray(
                evolutionary_stage(teff, logg, feh, _paramflag_logg(df), jk0, cfg.get("stage")),
                np.int64,
            ),
        },
        index=df.index,
    )
