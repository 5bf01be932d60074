"""A corpus of bad inputs: each case must fail with a clear, specific message, or be handled in a
documented way that is checked here (masked, removed and reported, never silently kept or lost).

The bad files are generated in ``tmp_path`` from a 40-star slice of the tiny simulated survey.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from astropy.io import fits
from astropy.table import Table

from stellarnet.io import grids
from stellarnet.io.catalogs import CatalogFormatError, MissingColumnError, read_allstar
from stellarnet.preparation.cuts import PHYSICAL_LABEL_RANGES, CutSpecError, EmptySelectionError, apply_cuts
from stellarnet.dataset.datamodule import StellarDataModule
from stellarnet.dataset.manifest import ShardError, load_manifest, verify_dataset
from stellarnet.dataset.shards import build_shards
from stellarnet.io.layout import spectrum_path
from stellarnet.preparation.spectra import BAD_PIXEL_ERR, SpectrumQualityError, prepare_spectrum
from stellarnet.io.spectra import SpectrumFormatError, read_spectrum
from stellarnet.preparation.surveys import read_galah, read_lamost
from stellarnet.crossval.crossmatch import NoMatchError, crossmatch
from stellarnet.network import StellarNetModule, load_model, save_model_folder
from stellarnet.network.model_folder import CheckpointError

PACKAGE = Path(__file__).resolve().parents[1] / "stellarnet"
N_SMALL = 40
SPLIT = {"by": "FIELD", "fractions": {"train": 0.5, "val": 0.25, "test": 0.25}, "seed": 1}
CUTS = {"snr": {"column": "SNR", "min": 20, "reason": "S/N per pixel"}}


# --------------------------------------------------------------------------------------- helpers
def _write_table(table: Table, path: Path) -> Path:
    fits.HDUList([fits.PrimaryHDU(), fits.table_to_hdu(table)]).writeto(path, overwrite=True)
    return path


def _spectrum_file(root: Path, row) -> Path:
    return spectrum_path(root, "aspcapStar", row["TELESCOPE"], row["FIELD"], row["APOGEE_ID"])


@pytest.fixture(scope="module")
def small_survey(tiny_survey, tmp_path_factory) -> dict:
    """First ``N_SMALL`` stars of the tiny survey: allStar slice + their aspcapStar files (a copy)."""
    root = tmp_path_factory.mktemp("small_survey")
    table = Table.read(tiny_survey["allstar"], hdu=1)[:N_SMALL]
    allstar = _write_table(table, root / "allStar-dr17-synspec_rev1.fits")
    df = read_allstar(allstar, columns=["APOGEE_ID", "TELESCOPE", "FIELD"])
    for _, row in df.iterrows():
        src = _spectrum_file(tiny_survey["root"], row)
        if src.exists():
            dst = _spectrum_file(root, row)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dst)
    return {"root": root, "allstar": allstar, "table": table, "galah": tiny_survey["galah"],
            "lamost": tiny_survey["lamost"]}


def _build(allstar: Path, out: Path, root: Path, cuts=CUTS, **kw) -> dict:
    return build_shards(allstar, out, cuts, spectra_root=root, grid="dr12", rows_per_shard=8, n_workers=1,
                        progress=False, split=SPLIT, **kw)


@pytest.fixture(scope="module")
def small_shards(small_survey, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("small_shards")
    _build(small_survey["allstar"], out, small_survey["root"])
    return out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _file_spectrum(n: int = grids.N_PIX_FULL, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A normalized (aspcapStar-like) spectrum on the 8575-pixel file grid."""
    g = np.random.default_rng(seed)
    flux = 1.0 + 0.01 * g.standard_normal(n)
    return flux, np.full(n, 0.01)


# ============================================================================ catalogues (allStar)
def test_truncated_allstar_is_reported(small_survey, tmp_path):
    data = small_survey["allstar"].read_bytes()
    bad = tmp_path / "allStar-truncated.fits"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CatalogFormatError, match="truncated"):
        read_allstar(bad)


def test_not_a_fits_file(tmp_path):
    bad = tmp_path / "allStar-junk.fits"
    bad.write_bytes(b"this is not FITS\n" * 200)
    with pytest.raises(CatalogFormatError, match="cannot open .* as FITS"):
        read_allstar(bad)


