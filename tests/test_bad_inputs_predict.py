"""Bad inputs to a prediction run, end to end through ``stellarnet.workflows.predict.predict`` (the CLI's
function): each gives a clear error or a per-star flag, never a silent wrong catalogue, and no run
replaces an earlier run's output unless told to.

Part of the bad-input corpus (with ``test_bad_inputs.py``); the cases come from a new user's
attempts (issue 20 of the project): a half-rebuilt shard directory, un-normalized and negated
"normalized" flux, a gzipped allStar, a mistyped spectra_root, a directory as input, NaN weights,
an output directory given twice, long star IDs.
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from astropy.io import fits
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from conftest import copy_survey_slice, tiny_model_folder

from stellarnet.io.bitmasks import STELLARNET_FLAG
from stellarnet.dataset.manifest import ShardError
from stellarnet.network.model_folder import CheckpointError
from stellarnet.network.flags import physical_ranges, stellarnet_flags
from stellarnet.common.paths import CONF_DIR
from stellarnet.workflows.predict import PredictionError, predict
from stellarnet.io.predictions import OutputExistsError

N_ROWS = 12
FAST = ("num_workers=0", "mc_samples=0", "torch_threads=1", "chunk_size=5")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_model_folder(tmp_path_factory.mktemp("model"), photometry=False, dropout=0.0)


@pytest.fixture(scope="module")
def survey(tiny_survey, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("bad_predict_survey")
    allstar, ids, files = copy_survey_slice(tiny_survey["root"], tiny_survey["allstar"], root, N_ROWS)
    return {"root": root, "allstar": allstar, "ids": ids, "files": files}


def _cfg(model_dir: Path, inp: str, out: Path, *overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose(config_name="predict", overrides=[f"ckpt_path={model_dir}", f"input={inp}",
                                                        f"output_dir={out}", *FAST, *overrides])
    GlobalHydra.instance().clear()
    return cfg


def _files(paths) -> str:
    """A comma list of files as one quoted Hydra value (a bare comma would mean a sweep)."""
    return "'" + ",".join(str(p) for p in paths) + "'"


def _catalogue(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"APOGEE_ID": str, "READ_ERROR": str}, keep_default_na=False)


def _scaled_copy(src: Path, dst: Path, factor: float) -> Path:
    """An aspcapStar copy whose flux (HDU1) and error (HDU2) are multiplied by ``factor``."""
    with fits.open(src) as hdul:
        hdul[1].data = hdul[1].data * factor
        hdul[2].data = hdul[2].data * abs(factor)
        hdul.writeto(dst)
    return dst


@pytest.mark.parametrize("factor,what", [(2500.0, "un-normalized"), (-1.0, "negated")])
def test_flux_that_is_not_normalized_gets_no_labels(model_dir, survey, tmp_path, factor, what):
    files = [str(f) for f in survey["files"][:4]]
    bad = _scaled_copy(Path(files[1]), tmp_path / Path(files[1]).name, factor)
    files[1] = str(bad)
    summary, paths = predict(_cfg(model_dir, _files(files), tmp_path / "out"))
    cat = _catalogue(paths["csv"])
    assert summary["read_errors"] == 1
    assert "not that of a continuum-normalized spectrum" in cat["READ_ERROR"][1], what
    assert cat.loc[1, ["TEFF", "LOGG", "TEFF_ERR"]].replace("", np.nan).astype(float).isna().all()
    assert np.isfinite(cat.drop(index=1)[["TEFF", "LOGG"]].astype(float).to_numpy()).all()


def test_every_star_failing_exits_nonzero_with_the_first_reason(model_dir, survey, tmp_path):
    wrong_root = tmp_path / "elsewhere"
    (wrong_root / "apogee").mkdir(parents=True)  # a plausible tree that holds none of the files
    with pytest.raises(PredictionError, match=r"every one of the 12 spectra failed .* FileNotFoundError"):
        predict(_cfg(model_dir, str(survey["allstar"]), tmp_path / "out", f"spectra_root={wrong_root}"))
    assert (tmp_path / "out" / "predictions.fits").exists()  # the catalogue that says why is kept


def test_mistyped_spectra_root_is_named(model_dir, survey, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"spectra_root .*/no_such_dir is not a directory"):
        predict(_cfg(model_dir, str(survey["allstar"]), tmp_path / "out", f"spectra_root={tmp_path / 'no_such_dir'}"))
    with pytest.raises(FileNotFoundError, match=r"has no apogee/ directory.*the directory above apogee/"):
        predict(_cfg(model_dir, str(survey["allstar"]), tmp_path / "out2", f"spectra_root={survey['root'] / 'apogee'}"))


def test_a_directory_that_is_not_a_dataset_is_refused(model_dir, survey, tmp_path):
    with pytest.raises(IsADirectoryError, match=r"not a shard dataset \(no manifest.json\).*\*\.fits"):
        predict(_cfg(model_dir, str(survey["files"][0].parent), tmp_path / "out"))


def test_gzipped_allstar_is_read(model_dir, survey, tmp_path):
    gz = tmp_path / "allStar-dr17-synspec_rev1.fits.gz"
    with open(survey["allstar"], "rb") as a, gzip.open(gz, "wb") as b:
        shutil.copyfileobj(a, b)
    summary, paths = predict(_cfg(model_dir, str(gz), tmp_path / "out", f"spectra_root={survey['root']}"))
    assert summary["stars"] == N_ROWS and summary["read_errors"] == 0
    assert _catalogue(paths["csv"])["APOGEE_ID"].tolist() == survey["ids"]


def test_an_earlier_output_is_not_overwritten(model_dir, survey, tmp_path):
    inp = _files(survey["files"][:3])
    _, paths = predict(_cfg(model_dir, inp, tmp_path / "out"))
    before = Path(paths["fits"]).read_bytes()
    with pytest.raises(OutputExistsError, match="predictions.fits already exists .* overwrite=true"):
        predict(_cfg(model_dir, _files(survey["files"][3:5]), tmp_path / "out"))
    assert Path(paths["fits"]).read_bytes() == before  # untouched
    summary, _ = predict(_cfg(model_dir, _files(survey["files"][3:5]), tmp_path / "out",
                              "overwrite=true"))
    assert summary["stars"] == 2 and len(_catalogue(paths["csv"])) == 2


def test_nan_weights_are_refused(model_dir, tmp_path):
    bad = tmp_path / "nan_model"
    shutil.copytree(model_dir, bad)
    ck = torch.load(bad / "model.pt", map_location="cpu", weights_only=True)
    name = next(k for k, v in ck["state_dict"].items() if v.is_floating_point() and v.numel() > 1)
    ck["state_dict"][name][0] = float("nan")
    torch.save(ck, bad / "model.pt")
    with pytest.raises(CheckpointError, match=rf"hold NaN or inf \(e.g. \['{name}'\]\)"):
        predict(_cfg(bad, str(tmp_path), tmp_path / "out"))


def test_half_rebuilt_shard_directory_is_refused(model_dir, tiny_shards, tmp_path):
    work = tmp_path / "shards"
    shutil.copytree(tiny_shards, work)
    (work / ".building").write_text("{}")
    with pytest.raises(ShardError, match="interrupted"):
        predict(_cfg(model_dir, str(work), tmp_path / "out"))
    assert not (tmp_path / "out" / "predictions.fits").exists()


def test_long_ids_are_kept_whole_in_the_fits(model_dir, survey, tmp_path):
    long_name = tmp_path / ("aspcapStar-dr17-" + "X" * 40 + ".fits")
    shutil.copy(survey["files"][0], long_name)
    (tmp_path / "junk").mkdir()
    junk = tmp_path / "junk" / ("aspcapStar-dr17-" + "Y" * 40 + ".fits")
    junk.write_bytes(b"not FITS" * 100)
    _, paths = predict(_cfg(model_dir, _files([long_name, junk]), tmp_path / "out"))
    with fits.open(paths["fits"]) as hdul:
        ids = [str(v) for v in hdul[1].data["APOGEE_ID"]]
    assert ids[1] == junk.stem  # an unreadable file is named by its whole stem (56 characters)


def test_refine_false_parses_and_gives_network_labels(model_dir, survey, tmp_path):
    cfg = _cfg(model_dir, str(survey["files"][0]), tmp_path / "out", "refine=false")
    assert cfg.refine is False
    summary, _ = predict(cfg)
    assert summary["refined"] is False


def test_unphysical_labels_are_flagged():
    names = ["TEFF", "LOGG", "FE_H", "ALPHA_FE"]
    labels = np.array([[4800, 2.5, 0.0, 0.1], [-20657.0, 27.8, 0.0, 0.1], [np.nan, 2.5, 0.0, 0.1],
                       [4800, 2.5, -7.0, 0.1]])
    res = {"labels": labels}
    flag = stellarnet_flags(res, np.ones(4), None, physical_ranges(names))
    unphysical = STELLARNET_FLAG.any_set(flag, ["UNPHYSICAL"])
    assert unphysical.tolist() == [False, True, True, True]
    assert STELLARNET_FLAG.any_set(flag, STELLARNET_FLAG.bad_bits).all()  # NOT_REFINED + UNPHYSICAL


def _apstar_negated(dst: Path) -> Path:
    src = Path(__file__).resolve().parents[1] / "data" / "reference" / "apStar-dr17-2M17335483-2753043.fits"
    with fits.open(src) as hdul:
        hdul[1].data = -hdul[1].data
        hdul.writeto(dst)
    return dst


@pytest.mark.parametrize("case,message", [
    ("all_zero", "has no good pixel"),
    ("no_error_hdu", "missing HDU2 (flux error)"),
])
def test_broken_aspcapstar_files_are_reported_per_star(model_dir, survey, tmp_path, case, message):
    files = [str(f) for f in survey["files"][:3]]
    bad = tmp_path / Path(files[0]).name
    with fits.open(files[0]) as hdul:
        if case == "all_zero":
            hdul[1].data = np.zeros_like(hdul[1].data)
            hdul.writeto(bad)
        else:
            fits.HDUList([hdul[0].copy(), hdul[1].copy()]).writeto(bad)
    files[0] = str(bad)
    summary, paths = predict(_cfg(model_dir, _files(files), tmp_path / "out"))
    cat = _catalogue(paths["csv"])
    assert summary["read_errors"] == 1 and message in cat["READ_ERROR"][0]
    assert np.isnan(float(cat["TEFF"][0] or "nan")) and np.isfinite(cat["TEFF"][1:].astype(float)).all()


def test_negated_apstar_is_reported(tmp_path):
    """Un-normalized (apStar) flux that is negative: a clear per-star error, not a flipped continuum."""
    from stellarnet.dataset.chunks import open_chunks

    bad = _apstar_negated(tmp_path / "apStar-dr17-2M17335483-2753043.fits")
    chunk = open_chunks([str(bad)], "dr12")[0]
    assert "not positive: negated or corrupt flux" in chunk["error"][0]
    assert not chunk["pix_mask"][0].any()


def test_an_empty_catalogue_is_an_error(model_dir, survey, tmp_path):
    from astropy.table import Table

    empty = tmp_path / "allStar-empty.fits"
    t = Table.read(survey["allstar"], hdu=1)[:0]
    fits.HDUList([fits.PrimaryHDU(), fits.table_to_hdu(t)]).writeto(empty)
    with pytest.raises(PredictionError, match="holds no stars: nothing to predict"):
        predict(_cfg(model_dir, str(empty), tmp_path / "out", f"spectra_root={survey['root']}"))


def test_catalogue_without_the_path_columns(model_dir, survey, tmp_path):
    from astropy.table import Table

    from stellarnet.io.catalogs import MissingColumnError

    t = Table.read(survey["allstar"], hdu=1)
    t.remove_column("TELESCOPE")
    bad = tmp_path / "allStar-notel.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.table_to_hdu(t)]).writeto(bad)
    with pytest.raises(MissingColumnError, match="'TELESCOPE'"):
        predict(_cfg(model_dir, str(bad), tmp_path / "out", f"spectra_root={survey['root']}"))


def test_a_folder_without_a_model(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(CheckpointError, match=r"no checkpoint at .*model.pt: pass ckpt_path=<run>/model"):
        predict(_cfg(tmp_path / "run", str(tmp_path), tmp_path / "out"))


def test_a_catalogue_is_recognised_by_content_and_input_kind_forces(model_dir, survey, tmp_path):
    from stellarnet.dataset.sources import source_kind

    mine = tmp_path / "my_targets.fits"
    shutil.copy(survey["allstar"], mine)
    assert source_kind(str(mine)) == "catalog"
    assert source_kind(str(survey["files"][0])) == "files"  # an aspcapStar: images, not a table
    assert source_kind(str(mine), "files") == "files"
    summary, paths = predict(_cfg(model_dir, str(mine), tmp_path / "out", f"spectra_root={survey['root']}"))
    assert summary["stars"] == N_ROWS and _catalogue(paths["csv"])["APOGEE_ID"].tolist() == survey["ids"]
    with pytest.raises(ValueError, match="input_kind must be one of"):
        source_kind(str(mine), "table")
    with pytest.raises(ValueError, match="input_kind=shards but .* is not a shard dataset"):
        source_kind(str(mine), "shards")


def test_file_list_predictions_carry_positions_from_the_headers(model_dir, survey, tmp_path):
    files = survey["files"][:3]
    _, paths = predict(_cfg(model_dir, _files(files), tmp_path / "out", "num_workers=1"))
    cat = _catalogue(paths["csv"])
    for i, f in enumerate(files):
        with fits.open(f) as hdul:
            h = hdul[0].header
        assert cat["RA"][i] == pytest.approx(h["RA"]) and cat["DEC"][i] == pytest.approx(h["DEC"])
        assert cat["TELESCOPE"][i] == h["TELESCOP"] and cat["FIELD"][i] == h["FIELD"]
    with fits.open(paths["fits"]) as hdul:
        assert hdul[1].columns["RA"].unit == "deg"


def test_another_release_layout_is_configurable(model_dir, survey, tmp_path):
    """Spectra mirrored flat as <root>/spectra/<APOGEE_ID>.fits: spectra_layout finds them, for
    predict and for the shard build; a template without {APOGEE_ID} is refused."""
    from stellarnet.dataset.shards import build_shards

    mirror = tmp_path / "mirror"
    (mirror / "spectra").mkdir(parents=True)
    for apogee_id, f in zip(survey["ids"], survey["files"]):
        shutil.copy(f, mirror / "spectra" / f"{apogee_id}.fits")
    layout = "spectra/{APOGEE_ID}.fits"
    summary, _ = predict(_cfg(model_dir, str(survey["allstar"]), tmp_path / "out", f"spectra_root={mirror}",
                              f"spectra_layout='{layout}'"))
    assert summary["stars"] == N_ROWS and summary["read_errors"] == 0
    m = build_shards(survey["allstar"], tmp_path / "ds", {}, spectra_root=mirror, layout=layout, grid="dr12",
                     rows_per_shard=64, n_workers=1, progress=False,
                     split={"by": "FIELD", "fractions": {"train": 0.5, "val": 0.25, "test": 0.25}, "seed": 1})
    assert m["sources"]["spectra_layout"] == layout and m["spectra_missing"]["count"] == 0
    with pytest.raises(ValueError, match=r"must contain \{APOGEE_ID\}"):
        predict(_cfg(model_dir, str(survey["allstar"]), tmp_path / "out2", f"spectra_root={mirror}",
                     "spectra_layout='spectra/{FIELD}.fits'"))
