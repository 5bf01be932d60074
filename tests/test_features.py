"""Engineered features: spectral indices, catalogue features, the feature table and its parquet."""

from __future__ import annotations

import json
import math
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from stellarnet.io import grids
from stellarnet.preparation.photometry import PHOT_FEATURES
from stellarnet.dataset.manifest import SCHEMA_VERSION, sha256_file
from stellarnet.features import (
    IndexMeasurer,
    IndexWindow,
    abundance_ratios,
    air_to_vacuum,
    brackett_wavelength,
    build_feature_table,
    colour_magnitude_features,
    default_output_path,
    default_windows,
    load_features_config,
    measure_indices,
    read_features,
    reduced_proper_motion,
    write_features,
)
from stellarnet.features.cleaning import fit_robust_stats, flag_outliers, impute_missing, resolve_missing_policies

LAM = grids.wavelength("dr17")  # vacuum Å, gap-removed 7,514-pixel grid
C0 = 16000.0


def gaussian_line(lam: np.ndarray, centre: float, depth: float, sigma: float) -> np.ndarray:
    return 1.0 - depth * np.exp(-0.5 * ((lam - centre) / sigma) ** 2)


def window(hw: float = 3.0, kind: str = "ew", centre: float = C0, name: str = "T") -> IndexWindow:
    return IndexWindow(name, "test", kind, (centre - hw, centre + hw), (centre - hw - 6, centre - hw - 2),
                       (centre + hw + 2, centre + hw + 6))


# --------------------------------------------------------------------------- indices


@pytest.mark.parametrize("hw,sigma", [(3.0, 0.45), (1.5, 0.35)])
def test_gaussian_equivalent_width_recovered(hw, sigma):
    depth = 0.4
    true_ew = depth * sigma * math.sqrt(2 * math.pi)
    flux = gaussian_line(LAM, C0 + 0.07, depth, sigma)  # line centre off the pixel grid
    m = IndexMeasurer(LAM, [window(hw), window(hw, "depth", name="D")])
    res = m.measure(flux, np.full_like(flux, 0.01))
    assert res["EW_T"][0] == pytest.approx(true_ew, rel=0.015)
    assert res["DEPTH_D"][0] * 2 * hw == pytest.approx(res["EW_T"][0], rel=1e-9)  # EW = W·D unmasked
    assert 0 < res["EW_T_ERR"][0] < 0.1 * true_ew


def test_linear_pseudo_continuum_removes_tilt():
    depth, sigma = 0.5, 0.4
    true_ew = depth * sigma * math.sqrt(2 * math.pi)
    cont = 1.15 + 4e-3 * (LAM - C0)  # offset and tilted continuum
    flux = cont * gaussian_line(LAM, C0, depth, sigma)
    err = np.full_like(flux, 0.01)
    lin = IndexMeasurer(LAM, [window()], continuum="linear").measure(flux, err)["EW_T"][0]
    unity = IndexMeasurer(LAM, [window()], continuum="unity").measure(flux, err)["EW_T"][0]
    assert lin == pytest.approx(true_ew, rel=0.01)
    assert abs(unity - true_ew) > 0.5 * true_ew  # the continuum really matters


def test_error_propagation_matches_monte_carlo():
    rng = np.random.default_rng(3)
    sig = 0.01 + 0.01 * rng.random(LAM.size)  # pixel-dependent noise
    clean = gaussian_line(LAM, C0, 0.4, 0.4)
    n = 3000
    noisy = clean[None, :] + sig[None, :] * rng.standard_normal((n, LAM.size))
    sl = slice(np.searchsorted(LAM, C0 - 20), np.searchsorted(LAM, C0 + 20))  # keep it small
    lam, noisy, sig_c = LAM[sl], noisy[:, sl], np.broadcast_to(sig[sl], (n, sl.stop - sl.start))
    for mode in ("linear", "unity"):
        res = IndexMeasurer(lam, [window()], continuum=mode).measure(noisy, sig_c)
        mc = np.std(res["EW_T"], ddof=1)
        assert np.median(res["EW_T_ERR"]) == pytest.approx(mc, rel=0.06), mode
    # unity: σ_EW² = Σ (σ_i w_i)² exactly (w = pixel overlap with the band)
    res = IndexMeasurer(lam, [window()], continuum="unity").measure(noisy[:1], sig_c[:1])
    from stellarnet.features.indices import pixel_edges

    lo, hi = pixel_edges(lam)
    w = np.clip(np.minimum(hi, C0 + 3) - np.maximum(lo, C0 - 3), 0, None)
    assert res["EW_T_ERR"][0] == pytest.approx(np.sqrt(np.sum((sig_c[0] * w) ** 2)), rel=1e-9)


