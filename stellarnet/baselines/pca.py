"""Principal components of continuum-normalized spectra: the baselines' spectral features
(chunked or incremental for data larger than memory; masked pixels filled with the training mean)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from stellarnet.common.files import atomic_path
from stellarnet.common.hardware import available_cpus

log = logging.getLogger(__name__)


def _resolve_jobs(n_jobs: int | None) -> int:
    return available_cpus() if n_jobs is None or n_jobs < 1 else int(n_jobs)


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
        with atomic_path(path) as tmp:
            np.savez(tmp, **self.state_dict())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> SpectralPCAFeatures:
        """Read a state written by :meth:`save` (``allow_pickle=False``)."""
        with np.load(path, allow_pickle=False) as z:
            return cls.from_state({k: z[k] for k in z.files})
