"""Streamed prediction catalogues: CSV and FITS written chunk by chunk equal the whole table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from astropy.table import Table

from stellarnet.io.predictions import PredictionWriter


def _chunk(start: int, n: int) -> pd.DataFrame:
    rng = np.random.default_rng(start)
    return pd.DataFrame({
        "APOGEE_ID": [f"2M{start + i:08d}+0000000" for i in range(n)],
        "TEFF": rng.normal(4800, 300, n).astype(np.float32),
        "TEFF_ERR": rng.uniform(10, 50, n).astype(np.float32),
        "RA": rng.uniform(0, 360, n),
        "STAGE": rng.choice(["MS", "SG", "RGB", "RC"], n),
        "READ_ERROR": [""] * (n - 1) + ["SpectrumFormatError: " + "x" * 200],
    })


def test_streamed_fits_and_csv_equal_the_table(tmp_path):
    chunks = [_chunk(0, 5), _chunk(5, 7), _chunk(12, 3)]
    whole = pd.concat(chunks, ignore_index=True)
    writer = PredictionWriter(tmp_path, len(whole))
    for c in chunks:
        writer.write(c)
    paths = writer.close()
    fits_t = Table.read(paths["fits"]).to_pandas()
    csv_t = pd.read_csv(paths["csv"], keep_default_na=False)
    for t in (fits_t, csv_t):
        assert len(t) == len(whole)
        np.testing.assert_allclose(t["TEFF"].to_numpy(np.float64), whole["TEFF"].to_numpy(np.float64), rtol=1e-6)
        np.testing.assert_allclose(t["RA"].to_numpy(), whole["RA"].to_numpy(), rtol=1e-12)
    ids = fits_t["APOGEE_ID"].map(lambda v: v.decode() if isinstance(v, bytes) else v).str.strip()
    assert ids.tolist() == whole["APOGEE_ID"].tolist()
    assert fits_t["TEFF"].dtype == np.float32
    assert len(str(fits_t["READ_ERROR"].iloc[4]).strip()) > 0  # long messages are cut, not lost entirely
    assert not list(tmp_path.glob("*.tmp"))


def test_wrong_row_count_is_an_error_and_leaves_nothing(tmp_path):
    writer = PredictionWriter(tmp_path, 10)
    writer.write(_chunk(0, 4))
    with pytest.raises(ValueError, match="wrote 4 rows, expected 10"):
        writer.close()
    assert not list(tmp_path.iterdir())
    writer = PredictionWriter(tmp_path, 3)
    with pytest.raises(ValueError, match="more rows"):
        writer.write(_chunk(0, 4))
    writer.abort()
    assert not list(tmp_path.iterdir())


def test_catalogue_has_units_on_every_numeric_column_and_provenance(tmp_path):
    """What an astronomer opens: TUNITn on every label and error column (K / dex / deg), an empty
    unit only on dimensionless ones, the provenance keywords, and the same in the CSV's sidecar."""
    import json

    from astropy.io import fits

    df = pd.DataFrame({
        "APOGEE_ID": ["2M00000001+0000001", "2M00000002+0000002"], "RA": [10.0, 11.0], "DEC": [-5.0, 5.0],
        "TEFF": np.float32([4800, 5000]), "TEFF_ERR": np.float32([20, 30]),
        "TEFF_ERR_ALEATORIC": np.float32([15, 25]), "TEFF_ERR_EPISTEMIC": np.float32([5, 5]),
        "LOGG": np.float32([2.5, 4.4]), "LOGG_ERR": np.float32([0.05, 0.04]),
        "LOGG_NET": np.float32([2.4, 4.5]), "LOGG_NET_ERR": np.float32([0.1, 0.1]),
        "REFINE_CHI2": np.float32([1.0, 1.2]), "STELLARNET_FLAG": np.int32([0, 4]),
        "P_STAGE_RC": np.float32([0.9, 0.0]), "STAGE": ["RC", "MS"], "READ_ERROR": ["", ""],
    })
    prov = {"stellarnet_version": "9.9", "model": "/m/" + "x" * 100, "model_sha256": "ab" * 32,
            "training_data": "a survey catalogue: allStar-dr17-synspec_rev1.fits", "refined": True,
            "input": "allStar.fits", "date": "2026-12-06T12:00:00"}
    writer = PredictionWriter(tmp_path, 2, label_names=["TEFF", "LOGG"], label_units=["K", "dex"], provenance=prov)
    writer.write(df)
    paths = writer.close()
    with fits.open(paths["fits"]) as hdul:
        t = Table.read(hdul[1])
        hdr = hdul[1].header
    units = {c: (str(t[c].unit) if t[c].unit is not None else "") for c in t.colnames}
    assert units["TEFF"] == units["TEFF_ERR"] == units["TEFF_ERR_ALEATORIC"] == units["TEFF_ERR_EPISTEMIC"] == "K"
    assert units["LOGG"] == units["LOGG_ERR"] == units["LOGG_NET"] == units["LOGG_NET_ERR"] == "dex"
    assert units["RA"] == units["DEC"] == "deg"
    assert units["REFINE_CHI2"] == units["STELLARNET_FLAG"] == units["P_STAGE_RC"] == ""
    assert hdr["SNVERS"] == "9.9" and hdr["SNMHASH"] == "ab" * 32 and hdr["SNMODEL"] == prov["model"]  # long: CONTINUE
    assert hdr["SNTRAIN"].startswith("a survey catalogue") and hdr["DATE"] == prov["date"] and hdr["SNREFINE"] == "True"
    side = json.loads(paths["columns"].read_text())
    assert side["columns"]["TEFF_ERR"] == {"unit": "K", "description": "TEFF: total 1-sigma error (use this)"}
    assert side["provenance"] == prov
