"""read_allstar / read_allstar_chunks on small allStar-format FITS files written with astropy."""

from __future__ import annotations

import os
import time
import tracemalloc

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits

from stellarnet.io.bitmasks import ASPCAPFLAG, PARAM_ORDER
from stellarnet.io.allstar_columns import ALLSTAR_COLUMNS
from stellarnet.io.catalogs import CatalogFormatError, MissingColumnError, allstar_columns, read_allstar, read_allstar_chunks

N = 6
IDS = [  # space padded like the real file; rows 0 and 3 are the same star (two fields)
    b"2M00000001+0000001   ",
    b"2M00000002-0000002",
    b"  2M00000003+0000003 ",
    b"2M00000001+0000001",
    b"2M00000005+0000005",
    b"2M00000006+0000006",
]


def write_allstar(path, with_image=False):
    paramflag = np.zeros((N, 9), dtype=">i4")
    paramflag[1, 1] = 1 << 24  # SPEC_RC on the LOGG entry
    paramflag[2, 1] = 1 << 25  # SPEC_RGB
    paramflag[3, 0] = -(2**31)  # bit 31 on the TEFF entry
    param = np.arange(N * 9, dtype=">f4").reshape(N, 9)
    param[4, 2] = -9999.0
    x_h = np.arange(N * 3, dtype=">f4").reshape(N, 3)
    x_h[5, 1] = -9999.0
    cols = [
        fits.Column("APOGEE_ID", "30A", array=np.array(IDS, dtype="S30")),
        fits.Column("TELESCOPE", "8A", array=np.array([b"apo25m  "] * 4 + [b"lco25m", b"apo1m"])),
        fits.Column("FIELD", "20A", array=np.array([b"K2_C12  ", b"M67", b"N188", b"K2_C13", b"x", b"y"])),
        fits.Column("RA", "D", array=np.linspace(0, 5, N).astype(">f8")),
        fits.Column("TEFF", "E", array=np.array([4800, -9999, 5500, np.nan, 3800, 6500], dtype=">f4")),
        fits.Column("LOGG", "E", array=np.array([2.4, 4.4, -999, 2.5, 1.0, 4.2], dtype=">f4")),
        fits.Column("FE_H", "D", array=np.array([0.0, -0.3, -9999, 0.1, -1.0, 0.2], dtype=">f8")),
        fits.Column("SNR", "E", array=np.array([150, 90, 40, 60, 300, 80], dtype=">f4")),
        fits.Column("NVISITS", "J", array=np.array([3, 1, -9999, 2, 5, 1], dtype=">i4")),
        fits.Column("STARFLAG", "K", array=np.array([0, 1, 1 << 40, -(2**63), 0, 4], dtype=">i8")),
        fits.Column("EXTRATARG", "J", array=np.array([0, 0, 0, 16, 1, 0], dtype=">i4")),
        fits.Column(
            "ASPCAPFLAG", "K", array=np.array([0, 1 << 23, 0, 1 << 41, 0, -9999], dtype=">i8")
        ),
        fits.Column("PARAM", "9E", array=param),
        fits.Column("PARAMFLAG", "9J", array=paramflag),
        fits.Column("X_H", "3E", array=x_h),
    ]
    hdus = [fits.PrimaryHDU(), fits.BinTableHDU.from_columns(cols)]
    if with_image:
        hdus.append(fits.ImageHDU(np.zeros((4, 4), dtype=np.float32)))
    fits.HDUList(hdus).writeto(path, overwrite=True)
    return path


@pytest.fixture
def allstar(tmp_path):
    return write_allstar(tmp_path / "allStar-test.fits", with_image=True)


