"""Decoding/encoding of the APOGEE bitmask tables (stellarnet.io.bitmasks)."""

from __future__ import annotations

import numpy as np
import pytest

from stellarnet.io.bitmasks import (
    ANDFLAG,
    APOGEE_PIXMASK,
    ASPCAPFLAG,
    BITMASKS,
    EXTRATARG,
    PARAM_ORDER,
    PARAMFLAG,
    STARFLAG,
)


def test_aspcapflag_decode_known_values():
    assert ASPCAPFLAG.decode(0) == []
    assert ASPCAPFLAG.decode(1 << 23) == ["STAR_BAD"]
    assert ASPCAPFLAG.decode(1 << 7) == ["STAR_WARN"]
    # TEFF_WARN | LOGG_BAD | STAR_BAD
    assert ASPCAPFLAG.decode(1 + (1 << 17) + (1 << 23)) == ["TEFF_WARN", "LOGG_BAD", "STAR_BAD"]
    assert ASPCAPFLAG.decode(1 << 31) == ["NO_ASPCAP_RESULT"]
    assert ASPCAPFLAG.value_of(["STAR_BAD", "TEFF_BAD"]) == 8454144  # module doc example


def test_aspcapflag_int64_bits_above_31():
    assert ASPCAPFLAG.decode(1 << 32) == ["MISSING_APSTAR"]
    assert ASPCAPFLAG.decode(np.int64(1 << 40)) == ["PROBLEM_TARGET"]
    v = np.int64((1 << 41) | (1 << 36) | (1 << 23))
    assert ASPCAPFLAG.decode(v) == ["STAR_BAD", "FERRE_FAIL", "MULTIPLE_SUSPECT"]
    assert ASPCAPFLAG.value_of(["PROBLEM_TARGET", 23]) == (1 << 40) | (1 << 23)
    # a bit with no name in the table is reported by number
    assert ASPCAPFLAG.decode(1 << 50) == ["BIT50"]


def test_negative_int64_decodes_as_unsigned():
    top = np.int64(-(2**63))  # only bit 63 set
    assert ASPCAPFLAG.decode(top) == ["BIT63"]
    both = np.int64(-(2**63) + (1 << 23))
    assert ASPCAPFLAG.decode(both) == ["STAR_BAD", "BIT63"]
    everything = ASPCAPFLAG.decode(np.int64(-1))
    assert len(everything) == 64
    assert set(ASPCAPFLAG.bits.values()) <= set(everything)
    assert everything[15] == "BIT15"  # unused bit 15


def test_any_set_vectorised_including_high_and_negative_values():
    vals = np.array([0, 1 << 23, 1 << 40, -(2**63), (1 << 40) | 1], dtype=np.int64)
    np.testing.assert_array_equal(
        ASPCAPFLAG.any_set(vals, ["STAR_BAD"]), [False, True, False, False, False]
    )
    np.testing.assert_array_equal(
        ASPCAPFLAG.any_set(vals, ["PROBLEM_TARGET"]), [False, False, True, False, True]
    )
    np.testing.assert_array_equal(ASPCAPFLAG.any_set(vals, [63]), [False, False, False, True, False])
    # big-endian input (as read from FITS) works too
    np.testing.assert_array_equal(
        ASPCAPFLAG.any_set(vals.astype(">i8"), ["STAR_BAD", 40]), [False, True, True, False, True]
    )


def test_starflag_and_andflag():
    assert STARFLAG.decode(0b11111) == [
        "BAD_PIXELS", "COMMISSIONING", "BRIGHT_NEIGHBOR", "VERY_BRIGHT_NEIGHBOR", "LOW_SNR",
    ]
    assert STARFLAG.decode((1 << 9) | (1 << 22)) == ["PERSIST_HIGH", "RV_FAIL"]
    assert STARFLAG.decode(1 << 25) == ["MTPFLUX_LT_50"]
    assert STARFLAG.bit("SUSPECT_BROAD_LINES") == 17
    assert STARFLAG.bad_value == (1 << 0) | (1 << 3) | (1 << 18) | (1 << 22)
    assert ANDFLAG.decode(1 << 3) == ["VERY_BRIGHT_NEIGHBOR"]


def test_extratarg():
    assert EXTRATARG.decode(16) == ["DUPLICATE"]
    assert EXTRATARG.decode(0b01101) == ["NOT_MAIN", "TELLURIC", "APO1M"]
    assert EXTRATARG.value_of(["DUPLICATE", "COMMISSIONING"]) == 18
    np.testing.assert_array_equal(
        EXTRATARG.any_set(np.array([0, 16, 15, 17], dtype=">i4"), ["DUPLICATE"]),
        [False, True, False, True],
    )


def test_paramflag():
    assert PARAMFLAG.decode(1 << 24) == ["SPEC_RC"]
    assert PARAMFLAG.decode((1 << 25) | (1 << 9)) == ["CALRANGE_WARN", "SPEC_RGB"]
    assert PARAMFLAG.decode(1 << 17) == ["RV_WARN"]
    assert PARAMFLAG.bit("LOGG_CAL_RGB_MS") == 27
    assert PARAMFLAG.bad_value == 0b11111
    assert PARAM_ORDER[:2] == ("TEFF", "LOGG") and len(PARAM_ORDER) == 9


def test_negative_int32_decodes_only_32_bits():
    # PARAMFLAG entries are int32 (FITS 'J'); bit 31 set makes them negative.
    assert PARAMFLAG.decode(np.int32(-(2**31))) == ["BIT31"]
    assert EXTRATARG.decode(np.int32(-(2**31) + 16)) == ["DUPLICATE", "BIT31"]


def test_apogee_pixmask():
    assert APOGEE_PIXMASK.decode(1 | (1 << 12)) == ["BADPIX", "SIG_SKYLINE"]
    assert APOGEE_PIXMASK.decode(1 << 16) == ["FERRE_MASK"]
    assert APOGEE_PIXMASK.decode(0b111 << 9) == ["PERSIST_HIGH", "PERSIST_MED", "PERSIST_LOW"]
    pix = np.array([0, 1 << 9, 1 << 14, 1 << 12], dtype=np.int16)
    np.testing.assert_array_equal(
        APOGEE_PIXMASK.any_set(pix, APOGEE_PIXMASK.bad_bits), [False, False, True, False]
    )


def test_unknown_name_is_a_clear_keyerror():
    with pytest.raises(KeyError, match="no flag 'STARBAD'.*STAR_BAD"):
        ASPCAPFLAG.bit("STARBAD")
    with pytest.raises(KeyError, match="APOGEE_EXTRATARG"):
        EXTRATARG.value_of(["DUPLICATES"])


@pytest.mark.parametrize("name", sorted(BITMASKS))
def test_roundtrip_every_named_bit(name):
    bm = BITMASKS[name]
    for bit, flag in bm.bits.items():
        assert bm.bit(flag) == bit
        assert bm.decode(bm.value_of([flag])) == [flag]
