"""The fast FITS reader (stellarnet.io.fitsfile): the same headers and arrays as astropy on the
files it accepts, a refusal (UnsupportedFITS → astropy) on everything else, and the spectrum readers
giving identical spectra either way."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from stellarnet.io import spectra
from stellarnet.io.fitsfile import BLOCK, UnsupportedFITS, open_fits
from stellarnet.common.paths import resource

APSTARS = ["apStar-dr17-2M17335483-2753043.fits", "apStar-dr17-2M19485057+5005279.fits"]


def _astropy_view(path: Path) -> list[tuple[dict, np.ndarray | None, bool]]:
    out = []
    with fits.open(path, memmap=False) as hdus:
        for h in hdus:
            header = {k: h.header[k] for k in h.header if k not in ("COMMENT", "HISTORY", "")}
            out.append((header, h.data if h.is_image else None, h.is_image))
    return out


def _assert_same_as_astropy(path: Path) -> None:
    ref = _astropy_view(path)
    with open_fits(path) as f:
        assert len(f) == len(ref)
        for (header, data, is_image), hdu in zip(ref, f):
            assert dict(hdu.header) == header
            assert list(hdu.header) == list(header)  # same keyword order
            assert hdu.is_image == is_image
            if data is None:
                assert hdu.data is None
            else:
                assert hdu.data.dtype == data.dtype and hdu.data.shape == data.shape
                np.testing.assert_array_equal(hdu.data, data)


@pytest.mark.parametrize("name", APSTARS)
def test_real_dr17_apstar_files_read_as_astropy_reads_them(name):
    """Both real DR17 apStar files (11 HDUs: float64 images, an int64 mask, an empty image, two
    binary tables): every header value, keyword order, dtype and pixel identical."""
    _assert_same_as_astropy(Path(resource(name)))


def test_simulated_aspcapstar_files_read_as_astropy_reads_them(tiny_survey):
    files = sorted(Path(tiny_survey["root"]).rglob("aspcapStar-*.fits"))[:20]
    assert files
    for p in files:
        _assert_same_as_astropy(p)


def test_header_values_of_every_kind(tmp_path):
    """Strings with '' escapes, leading spaces kept / trailing dropped, CONTINUE long strings,
    logicals, integers, floats with D exponents, undefined values, comments after '/'."""
    h0 = fits.PrimaryHDU()
    h0.header["S1"] = "it's"
    h0.header["S2"] = "  lead"
    h0.header["LONG"] = "x" * 150 + "END"
    h0.header["T1"] = True
    h0.header["F1"] = False
    h0.header["I1"] = -42
    h0.header["R1"] = (1.5e-7, "a comment / with a slash")
    h0.header["EMPTY"] = ""
    h0.header["COMMENT"] = "ignored"
    h0.header.append(fits.Card.fromstring("R2      =             1.25D+03 / Fortran exponent"))
    h0.header.append(fits.Card.fromstring("UNDEF   =                      / no value"))
    path = tmp_path / "kinds.fits"
    fits.HDUList([h0, fits.ImageHDU(np.arange(10, dtype=">f4"))]).writeto(path)
    _assert_same_as_astropy(path)
    with open_fits(path) as f:
        h = f[0].header
        assert h["S1"] == "it's" and h["S2"] == "  lead" and h["LONG"] == "x" * 150 + "END"
        assert h["T1"] is True and h["F1"] is False and h["I1"] == -42 and h["R2"] == 1250.0
        assert h["UNDEF"] is None and h.get("missing", 3) == 3 and "s1" in h


def _copy(src: Path, dst: Path) -> Path:
    shutil.copy(src, dst)
    return dst


@pytest.fixture()
def aspcap_file(tmp_path, tiny_survey) -> Path:
    src = sorted(Path(tiny_survey["root"]).rglob("aspcapStar-*.fits"))[0]
    return _copy(src, tmp_path / src.name)


def test_scaled_compressed_and_nonstandard_files_are_left_to_astropy(tmp_path, aspcap_file):
    """What it does not handle exactly it refuses — and the spectrum reader then reads the file through
    astropy with the same result (a uint16 mask stored with BZERO = 32768, a gzip file, a HIERARCH card)."""
    scaled = tmp_path / "apStar-scaled.fits"
    mask = np.array([0, 1, 40000] + [0] * 8572, dtype=np.uint16)
    flux = np.ones(8575)
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(flux), fits.ImageHDU(flux * 0.01),
                  fits.ImageHDU(mask)]).writeto(scaled)
    with pytest.raises(UnsupportedFITS, match="scaled"):
        open_fits(scaled)
    assert spectra.read_apstar(scaled).pixmask[2] == 40000

    gz = tmp_path / (aspcap_file.name + ".gz")
    gz.write_bytes(gzip.compress(aspcap_file.read_bytes()))
    with pytest.raises(UnsupportedFITS, match="compressed"):
        open_fits(gz)
    np.testing.assert_array_equal(spectra.read_aspcapstar(gz).flux, spectra.read_aspcapstar(aspcap_file).flux)

    hier = _copy(aspcap_file, tmp_path / "aspcapStar-hier.fits")
    with fits.open(hier, mode="update") as h:
        h[0].header["HIERARCH ESO LONG KEYWORD"] = 1
    with pytest.raises(UnsupportedFITS, match="non-standard card"):
        open_fits(hier)
    assert spectra.read_aspcapstar(hier).header["ESO LONG KEYWORD"] == 1


def test_truncated_and_padded_files_are_refused(tmp_path, aspcap_file):
    raw = aspcap_file.read_bytes()
    cut = tmp_path / "aspcapStar-cut.fits"
    cut.write_bytes(raw[:-BLOCK])  # a whole block short: the last HDU's data run past the end
    with pytest.raises(UnsupportedFITS, match="truncated"):
        open_fits(cut)
    with pytest.raises(spectra.SpectrumFormatError):
        spectra.read_aspcapstar(cut)  # astropy's verdict, as before
    odd = tmp_path / "aspcapStar-odd.fits"
    odd.write_bytes(raw[:-100])
    with pytest.raises(UnsupportedFITS, match="blocks"):
        open_fits(odd)
    junk = tmp_path / "aspcapStar-junk.fits"
    junk.write_bytes(raw + b"\0" * BLOCK)
    with pytest.raises(UnsupportedFITS, match="trailing"):
        open_fits(junk)
    not_fits = tmp_path / "aspcapStar-text.fits"
    not_fits.write_bytes(b"hello world " * 240)
    with pytest.raises(UnsupportedFITS):
        open_fits(not_fits)


def test_the_readers_use_the_fast_path_and_give_identical_spectra(monkeypatch, aspcap_file):
    """read_aspcapstar / read_apstar through open_fits and through astropy (open_fits disabled):
    every array and header value equal, and the fast path is the one taken."""
    files = [(spectra.read_aspcapstar, aspcap_file)] + [(spectra.read_apstar, Path(resource(n))) for n in APSTARS]
    fast = [reader(path) for reader, path in files]
    calls = []
    real = spectra.open_fits
    monkeypatch.setattr(spectra, "open_fits", lambda p: calls.append(p) or real(p))
    [reader(path) for reader, path in files]
    assert len(calls) == len(files)

    def refuse(p):
        raise UnsupportedFITS("disabled")

    monkeypatch.setattr(spectra, "open_fits", refuse)
    slow = [reader(path) for reader, path in files]
    for a, b in zip(fast, slow):
        for field in ("flux", "flux_err", "pixmask", "wavelength"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
            assert getattr(a, field).dtype == getattr(b, field).dtype
        assert a.header == b.header and a.apogee_id == b.apogee_id and a.n_visits == b.n_visits


def _cards(*cards: str) -> bytes:
    text = "".join(c.ljust(80)[:80] for c in cards + ("END",))
    return text.ljust(-(-len(text) // BLOCK) * BLOCK).encode("ascii")


_PRIMARY = ("SIMPLE  =                    T", "BITPIX  =                    8", "NAXIS   =                    0")


@pytest.mark.parametrize("cards, message", [
    (("SIMPLE  =                    F", "BITPIX  =                    8", "NAXIS   =                    0"), "SIMPLE"),
    (_PRIMARY + ("GROUPS  =                    T",), "random groups"),
    (("SIMPLE  =                    T", "BITPIX  =                   12", "NAXIS   =                    0"), "BITPIX"),
    (("SIMPLE  =                    T", "BITPIX  =                  -32", "NAXIS   =                    1",
      "NAXIS1  =                   -5"), "NAXISn"),
    (_PRIMARY + ("PCOUNT  =                   -1",), "PCOUNT"),
    (_PRIMARY + ("GCOUNT  =                    2",), "image with PCOUNT"),
    (_PRIMARY + ("ZIMAGE  =                    T",), "tile-compressed"),
    (_PRIMARY + ("A       = (1.0, 2.0)",), "complex or non-standard"),
    (_PRIMARY + ("NUM     =                    7", "CONTINUE  'x'"), "CONTINUE after a non-string"),
    (_PRIMARY + ("S       = 'abc&'", "CONTINUE  no quote"), "without a string"),
    (_PRIMARY + ("S       = 'abc'", "CONTINUE  'x'"), "without '&'"),
    (_PRIMARY + ("S       = 'unterminated",), "unterminated"),
    (_PRIMARY + ("lower   =                    1",), "non-standard card"),
])
def test_headers_it_does_not_read_exactly_are_refused(tmp_path, cards, message):
    """Hand-made headers, one oddity each: refused (UnsupportedFITS → astropy), never misread."""
    path = tmp_path / "odd.fits"
    path.write_bytes(_cards(*cards))
    with pytest.raises(UnsupportedFITS, match=message):
        open_fits(path)


def test_extensions_it_does_not_decode(tmp_path):
    """A table extension is listed (no data decoded); an unknown extension type or one without
    XTENSION is refused; a CONTINUE'd long string is joined; a header without END is refused."""
    ok = tmp_path / "table.fits"
    ok.write_bytes(_cards(*_PRIMARY, "EXTEND  =                    T", "S       = 'ab&'", "CONTINUE  'cd'")
                   + _cards("XTENSION= 'BINTABLE'", "BITPIX  =                    8", "NAXIS   =                    2",
                            "NAXIS1  =                    4", "NAXIS2  =                    1",
                            "PCOUNT  =                    0", "GCOUNT  =                    1", "TFIELDS =                    0")
                   + b"\0" * BLOCK)
    with open_fits(ok) as f:
        assert len(f) == 2 and f[0].header["S"] == "abcd" and not f[1].is_image and f[1].data is None
    for xt, message in (("'FOREIGN '", "extension type"), (None, "XTENSION")):
        bad = tmp_path / "ext.fits"
        ext = ([f"XTENSION= {xt}"] if xt else ["XTENSIO = 'IMAGE'"]) + ["BITPIX  =                    8",
                                                                        "NAXIS   =                    0"]
        bad.write_bytes(_cards(*_PRIMARY) + _cards(*ext))
        with pytest.raises(UnsupportedFITS, match=message if xt else "trailing|XTENSION"):
            open_fits(bad)
    no_end = tmp_path / "noend.fits"
    no_end.write_bytes("".join(c.ljust(80) for c in _PRIMARY).ljust(BLOCK).encode())
    with pytest.raises(UnsupportedFITS, match="past the end"):
        open_fits(no_end)