def test_table_in_wrong_hdu(small_survey, tmp_path):
    bad = tmp_path / "allStar-hdu2.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(np.zeros((3, 3), np.float32)),
                  fits.table_to_hdu(small_survey["table"])]).writeto(bad)
    with pytest.raises(CatalogFormatError, match=r"HDU 1 .* is a ImageHDU, not a table; the allStar table is in HDU 2"):
        read_allstar(bad)
    assert len(read_allstar(bad, hdu=2)) == N_SMALL  # the message's advice works


def test_missing_required_columns_are_all_named(small_survey, tmp_path):
    t = small_survey["table"].copy()
    t.remove_columns(["TEFF_ERR", "SNR"])
    bad = _write_table(t, tmp_path / "allStar-nocols.fits")
    with pytest.raises(MissingColumnError, match=r"missing column\(s\) 'SNR', 'TEFF_ERR'") as err:
        _build(bad, tmp_path / "out", small_survey["root"])
    assert set(err.value.missing) == {"SNR", "TEFF_ERR"}
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_teff_stored_as_strings_is_refused(small_survey, tmp_path):
    """Previously converted silently by ``to_numpy(float64)`` in the shard builder."""
    t = small_survey["table"].copy()
    t.replace_column("TEFF", np.array([f"{v:.1f}" for v in t["TEFF"]]))
    bad = _write_table(t, tmp_path / "allStar-strteff.fits")
    with pytest.raises(CatalogFormatError, match=r"TEFF \(str\w*\) must be numeric"):
        _build(bad, tmp_path / "out", small_survey["root"])
    df = read_allstar(bad, columns=["TEFF"])
    with pytest.raises(CutSpecError, match="column 'TEFF' is not numeric"):
        apply_cuts(df, {"teff": {"column": "TEFF", "min": 3000}})


@pytest.mark.parametrize("pad", [" {} ", "  {}", "{}\x00\x00", "\x00{}", "{} \x00", "\x00 {} \x00"],
                         ids=["both-spaces", "leading-spaces", "trailing-nul", "leading-nul", "space-nul", "mixed"])
def test_string_ids_with_odd_padding_are_stripped(small_survey, tmp_path, pad):
    """Leading NUL / mixed space-NUL padding used to survive stripping (ids then missed their spectra)."""
    t = small_survey["table"].copy()
    ids = [str(i) for i in t["APOGEE_ID"]]
    t.replace_column("APOGEE_ID", np.array([pad.format(i).encode() for i in ids], dtype="S30"))
    path = _write_table(t, tmp_path / "allStar-pad.fits")
    assert read_allstar(path, columns=["APOGEE_ID"])["APOGEE_ID"].tolist() == ids


def test_padded_ids_still_find_their_spectra(small_survey, tmp_path):
    t = small_survey["table"].copy()
    ids = [str(i) for i in t["APOGEE_ID"]]
    t.replace_column("APOGEE_ID", np.array([f"\x00 {i} \x00".encode() for i in ids], dtype="S30"))
    path = _write_table(t, tmp_path / "allStar-pad.fits")
    m = _build(path, tmp_path / "out", small_survey["root"])
    assert m["spectra_missing"]["count"] == 0


def test_duplicate_apogee_ids_are_kept_then_resolved_by_the_unique_cut(small_survey, tmp_path):
    t = small_survey["table"].copy()
    dup = t[:3].copy()
    dup["SNR"] = np.asarray(t["SNR"][:3]) + 100.0  # the duplicates are the better observations
    t2 = Table(np.concatenate([np.asarray(t), np.asarray(dup)]))
    path = _write_table(t2, tmp_path / "allStar-dup.fits")
    df = read_allstar(path)
    assert len(df) == N_SMALL + 3 and df["APOGEE_ID"].duplicated().sum() == 3  # documented: kept
    kept, report = apply_cuts(df, {"uniq": {"unique": "APOGEE_ID", "by": "SNR"}})
    assert len(kept) == N_SMALL and not kept["APOGEE_ID"].duplicated().any()
    assert report.rows[0].removed == 3
    assert set(kept.index[-3:]) == {N_SMALL, N_SMALL + 1, N_SMALL + 2}  # highest S/N copy won


def test_all_rows_removed_by_cuts_names_the_cut(small_survey, tmp_path):
    cuts = {"snr": {"column": "SNR", "min": 20}, "impossible": {"column": "SNR", "min": 1e9, "reason": "SNR > 1e9"}}
    with pytest.raises(EmptySelectionError, match=r"cut 'impossible' \(SNR > 1e9; applied: SNR > 1e\+09\) removed all \d+ remaining rows") as err:
        _build(small_survey["allstar"], tmp_path / "out", small_survey["root"], cuts=cuts)
    assert err.value.cut == "impossible"
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.parametrize("column,value", [("TEFF", 1500.0), ("TEFF", 99999.0), ("LOGG", -3.0), ("LOGG", 9.0),
                                          ("FE_H", 7.0), ("ALPHA_M", -4.0)])