def test_masked_pixels_and_nan_policy():
    flux = gaussian_line(LAM, C0, 0.3, 0.4)
    err = np.full_like(flux, 0.01)
    centre = np.flatnonzero((LAM > C0 - 3) & (LAM < C0 + 3))
    m = IndexMeasurer(LAM, [window()], max_masked_fraction=0.25)
    mask = np.ones((4, LAM.size), np.uint8)
    mask[1, centre[:2]] = 0  # ~7% of the band, in the wing: still measured, close to truth
    mask[2, centre[: int(0.4 * centre.size)]] = 0  # 40% masked → NaN
    mask[3, (LAM > C0 - 9) & (LAM < C0 - 5)] = 0  # blue continuum gone → flat red continuum
    res = m.measure(np.tile(flux, (4, 1)), np.tile(err, (4, 1)), mask)
    ew = res["EW_T"]
    assert np.isfinite(ew[[0, 1, 3]]).all()
    assert ew[1] == pytest.approx(ew[0], rel=0.01)  # masked wing pixels are simply excluded
    assert np.isnan(ew[2]) and np.isnan(res["EW_T_ERR"][2])
    assert ew[3] == pytest.approx(ew[0], rel=1e-3)
    # NaN flux counts as masked; both continua gone → NaN
    bad = flux.copy()
    bad[(LAM > C0 - 9) & (LAM < C0 - 5)] = np.nan
    bad[(LAM > C0 + 5) & (LAM < C0 + 9)] = np.nan
    assert np.isnan(m.measure(bad, err)["EW_T"][0])
    # a window off the grid is NaN, not an error
    off = IndexMeasurer(LAM, [window(centre=15830.0)])  # in the DR17 blue-green chip gap
    assert np.isnan(off.measure(flux, err)["EW_T"][0])
    assert off.coverage()["central"].iloc[0] == 0.0


def test_window_validation_and_cached_measure():
    with pytest.raises(ValueError, match="blue band"):
        IndexWindow("X", "x", "ew", (16000, 16003), (15999, 16001), None)
    with pytest.raises(ValueError, match="kind"):
        IndexWindow("X", "x", "eqw", (16000, 16003))
    flux = np.tile(gaussian_line(LAM, C0, 0.3, 0.4), (3, 1))
    df = measure_indices(LAM, flux, np.full_like(flux, 0.01), windows=[window()])
    df2 = measure_indices(LAM, flux, np.full_like(flux, 0.01), windows=[window()])
    assert list(df.columns) == ["EW_T", "EW_T_ERR"] and len(df) == 3
    pd.testing.assert_frame_equal(df, df2)


def test_default_window_table_is_consistent():
    wins = default_windows()
    cfg = load_features_config()
    entries = {e["name"]: e for e in cfg["indices"]["windows"]}
    assert len(wins) >= 25
    species = {w.species.split()[0] for w in wins}
    assert {"Fe", "Mg", "Si", "Al", "K", "Ca", "Mn", "OH", "CO", "H"} <= species
    for w in wins:
        e = entries[w.name]
        if e.get("air") is not None:  # documented air → vacuum conversion
            assert air_to_vacuum(e["air"]) == pytest.approx(e["vacuum"], abs=0.02), w.name
        if w.name.startswith("BR"):
            n = int(w.name[2:4])
            assert brackett_wavelength(n) == pytest.approx(e["vacuum"], abs=0.02)
        if w.kind == "ew":
            assert 0.5 * (w.band[0] + w.band[1]) == pytest.approx(e["vacuum"], abs=0.02), w.name
    # known vacuum positions (APOGEE line lists / Rydberg formula)
    assert air_to_vacuum(16718.957) == pytest.approx(16723.52, abs=0.02)
    assert brackett_wavelength(11) == pytest.approx(16811.1, abs=0.2)
    # every window is measurable on both shard grids
    for g in ("dr12", "dr17"):
        cov = IndexMeasurer(grids.wavelength(g), wins).coverage()
        assert (cov["central"] >= 0.75).all(), g
        assert ((cov["blue"].fillna(0) >= 0.5) | (cov["red"].fillna(0) >= 0.5)).all(), g


# --------------------------------------------------------------------------- catalogue features


