"""Classical baselines: PCA of the normalized spectrum (+ photometry) → gradient-boosted trees /
random forests, one model per label (regression) and per class task (classification).

Everything operates on in-memory numpy arrays (or array-likes that support row slicing, such as
h5py datasets, for the chunked PCA); nothing here reads files (models never read files).

Split dicts (``train`` / ``val`` / ``test`` for :func:`run_baselines`) hold

=============== ============ ==================================================================
key             shape        meaning
=============== ============ ==================================================================
``flux``        (N, P)       continuum-normalized flux, bad pixels already set to 1
``photometry``  (N, F)       photometric features in physical units, NaN = missing (optional)
``labels``      (N, L)       labels in physical units (Teff K, logg/[Fe/H]/[α/Fe] dex), NaN
``classes``     (N, C)       integer class codes, −1 = undefined
``snr``         (N,)         per-pixel S/N (for per-S/N metrics)
``pix_mask``    (N, P)       optional, 1/True = good pixel
``label_names`` (L,)         e.g. ``("TEFF", "LOGG", "FE_H", "ALPHA_FE")``
``class_tasks`` (C,)         e.g. ``("spectral_type", "luminosity_class", "stage")``
``class_names`` mapping      optional, task → class names
``tabular``     (N, T)       optional engineered features (NaN = missing), for the ``tabular`` /
                             ``both`` feature sets (:data:`FEATURE_SETS`)
``tabular_names`` (T,)       optional, names of the ``tabular`` columns
=============== ============ ==================================================================

Feature sets (``features`` key of the config, :data:`FEATURE_SETS`): ``spectra_pca`` = PCA
coefficients of the spectrum (+ photometry when ``use_photometry``); ``tabular`` = the split's
``tabular`` matrix only (e.g. from :func:`stellarnet.features.tabular.build_feature_table`, which
already holds the photometric features); ``both`` = PCA coefficients + ``tabular``.

xgboost and lightgbm are imported lazily; a method whose library is missing is skipped with a
logged warning and a ``{"skipped": True, "reason": ...}`` entry in the results.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

METHODS: tuple[str, ...] = ("xgboost", "lightgbm", "random_forest", "hist_gb")
"""Tree methods known to :func:`make_estimator` (``"cannon"`` is handled separately)."""

FEATURE_SETS: tuple[str, ...] = ("spectra_pca", "tabular", "both")
"""Baseline inputs: spectral PCA (+ photometry), the engineered feature table, or both."""

DEFAULT_PARAMS: dict[str, dict[str, Any]] = {
    "xgboost": {"n_estimators": 1000, "learning_rate": 0.05, "max_depth": 6, "subsample": 0.8,
                "colsample_bytree": 0.8, "min_child_weight": 5.0, "reg_lambda": 1.0, "max_bin": 256,
                "early_stopping_rounds": 50},
    "lightgbm": {"n_estimators": 1000, "learning_rate": 0.05, "num_leaves": 63, "min_child_samples": 20,
                 "subsample": 0.8, "subsample_freq": 1, "colsample_bytree": 0.8, "reg_lambda": 1.0,
                 "early_stopping_rounds": 50},
    "random_forest": {"n_estimators": 300, "max_depth": None, "min_samples_leaf": 2, "max_features": 0.33},
    "hist_gb": {"max_iter": 1000, "learning_rate": 0.05, "max_leaf_nodes": 63, "min_samples_leaf": 20,
                "l2_regularization": 1.0, "early_stopping_rounds": 50},
}


def n_cpus() -> int:
    """Number of CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def _resolve_jobs(n_jobs: int | None) -> int:
    return n_cpus() if n_jobs is None or n_jobs < 1 else int(n_jobs)


