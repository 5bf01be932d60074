"""The Cannon (Ness et al. 2015): a quadratic-in-labels data-driven spectral model, fitted pixel by
pixel with a per-pixel model scatter, and labels inferred by a non-linear least-squares fit."""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)


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
