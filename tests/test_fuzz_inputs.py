"""Property-based fuzzing of the readers beside the hand-written corpus (``test_bad_inputs*.py``).

Valid allStar, aspcapStar, apStar (the two real DR17 files), GALAH / LAMOST catalogues and shard
manifests are mutated — byte truncation, byte flips, header keywords, values (NaN, inf, zero,
negative, huge), removed columns, changed dtypes — and read through the public functions. The
property: a clear project error (a ``ValueError``/``OSError``/``KeyError`` subclass the project
raises on purpose, with a message) or a result that is sane (right shape, finite outputs, good
pixels only where the input allowed) — never a raw library exception, a hang or a silent NaN.

A bounded number of examples runs in the default suite (``derandomize``: the same examples every
run); ``-m slow`` runs many more.
"""

from __future__ import annotations

import io
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stellarnet.io.catalogs import CatalogFormatError, MissingColumnError, read_allstar
from stellarnet.dataset.manifest import ShardError, load_manifest, verify_dataset
from stellarnet.io.spectra import SpectrumFormatError, read_spectrum
from stellarnet.preparation.spectra import SpectrumQualityError, prepare_spectrum
from stellarnet.preparation.surveys import read_galah, read_lamost

REFERENCE = Path(__file__).resolve().parents[1] / "data" / "reference"
#: examples per property: default suite / -m slow
EXAMPLES = [pytest.param(25, id="bounded"), pytest.param(400, id="many", marks=pytest.mark.slow)]
CATALOG_ERRORS = (CatalogFormatError, MissingColumnError, FileNotFoundError)
SPECTRUM_ERRORS = (SpectrumFormatError, SpectrumQualityError)


def _settings(n: int):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _message(exc: BaseException) -> str:
    text = str(exc)
    assert len(text) > 15, f"{type(exc).__name__} without a useful message: {text!r}"
    return text


# ------------------------------------------------------------------------------- byte mutations
@st.composite
def byte_mutation(draw, size: int):
    """(kind, details) of a mutation of a file of ``size`` bytes."""
    kind = draw(st.sampled_from(["truncate", "flip", "zero_block", "junk_tail"]))
    if kind == "truncate":
        return kind, draw(st.integers(0, size - 1))
    if kind == "flip":
        offsets = draw(st.lists(st.integers(0, size - 1), min_size=1, max_size=12))
        return kind, [(o, draw(st.integers(1, 255))) for o in offsets]
    if kind == "zero_block":
        start = draw(st.integers(0, size - 1))
        return kind, (start, draw(st.integers(1, 5760)))
    return kind, draw(st.binary(min_size=1, max_size=3000))


def _mutate_bytes(data: bytes, mutation) -> bytes:
    kind, d = mutation
    if kind == "truncate":
        return data[:d]
    b = bytearray(data)
    if kind == "flip":
        for off, x in d:
            b[off] ^= x
    elif kind == "zero_block":
        start, n = d
        b[start:start + n] = bytes(len(b[start:start + n]))
    else:
        b += d
    return bytes(b)