# --------------------------------------------------------------------------------------------
# features
# --------------------------------------------------------------------------------------------
class SpectralPCAFeatures:
    """PCA projection of normalized spectra, state kept as plain arrays (``.npz``, no pickle).

    Parameters
    ----------
    n_components
        Number of principal components (capped at min(n_samples, n_pixels) at fit time).
    incremental
        Use :class:`sklearn.decomposition.IncrementalPCA` over row chunks of ``batch_size``
        (memory-bounded; works on h5py datasets) instead of a randomized-SVD :class:`PCA`.
    whiten
        Divide the components by sqrt(explained variance).
    fit_max_samples
        Fit on at most this many randomly chosen training rows (``None`` = all).

    Bad pixels (``pix_mask`` False / 0) are replaced by the training mean flux of that pixel, so
    they contribute nothing after centring. The data layer already sets bad pixels to flux 1, so
    the mask is optional.
    """

    def __init__(self, n_components: int = 50, *, incremental: bool = False, batch_size: int = 4096,
                 whiten: bool = False, fit_max_samples: int | None = 50000, random_state: int = 0) -> None:
        self.n_components = int(n_components)
        self.incremental = bool(incremental)
        self.batch_size = int(batch_size)
        self.whiten = bool(whiten)
        self.fit_max_samples = fit_max_samples
        self.random_state = int(random_state)
        self.mean_: np.ndarray | None = None
        self.components_: np.ndarray | None = None
        self.explained_variance_: np.ndarray | None = None
        self.explained_variance_ratio_: np.ndarray | None = None

    # -- helpers
    def _chunk(self, flux: Any, pix_mask: Any, sl: slice | np.ndarray, fill: np.ndarray | None) -> np.ndarray:
        x = np.asarray(flux[sl], dtype=np.float32)
        bad = ~np.isfinite(x)
        if pix_mask is not None:
            bad |= ~np.asarray(pix_mask[sl]).astype(bool)
        if bad.any():
            x = x.copy()
            x[bad] = np.broadcast_to(fill if fill is not None else np.float32(1.0), x.shape)[bad]
        return x

    @property
    def is_fitted(self) -> bool:
        return self.components_ is not None

    def fit(self, flux: Any, pix_mask: Any = None) -> SpectralPCAFeatures:
        """Fit on training spectra ``flux`` (N, P) (normalized; optional ``pix_mask`` 1 = good)."""
        from sklearn.decomposition import PCA, IncrementalPCA

        n, p = flux.shape
        rows = np.arange(n)
        if self.fit_max_samples is not None and n > self.fit_max_samples:
            rng = np.random.default_rng(self.random_state)
            rows = np.sort(rng.choice(n, size=int(self.fit_max_samples), replace=False))
        k = max(1, min(self.n_components, len(rows), p))
        bs = max(self.batch_size, k)
        # per-pixel mean over good pixels (first pass), used to fill bad pixels
        s = np.zeros(p)
        c = np.zeros(p)
        for i in range(0, len(rows), bs):
            idx = rows[i:i + bs]
            x = np.asarray(flux[idx], dtype=np.float64)
            good = np.isfinite(x)
            if pix_mask is not None:
                good &= np.asarray(pix_mask[idx]).astype(bool)
            s += np.where(good, x, 0.0).sum(axis=0)
            c += good.sum(axis=0)
        fill = np.where(c > 0, s / np.maximum(c, 1), 1.0).astype(np.float32)
        if self.incremental:
            model = IncrementalPCA(n_components=k, whiten=False, batch_size=bs)
            for i in range(0, len(rows), bs):
                idx = rows[i:i + bs]
                if len(idx) < k:  # IncrementalPCA needs >= k rows per batch; fold the tail in
                    continue
                model.partial_fit(self._chunk(flux, pix_mask, idx, fill))
        else:
            x = self._chunk(flux, pix_mask, rows, fill)
            solver = "full" if min(x.shape) <= 500 or k > 0.5 * min(x.shape) else "randomized"
            model = PCA(n_components=k, svd_solver=solver, random_state=self.random_state).fit(x)
        self.mean_ = np.asarray(model.mean_, dtype=np.float64)
        self.components_ = np.asarray(model.components_, dtype=np.float32)
        self.explained_variance_ = np.asarray(model.explained_variance_, dtype=np.float64)
        self.explained_variance_ratio_ = np.asarray(model.explained_variance_ratio_, dtype=np.float64)
        return self

    def transform(self, flux: Any, pix_mask: Any = None) -> np.ndarray:
        """(N, P) spectra → (N, n_components) float32 PCA coefficients (chunked)."""
        if not self.is_fitted:
            raise RuntimeError("SpectralPCAFeatures is not fitted")
        assert self.mean_ is not None and self.components_ is not None and self.explained_variance_ is not None
        n, p = flux.shape
        if p != self.mean_.size:
            raise ValueError(f"spectra have {p} pixels, PCA was fitted on {self.mean_.size}")
        mean = self.mean_.astype(np.float32)
        fill = mean if pix_mask is not None else None
        out = np.empty((n, self.components_.shape[0]), dtype=np.float32)
        for i in range(0, n, self.batch_size):
            sl = slice(i, min(n, i + self.batch_size))
            x = self._chunk(flux, pix_mask, sl, fill)
            out[sl] = (x - mean) @ self.components_.T
        if self.whiten:
            out /= np.sqrt(np.maximum(self.explained_variance_, 1e-30)).astype(np.float32)
        return out

    def fit_transform(self, flux: Any, pix_mask: Any = None) -> np.ndarray:
        """:meth:`fit` then :meth:`transform` on the same spectra."""
        return self.fit(flux, pix_mask).transform(flux, pix_mask)

    # -- state
    def state_dict(self) -> dict[str, np.ndarray]:
        """All state as numpy arrays (config scalars as 0-d arrays)."""
        if not self.is_fitted:
            raise RuntimeError("SpectralPCAFeatures is not fitted")
        return {
            "mean": np.asarray(self.mean_), "components": np.asarray(self.components_),
            "explained_variance": np.asarray(self.explained_variance_),
            "explained_variance_ratio": np.asarray(self.explained_variance_ratio_),
            "n_components": np.asarray(self.n_components), "whiten": np.asarray(self.whiten),
            "incremental": np.asarray(self.incremental), "batch_size": np.asarray(self.batch_size),
            "random_state": np.asarray(self.random_state),
        }

    @classmethod
    def from_state(cls, state: Mapping[str, np.ndarray]) -> SpectralPCAFeatures:
        """Rebuild from :meth:`state_dict` output."""
        obj = cls(int(state["n_components"]), incremental=bool(state["incremental"]),
                  batch_size=int(state["batch_size"]), whiten=bool(state["whiten"]),
                  random_state=int(state["random_state"]))
        obj.mean_ = np.asarray(state["mean"], dtype=np.float64)
        obj.components_ = np.asarray(state["components"], dtype=np.float32)
        obj.explained_variance_ = np.asarray(state["explained_variance"], dtype=np.float64)
        obj.explained_variance_ratio_ = np.asarray(state["explained_variance_ratio"], dtype=np.float64)
        return obj

    def save(self, path: str | os.PathLike) -> Path:
        """Write the state to an ``.npz`` file (atomic; no pickle)."""
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_suffix(".npz")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp.npz")
        np.savez(tmp, **self.state_dict())
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> SpectralPCAFeatures:
        """Read a state written by :meth:`save` (``allow_pickle=False``)."""
        with np.load(path, allow_pickle=False) as z:
            return cls.from_state({k: z[k] for k in z.files})


def fit_medians(x: np.ndarray) -> np.ndarray:
    """Column medians of ``x`` ignoring NaN (0 for all-NaN columns), for imputation."""
    x = np.asarray(x, dtype=float)
    if x.size == 0:
        return np.zeros(x.shape[1] if x.ndim == 2 else 0)
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            med = np.nanmedian(x, axis=0)
    return np.where(np.isfinite(med), med, 0.0)


def impute(x: np.ndarray, medians: np.ndarray) -> np.ndarray:
    """Replace non-finite entries of column j by ``medians[j]``."""
    x = np.array(x, dtype=np.float32, copy=True)
    bad = ~np.isfinite(x)
    if bad.any():
        x[bad] = np.broadcast_to(np.asarray(medians, dtype=np.float32), x.shape)[bad]
    return x