def test_types_strings_and_sentinels(allstar):
    df = read_allstar(allstar)
    assert len(df) == N
    assert isinstance(df.index, pd.RangeIndex) and list(df.index) == list(range(N))
    for c in df.columns:
        dt = df[c].dtype
        if isinstance(dt, np.dtype):
            assert dt.byteorder in ("=", "|"), (c, dt)
    assert df["TEFF"].dtype == np.float32 and df["FE_H"].dtype == np.float64
    assert df["STARFLAG"].dtype == np.int64 and df["NVISITS"].dtype == np.int32
    # padded strings stripped (both ends)
    assert df["APOGEE_ID"].tolist() == [s.decode().strip() for s in IDS]
    assert df["TELESCOPE"].tolist()[0] == "apo25m" and df["FIELD"].tolist()[0] == "K2_C12"
    # −9999 / −999 sentinels → NaN in float columns; NaN stays NaN
    assert np.isnan(df["TEFF"][1]) and np.isnan(df["TEFF"][3])
    assert np.isnan(df["LOGG"][2]) and np.isnan(df["FE_H"][2])
    assert df["TEFF"][0] == pytest.approx(4800.0)
    # integer columns are never touched, including −9999 and negative int64 flags
    assert df["NVISITS"][2] == -9999
    assert df["ASPCAPFLAG"][5] == -9999
    assert df["STARFLAG"][2] == 1 << 40
    assert df["STARFLAG"][3] == -(2**63)
    assert ASPCAPFLAG.decode(df["ASPCAPFLAG"][3]) == ["MULTIPLE_SUSPECT"]


def test_duplicate_ids_are_kept(allstar):
    df = read_allstar(allstar, columns=["APOGEE_ID", "FIELD"])
    dup = df[df["APOGEE_ID"] == "2M00000001+0000001"]
    assert len(dup) == 2 and dup["FIELD"].tolist() == ["K2_C12", "K2_C13"]


def test_array_columns_expanded_and_kept(allstar):
    df = read_allstar(allstar, columns=["APOGEE_ID", "PARAM", "PARAMFLAG", "X_H"])
    assert "PARAMFLAG" not in df.columns and "PARAM" not in df.columns
    for p in PARAM_ORDER:
        assert f"PARAMFLAG_{p}" in df.columns and f"PARAM_{p}" in df.columns
    assert df["PARAMFLAG_LOGG"].tolist() == [0, 1 << 24, 1 << 25, 0, 0, 0]
    assert df["PARAMFLAG_TEFF"][3] == -(2**31)
    assert df["PARAMFLAG_LOGG"].dtype == np.int32
    assert df["PARAM_LOGG"][1] == pytest.approx(10.0)  # row 1, entry 1 of arange
    assert np.isnan(df["PARAM_VMICRO"][4])  # −9999 inside an array → NaN
    # other arrays: object column of 1-D native float arrays
    assert df["X_H"].dtype == object
    v = df["X_H"][5]
    assert isinstance(v, np.ndarray) and v.shape == (3,) and v.dtype.byteorder in ("=", "|")
    assert v[0] == 15.0 and np.isnan(v[1])


def test_expanded_name_can_be_requested_directly(allstar):
    df = read_allstar(allstar, columns=["PARAMFLAG_LOGG", "TEFF"])
    assert list(df.columns) == ["PARAMFLAG_LOGG", "TEFF"]
    assert df["PARAMFLAG_LOGG"][1] == 1 << 24


def test_default_columns_only_those_present(allstar):
    df = read_allstar(allstar)  # file lacks most default columns: no error
    present = set(allstar_columns(allstar))
    expected = [c for c in ALLSTAR_COLUMNS if c in present and c not in ("PARAM", "PARAMFLAG")]
    assert [c for c in df.columns if not c.startswith("PARAM")] == expected
    assert "J" not in df.columns and "X_H" not in df.columns


def test_missing_columns_error_names_each_column_and_file(allstar):
    with pytest.raises(MissingColumnError) as ei:
        read_allstar(allstar, columns=["TEFF", "J", "GAIAEDR3_PARALLAX"])
    err = ei.value
    assert err.missing == ["J", "GAIAEDR3_PARALLAX"]
    msg = str(err)
    assert "'J'" in msg and "'GAIAEDR3_PARALLAX'" in msg and str(allstar) in msg
    assert isinstance(err, KeyError) and isinstance(err, ValueError)
    # required columns are checked with the defaults too
    with pytest.raises(MissingColumnError, match="'SNREV'"):
        read_allstar(allstar, required=["TEFF", "SNREV"])
    df = read_allstar(allstar, columns=["TEFF"], required=["SNR"])
    assert list(df.columns) == ["TEFF", "SNR"]


def test_wrong_hdu(allstar):
    with pytest.raises(CatalogFormatError, match=r"HDU 0 .*PrimaryHDU.*empty.*table is in HDU 1"):
        read_allstar(allstar, hdu=0)
    with pytest.raises(CatalogFormatError, match=r"HDU 2 .*ImageHDU.*HDU 1"):
        read_allstar(allstar, hdu=2)
    with pytest.raises(CatalogFormatError, match=r"no HDU 7.*table HDU\(s\): \[1\]"):
        read_allstar(allstar, hdu=7)