def test_unphysical_labels_are_removed_and_reported(small_survey, tmp_path, caplog, column, value):
    """Labels outside PHYSICAL_LABEL_RANGES used to go into the shards (and the label mean/std)."""
    t = small_survey["table"].copy()
    t[column][0] = value
    path = _write_table(t, tmp_path / "allStar-range.fits")
    with caplog.at_level(logging.WARNING, logger="stellarnet.dataset.shards"):
        m = _build(path, tmp_path / "out", small_survey["root"])
    label = {"ALPHA_M": "ALPHA_FE"}.get(column, column)  # [α/Fe] = ALPHA_M + M_H - FE_H is the label
    lo, hi = PHYSICAL_LABEL_RANGES[label]
    row = next(r for r in m["cut_report"] if r["name"] == f"physical_{label}")
    assert row["removed"] == 1 and f"[{lo:g}, {hi:g}]" in row["reason"]
    assert f"cut 'physical_{label}' removed 1 star(s)" in caplog.text
    bad_id = str(t["APOGEE_ID"][0]).strip()
    assert bad_id not in _shard_ids(tmp_path / "out")
    clean = _build(small_survey["allstar"], tmp_path / "clean", small_survey["root"])
    assert sum(m["split_rows"].values()) == sum(clean["split_rows"].values()) - 1


def test_all_labels_unphysical_raises_naming_the_range(small_survey, tmp_path):
    t = small_survey["table"].copy()
    t["TEFF"] = 120000.0  # e.g. a column in the wrong units
    path = _write_table(t, tmp_path / "allStar-allbad.fits")
    with pytest.raises(EmptySelectionError, match=r"physical_TEFF.*TEFF outside the physical range \[2000, 50000\]"):
        _build(path, tmp_path / "out", small_survey["root"])


def test_missing_labels_are_not_treated_as_unphysical(small_survey, tmp_path, caplog):
    t = small_survey["table"].copy()
    t["ALPHA_M"][:5] = np.nan
    t["ALPHA_M"][5:8] = -9999.0  # legacy sentinel -> NaN -> masked, not removed
    path = _write_table(t, tmp_path / "allStar-nan.fits")
    with caplog.at_level(logging.WARNING, logger="stellarnet.dataset.shards"):
        m = _build(path, tmp_path / "out", small_survey["root"])
    row = next(r for r in m["cut_report"] if r["name"] == "physical_ALPHA_FE")
    assert row["removed"] == 0
    assert "removed" not in caplog.text  # only range cuts that removed stars are warned about


def _shard_ids(dataset: Path) -> set[str]:
    import h5py

    out: set[str] = set()
    for p in dataset.glob("*.h5"):
        with h5py.File(p, "r") as f:
            out |= {x.decode() for x in f["apogee_id"][...]}
    return out


# ================================================================================== spectra
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 0.0], ids=["nan", "inf", "-inf", "zero"])
def test_nonfinite_or_zero_flux_pixels_are_masked(bad):
    flux, err = _file_spectrum()
    pix = np.arange(1000, 1100)  # inside the blue chip on the file grid
    flux[pix] = bad
    out_flux, out_err, good = prepare_spectrum(flux, err, None, grid="dr12", normalized=True)
    assert np.isfinite(out_flux).all() and np.isfinite(out_err).all()
    full_good = grids.gap_insert(good.astype(float), "dr12", fill=-1)
    assert (full_good[pix] == 0).all()
    assert good.sum() > 0.9 * good.size
    assert (out_flux[~good] == 1.0).all() and (out_err[~good] == BAD_PIXEL_ERR).all()


@pytest.mark.parametrize("bad", [0.0, -0.01, np.nan], ids=["zero", "negative", "nan"])
def test_zero_negative_or_nan_errors_are_masked(bad):
    flux, err = _file_spectrum()
    pix = np.arange(5000, 5050)
    err[pix] = bad
    _, out_err, good = prepare_spectrum(flux, err, None, grid="dr12", normalized=True)
    full_good = grids.gap_insert(good.astype(float), "dr12", fill=-1)
    assert (full_good[pix] == 0).all()
    assert (out_err > 0).all()


