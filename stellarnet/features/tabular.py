"""One tabular row per star of a shard dataset: IDs, engineered features, flags, labels, classes.

:func:`build_feature_table` reads a shard dataset (``stellarnet.dataset.shards`` layout; spectra
shard by shard, so memory stays bounded by one shard) and the allStar DataFrame it was built
from, and returns a DataFrame with, in this order:

* IDs: ``APOGEE_ID``, ``RA``, ``DEC`` (deg), ``FIELD``, ``row_index`` (allStar row), ``split``;
  ``SNR`` (per pixel, from the shards).
* Labels from the shards (physical units: K, dex): one column per ``manifest["label_names"]``
  (``TEFF``, ``LOGG``, ``FE_H``, ``ALPHA_FE``) plus ``<label>_ERR``; NaN = missing.
* Classes from the shards: one int64 column per class task (``spectral_type``,
  ``luminosity_class``, ``stage``), −1 = undefined.
* Features: colour–magnitude (:data:`stellarnet.preparation.photometry.PHOT_FEATURES`, ``A_K`` and the
  reduced proper motion ``H_K``; mag), abundance ratios (config ``abundances``; dex), spectral
  indices ``EW_*`` (Å) / ``DEPTH_*`` with ``*_ERR`` (:mod:`stellarnet.features.indices`).
* Flags: ``<feature>_IMPUTED`` (bool) for features with the ``median`` missing policy,
  ``<feature>_OUTLIER`` (bool) for every outlier-checked feature, ``N_OUTLIERS`` (int64).

The statistics used for imputation and outlier flags come from the ``fit_split`` (train) rows
only and are stored in ``df.attrs["feature_stats"]`` (kept by :func:`write_features`).
Rows are matched to the allStar DataFrame by ``row_index`` (its index is the FITS row number, as
:func:`stellarnet.io.catalogs.read_allstar` returns it) when the ``APOGEE_ID`` there agrees,
else by ``APOGEE_ID`` (the highest-``SNR`` row among duplicates); stars not found get NaN
catalogue features.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd

from stellarnet.common.files import atomic_path, to_jsonable, to_plain
from stellarnet.dataset.manifest import ShardError, load_manifest, verify_dataset
from stellarnet.features.cleaning import fit_robust_stats, flag_outliers, impute_missing, resolve_missing_policies
from stellarnet.features.derived import _num, abundance_ratios, colour_magnitude_features
from stellarnet.features.indices import IndexMeasurer, load_windows
from stellarnet.preparation.photometry import MIN_PARALLAX_SNR, PHOT_FEATURES
from stellarnet.preparation.splits import SPLITS

log = logging.getLogger(__name__)


ID_COLUMNS: tuple[str, ...] = ("APOGEE_ID", "RA", "DEC", "FIELD", "row_index", "split", "SNR")




def _default_config_path() -> Path:
    from stellarnet.common.paths import CONF_DIR

    return CONF_DIR / "features" / "default.yaml"


DEFAULT_CONFIG_PATH: Path = _default_config_path()


def load_features_config(path: str | Path | None = None) -> dict[str, Any]:
    """The features config (``conf/features/default.yaml`` unless ``path``) as a plain dict."""
    from omegaconf import OmegaConf

    p = Path(path) if path is not None else DEFAULT_CONFIG_PATH
    cfg = OmegaConf.to_container(OmegaConf.load(p), resolve=True)
    if not isinstance(cfg, dict):
        raise ValueError(f"{p} must hold a mapping")
    return cfg


def default_output_path(survey: str = "apogee", data_dir: str | Path | None = None) -> Path:
    """``<data_dir>/processed/<survey>_features.parquet``; ``data_dir`` defaults to
    ``$STELLARNET_DATA`` or ``./data`` (:func:`stellarnet.common.paths.default_data_root`)."""
    from stellarnet.common.paths import default_data_root

    root = Path(data_dir) if data_dir is not None else default_data_root()
    return root / "processed" / f"{survey}_features.parquet"


# --------------------------------------------------------------------------- allStar matching


def _match_allstar(allstar: pd.DataFrame, row_index: np.ndarray, apogee_id: np.ndarray) -> np.ndarray:
    """Positional index into ``allstar`` for each star (−1 = not found)."""
    n = len(row_index)
    pos = np.full(n, -1, dtype=np.int64)
    ids = allstar["APOGEE_ID"].astype(str).str.strip().to_numpy() if "APOGEE_ID" in allstar.columns else None
    if pd.api.types.is_integer_dtype(allstar.index.dtype) and allstar.index.is_unique:
        loc = allstar.index.get_indexer(row_index)
        hit = loc >= 0
        if ids is not None:
            hit &= np.array([ids[j] == a if j >= 0 else False for j, a in zip(loc, apogee_id)], dtype=bool)
        pos[hit] = loc[hit]
    todo = pos < 0
    if todo.any() and ids is not None:
        snr = _num(allstar, "SNR")
        order = np.lexsort((np.arange(len(allstar)), -np.nan_to_num(snr, nan=-np.inf)))
        first: dict[str, int] = {}
        for j in order:  # highest SNR first, then file order
            first.setdefault(ids[j], int(j))
        pos[todo] = [first.get(a, -1) for a in apogee_id[todo]]
    return pos


# --------------------------------------------------------------------------- shards


def _decode(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype.kind == "S":
        a = np.char.decode(a, "utf-8", errors="replace")
    return np.char.strip(a.astype(str))


def _read_split(
    dataset_dir: Path, manifest: Mapping[str, Any], split: str, measurer: IndexMeasurer | None
) -> dict[str, np.ndarray] | None:
    """Metadata fields and index measurements of one split, shard by shard."""
    shards = [s for s in manifest["shards"] if s["split"] == split]
    if not shards:
        return None
    meta_fields = ("labels", "label_err", "classes", "snr", "apogee_id", "row_index", "ra", "dec", "field")
    parts: dict[str, list[np.ndarray]] = {k: [] for k in meta_fields}
    idx_parts: list[dict[str, np.ndarray]] = []
    for sh in shards:
        p = dataset_dir / sh["file"]
        try:
            with h5py.File(p, "r") as f:
                for k in meta_fields:
                    if k not in f:
                        raise ShardError(f"shard {p} lacks dataset {k!r}")
                    parts[k].append(f[k][...])
                if measurer is not None:
                    idx_parts.append(measurer.measure(f["flux"][...], f["flux_err"][...], f["pix_mask"][...]))
        except OSError as exc:
            raise ShardError(f"shard {p} cannot be read: {exc}") from None
    out = {k: np.concatenate(v) for k, v in parts.items()}
    if measurer is not None:
        for c in measurer.columns:
            out["idx:" + c] = np.concatenate([d[c] for d in idx_parts])
    out["split"] = np.full(len(out["row_index"]), split, dtype=object)
    return out


def feature_columns(df: pd.DataFrame) -> list[str]:
    """The feature columns of a table from :func:`build_feature_table` (from its attrs)."""
    stats = df.attrs.get("feature_stats")
    if not stats:
        raise ValueError("not a feature table: attrs['feature_stats'] is missing")
    return list(stats["features"])


def build_feature_table(
    allstar_df: pd.DataFrame | None,
    dataset_dir: str | Path,
    cfg: Mapping[str, Any] | None = None,
    verify: bool = True,
) -> pd.DataFrame:
    """One row per star of the shard dataset in ``dataset_dir`` (schema: module docstring).

    ``allstar_df``: the allStar table the shards were built from (``read_allstar`` output; needs
    ``APOGEE_ID`` and the photometry / Gaia / ``X_FE`` columns to use; absent columns give NaN
    features). ``None`` skips the catalogue features. ``cfg``: the ``features`` config group
    (``conf/features/default.yaml`` if None). ``verify``: check shard SHA-256 sums first.
    """
    cfg = dict(to_plain(cfg) if cfg is not None else load_features_config())
    dataset_dir = Path(dataset_dir)
    manifest = load_manifest(dataset_dir)
    if verify:
        verify_dataset(dataset_dir, manifest, check_sha=True)

    icfg = dict(cfg.get("indices") or {})
    measurer = None
    if icfg.get("enabled", True) and icfg.get("windows"):
        lam = np.asarray(manifest.get("wavelength") or [], dtype=float)
        if lam.size == 0:
            from stellarnet.io import grids

            lam = grids.wavelength(manifest["grid"])
        measurer = IndexMeasurer(
            lam, load_windows(icfg),
            continuum=str(icfg.get("continuum", "linear")),
            continuum_error=bool(icfg.get("continuum_error", True)),
            max_masked_fraction=float(icfg.get("max_masked_fraction", 0.25)),
            max_masked_fraction_continuum=float(icfg.get("max_masked_fraction_continuum", 0.5)),
        )

    splits = list(cfg.get("splits") or SPLITS)
    blocks = [b for s in splits if (b := _read_split(dataset_dir, manifest, s, measurer)) is not None]
    if not blocks:
        raise ShardError(f"{dataset_dir} has no shards for splits {splits}")
    data = {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]}
    n = len(data["row_index"])

    table: dict[str, Any] = {
        "APOGEE_ID": _decode(data["apogee_id"]).astype(object),
        "RA": data["ra"].astype(np.float64),
        "DEC": data["dec"].astype(np.float64),
        "FIELD": _decode(data["field"]).astype(object),
        "row_index": data["row_index"].astype(np.int64),
        "split": data["split"].astype(object),
        "SNR": data["snr"].astype(np.float64),
    }
    label_names = list(manifest["label_names"])
    labels = np.asarray(data["labels"], dtype=np.float64).reshape(n, -1)
    label_err = np.asarray(data["label_err"], dtype=np.float64).reshape(n, -1)
    for j, name in enumerate(label_names):
        table[name] = labels[:, j]
        table[f"{name}_ERR"] = label_err[:, j]
    tasks = list((manifest.get("class_tasks") or {"spectral_type": 0, "luminosity_class": 0, "stage": 0}).keys())
    classes = np.asarray(data["classes"], dtype=np.int64).reshape(n, -1)
    for j, t in enumerate(tasks[: classes.shape[1]]):
        table[t] = classes[:, j]
    base = pd.DataFrame(table)

    # ---- features
    feats: list[pd.DataFrame] = []
    pcfg = dict(cfg.get("photometry") or {})
    if allstar_df is not None:
        if "APOGEE_ID" not in allstar_df.columns:
            raise ValueError("allstar_df needs an APOGEE_ID column to match the shard rows")
        pos = _match_allstar(allstar_df, base["row_index"].to_numpy(), base["APOGEE_ID"].to_numpy())
        found = pos >= 0
        if not found.all():
            log.warning("%d of %d shard stars not found in allstar_df: catalogue features are NaN",
                        int((~found).sum()), n)
        if found.any():
            aligned = allstar_df.iloc[np.where(found, pos, 0)].reset_index(drop=True)
        else:
            aligned = pd.DataFrame(index=pd.RangeIndex(n))
        cm = colour_magnitude_features(
            aligned, min_parallax_snr=float(pcfg.get("min_parallax_snr", MIN_PARALLAX_SNR)),
            reduced_pm=bool(pcfg.get("reduced_proper_motion", True)),
            rpm_only_without_parallax=bool(pcfg.get("rpm_only_without_parallax", True)),
        )
        ab = abundance_ratios(aligned, cfg.get("abundances") or {})
        for part in (cm, ab):
            part.loc[~found, :] = np.nan
            feats.append(part.reset_index(drop=True))
    if measurer is not None:
        feats.append(pd.DataFrame({c: data["idx:" + c] for c in measurer.columns}))
    fdf = pd.concat(feats, axis=1) if feats else pd.DataFrame(index=range(n))
    clash = sorted(set(fdf.columns) & set(base.columns))
    if clash:
        raise ValueError(f"feature names {clash} collide with ID/label/class columns; rename them in the config")
    if fdf.columns.duplicated().any():
        raise ValueError(f"duplicate feature columns: {sorted(fdf.columns[fdf.columns.duplicated()])}")
    value_cols = [c for c in fdf.columns if not c.endswith("_ERR")]

    # ---- statistics on the fit split, outliers (before imputation), missing values
    fit_split = cfg.get("fit_split", "train")
    fit_rows = (base["split"] == fit_split).to_numpy() if fit_split else np.ones(n, bool)
    if not fit_rows.any():
        log.warning("no %r rows: imputation/outlier statistics use all %d rows", fit_split, n)
        fit_rows = np.ones(n, bool)
    stats = fit_robust_stats(fdf.loc[fit_rows], value_cols)
    ocfg = dict(cfg.get("outliers") or {})
    out_cols = list(ocfg.get("columns") or value_cols)
    unknown = sorted(set(out_cols) - set(value_cols))
    if unknown:
        raise ValueError(f"outliers.columns lists unknown feature columns {unknown}")
    outliers = flag_outliers(fdf, {c: stats[c] for c in out_cols}, float(ocfg.get("robust_z", 6.0)))
    catalogue = [*PHOT_FEATURES, "A_K", "H_K", *map(str, dict(cfg.get("abundances") or {}))]
    policies = resolve_missing_policies(list(fdf.columns), cfg.get("missing"), known=catalogue)
    fdf, imputed = impute_missing(fdf, policies, stats)

    n_out = outliers.sum(axis=1).astype(np.int64).rename("N_OUTLIERS")
    df = pd.concat([base, fdf, imputed, outliers, n_out], axis=1)
    df.attrs["feature_stats"] = {
        "features": list(fdf.columns),
        "fit_split": fit_split,
        "n_fit": int(fit_rows.sum()),
        "robust": stats,
        "missing_policy": policies,
        "outlier_robust_z": float(ocfg.get("robust_z", 6.0)),
        "index_windows": [] if measurer is None else [
            {"column": w.column, "species": w.species, "kind": w.kind, "band": list(w.band),
             "blue": None if w.blue is None else list(w.blue), "red": None if w.red is None else list(w.red)}
            for w in measurer.windows],
        "index_continuum": None if measurer is None else measurer.continuum,
        "dataset_dir": str(dataset_dir),
        "build_hash": manifest.get("build_hash"),
        "grid": manifest.get("grid"),
        "survey": cfg.get("survey", "apogee"),
    }
    df.attrs["feature_stats"] = to_jsonable(df.attrs["feature_stats"])  # parquet metadata is JSON
    return df


# --------------------------------------------------------------------------- I/O


def write_features(df: pd.DataFrame, path: str | Path) -> Path:
    """Write ``df`` to parquet at ``path`` atomically (temp file in the same directory, then
    ``os.replace``); parent directories are created. Returns the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, engine="pyarrow")
    return path


def read_features(path: str | Path) -> pd.DataFrame:
    """Read a feature table written by :func:`write_features`."""
    return pd.read_parquet(Path(path), engine="pyarrow")