def test_image_only_file_has_no_table(tmp_path):
    p = tmp_path / "img.fits"
    fits.HDUList([fits.PrimaryHDU(np.zeros(10)), fits.ImageHDU(np.ones(3))]).writeto(p)
    with pytest.raises(CatalogFormatError, match="no table HDU"):
        read_allstar(p)


def test_truncated_data_block(allstar, tmp_path):
    size = os.path.getsize(allstar)
    with fits.open(allstar) as h:
        data_start = h[1].fileinfo()["datLoc"]
    bad = tmp_path / "truncated.fits"
    bad.write_bytes(allstar.read_bytes()[: data_start + 100])
    assert os.path.getsize(bad) < size
    with pytest.raises(CatalogFormatError, match="truncated") as ei:
        read_allstar(bad, columns=["TEFF"])
    assert str(bad) in str(ei.value)
    with pytest.raises(CatalogFormatError, match=str(bad)):
        next(read_allstar_chunks(bad, ["TEFF"], 2))


def test_truncated_header_and_garbage(allstar, tmp_path):
    bad = tmp_path / "cut_header.fits"
    bad.write_bytes(allstar.read_bytes()[: 2880 + 1000])  # inside HDU1's header
    with pytest.raises(CatalogFormatError, match="truncated") as ei:
        read_allstar(bad)
    assert str(bad) in str(ei.value)
    junk = tmp_path / "junk.fits"
    junk.write_bytes(b"this is not a FITS file" * 200)
    with pytest.raises(CatalogFormatError, match=str(junk)):
        read_allstar(junk)
    empty = tmp_path / "empty.fits"
    empty.write_bytes(b"")
    with pytest.raises(CatalogFormatError, match=str(empty)):
        read_allstar(empty)


def test_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.fits"):
        read_allstar(tmp_path / "nope.fits")


def test_chunks_match_full_read(allstar):
    cols = ["APOGEE_ID", "TEFF", "PARAMFLAG", "X_H"]
    full = read_allstar(allstar, columns=cols)
    chunks = list(read_allstar_chunks(allstar, cols, chunk_rows=4))
    assert [len(c) for c in chunks] == [4, 2]
    assert list(chunks[1].index) == [4, 5]
    joined = pd.concat(chunks)
    pd.testing.assert_frame_equal(
        joined.drop(columns="X_H"), full.drop(columns="X_H"), check_index_type=False
    )
    for a, b in zip(joined["X_H"], full["X_H"]):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="chunk_rows"):
        next(read_allstar_chunks(allstar, cols, chunk_rows=0))
    with pytest.raises(MissingColumnError, match="'NOPE'"):
        next(read_allstar_chunks(allstar, ["NOPE"], chunk_rows=2))


@pytest.fixture(scope="module")
def big_allstar(tmp_path_factory):
    """200,000-row, ~60 MB allStar-like table (wide rows, as in the real file)."""
    n = 200_000
    rng = np.random.default_rng(0)
    cols = [
        fits.Column("APOGEE_ID", "30A", array=np.char.add(b"2M", np.arange(n).astype("S28"))),
        fits.Column("STARFLAGS", "256A", array=np.full(n, b"BAD_PIXELS,LOW_SNR")),
        fits.Column("SNR", "E", array=rng.uniform(10, 500, n).astype(">f4")),
        fits.Column("TEFF", "E", array=rng.uniform(3500, 7000, n).astype(">f4")),
        fits.Column("ASPCAPFLAG", "K", array=rng.integers(0, 1 << 42, n).astype(">i8")),
    ]
    cols += [fits.Column(f"F{i}", "D", array=np.zeros(n, ">f8")) for i in range(5)]
    cols.append(fits.Column("PARAM_COV", "36E", array=np.zeros((n, 36), ">f4")))
    p = tmp_path_factory.mktemp("big") / "allStar-big.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns(cols)]).writeto(p)
    return p