def assemble_features(pca_feats: np.ndarray | None, photometry: np.ndarray | None,
                      tabular: np.ndarray | None = None) -> np.ndarray:
    """Concatenate PCA coefficients (N, k), photometric features (N, F) and tabular features
    (N, T), any of which may be None (NaN kept)."""
    parts = [np.asarray(a, dtype=np.float32) for a in (pca_feats, photometry, tabular)
             if a is not None and np.asarray(a).size > 0]
    if not parts:
        raise ValueError("no features: give PCA coefficients, photometry or tabular features")
    n = len(parts[0])
    return np.concatenate([a.reshape(n, -1) for a in parts], axis=1)


def tabular_features(table: Any, apogee_id: Sequence[str], split: str | None = None, *,
                     include: Sequence[str] | None = None,
                     exclude: Sequence[str] = ()) -> tuple[np.ndarray, list[str]]:
    """(N, T) float32 matrix and column names from a feature table (a DataFrame from
    :func:`stellarnet.features.tabular.build_feature_table`), rows aligned to ``apogee_id``
    (within ``split`` when the table has a ``split`` column). Columns: the table's feature columns
    (``attrs["feature_stats"]["features"]``, else every numeric non-ID column) matching an
    ``include`` pattern (fnmatch; None = all) and no ``exclude`` pattern; booleans become 0/1.
    Stars missing from the table get NaN rows (a warning is logged).
    """
    import fnmatch

    import pandas as pd

    df = table
    if split is not None and "split" in df.columns:
        df = df[df["split"].astype(str) == split]
    stats = (df.attrs or {}).get("feature_stats") or {}
    cols = list(stats.get("features") or [])
    if not cols:
        skip = {"APOGEE_ID", "RA", "DEC", "FIELD", "row_index", "split", "SNR"}
        cols = [c for c in df.columns if c not in skip and pd.api.types.is_numeric_dtype(df[c])]
    cols = [c for c in cols if (include is None or any(fnmatch.fnmatchcase(c, p) for p in include))
            and not any(fnmatch.fnmatchcase(c, p) for p in exclude)]
    if not cols:
        raise ValueError("no tabular feature columns left after include/exclude")
    ids = df["APOGEE_ID"].astype(str).str.strip().to_numpy()
    pos = pd.Index(ids).get_indexer(pd.Index([str(a).strip() for a in apogee_id]))
    if pd.Index(ids).has_duplicates:
        first = pd.Series(np.arange(len(ids)), index=ids).groupby(level=0).first()
        pos = first.reindex([str(a).strip() for a in apogee_id]).fillna(-1).to_numpy(dtype=np.int64)
    vals = df[cols].astype(float).to_numpy(dtype=np.float32)
    out = np.full((len(pos), len(cols)), np.nan, dtype=np.float32)
    hit = pos >= 0
    out[hit] = vals[pos[hit]]
    if not hit.all():
        log.warning("%d of %d stars have no row in the feature table%s: NaN features", int((~hit).sum()), len(pos),
                    f" (split {split})" if split else "")
    return out, cols


# --------------------------------------------------------------------------------------------
# estimators
# --------------------------------------------------------------------------------------------
class _ConstantClassifier:
    """Predicts the single class seen in training (for degenerate training sets)."""

    def __init__(self, n_classes: int = 1) -> None:
        self.n_classes = n_classes

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return np.ones((len(x), 1))


