"""photometric_features (dereddening, parallax gating) and derived classes."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from stellarnet.io.catalogs import MissingColumnError
from stellarnet.preparation.classes import (
    DEFAULT_LUMINOSITY_THRESHOLDS,
    DEFAULT_SPECTRAL_THRESHOLDS,
    DEFAULT_STAGE_CONFIG,
    LUMINOSITY_CLASSES,
    MS,
    RC,
    RGB,
    SG,
    SPECTRAL_TYPES,
    STAGES,
    class_names,
    derive_classes,
    evolutionary_stage,
    load_class_config,
    luminosity_class,
    spectral_type,
)
from stellarnet.preparation.photometry import (
    EXTINCTION_RATIOS,
    PHOT_FEATURES,
    k_extinction,
    photometric_features,
)

# ----------------------------------------------------------------------------- photometry


@pytest.fixture
def phot() -> pd.DataFrame:
    nan = np.nan
    return pd.DataFrame(
        {
            "J": np.array([10.0, 11.0, 12.0, 9.0, 10.0], np.float32),
            "H": np.array([9.5, 10.4, 11.4, 8.5, 9.6], np.float32),
            "K": np.array([9.3, 10.2, 11.2, 8.3, 9.5], np.float32),
            "AK_TARG": [0.1, nan, -9999.0, 0.05, -0.02],
            "AK_WISE": [0.3, 0.2, nan, 0.4, 0.5],
            "GAIAEDR3_PHOT_G_MEAN_MAG": [10.5, 12.0, 13.0, 9.5, 99.99],
            "GAIAEDR3_PHOT_BP_MEAN_MAG": [11.0, 12.5, 13.5, 10.0, 11.0],
            "GAIAEDR3_PHOT_RP_MEAN_MAG": [9.8, 11.4, 12.4, 9.0, nan],
            "GAIAEDR3_PARALLAX": [2.0, 1.0, 10.0, -0.5, 3.0],
            "GAIAEDR3_PARALLAX_ERROR": [0.1, 0.25, 1.0, 0.1, nan],
        },
        index=[7, 3, 9, 1, 4],
    )


def test_extinction_source_and_fallbacks(phot):
    ext = k_extinction(phot)
    assert ext.index.equals(phot.index)
    np.testing.assert_allclose(ext["A_K"], [0.1, 0.2, 0.0, 0.05, 0.0])
    # TARG, WISE (TARG NaN), none (TARG sentinel, WISE NaN), TARG, TARG (small negative → 0)
    assert ext["AK_SOURCE"].tolist() == [0, 1, 2, 0, 0]


def test_dereddening_hand_computed(phot):
    f = photometric_features(phot)
    assert list(f.columns) == list(PHOT_FEATURES) and f.index.equals(phot.index)
    r = f.loc[7]  # A_K = 0.1: A_J .25, A_H .155, A_V .88, A_G .6952, A_BP .88, A_RP .5192
    assert r["JH0"] == pytest.approx(0.5 - 0.095, abs=1e-5)
    assert r["HK0"] == pytest.approx(0.2 - 0.055, abs=1e-5)
    assert r["JK0"] == pytest.approx(0.7 - 0.15, abs=1e-5)
    assert r["BPRP0"] == pytest.approx(1.2 - 0.3608, abs=1e-5)
    dm = 5 * math.log10(1000 / 2.0) - 5  # 8.49485 for 2 mas
    assert r["M_K"] == pytest.approx(9.3 - 0.1 - dm, abs=1e-5)
    assert r["M_G"] == pytest.approx(10.5 - 0.6952 - dm, abs=1e-5)
    # row 9: no usable extinction → A = 0; 10 mas = 100 pc → distance modulus 5
    r = f.loc[9]
    assert r["JK0"] == pytest.approx(0.8, abs=1e-5) and r["M_K"] == pytest.approx(6.2, abs=1e-5)
    # row 3: WISE fallback A_K = 0.2 → (J−Ks)0 = 0.8 − 0.3
    assert f.loc[3, "JK0"] == pytest.approx(0.5, abs=1e-5)
    assert EXTINCTION_RATIOS["J"] - EXTINCTION_RATIOS["K"] == pytest.approx(1.5)
    assert EXTINCTION_RATIOS["G"] == pytest.approx(0.79 * 8.8)


def test_parallax_snr_gating(phot):
    f = photometric_features(phot)
    assert np.isnan(f.loc[3, "M_K"]) and np.isnan(f.loc[3, "M_G"])  # ϖ/σ = 4 < 5
    assert np.isnan(f.loc[1, "M_K"])  # negative parallax
    assert np.isnan(f.loc[4, "M_K"])  # no parallax error
    assert np.isfinite(f.loc[7, "M_K"]) and np.isfinite(f.loc[9, "M_K"])
    g = photometric_features(phot, min_parallax_snr=3.0)
    dm = 5 * math.log10(1000.0) - 5
    assert g.loc[3, "M_K"] == pytest.approx(10.2 - 0.2 - dm, abs=1e-5)
    h = photometric_features(phot, min_parallax_snr=25.0)  # 2/0.1 = 20 now fails
    assert np.isnan(h.loc[7, "M_K"])
    with pytest.raises(ValueError, match="min_parallax_snr"):
        photometric_features(phot, min_parallax_snr=-1)


def test_missing_values_and_columns_give_nan(phot):
    f = photometric_features(phot)
    assert np.isnan(f.loc[4, "M_G"])  # G = 99.99 placeholder (and no parallax error)
    assert np.isnan(f.loc[4, "BPRP0"])  # RP NaN
    no_gaia = phot[["J", "H", "K", "AK_TARG"]]
    g = photometric_features(no_gaia)
    assert g[["BPRP0", "M_K", "M_G"]].isna().all().all()
    assert g.loc[7, "JK0"] == pytest.approx(0.55, abs=1e-5)
    assert g.loc[3, "JK0"] == pytest.approx(0.8, abs=1e-5)  # no AK_WISE column → A_K = 0
    empty = photometric_features(pd.DataFrame(index=range(3)))
    assert empty.shape == (3, 6) and empty.isna().all().all()
    x = photometric_features(phot, with_extinction=True)
    assert list(x.columns) == [*PHOT_FEATURES, "A_K", "AK_SOURCE"]


# ----------------------------------------------------------------------------- classes


def test_spectral_type_boundaries():
    teff = [7000, 6000, 5999, 5300, 5299, 3900, 3899, 3000, 7300, 9000, np.nan]
    exp = [0, 0, 1, 1, 2, 2, 3, 3, -1, -1, -1]
    assert spectral_type(teff).tolist() == exp
    assert [SPECTRAL_TYPES[c] for c in spectral_type([6500, 5800, 4500, 3500])] == list("FGKM")
    assert spectral_type(5800.0) == 1 and isinstance(spectral_type(5800.0), int)
    with_a = {"A": [7300, 10000], **DEFAULT_SPECTRAL_THRESHOLDS}
    assert spectral_type([9000, 6500, 12000], with_a).tolist() == [0, 1, -1]


def test_luminosity_class_boundaries():
    logg = [4.5, 4.0, 3.99, 3.5, 2.0, 1.0, 0.7, 0.5, 0.2, -0.3, np.nan]
    exp = [4, 4, 3, 3, 2, 2, 1, 1, 0, 0, -1]
    assert luminosity_class(logg).tolist() == exp
    assert [LUMINOSITY_CLASSES[c] for c in luminosity_class([0.1, 0.8, 2.5, 3.7, 4.6])] == [
        "I", "II", "III", "IV", "V",
    ]
    custom = OmegaConf.create({"giant": [None, 3.8], "dwarf": [3.8, None]})
    assert luminosity_class([3.7, 3.9], custom).tolist() == [0, 1]


def test_bad_thresholds_are_rejected():
    with pytest.raises(ValueError, match="overlap"):
        spectral_type(5000, {"G": [5000, 6000], "K": [4000, 5500]})
    with pytest.raises(ValueError, match="'K'.*\\[lo, hi\\]"):
        spectral_type(5000, {"K": [4000]})
    with pytest.raises(ValueError, match="lower bound"):
        luminosity_class(2.0, {"III": [3.5, 1.0]})
    with pytest.raises(ValueError, match="unknown stage config"):
        evolutionary_stage(5000, 2.5, 0.0, cfg={"giant_logg": 3.0})


def test_kiel_stages():
    teff = [5800, 4000, 5500, 6200, 4500, 4300, 5000]
    logg = [4.4, 4.7, 3.8, 4.0, 3.8, 1.5, 3.2]
    feh = [0.0] * 7
    # MS, cool MS dwarf, SG, hot SG, base of the RGB (cool star in the 3.5–4.1 band),
    # upper RGB (logg < 1.8), and a 5000 K giant at logg 3.2 (Bovy ceiling 0.0018·393 + 2.5 = 3.207)
    got = evolutionary_stage(teff, logg, feh).tolist()
    assert got[:6] == [MS, MS, SG, SG, RGB, RGB]
    assert got[6] == RC  # 3.2 <= 3.207: inside the Bovy box at 5000 K, solar
    assert evolutionary_stage(5000, 3.3, 0.0) == RGB  # just above it
    assert [STAGES[c] for c in got[:3]] == ["MS", "MS", "SG"]


def test_bovy_fallback():
    # Teff_ref(0) = 4607 K: at 4800 K the ceiling is 2.847, at 4500 K it is 2.307
    assert evolutionary_stage(4800, 2.45, 0.0) == RC
    assert evolutionary_stage(4500, 2.45, 0.0) == RGB
    assert evolutionary_stage(4800, 1.75, 0.0) == RGB  # below logg 1.8
    # metallicity moves Teff_ref: at 4700 K, logg 2.6 is RGB for [Fe/H] = −0.5 (ceiling 2.323)
    # and RC for [Fe/H] = +0.3 (ceiling 2.874)
    assert evolutionary_stage(4700, 2.6, -0.5) == RGB
    assert evolutionary_stage(4700, 2.6, 0.3) == RC
    # (J−Ks)0 window 0.5–0.8 when given; NaN colour → window not applied
    assert evolutionary_stage(4800, 2.45, 0.0, jk0=0.95) == RGB
    assert evolutionary_stage(4800, 2.45, 0.0, jk0=0.6) == RC
    assert evolutionary_stage(4800, 2.45, 0.0, jk0=np.nan) == RC
    assert evolutionary_stage(4800, 2.45, 0.0, jk0=0.95, cfg={"rc_jk0_range": None}) == RC


def test_paramflag_decides_rc_rgb():
    rc_bit, rgb_bit = 1 << 24, 1 << 25
    assert evolutionary_stage(4500, 2.45, 0.0, paramflag_logg=rc_bit) == RC  # Bovy says RGB
    assert evolutionary_stage(4800, 2.45, 0.0, paramflag_logg=rgb_bit) == RGB  # Bovy says RC
    assert evolutionary_stage(4800, 2.45, 0.0, paramflag_logg=1 << 8) == RC  # other bits → Bovy
    assert evolutionary_stage(4800, 2.45, 0.0, paramflag_logg=np.nan) == RC
    assert evolutionary_stage(5800, 4.4, 0.0, paramflag_logg=rc_bit) == MS  # dwarfs stay dwarfs
    assert evolutionary_stage(4500, 2.45, 0.0, paramflag_logg=rc_bit, cfg={"use_paramflag": False}) == RGB
    # int32 PARAMFLAG with bit 31 set (negative) still reads bits 24/25
    assert evolutionary_stage(4800, 2.45, 0.0, paramflag_logg=np.int32(-(2**31) + rgb_bit)) == RGB


def test_nan_inputs():
    assert evolutionary_stage(np.nan, 2.5, 0.0) == -1
    assert evolutionary_stage(4800, np.nan, 0.0) == -1
    assert evolutionary_stage(4800, 2.45, np.nan) == -1  # giant needs [Fe/H] for Bovy
    assert evolutionary_stage(4800, 2.45, np.nan, paramflag_logg=1 << 24) == RC
    assert evolutionary_stage(5800, 4.4, np.nan) == MS
    v = evolutionary_stage(np.array([5800, np.nan]), np.array([4.4, 4.4]), 0.0)
    assert v.tolist() == [MS, -1] and v.dtype == np.int64


def test_shipped_class_config_matches_defaults():
    cfg = load_class_config()
    assert set(cfg) == {"spectral_type", "luminosity_class", "stage"}
    assert {k: tuple(v) for k, v in cfg["spectral_type"].items()} == DEFAULT_SPECTRAL_THRESHOLDS
    assert {k: tuple(v) for k, v in cfg["luminosity_class"].items()} == DEFAULT_LUMINOSITY_THRESHOLDS
    stage = dict(cfg["stage"], rc_jk0_range=tuple(cfg["stage"]["rc_jk0_range"]))
    assert stage == DEFAULT_STAGE_CONFIG
    assert class_names(cfg) == {
        "spectral_type": SPECTRAL_TYPES, "luminosity_class": LUMINOSITY_CLASSES, "stage": STAGES,
    }


def test_derive_classes():
    df = pd.DataFrame(
        {
            "TEFF": np.array([5800, 5500, 4500, 4800, 4800, np.nan, 6500], np.float32),
            "LOGG": np.array([4.4, 3.8, 2.45, 2.45, 2.45, 2.0, 4.2], np.float32),
            "FE_H": [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -0.3],
            "PARAMFLAG_LOGG": np.array([0, 0, 1 << 24, 0, 0, 0, 0], np.int32),
            "JK0": [0.4, 0.5, 0.7, 0.95, 0.65, 0.6, 0.3],
        },
        index=list("abcdefg"),
    )
    out = derive_classes(df)
    assert list(out.columns) == ["spectral_type", "luminosity_class", "stage"]
    assert out.index.equals(df.index) and (out.dtypes == np.int64).all()
    assert out["spectral_type"].tolist() == [1, 1, 2, 2, 2, -1, 0]
    assert out["luminosity_class"].tolist() == [4, 3, 2, 2, 2, 2, 4]
    assert out["stage"].tolist() == [MS, SG, RC, RGB, RC, -1, MS]
    # unexpanded PARAMFLAG array column works the same
    arr = df.drop(columns="PARAMFLAG_LOGG")
    arr["PARAMFLAG"] = [np.array([0, v] + [0] * 7) for v in df["PARAMFLAG_LOGG"]]
    pd.testing.assert_frame_equal(derive_classes(arr), out)
    # without PARAMFLAG/JK0 the Bovy box alone decides: c → RGB, d → RC
    bare = derive_classes(df[["TEFF", "LOGG", "FE_H"]])
    assert bare["stage"].tolist() == [MS, SG, RGB, RC, RC, -1, MS]
    # a DictConfig with custom thresholds
    cfg = OmegaConf.create({"luminosity_class": {"giant": [None, 3.5], "dwarf": [3.5, None]}})
    assert derive_classes(df, cfg)["luminosity_class"].tolist() == [1, 1, 0, 0, 0, 0, 1]
    with pytest.raises(MissingColumnError, match="'FE_H'"):
        derive_classes(df.drop(columns="FE_H"))
    with pytest.raises(ValueError, match="unknown class config section"):
        derive_classes(df, {"stages": {}})
