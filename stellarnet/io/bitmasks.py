"""Named APOGEE bitmasks (DR17 data model): ASPCAPFLAG, STARFLAG/ANDFLAG, EXTRATARG, PARAMFLAG,
APOGEE_PIXMASK.

A flag is set when ``(value >> bit) & 1``. Bit numbers follow the SDSS DR17 data model pages
(see ``docs`` / survey facts). Example::

    >>> ASPCAPFLAG.decode(1 << 23)
    ['STAR_BAD']
    >>> ASPCAPFLAG.value_of(["STAR_BAD", "TEFF_BAD"])
    8454144
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import numpy as np


@dataclass(frozen=True)
class Bitmask:
    """A named bit table. ``bits`` maps bit number -> flag name."""

    name: str
    bits: dict[int, str]
    bad_bits: tuple[int, ...] = field(default=())  # the pipeline's "bad"-level bits

    def __post_init__(self) -> None:
        names = list(self.bits.values())
        if len(set(names)) != len(names):
            raise ValueError(f"{self.name}: duplicate flag names")

    @property
    def by_name(self) -> dict[str, int]:
        return {v: k for k, v in self.bits.items()}

    def bit(self, name: str) -> int:
        """Bit number of flag ``name`` (KeyError listing valid names if unknown)."""
        try:
            return self.by_name[name]
        except KeyError:
            raise KeyError(
                f"{self.name} has no flag {name!r}; known flags: {sorted(self.by_name)}"
            ) from None

    def value_of(self, flags: Iterable[str | int]) -> int:
        """Integer with the given flags (names or bit numbers) set."""
        value = 0
        for f in flags:
            b = f if isinstance(f, (int, np.integer)) else self.bit(str(f))
            value |= 1 << int(b)
        return value

    @property
    def bad_value(self) -> int:
        return self.value_of(self.bad_bits)

    def decode(self, value: int) -> list[str]:
        """Flag names set in ``value`` (unknown set bits appear as ``BIT<n>``)."""
        width = value.dtype.itemsize * 8 if isinstance(value, np.integer) else 64
        value = int(value)
        if value < 0:  # two's complement: a negative int32/int64 has its top bit set
            value &= (1 << width) - 1
        out = []
        b = 0
        while value >> b:
            if (value >> b) & 1:
                out.append(self.bits.get(b, f"BIT{b}"))
            b += 1
        return out

    def any_set(self, values: np.ndarray | int, flags: Iterable[str | int]) -> np.ndarray:
        """Boolean array: True where any of ``flags`` is set in ``values``."""
        mask = np.int64(np.uint64(self.value_of(flags)).astype(np.int64))
        return (np.asarray(values).astype(np.int64) & mask) != 0


ASPCAPFLAG = Bitmask(
    "APOGEE_ASPCAPFLAG",
    {
        0: "TEFF_WARN", 1: "LOGG_WARN", 2: "VMICRO_WARN", 3: "M_H_WARN", 4: "ALPHA_M_WARN",
        5: "C_M_WARN", 6: "N_M_WARN", 7: "STAR_WARN", 8: "CHI2_WARN", 9: "COLORTE_WARN",
        10: "ROTATION_WARN", 11: "SN_WARN", 12: "SPEC_HOLE_WARN", 13: "ATMOS_HOLE_WARN",
        14: "VSINI_WARN",
        16: "TEFF_BAD", 17: "LOGG_BAD", 18: "VMICRO_BAD", 19: "M_H_BAD", 20: "ALPHA_M_BAD",
        21: "C_M_BAD", 22: "N_M_BAD", 23: "STAR_BAD", 24: "CHI2_BAD", 25: "COLORTE_BAD",
        26: "ROTATION_BAD", 27: "SN_BAD", 28: "SPEC_HOLE_BAD", 29: "ATMOS_HOLE_BAD",
        30: "VSINI_BAD", 31: "NO_ASPCAP_RESULT",
        32: "MISSING_APSTAR", 33: "NO_GRID", 34: "BAD_FRAC_LOWSNR", 35: "BAD_FRAC_BADPIX",
        36: "FERRE_FAIL", 40: "PROBLEM_TARGET", 41: "MULTIPLE_SUSPECT",
    },
    bad_bits=(16, 17, 23, 25, 26, 28, 31, 32, 33, 34, 35, 36, 40, 41),
)

STARFLAG = Bitmask(
    "APOGEE_STARFLAG",
    {
        0: "BAD_PIXELS", 1: "COMMISSIONING", 2: "BRIGHT_NEIGHBOR", 3: "VERY_BRIGHT_NEIGHBOR",
        4: "LOW_SNR", 9: "PERSIST_HIGH", 10: "PERSIST_MED", 11: "PERSIST_LOW",
        12: "PERSIST_JUMP_POS", 13: "PERSIST_JUMP_NEG", 16: "SUSPECT_RV_COMBINATION",
        17: "SUSPECT_BROAD_LINES", 18: "BAD_RV_COMBINATION", 19: "RV_REJECT", 20: "RV_SUSPECT",
        21: "MULTIPLE_SUSPECT", 22: "RV_FAIL", 23: "SUSPECT_ROTATION", 24: "MTPFLUX_LT_75",
        25: "MTPFLUX_LT_50",
    },
    bad_bits=(0, 3, 18, 22),
)
ANDFLAG = STARFLAG  # same bit table; ANDFLAG is the AND over visits

EXTRATARG = Bitmask(
    "APOGEE_EXTRATARG",
    {0: "NOT_MAIN", 1: "COMMISSIONING", 2: "TELLURIC", 3: "APO1M", 4: "DUPLICATE"},
    bad_bits=(4,),
)

PARAMFLAG = Bitmask(
    "APOGEE_PARAMFLAG",
    {
        0: "GRIDEDGE_BAD", 1: "CALRANGE_BAD", 2: "OTHER_BAD", 3: "FERRE_FAIL",
        4: "PARAM_MISMATCH_BAD", 5: "FERRE_ERR_USED", 6: "TEFF_CUT",
        8: "GRIDEDGE_WARN", 9: "CALRANGE_WARN", 10: "OTHER_WARN", 11: "FERRE_WARN",
        12: "PARAM_MISMATCH_WARN", 13: "OPTICAL_WARN", 14: "ERR_WARN", 15: "FAINT_WARN",
        16: "PARAM_FIXED", 17: "RV_WARN",
        24: "SPEC_RC", 25: "SPEC_RGB", 26: "LOGG_CAL_MS", 27: "LOGG_CAL_RGB_MS",
    },
    bad_bits=(0, 1, 2, 3, 4),
)
# Order of the entries of the PARAM / PARAMFLAG arrays in DR17 allStar.
PARAM_ORDER = ("TEFF", "LOGG", "VMICRO", "M_H", "C_M", "N_M", "ALPHA_M", "VSINI", "O_M")

APOGEE_PIXMASK = Bitmask(
    "APOGEE_PIXMASK",
    {
        0: "BADPIX", 1: "CRPIX", 2: "SATPIX", 3: "UNFIXABLE", 4: "BADDARK", 5: "BADFLAT",
        6: "BADERR", 7: "NOSKY", 8: "LITTROW_GHOST", 9: "PERSIST_HIGH", 10: "PERSIST_MED",
        11: "PERSIST_LOW", 12: "SIG_SKYLINE", 13: "SIG_TELLURIC", 14: "NOT_ENOUGH_PSF",
        16: "FERRE_MASK",
    },
    bad_bits=(0, 1, 2, 3, 4, 5, 6, 7, 14),
)
# astroNN's default pixel rejection for continuum fitting: bits 0-7 and 12 (SIG_SKYLINE).
PIXMASK_ASTRONN_DEFAULT = (0, 1, 2, 3, 4, 5, 6, 7, 12)
# Persistence bits: flag and down-weight, never drop.
PIXMASK_PERSIST = (9, 10, 11)

# stellarnet's own per-star quality bitmask (catalogue column STELLARNET_FLAG), in the spirit of
# ASPCAPFLAG; set by stellarnet.network.flags.stellarnet_flags (thresholds documented there and in
# docs/robustness.md). STAR_BAD-level bits: the labels should not be used without a look.
STELLARNET_FLAG = Bitmask(
    "STELLARNET_FLAG",
    {
        0: "REFINE_FAILED",        # χ² fit failed, or moved > REFINE_MAX_SHIFT network σ with χ² > 2: network labels kept
        1: "NOT_REFINED",          # no χ² refinement (no stage, refine off, or non-finite network labels)
        2: "HIGH_CHI2",            # reduced χ² of the refinement above 2: the emulator does not explain the spectrum
        3: "OUTSIDE_TRAINING",     # a label outside the training set's label range
        4: "OUTLIER_PIXELS",       # more than 1 % of the usable pixels rejected as outliers by the fit
        5: "NET_REFINE_DISAGREE",  # network and refined labels differ by > 3 combined σ in some label
        6: "MASKED_SEGMENTS",      # a chip segment dropped from the fit (persistence-like artefact)
        7: "FEW_PIXELS",           # fewer than 70 % of the pixels usable
        8: "UNPHYSICAL",           # a label outside the physically possible range (or non-finite): do not use
        9: "BINARY_CANDIDATE",     # the fit residuals hold the star's lines at another velocity: a double-lined binary
        10: "BAD_CONTINUUM",       # the upper envelope of a chip segment is far from 1: the normalization is spoiled
    },
    bad_bits=(0, 1, 2, 3, 8, 9, 10),
)

BITMASKS = {
    "ASPCAPFLAG": ASPCAPFLAG,
    "STARFLAG": STARFLAG,
    "ANDFLAG": ANDFLAG,
    "EXTRATARG": EXTRATARG,
    "PARAMFLAG": PARAMFLAG,
    "APOGEE_PIXMASK": APOGEE_PIXMASK,
    "STELLARNET_FLAG": STELLARNET_FLAG,
}