def make_estimator(method: str, kind: str, params: Mapping[str, Any] | None = None, *,
                   n_jobs: int | None = -1, seed: int = 0, early_stopping: bool = True) -> tuple[Any, int | None]:
    """Build an unfitted scikit-learn-API estimator.

    ``kind`` is ``"regression"`` or ``"classification"``. ``params`` override
    :data:`DEFAULT_PARAMS`; ``early_stopping_rounds`` is taken out and returned as the second
    value (``None`` for random forests or when ``early_stopping`` is False).
    Raises ImportError when xgboost / lightgbm is not installed.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {METHODS}")
    if kind not in ("regression", "classification"):
        raise ValueError(f"kind must be 'regression' or 'classification', got {kind!r}")
    p = {**DEFAULT_PARAMS[method], **dict(params or {})}
    rounds = p.pop("early_stopping_rounds", None)
    rounds = int(rounds) if (rounds and early_stopping and method != "random_forest") else None
    jobs = _resolve_jobs(n_jobs)
    reg = kind == "regression"
    if method == "xgboost":
        import xgboost as xgb

        cls = xgb.XGBRegressor if reg else xgb.XGBClassifier
        p.setdefault("tree_method", "hist")
        return cls(n_jobs=jobs, random_state=seed, early_stopping_rounds=rounds, **p), rounds
    if method == "lightgbm":
        import lightgbm as lgb

        cls = lgb.LGBMRegressor if reg else lgb.LGBMClassifier
        p.setdefault("verbose", -1)
        return cls(n_jobs=jobs, random_state=seed, **p), rounds
    if method == "random_forest":
        from sklearn.ensemble import RandomForestClassifier, RandomForestRegressor

        cls = RandomForestRegressor if reg else RandomForestClassifier
        return cls(n_jobs=jobs, random_state=seed, **p), None
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor

    cls = HistGradientBoostingRegressor if reg else HistGradientBoostingClassifier
    if rounds:
        p.update(early_stopping=True, n_iter_no_change=rounds)
    else:
        p.update(early_stopping=False)
    return cls(random_state=seed, **p), rounds


def _fit(method: str, est: Any, rounds: int | None, x: np.ndarray, y: np.ndarray,
         xv: np.ndarray | None, yv: np.ndarray | None) -> Any:
    use_val = rounds is not None and xv is not None and len(xv) > 0
    if method == "xgboost":
        if not use_val:
            est.set_params(early_stopping_rounds=None)
            return est.fit(x, y, verbose=False)
        return est.fit(x, y, eval_set=[(xv, yv)], verbose=False)
    if method == "lightgbm":
        if not use_val:
            return est.fit(x, y)
        import lightgbm as lgb

        import inspect

        cbs = [lgb.early_stopping(rounds, verbose=False), lgb.log_evaluation(0)]
        if "eval_X" in inspect.signature(est.fit).parameters:  # lightgbm >= 4.7 (eval_set deprecated)
            return est.fit(x, y, eval_X=(xv,), eval_y=(yv,), callbacks=cbs)
        return est.fit(x, y, eval_set=[(xv, yv)], callbacks=cbs)
    if method == "hist_gb":
        if use_val:
            try:
                return est.fit(x, y, X_val=xv, y_val=yv)
            except TypeError:  # scikit-learn < 1.7: internal validation split instead
                return est.fit(x, y)
        if rounds is not None:  # no validation split given: internal 10 % split
            est.set_params(validation_fraction=0.1)
        return est.fit(x, y)
    return est.fit(x, y)


def _n_iterations(method: str, est: Any) -> int | None:
    """Number of boosting rounds kept (best iteration with early stopping) or trees."""
    if method == "xgboost":
        try:
            return int(est.best_iteration) + 1
        except AttributeError:  # no early stopping
            return int(est.get_booster().num_boosted_rounds())
    if method == "lightgbm":
        best = int(getattr(est, "best_iteration_", 0) or 0)
        return best if best > 0 else int(est.n_estimators_)
    if method == "hist_gb":
        return int(est.n_iter_)
    if method == "random_forest":
        return len(est.estimators_)
    return None


class TreeBaseline:
    """One tree method: a regressor per label and a classifier per class task on shared features.

    Features are PCA coefficients of the spectrum (a fitted :class:`SpectralPCAFeatures`) plus
    photometric features; NaN photometry is kept for the NaN-aware GBDTs and imputed with the
    training medians for the random forest. Regression targets are standardized with the training
    mean / std per label (predictions are returned in physical units). Rows with a NaN label are
    excluded from that label's model; rows with class −1 from that task's model. Class codes are
    mapped to contiguous indices for fitting and back for prediction.
    """

    def __init__(self, method: str, pca: SpectralPCAFeatures | None, *, params: Mapping[str, Any] | None = None,
                 n_jobs: int | None = -1, seed: int = 0, use_photometry: bool = True,
                 feature_set: str = "spectra_pca") -> None:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; known: {METHODS}")
        if feature_set not in FEATURE_SETS:
            raise ValueError(f"unknown feature set {feature_set!r}; known: {FEATURE_SETS}")
        if pca is None and feature_set != "tabular":
            raise ValueError(f"feature set {feature_set!r} needs a fitted SpectralPCAFeatures")
        self.method = method
        self.pca = pca
        self.feature_set = feature_set
        self.feature_names: list[str] = []
        self.params = dict(params or {})
        self.n_jobs = n_jobs
        self.seed = seed
        self.use_photometry = use_photometry
        self.impute = method == "random_forest"
        self.medians: np.ndarray | None = None
        self.regressors: list[Any] = []
        self.target_mean: np.ndarray | None = None
        self.target_std: np.ndarray | None = None
        self.classifiers: list[Any] = []
        self.class_codes: list[np.ndarray] = []
        self.n_iterations: dict[str, int | None] = {}
        self.label_names: list[str] = []
        self.class_tasks: list[str] = []

    def _raw_features(self, split: Mapping[str, Any], pca_feats: np.ndarray | None = None) -> np.ndarray:
        pca_part = phot = tab = None
        if self.feature_set in ("spectra_pca", "both"):
            assert self.pca is not None
            pca_part = pca_feats if pca_feats is not None else self.pca.transform(split["flux"], split.get("pix_mask"))
        if self.feature_set == "spectra_pca" and self.use_photometry:
            phot = split.get("photometry")
        if self.feature_set in ("tabular", "both"):
            if split.get("tabular") is None:
                raise ValueError(f"feature set {self.feature_set!r} needs a 'tabular' matrix in the split dict")
            tab = split["tabular"]
        return assemble_features(pca_part, phot, tab)

    def _names(self, split: Mapping[str, Any], n_features: int) -> list[str]:
        names: list[str] = []
        if self.feature_set in ("spectra_pca", "both"):
            assert self.pca is not None and self.pca.components_ is not None
            names += [f"PC{i:02d}" for i in range(self.pca.components_.shape[0])]
        if self.feature_set == "spectra_pca" and self.use_photometry and split.get("photometry") is not None:
            nph = int(np.asarray(split["photometry"]).reshape(len(split["photometry"]), -1).shape[1])
            given = list(split.get("photometry_names") or [])
            names += given if len(given) == nph else [f"PHOT{i}" for i in range(nph)]
        if self.feature_set in ("tabular", "both"):
            ntab = int(np.asarray(split["tabular"]).reshape(len(split["tabular"]), -1).shape[1])
            given = list(split.get("tabular_names") or [])
            names += given if len(given) == ntab else [f"TAB{i}" for i in range(ntab)]
        return names if len(names) == n_features else [f"f{i}" for i in range(n_features)]

    def features(self, split: Mapping[str, Any], pca_feats: np.ndarray | None = None) -> np.ndarray:
        """Feature matrix of a split for this model's ``feature_set`` (``pca_feats`` reuses a
        precomputed PCA transform); column names in :attr:`feature_names` after :meth:`fit`."""
        x = self._raw_features(split, pca_feats)
        if self.impute:
            if self.medians is None:
                raise RuntimeError("medians not fitted")
            x = impute(x, self.medians)
        return x

    def _split_params(self, kind: str) -> dict[str, Any]:
        p = {k: v for k, v in self.params.items() if k not in ("regression", "classification")}
        p.update(dict(self.params.get(kind) or {}))
        return p

    def fit(self, train: Mapping[str, Any], val: Mapping[str, Any] | None = None, *,
            train_pca: np.ndarray | None = None, val_pca: np.ndarray | None = None) -> TreeBaseline:
        """Fit all label regressors and class-task classifiers (early stopping on ``val``).

        ``train_pca`` / ``val_pca`` reuse precomputed PCA coefficients of the splits.
        """
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=_resolve_jobs(self.n_jobs)):
            return self._fit(train, val, train_pca, val_pca)

    def _fit(self, train: Mapping[str, Any], val: Mapping[str, Any] | None,
             train_pca: np.ndarray | None, val_pca: np.ndarray | None) -> TreeBaseline:
        labels = np.asarray(train["labels"], dtype=float).reshape(len(train["flux"]), -1)
        classes = train.get("classes")
        classes = None if classes is None else np.asarray(classes).astype(int).reshape(len(labels), -1)
        self.label_names = [str(x) for x in train.get("label_names", [f"label{i}" for i in range(labels.shape[1])])]
        self.class_tasks = [] if classes is None else [
            str(x) for x in train.get("class_tasks", [f"task{i}" for i in range(classes.shape[1])])]
        if self.impute:
            self.medians = fit_medians(self._raw_features(train, train_pca))
        x = self.features(train, train_pca)
        self.feature_names = self._names(train, x.shape[1])
        xv = vl = vc = None
        if val is not None and len(val["flux"]):
            xv = self.features(val, val_pca)
            vl = np.asarray(val["labels"], dtype=float).reshape(len(xv), -1)
            vc = None if val.get("classes") is None else np.asarray(val["classes"]).astype(int).reshape(len(xv), -1)
        # regression
        self.target_mean = np.nanmean(labels, axis=0) if labels.size else np.zeros(labels.shape[1])
        self.target_std = np.nanstd(labels, axis=0) if labels.size else np.ones(labels.shape[1])
        self.target_mean = np.where(np.isfinite(self.target_mean), self.target_mean, 0.0)
        self.target_std = np.where(np.isfinite(self.target_std) & (self.target_std > 0), self.target_std, 1.0)
        preg = self._split_params("regression")
        self.regressors = []
        for j, name in enumerate(self.label_names):
            ok = np.isfinite(labels[:, j])
            if ok.sum() < 2:
                log.warning("%s: label %s has %d finite training rows; predicting NaN", self.method, name, ok.sum())
                self.regressors.append(None)
                continue
            y = (labels[ok, j] - self.target_mean[j]) / self.target_std[j]
            xvj = yvj = None
            if xv is not None and vl is not None:
                okv = np.isfinite(vl[:, j])
                xvj, yvj = xv[okv], (vl[okv, j] - self.target_mean[j]) / self.target_std[j]
            est, rounds = make_estimator(self.method, "regression", preg, n_jobs=self.n_jobs, seed=self.seed)
            _fit(self.method, est, rounds, x[ok], y, xvj, yvj)
            self.regressors.append(est)
            self.n_iterations[name] = _n_iterations(self.method, est)
        # classification
        pcls = self._split_params("classification")
        self.classifiers, self.class_codes = [], []
        for j, task in enumerate(self.class_tasks):
            assert classes is not None
            ok = classes[:, j] >= 0
            codes = np.unique(classes[ok, j])
            self.class_codes.append(codes)
            if codes.size == 0:
                log.warning("%s: task %s has no labelled training rows; predicting -1", self.method, task)
                self.classifiers.append(None)
                continue
            if codes.size == 1:
                self.classifiers.append(_ConstantClassifier())
                continue
            y = np.searchsorted(codes, classes[ok, j])
            xvj = yvj = None
            if xv is not None and vc is not None:
                okv = np.isin(vc[:, j], codes)
                if okv.any() and np.unique(vc[okv, j]).size >= 1:
                    xvj, yvj = xv[okv], np.searchsorted(codes, vc[okv, j])
            est, rounds = make_estimator(self.method, "classification", pcls, n_jobs=self.n_jobs, seed=self.seed)
            _fit(self.method, est, rounds, x[ok], y, xvj, yvj)
            self.classifiers.append(est)
            self.n_iterations[task] = _n_iterations(self.method, est)
        return self

    def predict(self, split: Mapping[str, Any], *, pca_feats: np.ndarray | None = None) -> dict[str, Any]:
        """Predict a split: ``labels`` (N, L) physical units, ``classes`` (N, C) codes and
        ``class_proba`` (list of (N, n_codes) arrays; columns follow ``class_codes[j]``)."""
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=_resolve_jobs(self.n_jobs)):
            return self._predict(split, pca_feats)

    def _predict(self, split: Mapping[str, Any], pca_feats: np.ndarray | None) -> dict[str, Any]:
        x = self.features(split, pca_feats)
        n = len(x)
        assert self.target_mean is not None and self.target_std is not None
        lab = np.full((n, len(self.label_names)), np.nan)
        for j, est in enumerate(self.regressors):
            if est is not None:
                lab[:, j] = np.asarray(est.predict(x), dtype=float) * self.target_std[j] + self.target_mean[j]
        cls = np.full((n, len(self.class_tasks)), -1, dtype=np.int64)
        proba: list[np.ndarray] = []
        for j, est in enumerate(self.classifiers):
            codes = self.class_codes[j]
            if est is None:
                proba.append(np.zeros((n, 0)))
                continue
            pr = np.asarray(est.predict_proba(x), dtype=float)
            proba.append(pr)
            cls[:, j] = codes[np.argmax(pr, axis=1)]
        return {"labels": lab, "classes": cls, "class_proba": proba}


# --------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------
def _to_container(cfg: Any) -> dict[str, Any]:
    if cfg is None:
        return {}
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except ImportError:  # pragma: no cover
        pass
    return dict(cfg)


def _eval_kwargs(cfg: Mapping[str, Any]) -> dict[str, Any]:
    ev = dict(cfg.get("eval") or {})
    edges = ev.get("snr_edges", [0.0, 50.0, 100.0, 200.0, math.inf])
    edges = [math.inf if str(e).lower() in ("inf", ".inf", "+inf") else float(e) for e in edges]
    return {"snr_edges": edges, "outlier_k": ev.get("outlier_k", 3.0), "outlier_abs": ev.get("outlier_abs")}


def evaluate_predictions(pred: Mapping[str, Any], split: Mapping[str, Any], cfg: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Regression (overall / per S/N / per true stage) and classification metrics of predictions
    ``{"labels", "classes"}`` against a split dict."""
    from stellarnet.evaluation.metrics import classification_report, default_class_names, regression_report

    cfg = _to_container(cfg)
    ekw = _eval_kwargs(cfg)
    label_names = list(split.get("label_names") or [])
    tasks = list(split.get("class_tasks") or [])
    cnames = {**default_class_names(), **dict(split.get("class_names") or {})}
    true_cls = split.get("classes")
    groups = group_names = None
    if true_cls is not None and "stage" in tasks:
        groups = np.asarray(true_cls).reshape(len(split["flux"]), -1)[:, tasks.index("stage")]
        group_names = cnames.get("stage")
    out: dict[str, Any] = {
        "regression": regression_report(pred["labels"], split["labels"], label_names or None, snr=split.get("snr"),
                                        snr_edges=ekw["snr_edges"] if split.get("snr") is not None else None,
                                        groups=groups, group_names=group_names,
                                        outlier_k=ekw["outlier_k"], outlier_abs=ekw["outlier_abs"]),
    }
    if true_cls is not None and pred.get("classes") is not None and tasks:
        out["classification"] = classification_report(pred["classes"], true_cls, tasks, cnames)
    return out


