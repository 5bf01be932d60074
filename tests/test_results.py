"""Streamed prediction catalogues: CSV and FITS written chunk by chunk equal the whole table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from astropy.table import Table

from stellarnet.results import PredictionWriter


def _chunk(start: int, n: int) -> pd.DataFrame:
    rng = np.random.default_rng(start)
    return pd.DataFrame({
        "APOGEE_ID": [f"2M{start + i:08d}+0000000" for i in range(n)],
        "TEFF": rng.normal(4800, 300, n).astype(np.float32),
        "TEFF_SIGMA": rng.uniform(10, 50, n).astype(np.float32),
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