def test_abundance_ratios():
    df = pd.DataFrame({"C_FE": [0.1, np.nan, -0.2], "N_FE": [0.3, 0.2, 0.1], "MG_FE": [0.05, 0.1, 0.2]})
    out = abundance_ratios(df, {"C_N": ["C_FE", "N_FE"], "MG_FE": ["MG_FE"], "AL_FE": ["AL_FE"]})
    np.testing.assert_allclose(out["C_N"], [-0.2, np.nan, -0.3])
    np.testing.assert_allclose(out["MG_FE"], df["MG_FE"])
    assert out["AL_FE"].isna().all()


def test_reduced_proper_motion():
    h = reduced_proper_motion(np.array([10.0, 10.0, 99.99]), np.array([0.1, 0.0, 0.0]),
                              np.array([30.0, 0.0, 5.0]), np.array([40.0, 0.0, 5.0]))
    assert h[0] == pytest.approx(9.9 + 5 * math.log10(0.05) + 5)
    assert np.isnan(h[1]) and np.isnan(h[2])  # μ = 0, placeholder magnitude
    df = pd.DataFrame({
        "J": [11.0, 11.0], "H": [10.4, 10.4], "K": [10.2, 10.2], "AK_TARG": [0.1, 0.1],
        "GAIAEDR3_PMRA": [30.0, 30.0], "GAIAEDR3_PMDEC": [40.0, 40.0],
        "GAIAEDR3_PARALLAX": [1.0, 1.0], "GAIAEDR3_PARALLAX_ERROR": [0.1, 0.5],  # ϖ/σ = 10, 2
    })
    cm = colour_magnitude_features(df)
    assert list(cm.columns[: len(PHOT_FEATURES)]) == list(PHOT_FEATURES)
    assert np.isnan(cm["H_K"][0]) and np.isfinite(cm["M_K"][0])  # good parallax: use M_K
    assert cm["H_K"][1] == pytest.approx(10.1 + 5 * math.log10(0.05) + 5)
    assert colour_magnitude_features(df, rpm_only_without_parallax=False)["H_K"].notna().all()


def test_missing_policies_and_outliers():
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"JK0": rng.normal(0.7, 0.1, 200), "EW_A": rng.normal(0.3, 0.02, 200),
                       "EW_A_ERR": np.full(200, 0.01), "M_K": rng.normal(-1, 1, 200)})
    df.loc[5, "EW_A"] = 3.0  # injected outlier
    df.loc[7, ["JK0", "EW_A", "EW_A_ERR", "M_K"]] = np.nan
    pol = resolve_missing_policies(list(df.columns), {"default": "nan", "features": {"JK0": "median", "EW_*": "median"}})
    assert pol == {"JK0": "median", "EW_A": "median", "EW_A_ERR": "nan", "M_K": "nan"}
    with pytest.raises(ValueError, match="unknown"):
        resolve_missing_policies(list(df.columns), {"features": {"JKO": "median"}})
    with pytest.raises(ValueError, match="policy"):
        resolve_missing_policies(list(df.columns), {"default": "zero"})
    stats = fit_robust_stats(df, ["JK0", "EW_A", "M_K"])
    flags = flag_outliers(df, stats, 6.0)
    assert flags["EW_A_OUTLIER"].tolist() == [i == 5 for i in range(200)]
    assert not flags["JK0_OUTLIER"].any()
    filled, imputed = impute_missing(df, pol, stats)
    assert filled.loc[7, "JK0"] == pytest.approx(np.nanmedian(df["JK0"]))
    assert np.isnan(filled.loc[7, "M_K"]) and np.isnan(filled.loc[7, "EW_A_ERR"])
    assert imputed["JK0_IMPUTED"].sum() == 1 and bool(imputed.loc[7, "EW_A_IMPUTED"])
    assert set(imputed.columns) == {"JK0_IMPUTED", "EW_A_IMPUTED"}


# --------------------------------------------------------------------------- dataset level

AL = 16723.52  # Al I, vacuum Å (window AL1_16724)