def run_baselines(train: Mapping[str, Any], val: Mapping[str, Any] | None, test: Mapping[str, Any],
                  cfg: Any = None, *, return_predictions: bool = False,
                  pca: SpectralPCAFeatures | None = None, return_models: bool = False) -> dict[str, dict[str, Any]]:
    """Fit every configured baseline on ``train`` (early stopping on ``val``) and evaluate on
    ``test``.

    ``cfg`` is the Hydra ``baselines`` group node (see ``conf/baselines/default.yaml``) or a plain
    mapping with keys ``methods``, ``n_jobs``, ``seed``, ``use_photometry``, ``pca``
    (``n_components``, ``incremental``, ``batch_size``, ``whiten``, ``fit_max_samples``),
    ``eval`` (``snr_edges``, ``outlier_k``, ``outlier_abs``) and one params mapping per method
    (optionally with ``regression`` / ``classification`` sub-mappings). A fitted ``pca`` may be
    passed to skip the PCA fit.

    Returns ``{method: result}`` with ``regression`` / ``classification`` metrics (see
    :mod:`stellarnet.evaluation.metrics`), ``train_time_s`` (PCA fit + model fits, s),
    ``model_fit_time_s``, ``feature_time_s``, ``predict_rate`` (test spectra / s including the PCA
    transform), ``n_train`` / ``n_val`` / ``n_test``, ``n_iterations`` per label/task, ``params``
    and ``features``; skipped methods are ``{"skipped": True, "reason": str}``. With
    ``return_predictions`` each result also has ``_predictions`` (numpy arrays; dropped by
    :func:`stellarnet.evaluation.report.to_jsonable`), with ``return_models`` ``_model`` (the fitted
    :class:`TreeBaseline`). ``features`` (:data:`FEATURE_SETS`, default ``spectra_pca``) picks
    the inputs; ``tabular`` / ``both`` need ``tabular`` in the split dicts.
    """
    c = _to_container(cfg)
    from threadpoolctl import threadpool_limits

    # BLAS (PCA) and OpenMP (HistGradientBoosting) pools follow n_jobs too
    with threadpool_limits(limits=_resolve_jobs(c.get("n_jobs", -1))):
        return _run_baselines(train, val, test, c, return_predictions, pca, return_models)


