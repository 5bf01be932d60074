"""Shared fixtures: a tiny simulated survey and its shards (built once per test session)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REFERENCE = Path(__file__).resolve().parents[1] / "data" / "reference"
TINY_STARS = 400


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    return REFERENCE


@pytest.fixture(scope="session")
def tiny_survey(tmp_path_factory) -> dict:
    """A 400-star simulated survey in the real file layout (tests only; the pipeline never knows)."""
    from stellarnet.simulate.survey import simulate_survey

    root = tmp_path_factory.mktemp("sim_survey")
    paths = simulate_survey(root, n_stars=TINY_STARS, seed=7, stars_per_field=20, progress=False)
    return {"root": root, **{k: Path(v) for k, v in paths.items() if isinstance(v, (str, os.PathLike))}}


@pytest.fixture(scope="session")
def loose_cuts() -> dict:
    """Cuts loose enough that a tiny survey keeps most stars."""
    return {
        "star_bad": {"flag": "ASPCAPFLAG", "bits": ["STAR_BAD"], "reason": "ASPCAP STAR_BAD"},
        "duplicates": {"flag": "EXTRATARG", "bits": ["DUPLICATE"], "reason": "lower-S/N duplicate"},
        "snr": {"column": "SNR", "min": 20, "reason": "S/N per pixel"},
        "finite": {"finite": ["TEFF", "LOGG", "FE_H"], "reason": "finite core labels"},
    }


@pytest.fixture(scope="session")
def tiny_shards(tiny_survey, loose_cuts, tmp_path_factory) -> Path:
    from stellarnet.dataset.shards import build_shards

    out = tmp_path_factory.mktemp("shards")
    build_shards(tiny_survey["allstar"], out, loose_cuts, spectra_root=tiny_survey["root"], grid="dr12",
                 rows_per_shard=64, n_workers=1, progress=False,
                 split={"by": "FIELD", "fractions": {"train": 0.6, "val": 0.2, "test": 0.2}, "seed": 1})
    return out


def copy_survey_slice(survey_root: Path, allstar: Path, root: Path, n_rows: int) -> tuple[Path, list, list[Path]]:
    """Copy the first ``n_rows`` allStar rows of a simulated survey and their aspcapStar files to
    ``root`` (real directory layout). Returns ``(allstar_path, apogee_ids, spectrum_paths)``."""
    import shutil

    from astropy.io import fits
    from astropy.table import Table

    from stellarnet.io.catalogs import read_allstar
    from stellarnet.io.layout import spectrum_path

    table = Table.read(allstar, hdu=1)[:n_rows]
    out = root / "allStar-dr17-synspec_rev1.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.table_to_hdu(table)]).writeto(out)
    df = read_allstar(out, columns=["APOGEE_ID", "TELESCOPE", "FIELD"])
    files = []
    for _, row in df.iterrows():
        src = spectrum_path(survey_root, "aspcapStar", row["TELESCOPE"], row["FIELD"], row["APOGEE_ID"])
        dst = spectrum_path(root, "aspcapStar", row["TELESCOPE"], row["FIELD"], row["APOGEE_ID"])
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dst)
        files.append(dst)
    return out, df["APOGEE_ID"].tolist(), files


def tiny_model_folder(directory: Path, photometry: bool = True, dropout: float = 0.1) -> Path:
    """An untrained tiny network on the dr12 grid (TEFF, LOGG; the stage task) saved as a model
    folder: for tests of reading, writing and flags, where the weights do not matter."""
    import torch

    from stellarnet.preparation.photometry import PHOT_FEATURES
    from stellarnet.network import StellarNetModule, save_model_folder

    net = {
        "spectral_encoder": {"_target_": "stellarnet.network.encoders.SpectralConvEncoder", "channels": [4],
                             "kernel_sizes": [5], "strides": [4], "pool_size": 4, "dropout": dropout, "out_dim": 8},
        "photometry": ({"_target_": "stellarnet.network.encoders.PhotometryMLP", "hidden": [8], "out_dim": 4}
                       if photometry else None),
        "trunk": {"_target_": "stellarnet.network.heads.TrunkMLP", "hidden": [8], "dropout": dropout},
    }
    phot = list(PHOT_FEATURES) if photometry else []
    spec = {"grid": "dr12", "n_pixels": 7214, "label_names": ["TEFF", "LOGG"], "label_units": ["K", "dex"],
            "label_mean": [4800.0, 2.5], "label_std": [600.0, 1.0], "phot_features": phot,
            "class_tasks": {"stage": ["MS", "SG", "RGB", "RC"]}}
    if photometry:
        spec.update(phot_mean=[0.0] * len(phot), phot_std=[1.0] * len(phot))
    torch.manual_seed(0)
    module = StellarNetModule(net=net, data_spec=spec, log_figures=False)
    return save_model_folder(module, directory)
