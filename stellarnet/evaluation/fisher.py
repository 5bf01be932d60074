"""The Cramér–Rao bound of any spectral model: its Jacobian by central differences (label steps in K /
dex), the per-pixel noise, the Fisher matrix FᵢⱼЅ = Σ_p J_pi J_pj / σ_p² over good pixels, and the bound's
covariance and σ (a singular matrix warns and gives NaN). Model-agnostic: the model is a function argument."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Callable

import numpy as np

from stellarnet.common.labels import LABEL_NAMES

#: ``model_fn(labels (N, L) in physical units) -> model flux (N, P)``. It may also carry an
#: attribute ``jacobian(labels) -> (N, P, L)`` with the analytic derivative (then used by
#: :func:`jacobian` instead of finite differences).
ModelFn = Callable[[np.ndarray], np.ndarray]


#: Default central-difference steps in physical units (K, dex, dex, dex), per label name.
DEFAULT_STEPS: dict[str, float] = {"TEFF": 10.0, "LOGG": 0.02, "FE_H": 0.01, "ALPHA_FE": 0.01, "M_H": 0.01}


#: Relative eigenvalue threshold below which the (scaled) Fisher matrix counts as singular.
SINGULAR_RCOND: float = 1e-10


class SingularFisherWarning(RuntimeWarning):
    """A Fisher matrix is (numerically) singular: some label combination is not constrained by
    the spectrum; the bound there is computed with a pseudo-inverse and is not meaningful."""


# ----------------------------------------------------------------------------------------------
# Jacobian
def _steps_array(steps: float | Sequence[float] | np.ndarray | Mapping[str, float] | None, n_labels: int,
                 label_names: Sequence[str] | None) -> np.ndarray:
    if steps is None:
        names = list(label_names) if label_names is not None else list(LABEL_NAMES[:n_labels])
        if len(names) != n_labels or any(n not in DEFAULT_STEPS for n in names):
            raise ValueError(f"no default finite-difference steps for labels {names}; pass steps explicitly")
        steps = [DEFAULT_STEPS[n] for n in names]
    elif isinstance(steps, Mapping):
        if label_names is None:
            raise ValueError("steps given as a mapping need label_names")
        steps = [float(steps[n]) for n in label_names]
    h = np.broadcast_to(np.asarray(steps, dtype=np.float64), (n_labels,)).copy()
    if not np.all(np.isfinite(h) & (h > 0)):
        raise ValueError(f"finite-difference steps must be positive and finite, got {h.tolist()}")
    return h


def jacobian(
    model_fn: ModelFn,
    labels: np.ndarray,
    steps: float | Sequence[float] | np.ndarray | Mapping[str, float] | None = None,
    *,
    label_names: Sequence[str] | None = None,
    bounds: tuple[Sequence[float], Sequence[float]] | None = None,
    chunk: int = 128,
    use_analytic: bool = True,
) -> np.ndarray:
    """Derivative of the model flux with respect to the labels, ``J[n, p, l] = ∂f_p/∂θ_l`` at
    ``labels[n]`` → float64 (N, P, L), in flux units per label unit (per K, per dex).

    ``labels``: (N, L) or (L,) in physical units. ``steps``: central-difference step per label in
    the same units (scalar, length-L sequence, or mapping name → step with ``label_names``;
    default :data:`DEFAULT_STEPS`, e.g. 10 K, 0.02 dex, 0.01 dex, 0.01 dex). The derivative is
    ``(f(θ + h e_l) − f(θ − h e_l)) / 2h``; all 2L perturbed spectra of ``chunk`` stars go to
    ``model_fn`` in one call. With ``bounds = (lower, upper)`` (per label), a stencil that would
    leave the box is shifted inside it (same width 2h, one-sided near an edge), so the model is
    never evaluated outside. If ``model_fn`` has a callable ``jacobian`` attribute and
    ``use_analytic``, that is returned instead.
    """
    labels = np.asarray(labels, dtype=np.float64)
    single = labels.ndim == 1
    labels = np.atleast_2d(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be (N, L) or (L,), got shape {labels.shape}")
    n, n_lab = labels.shape
    analytic = getattr(model_fn, "jacobian", None)
    if use_analytic and callable(analytic):
        jac = np.asarray(analytic(labels), dtype=np.float64)
        if jac.ndim != 3 or jac.shape[0] != n or jac.shape[2] != n_lab:
            raise ValueError(f"model_fn.jacobian returned shape {jac.shape}, expected ({n}, P, {n_lab})")
        return jac[0] if single else jac
    h = _steps_array(steps, n_lab, label_names)
    lo = np.full(n_lab, -np.inf)
    hi = np.full(n_lab, np.inf)
    if bounds is not None:
        lo = np.broadcast_to(np.asarray(bounds[0], np.float64), (n_lab,))
        hi = np.broadcast_to(np.asarray(bounds[1], np.float64), (n_lab,))
        if np.any(hi - lo < 2 * h):
            raise ValueError(f"label box {lo.tolist()}..{hi.tolist()} narrower than two steps {h.tolist()}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    out: np.ndarray | None = None
    eye = np.eye(n_lab)
    for s in range(0, n, chunk):
        x = labels[s : s + chunk]  # (c, L)
        c = x.shape[0]
        # lower stencil point a = clip(x − h, lo, hi − 2h); upper b = a + 2h  (interior: x ± h)
        a = np.clip(x - h, lo, hi - 2 * h)  # (c, L)
        lower = np.repeat(x[:, None, :], n_lab, axis=1)  # (c, L_perturbed, L)
        upper = lower.copy()
        diag = eye.astype(bool)
        lower[:, diag] = a
        upper[:, diag] = a + 2 * h
        batch = np.concatenate([upper.reshape(c * n_lab, n_lab), lower.reshape(c * n_lab, n_lab)])
        f = np.asarray(model_fn(batch), dtype=np.float64)
        if f.ndim != 2 or f.shape[0] != 2 * c * n_lab:
            raise ValueError(f"model_fn returned shape {f.shape} for {batch.shape[0]} label rows")
        n_pix = f.shape[1]
        fu = f[: c * n_lab].reshape(c, n_lab, n_pix)
        fl = f[c * n_lab :].reshape(c, n_lab, n_pix)
        d = (fu - fl) / (2 * h)[None, :, None]  # (c, L, P)
        if out is None:
            out = np.empty((n, n_pix, n_lab), np.float64)
        out[s : s + c] = d.transpose(0, 2, 1)
    assert out is not None
    return out[0] if single else out


# ----------------------------------------------------------------------------------------------
# noise and Fisher information
def noise_sigma(
    n_stars: int,
    n_pix: int,
    snr: float | np.ndarray | None = None,
    flux_err: np.ndarray | None = None,
) -> np.ndarray:
    """Per-pixel noise σ (N, P) float64 in normalized-flux units: ``flux_err`` (broadcast to
    (N, P)) if given, else ``1/snr`` (SNR per pixel, scalar or (N,); unit continuum)."""
    if flux_err is not None:
        return np.broadcast_to(np.asarray(flux_err, np.float64), (n_stars, n_pix))
    if snr is None:
        raise ValueError("give the noise as snr (per pixel, per star) or flux_err (per pixel)")
    snr = np.broadcast_to(np.asarray(snr, np.float64), (n_stars,))
    with np.errstate(divide="ignore", invalid="ignore"):
        sig = np.where(snr > 0, 1.0 / snr, np.inf)
    return np.broadcast_to(sig[:, None], (n_stars, n_pix))


def fisher_matrix(J: np.ndarray, sigma_pix: float | np.ndarray, good: np.ndarray | None = None) -> np.ndarray:
    """Fisher information ``F[n] = J[n]ᵀ diag(w) J[n]``, ``w_p = good_p / σ_p²`` → (N, L, L).

    ``J``: (N, P, L) or (P, L) (flux per label unit). ``sigma_pix``: per-pixel noise in the same
    flux units, broadcastable to (N, P) (scalar, (P,), (N, 1) or (N, P); e.g. ``1/SNR``).
    ``good``: bool broadcastable to (N, P), True = use the pixel (masked pixels excluded).
    Pixels with non-finite or non-positive σ, or non-finite J, are excluded too. Units:
    label-unit⁻² (K⁻², dex⁻²).
    """
    J = np.asarray(J, np.float64)
    single = J.ndim == 2
    J3 = J[None] if single else J
    if J3.ndim != 3:
        raise ValueError(f"J must be (N, P, L) or (P, L), got shape {J.shape}")
    n, p, _ = J3.shape
    sig = np.asarray(sigma_pix, np.float64)
    if single and sig.ndim == 1:
        sig = sig[None]
    sig = np.broadcast_to(sig, (n, p))
    with np.errstate(divide="ignore", invalid="ignore"):
        ok = np.isfinite(sig) & (sig > 0) & np.all(np.isfinite(J3), axis=2)
        if good is not None:
            g = np.asarray(good, bool)
            if single and g.ndim == 1:
                g = g[None]
            ok &= np.broadcast_to(g, (n, p))
        w = np.where(ok, 1.0 / np.where(ok, sig, 1.0) ** 2, 0.0)
    Jz = np.where(ok[..., None], J3, 0.0)
    F = np.einsum("npl,np,npm->nlm", Jz, w, Jz, optimize=True)
    return F[0] if single else F


def crlb_covariance(F: np.ndarray, *, warn: bool = True) -> np.ndarray:
    """Inverse Fisher matrix ``F⁻¹`` (N, L, L) or (L, L): the CRLB covariance (label units²).

    Inverted stably: F is first scaled to unit diagonal (labels have very different units,
    K vs dex), then inverted through its symmetric eigen-decomposition. A label with zero
    information (diagonal 0, e.g. all pixels masked) gets infinite variance (its row/column is
    inf on the diagonal, NaN elsewhere). If the scaled matrix has eigenvalues below
    :data:`SINGULAR_RCOND` × the largest (degenerate label combinations), the pseudo-inverse is
    used and a :class:`SingularFisherWarning` names the stars affected; those bounds are
    lower than the truth (the degenerate direction is infinitely uncertain).
    """
    F = np.asarray(F, np.float64)
    single = F.ndim == 2
    F3 = F[None] if single else F
    if F3.ndim != 3 or F3.shape[1] != F3.shape[2]:
        raise ValueError(f"F must be (N, L, L) or (L, L), got shape {F.shape}")
    n, L, _ = F3.shape
    F3 = 0.5 * (F3 + F3.transpose(0, 2, 1))
    d = np.einsum("nll->nl", F3).copy()
    finite = np.all(np.isfinite(F3), axis=(1, 2))
    zero = ~(d > 0)  # includes NaN
    d_safe = np.where(zero, 1.0, d)
    s = 1.0 / np.sqrt(d_safe)  # (N, L)
    C = F3 * s[:, :, None] * s[:, None, :]
    keep = ~zero  # labels with information
    C = np.where(keep[:, :, None] & keep[:, None, :], C, 0.0)
    C[:, np.arange(L), np.arange(L)] = np.where(keep, 1.0, 0.0)
    C = np.where(finite[:, None, None], C, 0.0)
    evals, evecs = np.linalg.eigh(C)
    emax = np.max(evals, axis=1, keepdims=True)
    small = evals <= SINGULAR_RCOND * np.where(emax > 0, emax, 1.0)
    # eigenvalues that are zero only because of the zero-information labels are expected:
    n_expected = (~keep).sum(axis=1)
    degenerate = small.sum(axis=1) > n_expected
    inv_ev = np.where(small, 0.0, 1.0 / np.where(small, 1.0, evals))
    Cinv = np.einsum("nik,nk,njk->nij", evecs, inv_ev, evecs)
    cov = Cinv * s[:, :, None] * s[:, None, :]
    zz = zero[:, :, None] | zero[:, None, :]
    cov = np.where(zz, np.nan, cov)
    idx = np.arange(L)
    cov[:, idx, idx] = np.where(zero, np.inf, cov[:, idx, idx])
    cov[~finite] = np.nan
    if warn and degenerate.any():
        rows = np.flatnonzero(degenerate)
        warnings.warn(
            f"Fisher matrix singular (rcond < {SINGULAR_RCOND:g}) for {rows.size} of {n} stars "
            f"(rows {rows[:10].tolist()}{'...' if rows.size > 10 else ''}): some label combination is "
            "unconstrained by the spectrum; the pseudo-inverse bound there underestimates the error",
            SingularFisherWarning,
            stacklevel=2,
        )
    return cov[0] if single else cov


def crlb_sigma(F: np.ndarray, *, warn: bool = True) -> np.ndarray:
    """Best possible 1-σ error per label, ``sqrt(diag(F⁻¹))`` → (N, L) or (L,), in label units
    (K, dex), other labels marginalized. See :func:`crlb_covariance` for singular F."""
    cov = crlb_covariance(F, warn=warn)
    var = np.diagonal(cov, axis1=-2, axis2=-1)
    with np.errstate(invalid="ignore"):
        return np.sqrt(np.where(var >= 0, var, np.nan))


def crlb_for_stars(
    model_fn: ModelFn,
    labels: np.ndarray,
    snr: float | np.ndarray | None = None,
    flux_err: np.ndarray | None = None,
    good: np.ndarray | None = None,
    *,
    steps: float | Sequence[float] | np.ndarray | Mapping[str, float] | None = None,
    label_names: Sequence[str] | None = None,
    bounds: tuple[Sequence[float], Sequence[float]] | None = None,
    chunk: int = 128,
    return_covariance: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Per-star CRLB σ (N, L) in label units (K, dex) for labels (N, L) in physical units.

    Noise per pixel (normalized-flux units): ``flux_err`` (N, P) or (P,) if given, else
    ``1/snr`` (scalar or (N,), SNR per pixel). ``good`` (N, P) / (P,) bool: pixels to use
    (False = masked, excluded). The Jacobian of ``model_fn`` (see :func:`jacobian`; ``steps``,
    ``bounds``) is computed ``chunk`` stars at a time, so memory stays ≈ chunk × 2L × P × 8 B.
    With ``return_covariance`` also returns the (N, L, L) CRLB covariance.
    """
    labels = np.atleast_2d(np.asarray(labels, np.float64))
    n, n_lab = labels.shape
    if flux_err is None and snr is None:
        raise ValueError("give the noise as snr (per pixel, per star) or flux_err (per pixel)")
    sig_all = good_all = None
    if flux_err is not None:
        sig_all = np.asarray(flux_err, np.float64)
        if sig_all.ndim == 2 and sig_all.shape[0] != n:
            raise ValueError(f"flux_err has {sig_all.shape[0]} rows for {n} stars")
    if good is not None:
        good_all = np.asarray(good, bool)
        if good_all.ndim == 2 and good_all.shape[0] != n:
            raise ValueError(f"good has {good_all.shape[0]} rows for {n} stars")
    snr_all = None if snr is None else np.broadcast_to(np.asarray(snr, np.float64), (n,))
    covs = np.empty((n, n_lab, n_lab))
    for s in range(0, n, chunk):
        sl = slice(s, min(s + chunk, n))
        J = jacobian(model_fn, labels[sl], steps, label_names=label_names, bounds=bounds, chunk=chunk)
        c, p, _ = J.shape
        if sig_all is not None:
            sig = sig_all[sl] if sig_all.ndim == 2 else sig_all
            sig = noise_sigma(c, p, flux_err=sig)
        else:
            sig = noise_sigma(c, p, snr=snr_all[sl])
        g = None if good_all is None else (good_all[sl] if good_all.ndim == 2 else good_all)
        F = fisher_matrix(J, sig, g)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", SingularFisherWarning)
            covs[sl] = crlb_covariance(F)
        for w in caught:  # re-issue with global row numbers
            if issubclass(w.category, SingularFisherWarning):
                warnings.warn(f"stars {s}..{sl.stop - 1}: {w.message}", SingularFisherWarning, stacklevel=2)
    var = np.diagonal(covs, axis1=1, axis2=2)
    with np.errstate(invalid="ignore"):
        sigma = np.sqrt(np.where(var >= 0, var, np.nan))
    return (sigma, covs) if return_covariance else sigma