def _run_baselines(train: Mapping[str, Any], val: Mapping[str, Any] | None, test: Mapping[str, Any],
                   c: dict[str, Any], return_predictions: bool, pca: SpectralPCAFeatures | None,
                   return_models: bool = False) -> dict[str, dict[str, Any]]:
    methods = list(c.get("methods") or ["xgboost", "lightgbm", "random_forest"])
    n_jobs = c.get("n_jobs", -1)
    seed = int(c.get("seed", 0))
    use_phot = bool(c.get("use_photometry", True))
    feature_set = str(c.get("features") or "spectra_pca")
    if feature_set not in FEATURE_SETS:
        raise ValueError(f"baselines.features must be one of {FEATURE_SETS}, got {feature_set!r}")
    if feature_set != "spectra_pca" and train.get("tabular") is None:
        raise ValueError(f"baselines.features={feature_set!r} needs 'tabular' features in the split dicts")
    pcfg = dict(c.get("pca") or {})
    # features (shared by all methods; the PCA fit time is charged to each method's train time)
    tr_p = va_p = None
    feat_s = 0.0
    feat_info: dict[str, Any] = {"feature_set": feature_set}
    if feature_set in ("spectra_pca", "both"):
        t0 = time.perf_counter()
        if pca is None or not pca.is_fitted:
            pca = SpectralPCAFeatures(int(pcfg.get("n_components", 50)), incremental=bool(pcfg.get("incremental", False)),
                                      batch_size=int(pcfg.get("batch_size", 4096)), whiten=bool(pcfg.get("whiten", False)),
                                      fit_max_samples=pcfg.get("fit_max_samples", 50000), random_state=seed)
            pca.fit(train["flux"], train.get("pix_mask"))
        pca_fit_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        tr_p = pca.transform(train["flux"], train.get("pix_mask"))
        va_p = pca.transform(val["flux"], val.get("pix_mask")) if val is not None and len(val["flux"]) else None
        feat_s = pca_fit_s + time.perf_counter() - t0
        feat_info.update({"n_components": int(pca.components_.shape[0]),  # type: ignore[union-attr]
                          "explained_variance_ratio": float(np.sum(pca.explained_variance_ratio_))})  # type: ignore[arg-type]
    feat_info["n_photometry"] = (int(np.asarray(train.get("photometry")).reshape(len(train["flux"]), -1).shape[1])
                                 if feature_set == "spectra_pca" and use_phot and train.get("photometry") is not None
                                 else 0)
    feat_info["n_tabular"] = (int(np.asarray(train["tabular"]).reshape(len(train["flux"]), -1).shape[1])
                              if feature_set != "spectra_pca" else 0)
    results: dict[str, dict[str, Any]] = {}
    for method in methods:
        if method == "cannon":
            if feature_set != "spectra_pca":
                results[method] = {"skipped": True, "reason": f"the Cannon models the spectrum itself "
                                                              f"(feature set {feature_set!r} does not apply)"}
                continue
            results[method] = _run_cannon(train, val, test, c, return_predictions)
            continue
        params = dict(c.get(method) or {})
        try:
            tb = TreeBaseline(method, pca, params=params, n_jobs=n_jobs, seed=seed, use_photometry=use_phot,
                              feature_set=feature_set)
            t0 = time.perf_counter()
            tb.fit(train, val, train_pca=tr_p, val_pca=va_p)
            fit_s = time.perf_counter() - t0
        except ImportError as exc:
            msg = (f"{method} unavailable ({exc}): install the optional dependency with "
                   f"pip install 'stellarnet[baselines]' (or pip install {method})")
            log.warning("skipping baseline %s", msg)
            results[method] = {"skipped": True, "reason": msg}
            continue
        t0 = time.perf_counter()
        pred = tb.predict(test)
        pred_s = time.perf_counter() - t0
        n_test = len(test["flux"])
        res = evaluate_predictions(pred, test, c)
        res.update({
            "method": method,
            "train_time_s": feat_s + fit_s,
            "model_fit_time_s": fit_s,
            "feature_time_s": feat_s,
            "predict_rate": n_test / pred_s if pred_s > 0 else math.nan,
            "n_train": len(train["flux"]), "n_val": 0 if val is None else len(val["flux"]), "n_test": n_test,
            "n_iterations": dict(tb.n_iterations),
            "params": {**DEFAULT_PARAMS[method], **params},
            "features": feat_info,
        })
        if return_predictions:
            res["_predictions"] = pred
        if return_models:
            res["_model"] = tb
        log.info("%s: fit %.1fs, predict %.0f spectra/s", method, fit_s, res["predict_rate"])
        results[method] = res
    return results