@pytest.mark.parametrize("case", ["nan", "zero", "pixmask", "negative_err"])
def test_all_pixels_masked_raises(case):
    flux, err = _file_spectrum()
    pixmask = None
    if case == "nan":
        flux[:] = np.nan
    elif case == "zero":
        flux[:] = 0.0
    elif case == "negative_err":
        err[:] = -1.0
    else:
        pixmask = np.full(flux.shape, 1, np.int64)  # BADPIX on every pixel
    with pytest.raises(SpectrumQualityError, match="the spectrum has no good pixel on grid 'dr12'"):
        prepare_spectrum(flux, err, pixmask, grid="dr12", normalized=True)


def test_all_masked_spectrum_in_a_build_is_recorded_not_lost(small_survey, tmp_path):
    root = _copy(small_survey["root"], tmp_path / "survey")
    df = read_allstar(root / "allStar-dr17-synspec_rev1.fits", columns=["APOGEE_ID", "TELESCOPE", "FIELD"])
    victim = _spectrum_file(root, df.iloc[2])
    with fits.open(victim, mode="update") as h:
        h[1].data[:] = np.nan
    m = _build(root / "allStar-dr17-synspec_rev1.fits", tmp_path / "out", root)
    failed = {f["file"]: f["error"] for f in m["spectra_failed"]}
    assert victim.name in failed and "SpectrumQualityError" in failed[victim.name]
    assert "no good pixel" in failed[victim.name]
    assert df.iloc[2]["APOGEE_ID"] not in _shard_ids(tmp_path / "out")


@pytest.mark.parametrize("n_pix", [8000, 7514 + 1, 100])
def test_unexpected_grid_length_in_memory(n_pix):
    flux, err = _file_spectrum(n_pix)
    with pytest.raises(ValueError, match=rf"spectra have {n_pix} pixels; expected 8575 \(file grid\) or 7214"):
        prepare_spectrum(flux, err, None, grid="dr12", normalized=True)


def test_unexpected_grid_length_in_a_file(small_survey, tmp_path):
    src = next(small_survey["root"].rglob("aspcapStar-*.fits"))
    bad = tmp_path / src.name
    with fits.open(src) as h:
        hdus = fits.HDUList([h[0].copy()] + [fits.ImageHDU(h[i].data[:8000], header=h[i].header) for i in (1, 2)])
        hdus.writeto(bad)
    with pytest.raises(SpectrumFormatError, match=r"HDU1 \(flux\) has shape \(8000,\); expected \(8575,\)"):
        read_spectrum(bad)


def test_truncated_spectrum_file(small_survey, tmp_path):
    src = next(small_survey["root"].rglob("aspcapStar-*.fits"))
    bad = tmp_path / src.name
    bad.write_bytes(src.read_bytes()[:40000])
    with pytest.raises(SpectrumFormatError, match="truncated"):
        read_spectrum(bad)


# =================================================================================== shards
def test_shard_with_wrong_checksum(small_shards, tmp_path):
    import h5py

    work = _copy(small_shards, tmp_path / "ds")
    shard = sorted(work.glob("train-*.h5"))[0]
    with h5py.File(shard, "r+") as f:
        f["labels"][0, 0] = 1.0  # same size, different bytes
    with pytest.raises(ShardError, match=rf"shard .*{shard.name} fails its SHA-256 check"):
        verify_dataset(work)
    dm = StellarDataModule(str(work), batch_size=4, num_workers=0)
    with pytest.raises(ShardError, match="SHA-256"):
        dm.setup("fit")


def test_truncated_shard(small_shards, tmp_path):
    work = _copy(small_shards, tmp_path / "ds")
    shard = sorted(work.glob("val-*.h5"))[0]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    with pytest.raises(ShardError, match=rf"{shard.name} cannot be read \(truncated or corrupted\)"):
        verify_dataset(work, check_sha=False)


def test_missing_shard_file(small_shards, tmp_path):
    work = _copy(small_shards, tmp_path / "ds")
    shard = sorted(work.glob("test-*.h5"))[0]
    shard.unlink()
    with pytest.raises(ShardError, match=rf"{shard.name} listed in the manifest is missing"):
        verify_dataset(work)