def _tiny_dataset(root: Path) -> tuple[Path, pd.DataFrame, dict]:
    """Two shards (train 6, test 4) in the shards.py layout and a matching 14-row allStar frame."""
    rng = np.random.default_rng(11)
    lam = grids.wavelength("dr12")
    n_all = 14
    ids = [f"2M{i:08d}+0000000" for i in range(n_all)]
    allstar = pd.DataFrame({
        "APOGEE_ID": ids,
        "FIELD": ["F1"] * 7 + ["F2"] * 7,
        "RA": np.linspace(10, 20, n_all), "DEC": np.linspace(-5, 5, n_all),
        "J": rng.normal(11.0, 0.3, n_all), "H": np.nan, "K": np.nan,
        "AK_TARG": np.full(n_all, 0.05),
        "GAIAEDR3_PMRA": rng.normal(0, 10, n_all), "GAIAEDR3_PMDEC": rng.normal(0, 10, n_all),
        "GAIAEDR3_PARALLAX": np.full(n_all, 0.5), "GAIAEDR3_PARALLAX_ERROR": np.full(n_all, 0.2),
        "C_FE": rng.normal(0, 0.1, n_all), "N_FE": rng.normal(0.2, 0.1, n_all),
        "MG_FE": rng.normal(0.1, 0.05, n_all), "SNR": np.full(n_all, 100.0),
    })
    allstar["H"] = allstar["J"] - 0.6 + rng.normal(0, 0.02, n_all)
    allstar["K"] = allstar["H"] - 0.15 + rng.normal(0, 0.02, n_all)
    rows = np.array([0, 2, 3, 5, 6, 8, 9, 10, 12, 13])  # allStar rows kept by the "cuts"
    allstar.loc[3, "J"] = np.nan  # → JH0, JK0 missing → imputed
    allstar.loc[9, "J"] = 30.0  # → JH0 outlier
    n = rows.size
    flux = 1.0 + 0.002 * rng.standard_normal((n, lam.size))
    err = np.full((n, lam.size), 0.002)
    depths = np.linspace(0.1, 0.5, n)
    sigma = 0.4
    flux *= gaussian_line(lam[None, :], AL, depths[:, None], sigma)
    mask = np.ones((n, lam.size), np.uint8)
    mask[4, (lam > AL - 1.5) & (lam < AL + 0.5)] = 0  # star 4: Al band mostly masked → NaN → imputed
    labels = np.stack([rng.normal(4800, 300, n), rng.normal(2.5, 0.5, n), rng.normal(0, 0.2, n),
                       rng.normal(0.1, 0.05, n)], 1).astype(np.float32)
    labels[2, 3] = np.nan
    classes = rng.integers(-1, 3, (n, 3))
    split = np.array(["train"] * 6 + ["test"] * 4)
    ds = root / "ds"
    ds.mkdir()
    shards = []
    for s, name in (("train", "train-00000.h5"), ("test", "test-00000.h5")):
        sel = np.flatnonzero(split == s)
        with h5py.File(ds / name, "w") as f:
            f["flux"] = flux[sel].astype(np.float32)
            f["flux_err"] = err[sel].astype(np.float32)
            f["pix_mask"] = mask[sel]
            f["labels"] = labels[sel]
            f["label_err"] = np.full((sel.size, 4), 0.05, np.float32)
            f["classes"] = classes[sel].astype(np.int64)
            f["photometry"] = np.zeros((sel.size, len(PHOT_FEATURES)), np.float32)
            f["snr"] = np.full(sel.size, 100.0, np.float32)
            f["apogee_id"] = np.array([ids[r] for r in rows[sel]]).astype("S")
            f["row_index"] = rows[sel].astype(np.int64)
            f["ra"] = allstar["RA"].to_numpy()[rows[sel]]
            f["dec"] = allstar["DEC"].to_numpy()[rows[sel]]
            f["field"] = allstar["FIELD"].to_numpy()[rows[sel]].astype("S")
            f.attrs["build_hash"] = "test"  # what build_shards writes: the shard belongs to this manifest
            f.attrs["complete"] = True
        shards.append({"file": name, "split": s, "rows": int(sel.size), "sha256": sha256_file(ds / name)})
    manifest = {
        "schema_version": SCHEMA_VERSION, "build_hash": "test", "grid": "dr12", "n_pixels": lam.size,
        "wavelength": [float(w) for w in lam], "label_names": ["TEFF", "LOGG", "FE_H", "ALPHA_FE"],
        "label_mean": [4800.0, 2.5, 0.0, 0.1], "label_std": [300.0, 0.5, 0.2, 0.05],
        "phot_features": list(PHOT_FEATURES),
        "class_tasks": {"spectral_type": ["F", "G", "K", "M"], "luminosity_class": ["I", "II", "III", "IV", "V"],
                        "stage": ["MS", "SG", "RGB", "RC"]},
        "shards": shards,
    }
    (ds / "manifest.json").write_text(json.dumps(manifest))
    truth = {"rows": rows, "labels": labels, "classes": classes, "split": split,
             "ew": depths * sigma * math.sqrt(2 * math.pi)}
    return ds, allstar, truth


