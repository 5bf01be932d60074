"""Prediction sources: the pooled spectrum reader gives the in-process reader's chunks (same arrays,
order and per-file errors), the cached aspcapStar reader fails like ``read_aspcapstar``."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from conftest import copy_survey_slice

from stellarnet.dataset import sources as S
from stellarnet.io.catalogs import read_allstar
from stellarnet.io.spectra import _checked_grid, read_aspcapstar, read_spectrum

GRID = "dr12"
N_GOOD = 14


@pytest.fixture(scope="module")
def survey(tiny_survey, tmp_path_factory) -> dict:
    """``N_GOOD`` good aspcapStar files of the tiny survey plus a corpus of bad ones, and an allStar
    slice of 16 rows whose spectra include a corrupt and a missing file."""
    root = tmp_path_factory.mktemp("src_survey")
    allstar, ids, paths = copy_survey_slice(tiny_survey["root"], tiny_survey["allstar"], root, 16)
    good = [str(p) for p in paths]
    bad_dir = root / "bad"
    bad_dir.mkdir()
    src = good[0]
    bad = {}
    bad["truncated"] = bad_dir / "aspcapStar-dr17-2M00000001+0000001.fits"
    bad["truncated"].write_bytes(Path(src).read_bytes()[:40000])
    bad["not_fits"] = bad_dir / "aspcapStar-dr17-2M00000002+0000002.fits"
    bad["not_fits"].write_text("this is not a FITS file\n" * 200)
    with fits.open(src) as h:
        short = fits.HDUList([h[0].copy()] + [fits.ImageHDU(h[i].data[:8000], header=h[i].header) for i in (1, 2)])
        short.writeto(bad_dir / "aspcapStar-dr17-2M00000003+0000003.fits")
        bad["short_grid"] = bad_dir / "aspcapStar-dr17-2M00000003+0000003.fits"
        nan = fits.HDUList([h[0].copy()] + [fits.ImageHDU(np.full(8575, np.nan, np.float32), header=h[1].header),
                                            fits.ImageHDU(h[2].data, header=h[2].header)])
        bad["all_nan"] = bad_dir / "aspcapStar-dr17-2M00000004+0000004.fits"
        nan.writeto(bad["all_nan"])
        shifted = fits.HDUList([h[0].copy()] + [fits.ImageHDU(h[i].data, header=h[i].header.copy()) for i in (1, 2, 3)])
        shifted[1].header["CRVAL1"] = 4.18  # not the APOGEE grid
        bad["wrong_wavelength"] = bad_dir / "aspcapStar-dr17-2M00000005+0000005.fits"
        shifted.writeto(bad["wrong_wavelength"])
        model = fits.HDUList([h[0].copy()] + [fits.ImageHDU(h[i].data, header=h[i].header) for i in (1, 2)]
                             + [fits.ImageHDU(h[3].data[:100])])
        bad["model_shape"] = bad_dir / "aspcapStar-dr17-2M00000006+0000006.fits"
        model.writeto(bad["model_shape"])
        text = fits.HDUList([h[0].copy()] + [fits.ImageHDU(h[i].data, header=h[i].header.copy()) for i in (1, 2)])
        text[1].header["CDELT1"] = "six microdex"
        bad["text_keyword"] = bad_dir / "aspcapStar-dr17-2M00000007+0000007.fits"
        text.writeto(bad["text_keyword"])
    # the catalogue: row 3's spectrum is corrupt, row 9's is missing
    Path(good[3]).write_bytes(Path(good[3]).read_bytes()[:30000])
    Path(good[9]).unlink()
    return {"root": root, "allstar": allstar, "files": [g for i, g in enumerate(good) if i not in (3, 9)],
            "bad": {k: str(v) for k, v in bad.items()}, "catalog_bad_rows": (3, 9)}


def _mixed_files(survey) -> list[str]:
    files = list(survey["files"][:N_GOOD])
    for k, path in enumerate(survey["bad"].values()):  # bad files spread between good ones
        files.insert(2 + 2 * k, path)
    return files


def _assert_same_chunk(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for key in a:
        x, y = np.asarray(a[key]), np.asarray(b[key])
        assert x.dtype == y.dtype and x.shape == y.shape, key
        if x.dtype == object:
            assert x.tolist() == y.tolist(), key
        else:
            np.testing.assert_array_equal(x, y, err_msg=key)


# --------------------------------------------------------------------------------- one file
def test_lean_aspcapstar_reader_matches_read_aspcapstar(survey):
    for f in survey["files"][:4]:
        spec = read_aspcapstar(f)
        lean = read_aspcapstar(f, header=False)
        np.testing.assert_array_equal(lean.flux, spec.flux)
        np.testing.assert_array_equal(lean.flux_err, spec.flux_err)
        np.testing.assert_array_equal(lean.wavelength, spec.wavelength)
        assert lean.apogee_id == spec.apogee_id and lean.flux.dtype == np.float64
        assert set(lean.header) <= {"RA", "DEC", "SNR", "TELESCOP", "FIELD"}  # only the position keywords
    assert _checked_grid.cache_info().currsize  # the APOGEE grid is cached after the first file


@pytest.mark.parametrize("case", ["truncated", "not_fits", "short_grid", "wrong_wavelength", "model_shape",
                                  "text_keyword"])
def test_lean_reader_fails_like_read_aspcapstar(survey, case):
    read_aspcapstar(survey["files"][0], header=False)  # cache filled: bad grids must still be caught
    path = survey["bad"][case]
    with pytest.raises(Exception) as ref:
        read_aspcapstar(path)
    with pytest.raises(type(ref.value)) as got:
        read_aspcapstar(path, header=False)
    assert str(got.value) == str(ref.value)


def test_wavelength_cache_only_keeps_passing_grids(survey):
    read_aspcapstar(survey["files"][0], header=False)
    good = read_aspcapstar(survey["files"][0], header=False).wavelength
    for case in ("wrong_wavelength", "text_keyword"):
        with pytest.raises(Exception, match="wavelength"):
            read_aspcapstar(survey["bad"][case], header=False)
    # the cached grid is never handed out for in-place edits
    good[0] = 0.0
    assert read_aspcapstar(survey["files"][0], header=False).wavelength[0] == pytest.approx(10 ** 4.179, rel=1e-6)


def test_file_reader_matches_read_spectrum_then_prepare(survey):
    from stellarnet.preparation.spectra import prepare_spectrum

    files = survey["files"][:3]
    chunk = S.read_spectrum_files(files, GRID, None)
    for i, f in enumerate(files):
        spec = read_spectrum(f)
        fl, er, gd = prepare_spectrum(spec.flux, spec.flux_err, spec.pixmask, grid=GRID, normalized=True)
        np.testing.assert_array_equal(chunk["flux"][i], fl)
        np.testing.assert_array_equal(chunk["flux_err"][i], er)
        np.testing.assert_array_equal(chunk["pix_mask"][i], gd.astype(np.float32))
        assert chunk["apogee_id"][i] == spec.apogee_id and chunk["error"][i] == ""


# ------------------------------------------------------------ reading in DataLoader workers
def _loader_chunks(ds, num_workers: int) -> list[dict]:
    from torch.utils.data import DataLoader

    from stellarnet.dataset.chunks import pass_through

    return list(DataLoader(ds, batch_size=None, num_workers=num_workers, collate_fn=pass_through))


def test_worker_processes_give_the_in_process_chunks(survey):
    """Spectrum files read by 2 DataLoader worker processes: the same chunks (order, arrays, per-file
    errors) as in this process; a bad file is one row with the reader's message, good rows untouched."""
    from stellarnet.dataset.chunks import open_chunks

    files = _mixed_files(survey)
    ds = open_chunks(files, GRID, chunk_size=4)
    ref, got = _loader_chunks(ds, 0), _loader_chunks(ds, 2)
    assert len(ref) == len(got) == -(-len(files) // 4)
    for a, b in zip(ref, got, strict=True):
        _assert_same_chunk(a, b)
    errors = dict(zip(files, np.concatenate([c["error"] for c in ref])))
    assert sum(e != "" for e in errors.values()) == len(survey["bad"])
    assert "truncated" in errors[survey["bad"]["truncated"]]
    assert errors[survey["bad"]["not_fits"]].startswith("SpectrumFormatError:") and "not a readable FITS" in \
        errors[survey["bad"]["not_fits"]]
    assert "HDU1 (flux) has shape (8000,)" in errors[survey["bad"]["short_grid"]]
    assert errors[survey["bad"]["all_nan"]].startswith("SpectrumQualityError:")
    assert "not the APOGEE 8575-pixel" in errors[survey["bad"]["wrong_wavelength"]]
    flux = np.concatenate([c["flux"] for c in got])
    good = np.concatenate([c["pix_mask"] for c in got])
    ids = np.concatenate([c["apogee_id"] for c in got])
    for i, f in enumerate(files):
        if errors[f]:
            assert not good[i].any() and (flux[i] == 1).all() and ids[i] == Path(f).stem
        else:
            assert good[i].sum() > 1000


def test_catalogue_chunks_in_workers_match_in_process(survey):
    from stellarnet.dataset.chunks import open_chunks

    ds = open_chunks(str(survey["allstar"]), GRID, chunk_size=5, spectra_root=str(survey["root"]))
    assert (ds.kind, ds.n_stars) == ("catalog", 16)
    ref, got = _loader_chunks(ds, 0), _loader_chunks(ds, 2)
    for a, b in zip(ref, got, strict=True):
        _assert_same_chunk(a, b)
    ids = np.concatenate([c["apogee_id"] for c in got])
    assert ids.tolist() == read_allstar(survey["allstar"], columns=["APOGEE_ID"])["APOGEE_ID"].tolist()
    errors = np.concatenate([c["error"] for c in got])
    bad3, bad9 = survey["catalog_bad_rows"]
    assert "truncated" in errors[bad3] and errors[bad9].startswith("FileNotFoundError:")
    assert sum(e != "" for e in errors) == 2


def test_a_dead_worker_is_a_clear_error(survey, tmp_path):
    """A reader process killed mid-run (out of memory, a signal) ends the run with an error naming it,
    never a hang (predict turns it into a PredictionError saying the finished chunks are kept). In a
    subprocess: torch reports a dead worker from a SIGCHLD handler, at any moment, so the message is
    torch's, the shared-memory hand-over's (ConnectionResetError) or the result queue's (EOFError)."""
    import subprocess
    import sys

    script = tmp_path / "kill_workers.py"
    script.write_text(f"""
import os, signal, time
from torch.utils.data import DataLoader
from stellarnet.dataset.chunks import open_chunks, pass_through
ds = open_chunks({[str(f) for f in survey["files"]] * 4!r}, {GRID!r}, chunk_size=1)
it = iter(DataLoader(ds, batch_size=None, num_workers=2, collate_fn=pass_through))
next(it)
for w in it._workers:
    os.kill(w.pid, signal.SIGKILL)
for _ in it:
    time.sleep(0.05)
print("finished without noticing")
""")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "finished without noticing" not in r.stdout
    assert re.search(r"DataLoader worker \(pid.*\) (is killed by signal|exited unexpectedly)|ConnectionResetError|EOFError",
                     r.stderr), r.stderr[-1500:]


@pytest.mark.parametrize("value", [-1, 1.5, "two", True])
def test_num_workers_is_checked(value):
    with pytest.raises(ValueError, match="num_workers must be an integer >= 0 or 'auto'"):
        S.resolve_num_workers(value)
    assert S.resolve_num_workers("auto") == S.default_num_workers()
    assert S.resolve_num_workers(0) == 0


def test_auto_workers_leave_the_model_a_share_of_the_cpus():
    assert [S.default_num_workers(c) for c in (1, 2, 3, 4, 8, 16)] == [0, 1, 2, 2, 4, 7]


def test_source_kind(survey, tmp_path):
    assert S.source_kind(str(survey["allstar"])) == "catalog"
    assert S.source_kind(survey["files"][:2]) == "files"
    assert S.source_kind(str(tmp_path)) == "files"  # a directory without manifest.json
