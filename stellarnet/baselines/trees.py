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
from collections.abc import Mapping
from typing import Any

import numpy as np

from stellarnet.baselines.inputs import assemble_features, fit_medians, impute
from stellarnet.baselines.pca import SpectralPCAFeatures, _resolve_jobs

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
        import inspect

        import lightgbm as lgb

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