def _run_cannon(train: Mapping[str, Any], val: Mapping[str, Any] | None, test: Mapping[str, Any],
                cfg: Mapping[str, Any], return_predictions: bool) -> dict[str, Any]:
    """Fit / evaluate the quadratic Cannon (labels only; no classification)."""
    p = dict(cfg.get("cannon") or {})
    model = CannonModel(scatter=bool(p.get("scatter", True)), regularization=float(p.get("regularization", 0.0)),
                        n_iter=int(p.get("n_iter", 30)))
    names = list(train.get("label_names") or [])
    t0 = time.perf_counter()
    model.fit(train["labels"], train["flux"], train.get("flux_err"), train.get("pix_mask"))
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    lab = model.predict(test["flux"], test.get("flux_err"), test.get("pix_mask"))
    pred_s = time.perf_counter() - t0
    pred = {"labels": lab, "classes": None}
    res = evaluate_predictions(pred, {**test, "class_tasks": []}, cfg)
    res.update({"method": "cannon", "train_time_s": fit_s, "model_fit_time_s": fit_s, "feature_time_s": 0.0,
                "predict_rate": len(lab) / pred_s if pred_s > 0 else math.nan, "n_train": int(model.n_train_),
                "n_val": 0 if val is None else len(val["flux"]), "n_test": len(lab), "params": p,
                "label_names": names})
    if return_predictions:
        res["_predictions"] = pred
    return res


# --------------------------------------------------------------------------------------------
# The Cannon (Ness et al. 2015): quadratic-in-labels data-driven spectral model
# --------------------------------------------------------------------------------------------
def quadratic_vectorizer(labels: np.ndarray) -> np.ndarray:
    """(N, L) scaled labels → (N, 1 + L + L(L+1)/2) design [1, ℓ_i, ℓ_i ℓ_j (i ≤ j)]."""
    x = np.atleast_2d(np.asarray(labels, dtype=float))
    n, L = x.shape
    iu, ju = np.triu_indices(L)
    return np.concatenate([np.ones((n, 1)), x, x[:, iu] * x[:, ju]], axis=1)


def quadratic_vectorizer_jacobian(labels: np.ndarray) -> np.ndarray:
    """(N, L) → (N, T, L) derivative of :func:`quadratic_vectorizer` w.r.t. the labels."""
    x = np.atleast_2d(np.asarray(labels, dtype=float))
    n, L = x.shape
    iu, ju = np.triu_indices(L)
    T = 1 + L + iu.size
    jac = np.zeros((n, T, L))
    jac[:, 1:1 + L, :] = np.eye(L)
    for t, (i, j) in enumerate(zip(iu, ju)):
        jac[:, 1 + L + t, i] += x[:, j]
        jac[:, 1 + L + t, j] += x[:, i]
    return jac