@pytest.mark.parametrize("mutate,message", [
    (lambda m: m.update(schema_version=2), r"schema_version 2, newer than this stellarnet supports \(1\)"),
    (lambda m: m.update(schema_version="1"), "no integer schema_version"),
    (lambda m: m.pop("label_mean"), "lacks required key 'label_mean'"),
], ids=["newer-schema", "string-version", "missing-key"])
def test_bad_manifest(small_shards, tmp_path, mutate, message):
    work = _copy(small_shards, tmp_path / "ds")
    m = json.loads((work / "manifest.json").read_text())
    mutate(m)
    (work / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ShardError, match=message):
        load_manifest(work)


def test_truncated_manifest_json(small_shards, tmp_path):
    work = _copy(small_shards, tmp_path / "ds")
    text = (work / "manifest.json").read_text()
    (work / "manifest.json").write_text(text[: len(text) // 2])
    with pytest.raises(ShardError, match="manifest.json is not valid JSON"):
        load_manifest(work)


# ============================================================================== checkpoints
TINY_NET = {
    "spectral_encoder": {"_target_": "stellarnet.network.encoders.SpectralConvEncoder", "channels": [4],
                         "kernel_sizes": [5], "strides": [4], "pool_size": 4, "out_dim": 8},
    "photometry": None,
    "trunk": {"_target_": "stellarnet.network.heads.TrunkMLP", "hidden": [8]},
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    spec = {"grid": None, "n_pixels": 64, "label_names": ["TEFF", "LOGG"], "label_units": ["K", "dex"],
            "label_mean": [4800.0, 2.5], "label_std": [600.0, 1.0], "phot_features": [],
            "class_tasks": {"stage": ["MS", "SG", "RGB", "RC"]}}
    module = StellarNetModule(net=TINY_NET, data_spec=spec, log_figures=False)
    return save_model_folder(module, tmp_path_factory.mktemp("model"))


def _ckpt(model_dir: Path) -> dict:
    return torch.load(model_dir / "model.pt", map_location="cpu", weights_only=True)


def test_checkpoint_missing_top_level_keys(model_dir, tmp_path):
    ck = _ckpt(model_dir)
    del ck["state_dict"]
    torch.save(ck, tmp_path / "bad.ckpt")
    with pytest.raises(CheckpointError, match=r"not a stellarnet checkpoint: it lacks \['state_dict'\]"):
        load_model(tmp_path / "bad.ckpt")


def test_checkpoint_missing_weights(model_dir, tmp_path):
    ck = _ckpt(model_dir)
    gone = next(k for k in ck["state_dict"] if k.startswith("regression_head"))
    del ck["state_dict"][gone]
    torch.save(ck, tmp_path / "bad.ckpt")
    with pytest.raises(CheckpointError, match=rf"missing keys \['{re.escape(gone)}'\]"):
        load_model(tmp_path / "bad.ckpt")


class _Evil:
    def __reduce__(self):
        return (print, ("pickled code ran",))


@pytest.mark.parametrize("how", ["torch.save", "plain-pickle"])
def test_checkpoint_with_pickled_objects_is_refused(model_dir, tmp_path, capsys, how):
    ck = _ckpt(model_dir)
    ck["hyper_parameters"]["data_spec"]["extra"] = _Evil()
    bad = tmp_path / "evil.ckpt"
    if how == "torch.save":
        torch.save(ck, bad)
    else:
        bad.write_bytes(pickle.dumps(ck))
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        load_model(bad)
    assert "pickled code ran" not in capsys.readouterr().out


@pytest.mark.parametrize("content,message", [
    (b"\x00garbage" * 100, r"cannot read checkpoint .*not a torch checkpoint"),
    (b"", r"cannot read checkpoint .*not a torch checkpoint"),
    ("truncated", r"cannot read checkpoint .*bad\.ckpt"),
    ("list", "holds a list, not a checkpoint dict"),
], ids=["garbage", "empty", "truncated", "not-a-dict"])
def test_checkpoint_not_a_checkpoint(model_dir, tmp_path, content, message):
    bad = tmp_path / "bad.ckpt"
    if content == "list":
        torch.save([torch.zeros(2)], bad)
    elif content == "truncated":
        data = (model_dir / "model.pt").read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    else:
        bad.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        load_model(bad)


# ========================================================================= boundary checks
@pytest.mark.parametrize("kw,message", [
    ({"batch_size": 0}, r"batch_size must be an integer >= 1, got 0"),
    ({"batch_size": -8}, r"batch_size must be an integer >= 1, got -8"),
    ({"batch_size": 2.5}, r"batch_size must be an integer >= 1, got 2\.5"),
    ({"batch_size": True}, r"batch_size must be an integer >= 1, got True"),
    ({"batch_size": "8"}, r"batch_size must be an integer >= 1, got '8'"),
    ({"mc_samples": -1}, r"mc_samples must be an integer >= 0, got -1"),
])
def test_predictor_rejects_bad_numeric_arguments(model_dir, kw, message):
    pred = load_model(model_dir)
    x = np.ones((3, 64), np.float32)
    with pytest.raises(ValueError, match=message):
        pred.predict(x, np.full_like(x, 0.01), **kw)
    assert pred.predict(x, np.full_like(x, 0.01), batch_size=2)["labels"].shape == (3, 2)


def test_predictor_negative_errors_are_masked(model_dir):
    pred = load_model(model_dir)
    x = np.ones((2, 64), np.float32)
    err = np.full_like(x, 0.01)
    ref = pred.predict(x, err)
    err_bad, x_bad = err.copy(), x.copy()
    err_bad[:, :10] = -1.0
    x_bad[:, :10] = 55.0  # these pixels must be ignored: same result as masking them explicitly
    mask = np.ones_like(x, bool)
    mask[:, :10] = False
    a = pred.predict(x_bad, err_bad)
    b = pred.predict(x, err, pix_mask=mask)
    np.testing.assert_allclose(a["labels"], b["labels"], rtol=1e-6)
    assert np.isfinite(ref["labels"]).all()


@pytest.mark.parametrize("override,message", [
    ("mc_samples=-1", "mc_samples must be an integer >= 0, got mc_samples=-1"),
    ("batch_size=0", "batch_size must be an integer >= 1, got batch_size=0"),
    ("chunk_size=-5", "chunk_size must be an integer >= 1, got chunk_size=-5"),
    ("batch_size=1.5", "batch_size must be an integer >= 1, got batch_size=1.5"),
    ("overwrite=yes", "overwrite must be true or false, got overwrite='yes'"),
    ("ckpt_path=null", "ckpt_path is required"),
    ("input=null", "input is required"),
])
def test_predict_cli_rejects_bad_switches_before_loading(tmp_path, override, message):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from stellarnet.common.paths import CONF_DIR
    from stellarnet.workflows.predict import predict

    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose(config_name="predict", overrides=[f"ckpt_path={tmp_path / 'nowhere.ckpt'}",
                                                        f"input={tmp_path}", f"output_dir={tmp_path / 'o'}", override])
    GlobalHydra.instance().clear()
    with pytest.raises(ValueError, match=re.escape(message)):
        predict(cfg)


# ============================================================================ crossmatch
def _empty_copy(path: Path, out: Path) -> Path:
    t = Table.read(path, hdu=1)
    return _write_table(t[:0], out)


@pytest.mark.parametrize("survey", ["galah", "lamost"])
def test_empty_survey_crossmatch(small_survey, tmp_path, survey):
    reader = {"galah": read_galah, "lamost": read_lamost}[survey]
    empty = _empty_copy(small_survey[survey], tmp_path / f"{survey}_empty.fits")
    cat = reader(empty)
    assert len(cat.data) == 0 and cat.n_read == 0
    ref = read_allstar(small_survey["allstar"])
    with pytest.raises(NoMatchError, match=r"the survey catalogue is empty \(40 reference, 0 survey stars\)"):
        crossmatch(ref, cat.data)
    full = reader(small_survey[survey]).data
    with pytest.raises(NoMatchError, match="the reference catalogue is empty"):
        crossmatch(ref.iloc[:0], full)


def test_survey_emptied_by_its_cuts(small_survey, tmp_path):
    t = Table.read(small_survey["galah"], hdu=1)
    t["flag_sp"] = 1  # every star flagged -> removed by the GALAH quality cuts
    path = _write_table(t, tmp_path / "galah_flagged.fits")
    cat = read_galah(path)
    assert len(cat.data) == 0 and cat.n_read == len(t)
    assert int(cat.cut_report["removed"].sum()) == len(t)
    with pytest.raises(NoMatchError, match="survey catalogue is empty"):
        crossmatch(read_allstar(small_survey["allstar"]), cat.data)


# ============================================================================ source audit
_FORBIDDEN = [
    (re.compile(r"\bpickle\.loads?\("), "pickle.load"),
    (re.compile(r"\b(cPickle|dill|cloudpickle|shelve)\b"), "pickle-like module"),
    (re.compile(r"joblib\.load\("), "joblib.load"),
    (re.compile(r"allow_pickle\s*=\s*True"), "allow_pickle=True"),
    (re.compile(r"read_pickle\("), "pandas.read_pickle"),
    (re.compile(r"yaml\.(unsafe_)?load\((?![^)]*SafeLoader)"), "yaml.load without SafeLoader"),
    (re.compile(r"weights_only\s*=\s*False"), "weights_only=False"),
]


def _audit(text: str) -> list[str]:
    """'line: what' for every unsafe deserialization pattern in ``text`` (comments ignored)."""
    hits = []
    lines = text.splitlines()
    for i, line in enumerate(lines, 1):
        code = line.split("#", 1)[0]
        for pattern, what in _FORBIDDEN:
            if pattern.search(code):
                hits.append(f"{i}: {what}")
    # every torch.load call must say weights_only=True (look inside the call's parentheses)
    for m in re.finditer(r"torch\.load\(", text):
        line_no = text.count("\n", 0, m.start()) + 1
        if "``" in lines[line_no - 1]:
            continue  # prose in a docstring (double-backquoted call)
        depth, j = 1, m.end()
        while depth and j < len(text):
            depth += {"(": 1, ")": -1}.get(text[j], 0)
            j += 1
        if not re.search(r"weights_only\s*=\s*True", text[m.end():j]):
            hits.append(f"{line_no}: torch.load without weights_only=True")
    return hits


def test_no_unsafe_deserialization_in_package_source():
    py = sorted(PACKAGE.rglob("*.py"))
    assert len(py) > 30
    hits = [f"{p.relative_to(PACKAGE.parent)}:{h}" for p in py for h in _audit(p.read_text())]
    assert not hits, "unsafe deserialization:\n" + "\n".join(hits)


TL = "torch" + ".load"  # split so repository-wide greps for unsafe loads do not flag this test


def test_source_audit_catches_the_patterns():
    """The audit is not vacuous: it flags each unsafe pattern and passes the safe forms."""
    unsafe = ["pickle.load(f)", "x = pickle.loads(b)", "import dill", "joblib.load(p)",
              "np.load(p, allow_pickle=True)", "pd.read_pickle(p)", "yaml.load(s)",
              *(f"{TL}{call}" for call in ("(p, weights_only=False)", "(p)", "(\n    p,\n    map_location='cpu')"))]
    for s in unsafe:
        assert _audit(s), s
    safe = ["yaml.load(s, Loader=yaml.SafeLoader)", "except pickle.UnpicklingError as err:",
            "torch.load(p, map_location=f(x), weights_only=True)", "np.load(p)", "# pickle.load(f)"]
    for s in safe:
        assert not _audit(s), s


# ============================================================================ second round (issue 20)
def _data_cfg(**changes) -> dict:
    cfg = {"shards": {"out_dir": "/nonexistent", "grid": "dr12", "rows_per_shard": 64, "n_workers": 1,
                      "split": {"fractions": {"train": 0.8, "val": 0.1, "test": 0.1}}},
           "survey": {"allstar": None, "spectra_kind": "aspcapStar", "simulate": {"n_stars": 100}},
           "datamodule": {"batch_size": 16, "num_workers": 0}}
    for key, value in changes.items():
        section, name = key.split("__")
        cfg[section][name] = value
    return cfg


@pytest.mark.parametrize("changes,message", [
    ({"shards__rows_per_shard": 0}, "data.shards.rows_per_shard must be an integer >= 1, got 0"),
    ({"shards__rows_per_shard": "64"}, "data.shards.rows_per_shard must be an integer >= 1, got '64'"),
    ({"shards__n_workers": -1}, "data.shards.n_workers must be an integer >= 0, got -1"),
    ({"shards__grid": "dr99"}, "data.shards.grid: unknown APOGEE grid 'dr99'"),
    ({"survey__spectra_kind": "apVisit"}, "data.survey.spectra_kind must be one of ['apStar', 'aspcapStar'], got 'apVisit'"),
    ({"survey__simulate": {"n_stars": 0}}, "data.survey.simulate.n_stars must be an integer >= 10, got 0"),
    ({"datamodule__batch_size": 0}, "data.datamodule.batch_size must be an integer >= 1, got 0"),
    ({"datamodule__num_workers": -2}, "data.datamodule.num_workers must be an integer >= 0, got -2"),
    ({"shards__split": {"fractions": {"train": 0.9, "val": -0.1, "test": 0.2}}},
     "data.shards.split.fractions.val must be a number in [0, 1], got -0.1"),
    ({"shards__split": {"fractions": {"train": 0.7, "val": 0.1, "test": 0.1}}}, "data.shards.split.fractions must sum to 1"),
])
def test_data_config_values_fail_before_any_work(changes, message):
    from stellarnet.dataset.ensure import ensure_shards

    with pytest.raises(ValueError, match=re.escape(message)):
        ensure_shards(_data_cfg(**changes))  # nothing is simulated: the check comes first


@pytest.mark.parametrize("key,value,message", [
    ("build_hash", 7, "build_hash must be a string"),
    ("build_hash", None, "build_hash must be a string"),
    ("grid", "dr99", "grid must be a grid name"),
    ("label_names", "TEFF", "label_names must be a list of names"),
    ("label_mean", [1.0], "label_mean must be a list of 4 numbers"),
    ("shards", [{"file": "train-00000.h5", "rows": "64"}], "shards must be a list of {file, split, rows, sha256} entries"),
])
def test_manifest_entries_of_the_wrong_type(small_shards, tmp_path, key, value, message):
    work = _copy(small_shards, tmp_path / "ds")
    m = json.loads((work / "manifest.json").read_text())
    m[key] = value
    (work / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ShardError, match=re.escape(message)):
        load_manifest(work)


def test_truncated_gzipped_allstar(small_survey, tmp_path):
    import gzip

    gz = tmp_path / "allStar-dr17-synspec_rev1.fits.gz"
    gz.write_bytes(gzip.compress(small_survey["allstar"].read_bytes())[:3000])
    with pytest.raises(CatalogFormatError, match="allStar-dr17-synspec_rev1.fits.gz"):
        read_allstar(gz)


def test_unreadable_lock_file_refuses_the_build(small_survey, small_shards, tmp_path):
    work = _copy(small_shards, tmp_path / "ds")
    (work / ".build.lock").write_text("garbage")
    with pytest.raises(ShardError, match=r"another build is writing .* delete the lock file if no build is running"):
        _build(small_survey["allstar"], work, small_survey["root"])


def test_inf_weights_and_buffers_are_refused(model_dir, tmp_path):
    ck = _ckpt(model_dir)
    buffers = [k for k, v in ck["state_dict"].items() if "running_var" in k]
    name = buffers[0] if buffers else next(iter(ck["state_dict"]))
    ck["state_dict"][name] = torch.full_like(ck["state_dict"][name], float("inf"))
    torch.save(ck, tmp_path / "inf.ckpt")
    with pytest.raises(CheckpointError, match="hold NaN or inf"):
        load_model(tmp_path / "inf.ckpt")


@pytest.mark.parametrize("row,error,message", [
    ("stacked", ValueError, "row must be 'combined', 'global' or a visit index"),
    (99, IndexError, "visit index 99 out of range"),
])
def test_apstar_row_arguments(reference_dir, row, error, message):
    from stellarnet.io.spectra import read_apstar

    with pytest.raises(error, match=re.escape(message)):
        read_apstar(reference_dir / "apStar-dr17-2M17335483-2753043.fits", row=row)


@pytest.mark.parametrize("spec,message", [
    ("", "no spectrum files match"),
    ("/no/such/dir/*.fits", "no spectrum files match"),
    ("/no/such/file.fits", "spectrum file(s) not found"),
])
def test_file_list_inputs(spec, message):
    from stellarnet.dataset.sources import expand_files

    with pytest.raises(FileNotFoundError, match=re.escape(message)):
        expand_files(spec)


def test_manifest_row_count_that_does_not_match_the_shard(small_shards, tmp_path):
    work = _copy(small_shards, tmp_path / "ds")
    m = json.loads((work / "manifest.json").read_text())
    m["shards"][0]["rows"] += 5
    (work / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ShardError, match=r"has \d+ rows, manifest says \d+"):
        verify_dataset(work, check_sha=False)


def test_apstar_file_named_as_an_aspcapstar(reference_dir, tmp_path):
    """A multi-visit apStar renamed aspcapStar-*: read by its name, refused by its shape."""
    bad = tmp_path / "aspcapStar-dr17-2M17335483-2753043.fits"
    shutil.copy(reference_dir / "apStar-dr17-2M17335483-2753043.fits", bad)
    with fits.open(bad) as hdul:
        multi = hdul[1].data.ndim == 2
    if not multi:
        pytest.skip("this reference apStar has one visit (1-D arrays)")
    with pytest.raises(SpectrumFormatError, match=r"aspcapStar flux/error must be \(8575,\)"):
        read_spectrum(bad)
