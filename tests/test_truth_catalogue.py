"""scripts/truth_catalogue.py: the allStar copy carries the true labels, everything else unchanged."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
from astropy.io import fits

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("truth_catalogue", ROOT / "scripts" / "truth_catalogue.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_truth_catalogue_replaces_only_finite_labels(tiny_survey, tmp_path):
    mod = _script()
    assert mod.main(["--survey", str(tiny_survey["root"]), "--out", str(tmp_path)]) == 0
    orig = fits.getdata(tiny_survey["root"] / mod.ALLSTAR, 1)
    new = fits.getdata(tmp_path / mod.ALLSTAR, 1)
    truth = fits.getdata(tiny_survey["root"] / "truth" / "truth.fits", 1)
    row = {str(s).strip(): i for i, s in enumerate(truth["APOGEE_ID"])}
    idx = np.array([row[str(s).strip()] for s in orig["APOGEE_ID"]])
    assert len(new) == len(orig) and orig.columns.names == new.columns.names
    for col in mod.LABELS:
        fin = np.isfinite(orig[col])
        assert np.array_equal(np.isfinite(new[col]), fin)  # flagged / NaN rows stay NaN
        np.testing.assert_array_equal(new[col][fin], truth[col][idx][fin].astype(new[col].dtype))
        assert np.any(orig[col][fin] != new[col][fin])  # the catalogue really had noise
    for col in ("TEFF_ERR", "SNR"):
        assert np.array_equal(orig[col], new[col], equal_nan=True)
    assert np.array_equal(orig["ASPCAPFLAG"], new["ASPCAPFLAG"])
    assert list(orig["APOGEE_ID"]) == list(new["APOGEE_ID"])
    assert not list(tmp_path.glob("*.tmp"))