def test_build_feature_table_and_parquet_round_trip(tmp_path):
    ds, allstar, truth = _tiny_dataset(tmp_path)
    df = build_feature_table(allstar, ds)
    assert len(df) == 10
    assert list(df.columns[:7]) == ["APOGEE_ID", "RA", "DEC", "FIELD", "row_index", "split", "SNR"]
    np.testing.assert_array_equal(df["row_index"], truth["rows"])
    assert df["split"].tolist() == truth["split"].tolist()
    assert df["APOGEE_ID"].tolist() == allstar["APOGEE_ID"].iloc[truth["rows"]].tolist()
    np.testing.assert_allclose(df[["TEFF", "LOGG", "FE_H", "ALPHA_FE"]].to_numpy(), truth["labels"], rtol=1e-6)
    assert np.isnan(df.loc[2, "ALPHA_FE"])
    np.testing.assert_array_equal(df[["spectral_type", "luminosity_class", "stage"]].to_numpy(), truth["classes"])
    # catalogue features joined by row_index
    sub = allstar.iloc[truth["rows"]].reset_index(drop=True)
    np.testing.assert_allclose(df["C_N"], sub["C_FE"] - sub["N_FE"])
    np.testing.assert_allclose(df["MG_FE"], sub["MG_FE"])
    assert df["SI_FE"].isna().all()  # column absent in this allStar
    assert df["M_K"].isna().all() and df["H_K"].notna().all()  # ϖ/σ = 2.5: no M_K, use H_K
    # spectral index of the injected Al I line (and NaN → train-median imputation for star 4)
    ew = df["EW_AL1_16724"].to_numpy()
    ok = np.arange(10) != 4
    np.testing.assert_allclose(ew[ok], truth["ew"][ok], rtol=0.03)
    assert bool(df.loc[4, "EW_AL1_16724_IMPUTED"]) and np.isnan(df.loc[4, "EW_AL1_16724_ERR"])
    assert df.loc[4, "EW_AL1_16724"] == pytest.approx(np.median(ew[:6][ok[:6]]))
    # missing J (allStar row 3 = table row 2) imputed with the train median; J = 30 (row 9) flagged
    assert bool(df.loc[2, "JH0_IMPUTED"]) and df["JH0_IMPUTED"].sum() == 1
    assert df.loc[2, "JH0"] == pytest.approx(df.loc[[0, 1, 3, 4, 5], "JH0"].median())
    assert bool(df.loc[6, "JH0_OUTLIER"]) and df["JH0_OUTLIER"].sum() == 1
    assert df.loc[6, "N_OUTLIERS"] >= 1
    assert np.isnan(df.loc[2, "BPRP0"]) and "BPRP0_IMPUTED" not in df.columns  # nan policy

    # join by APOGEE_ID when the allStar index is not the FITS row number
    shuffled = allstar.sample(frac=1.0, random_state=1).reset_index(drop=True)
    df_id = build_feature_table(shuffled, ds)
    pd.testing.assert_frame_equal(df_id, df)

    # parquet round trip, atomic write, default path
    out = write_features(df, tmp_path / "processed" / "apogee_features.parquet")
    back = read_features(out)
    pd.testing.assert_frame_equal(back, df)
    assert back.dtypes.to_dict() == df.dtypes.to_dict()
    assert back.attrs["feature_stats"]["features"] == df.attrs["feature_stats"]["features"]
    assert pd.read_parquet(out).shape == df.shape
    write_features(df.iloc[:3], out)  # overwrite in place
    assert len(read_features(out)) == 3
    assert [p.name for p in out.parent.iterdir()] == ["apogee_features.parquet"]
    assert default_output_path("apogee", tmp_path) == tmp_path / "processed" / "apogee_features.parquet"


def test_build_feature_table_config_options(tmp_path):
    ds, allstar, _ = _tiny_dataset(tmp_path)
    cfg = load_features_config()
    cfg["indices"]["enabled"] = False
    cfg["missing"] = {"default": "nan"}
    cfg["splits"] = ["test"]
    df = build_feature_table(allstar, ds, cfg)
    assert len(df) == 4 and set(df["split"]) == {"test"}
    assert not any(c.startswith("EW_") for c in df.columns)
    assert not any(c.endswith("_IMPUTED") for c in df.columns)
    cfg["abundances"] = {"TEFF": ["C_FE"]}
    with pytest.raises(ValueError, match="collide"):
        build_feature_table(allstar, ds, cfg)
    df_none = build_feature_table(None, ds)  # spectra-only features
    assert "JH0" not in df_none.columns and "EW_FE1_15212" in df_none.columns