@pytest.fixture(scope="module")
def allstar_bytes(tiny_survey) -> bytes:
    t = Table.read(tiny_survey["allstar"], hdu=1)[:30]
    buf = io.BytesIO()
    fits.HDUList([fits.PrimaryHDU(), fits.table_to_hdu(t)]).writeto(buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def aspcap_bytes(tiny_survey) -> bytes:
    f = sorted(Path(tiny_survey["root"]).rglob("aspcapStar-*.fits"))[0]
    return f.read_bytes()


def _check_spectrum_file(path: Path) -> None:
    """Read + prepare ``path``: a project error, or finite inputs for the network."""
    try:
        spec = read_spectrum(path)
        flux, err, good = prepare_spectrum(spec.flux, spec.flux_err, spec.pixmask, grid="dr17",
                                           normalized=path.name.startswith("aspcapStar"))
    except SPECTRUM_ERRORS as exc:
        _message(exc)
        return
    assert np.isfinite(flux).all() and np.isfinite(err).all() and (err > 0).all()
    assert good.dtype == bool and good.any()
    assert (flux[~good] == 1).all()


def _fuzz_file_bytes(data: bytes, name: str, n: int, check_file) -> None:
    """Run ``check_file(path)`` on ``n`` byte mutations of ``data`` written as ``name``."""
    @_settings(n)
    @given(byte_mutation(len(data)))
    def check(mutation):
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / name
            p.write_bytes(_mutate_bytes(data, mutation))
            check_file(p)

    check()


def _check_allstar_file(p: Path) -> None:
    try:
        df = read_allstar(p, required=["APOGEE_ID", "TEFF", "LOGG"])
    except CATALOG_ERRORS as exc:
        _message(exc)
        return
    assert 0 <= len(df) <= 30 and {"APOGEE_ID", "TEFF", "LOGG"} <= set(df.columns)


@pytest.mark.parametrize("n", EXAMPLES)
def test_fuzzed_allstar_bytes(allstar_bytes, n):
    _fuzz_file_bytes(allstar_bytes, "allStar-fuzz.fits", n, _check_allstar_file)


@pytest.mark.parametrize("n", EXAMPLES)
def test_fuzzed_allstar_columns(allstar_bytes, n):
    """Columns removed, renamed, retyped (numbers as strings) or filled with sentinels / inf."""
    table = Table.read(io.BytesIO(allstar_bytes), hdu=1)
    names = ["TEFF", "LOGG", "FE_H", "SNR", "APOGEE_ID", "ASPCAPFLAG"]

    @_settings(n)
    @given(st.sampled_from(names), st.sampled_from(["drop", "string", "inf", "nan", "sentinel", "huge"]))
    def check(column, how):
        t = table.copy()
        if how == "drop":
            t.remove_column(column)
        elif how == "string":
            t[column] = np.array([str(v) for v in t[column]])
        elif t[column].dtype.kind == "f":
            t[column] = {"inf": np.inf, "nan": np.nan, "sentinel": -9999.0, "huge": 1e30}[how]
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / "allStar-fuzz.fits"
            fits.HDUList([fits.PrimaryHDU(), fits.table_to_hdu(t)]).writeto(p)
            try:
                df = read_allstar(p, required=names)
            except CATALOG_ERRORS as exc:
                assert column in _message(exc) or how == "drop"
                return
            assert len(df) == 30
            if how == "sentinel" and column in ("TEFF", "LOGG", "FE_H", "SNR"):
                assert df[column].isna().all()  # -9999 is missing, never a value

    check()


@pytest.mark.parametrize("n", EXAMPLES)
def test_fuzzed_aspcapstar_bytes(aspcap_bytes, n):
    _fuzz_file_bytes(aspcap_bytes, "aspcapStar-dr17-2M00000000+0000000.fits", n, _check_spectrum_file)


@pytest.mark.parametrize("n", EXAMPLES)
def test_fuzzed_spectrum_values_and_headers(aspcap_bytes, n):
    """Values (NaN, inf, 0, negative, huge, scaled) in flux / error, and header keywords."""
    with fits.open(io.BytesIO(aspcap_bytes)) as hdul:
        base = [h.copy() for h in hdul]

    @_settings(n)
    @given(st.sampled_from([1, 2]), st.sampled_from(["nan", "inf", "zero", "negative", "huge", "scale"]),
           st.floats(0.0, 1.0), st.floats(0.0, 1.0),
           st.sampled_from([None, "NAXIS1", "CRVAL1", "CDELT1"]), st.sampled_from([0, -1, 1e30, "junk"]))
    def check(hdu, how, start, length, keyword, value):
        hdus = [h.copy() for h in base]
        arr = np.array(hdus[hdu].data, dtype=np.float64)
        a = int(start * arr.size)
        b = min(arr.size, a + 1 + int(length * arr.size))
        arr[a:b] = {"nan": np.nan, "inf": np.inf, "zero": 0.0, "negative": -1.0, "huge": 1e38}.get(how, 0.0) \
            if how != "scale" else arr[a:b] * 1000.0
        hdus[hdu].data = arr.astype(np.float32)
        if keyword is not None and keyword != "NAXIS1":
            hdus[1].header[keyword] = value
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / "aspcapStar-dr17-2M00000000+0000000.fits"
            fits.HDUList(hdus).writeto(p, output_verify="silentfix")
            _check_spectrum_file(p)

    check()


@pytest.mark.parametrize("n", EXAMPLES)
@pytest.mark.parametrize("name", ["apStar-dr17-2M17335483-2753043.fits", "apStar-dr17-2M19485057+5005279.fits"])
def test_fuzzed_real_apstar_bytes(name, n):
    _fuzz_file_bytes((REFERENCE / name).read_bytes(), name, max(5, n // 2), _check_spectrum_file)


@pytest.mark.parametrize("n", EXAMPLES)
@pytest.mark.parametrize("survey", ["galah", "lamost"])
def test_fuzzed_external_catalogues(tiny_survey, survey, n):
    reader = read_galah if survey == "galah" else read_lamost
    path = Path(tiny_survey[survey])
    n_clean = len(reader(path).data)

    def check_file(p: Path) -> None:
        try:
            cat = reader(p)
        except CATALOG_ERRORS as exc:
            _message(exc)
            return
        assert len(cat.data) <= n_clean  # damage never invents stars (cuts may remove some)

    _fuzz_file_bytes(path.read_bytes(), path.name, max(5, n // 2), check_file)


@pytest.mark.parametrize("n", EXAMPLES)
def test_fuzzed_manifest(tiny_shards, n):
    """Manifest keys removed or given wrong types / values; the JSON truncated: ShardError, always."""
    manifest = json.loads((tiny_shards / "manifest.json").read_text())
    keys = sorted(manifest)

    @_settings(n)
    @given(st.sampled_from(keys), st.sampled_from(["drop", "null", "string", "number", "list", "truncate_json"]),
           st.integers(0, 10_000))
    def check(key, how, cut):
        m = json.loads(json.dumps(manifest))
        text = None
        if how == "drop":
            m.pop(key)
        elif how == "truncate_json":
            text = json.dumps(m)[: cut % len(json.dumps(m))]
        else:
            m[key] = {"null": None, "string": "x", "number": 7, "list": [1, "a"]}[how]
        with tempfile.TemporaryDirectory() as d:
            work = Path(d) / "ds"
            shutil.copytree(tiny_shards, work)
            (work / "manifest.json").write_text(text if text is not None else json.dumps(m))
            try:
                loaded = load_manifest(work)
                verify_dataset(work, loaded, check_sha=False)
            except ShardError as exc:
                _message(exc)
                return
            # accepted: only keys the readers do not need were changed
            assert key not in ("shards", "schema_version", "label_names", "grid", "build_hash") or how == "drop" \
                and key == "build_hash"

    check()