class CannonModel:
    """Quadratic Cannon: per-pixel flux f_p(ℓ) = θ_p · v(ℓ) with v the quadratic vectorizer of
    the scaled labels, optional intrinsic scatter s_p; θ fitted by (weighted) least squares on
    training stars with all labels finite; labels inferred per star by batched Gauss–Newton
    (Levenberg–Marquardt damped) weighted least squares, started from the training mean.

    Labels in physical units (K, dex) are scaled internally to zero mean / unit std. Without
    ``flux_err`` a uniform flux error of 0.01 is assumed; masked / non-finite pixels get zero
    weight.
    """

    def __init__(self, *, scatter: bool = True, regularization: float = 0.0, n_iter: int = 30,
                 batch_size: int = 512) -> None:
        self.scatter = scatter
        self.regularization = float(regularization)
        self.n_iter = int(n_iter)
        self.batch_size = int(batch_size)
        self.theta_: np.ndarray | None = None  # (T, P)
        self.s2_: np.ndarray | None = None  # (P,)
        self.label_mean_: np.ndarray | None = None
        self.label_std_: np.ndarray | None = None
        self.n_train_ = 0

    @staticmethod
    def _ivar(flux: np.ndarray, flux_err: np.ndarray | None, pix_mask: np.ndarray | None, s2: np.ndarray | float) -> np.ndarray:
        err2 = np.full(flux.shape, 0.01**2) if flux_err is None else np.asarray(flux_err, dtype=float) ** 2
        iv = 1.0 / (err2 + s2)
        iv[~np.isfinite(flux) | ~np.isfinite(iv)] = 0.0
        if pix_mask is not None:
            iv[~np.asarray(pix_mask).astype(bool)] = 0.0
        return iv

    def _solve_theta(self, v: np.ndarray, f: np.ndarray, iv: np.ndarray, chunk: int = 64) -> np.ndarray:
        """Per-pixel weighted least squares θ_p = (Vᵀ W_p V + λI)⁻¹ Vᵀ W_p f_p, chunked over pixels."""
        T, P = v.shape[1], f.shape[1]
        theta = np.empty((T, P))
        reg = (self.regularization + 1e-10) * np.eye(T)
        for i in range(0, P, chunk):
            sl = slice(i, min(P, i + chunk))
            w = iv[:, sl]
            a = np.einsum("np,nt,nu->ptu", w, v, v, optimize=True) + reg
            b = np.einsum("np,nt->pt", w * f[:, sl], v, optimize=True)
            theta[:, sl] = np.linalg.solve(a, b[..., None])[..., 0].T
        return theta

    def fit(self, labels: np.ndarray, flux: np.ndarray, flux_err: np.ndarray | None = None,
            pix_mask: np.ndarray | None = None) -> CannonModel:
        """Fit θ (and scatter) on stars whose labels (N, L) are all finite."""
        labels = np.asarray(labels, dtype=float)
        ok = np.all(np.isfinite(labels), axis=1)
        if ok.sum() < quadratic_vectorizer(labels[:1]).shape[1]:
            raise ValueError(f"The Cannon needs more training stars with complete labels (got {ok.sum()})")
        lab = labels[ok]
        f = np.nan_to_num(np.asarray(flux, dtype=float)[ok], nan=1.0)
        fe = None if flux_err is None else np.asarray(flux_err, dtype=float)[ok]
        pm = None if pix_mask is None else np.asarray(pix_mask)[ok]
        self.label_mean_ = lab.mean(axis=0)
        self.label_std_ = np.where(lab.std(axis=0) > 0, lab.std(axis=0), 1.0)
        v = quadratic_vectorizer((lab - self.label_mean_) / self.label_std_)
        s2 = np.zeros(f.shape[1])
        iv = self._ivar(f, fe, pm, s2)
        theta = self._solve_theta(v, f, iv)
        if self.scatter:  # one refinement: scatter from weighted residual excess, then refit
            r2 = (f - v @ theta) ** 2
            err2 = np.full(f.shape, 0.01**2) if fe is None else fe**2
            w = (iv > 0)
            s2 = np.maximum(0.0, (np.where(w, r2 - err2, 0.0)).sum(0) / np.maximum(w.sum(0), 1))
            theta = self._solve_theta(v, f, self._ivar(f, fe, pm, s2))
        self.theta_, self.s2_, self.n_train_ = theta, s2, int(ok.sum())
        return self

    def predict(self, flux: np.ndarray, flux_err: np.ndarray | None = None, pix_mask: np.ndarray | None = None) -> np.ndarray:
        """Infer (N, L) labels (physical units) by damped Gauss–Newton per star (batched)."""
        if self.theta_ is None or self.label_mean_ is None or self.label_std_ is None or self.s2_ is None:
            raise RuntimeError("CannonModel is not fitted")
        flux = np.asarray(flux, dtype=float)
        n, L = len(flux), self.label_mean_.size
        out = np.empty((n, L))
        for i in range(0, n, self.batch_size):
            sl = slice(i, min(n, i + self.batch_size))
            f = np.nan_to_num(flux[sl], nan=1.0)
            iv = self._ivar(f, None if flux_err is None else np.asarray(flux_err)[sl],
                            None if pix_mask is None else np.asarray(pix_mask)[sl], self.s2_)
            x = np.zeros((len(f), L))
            lam = np.full(len(f), 1e-3)

            def chi2(xx: np.ndarray) -> np.ndarray:
                return np.sum(iv * (f - quadratic_vectorizer(xx) @ self.theta_) ** 2, axis=1)

            c2 = chi2(x)
            for _ in range(self.n_iter):
                r = f - quadratic_vectorizer(x) @ self.theta_  # (B, P)
                jm = np.einsum("btl,tp->bpl", quadratic_vectorizer_jacobian(x), self.theta_, optimize=True)
                a = np.einsum("bpl,bp,bpm->blm", jm, iv, jm, optimize=True)
                g = np.einsum("bpl,bp,bp->bl", jm, iv, r, optimize=True)
                diag = np.einsum("bll->bl", a)
                step = np.linalg.solve(a + (lam[:, None, None] * np.eye(L)) * diag[:, :, None] + 1e-12 * np.eye(L),
                                       g[..., None])[..., 0]
                xn = np.clip(x + step, -6.0, 6.0)
                c2n = chi2(xn)
                better = c2n < c2
                x[better], c2[better] = xn[better], c2n[better]
                lam = np.where(better, lam * 0.3, lam * 10.0)
                if np.max(np.abs(step)) < 1e-6:
                    break
            out[sl] = x * self.label_std_ + self.label_mean_
        return out