def test_memmap_reads_two_columns_fast_and_bounded(big_allstar, tmp_path):
    size = os.path.getsize(big_allstar)
    assert size > 100 * 200_000  # the full table is far larger than two columns
    tracemalloc.start()
    t0 = time.perf_counter()
    df = read_allstar(big_allstar, columns=["SNR", "ASPCAPFLAG"])
    elapsed = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(df) == 200_000 and list(df.columns) == ["SNR", "ASPCAPFLAG"]
    assert elapsed < 5.0
    # 2 columns = 2.4 MB of data; the whole table is ~90 MB: nothing near that is allocated
    assert peak < 0.15 * size, (peak, size)
    # the result owns its memory (no views into the closed memory map)
    copy = tmp_path / "moved.fits"
    os.replace(big_allstar, copy)
    try:
        assert np.isfinite(df["SNR"].to_numpy()).all()
        assert float(df["SNR"].min()) >= 10.0
    finally:
        os.replace(copy, big_allstar)


def test_memmap_chunks_stream(big_allstar):
    total, n_chunks, first = 0, 0, None
    for chunk in read_allstar_chunks(big_allstar, ["APOGEE_ID", "TEFF"], chunk_rows=64_000):
        total += len(chunk)
        n_chunks += 1
        first = chunk if first is None else first
    assert total == 200_000 and n_chunks == 4
    assert first["APOGEE_ID"].iloc[0] == "2M0" and first["APOGEE_ID"].iloc[12] == "2M12"


def test_read_then_cut_then_classes(allstar):
    """Flags read from FITS (big-endian int64, bits ≥ 32) drive cuts; PARAMFLAG_LOGG drives RC."""
    from stellarnet.preparation.classes import RC, derive_classes
    from stellarnet.preparation.cuts import apply_cuts

    df = read_allstar(allstar, columns=["APOGEE_ID", "TEFF", "LOGG", "FE_H", "SNR", "STARFLAG",
                                        "EXTRATARG", "PARAMFLAG"])
    kept, rep = apply_cuts(
        df,
        {
            "sf40": {"flag": "STARFLAG", "bits": [40]},
            "dup": {"flag": "EXTRATARG", "bits": ["DUPLICATE"]},
            "uniq": {"unique": "APOGEE_ID", "by": "SNR"},
        },
    )
    assert [r.removed for r in rep.rows] == [1, 1, 0]  # row 2 (bit 40), row 3 (DUPLICATE)
    assert list(kept.index) == [0, 1, 4, 5]
    cls = derive_classes(df)
    assert cls.loc[1, "stage"] != RC  # SPEC_RC set but TEFF is NaN (−9999) → undefined
    assert cls.loc[1, "stage"] == -1 and cls.loc[0, "stage"] == RC  # 4800 K, 2.4 dex, solar


def test_alpha_fe_is_derived_from_dr17_alpha_m():
    """DR17 reports [α/M] (ALPHA_M); the label [α/Fe] = ALPHA_M + M_H − FE_H, error ALPHA_M_ERR.
    A file that has its own ALPHA_FE column (older releases) is read as it is."""
    import pandas as pd

    from stellarnet.io.allstar_columns import add_derived_columns, columns_to_read

    dr17 = ["APOGEE_ID", "FE_H", "FE_H_ERR", "M_H", "ALPHA_M", "ALPHA_M_ERR"]
    assert columns_to_read(["FE_H", "ALPHA_FE", "ALPHA_FE_ERR"], dr17) == ["FE_H", "ALPHA_M", "M_H", "ALPHA_M_ERR"]
    assert columns_to_read(["ALPHA_FE", "ALPHA_FE_ERR"], dr17 + ["ALPHA_FE", "ALPHA_FE_ERR"]) == ["ALPHA_FE", "ALPHA_FE_ERR"]
    assert columns_to_read(["NOPE"], dr17) == ["NOPE"]  # left for read_allstar to name as missing
    df = pd.DataFrame({"FE_H": [-0.5, 0.1, np.nan], "M_H": [-0.4, 0.1, 0.0], "ALPHA_M": [0.2, 0.0, 0.1],
                       "ALPHA_M_ERR": [0.02, 0.01, 0.03]})
    out = add_derived_columns(df.copy())
    np.testing.assert_allclose(out["ALPHA_FE"], [0.3, 0.0, np.nan])
    np.testing.assert_allclose(out["ALPHA_FE_ERR"], [0.02, 0.01, 0.03])
    own = add_derived_columns(df.assign(ALPHA_FE=[9.0, 9.0, 9.0]))
    assert (own["ALPHA_FE"] == 9.0).all()  # never overwritten
