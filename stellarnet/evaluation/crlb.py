"""Cramér–Rao lower bound (CRLB) on stellar labels from a spectral model and per-pixel noise.

For a spectrum ``y = f(θ) + ε`` with independent Gaussian pixel noise ``ε_p ~ N(0, σ_p²)``, the
Fisher information of the labels θ (L of them) is ::

    F_lm = Σ_p  J_pl J_pm / σ_p²,      J_pl = ∂f_p / ∂θ_l   (sum over good pixels only)

and any unbiased estimator has ``Cov(θ̂) ⪰ F⁻¹``: the best possible 1-σ error of label l is
``sqrt((F⁻¹)_ll)`` (other labels marginalized, i.e. fitted simultaneously).

Units: ``f`` and ``σ_p`` are in the same flux units — here continuum-normalized flux, so for a
unit continuum ``σ_p = 1/SNR`` (SNR per pixel), or the per-pixel normalized errors of the data.
The Jacobian is in normalized flux per label unit (per K for Teff, per dex for logg / [Fe/H] /
[α/Fe]), so F is in label-unit⁻² and the bound σ is in K / dex.

The model is a generic callable ``model_fn(labels (N, L)) -> flux (N, P)``; this module does not
know where spectra come from. The derivative must be of the *same* quantity the data are — if
the data are continuum-normalized, ``model_fn`` must normalize its noiseless spectrum the same
way. Approximations: pixel noise is independent and Gaussian with the given σ (the small noise
of the continuum estimate and any model-mismatch / systematic terms folded into the reported
errors are treated as white noise), and the derivative is evaluated at the given labels.

Comparing with achieved errors: for Gaussian residuals of standard deviation σ, the mean absolute
error is ``MAE = σ·√(2/π)``, so ``MAE / (CRLB·√(2/π))`` is the achieved σ in units of the bound
(1 = optimal; the issue's goal is ≤ 2 for giants at SNR ≥ 100). See :func:`mae_over_crlb`.

For a shard split, :func:`crlb_report` does the whole job (subset, selection inside the model's
label box, model-grid mapping, per-star bound, per-bin summaries, MAE/CRLB and the goal check);
the spectral model and its box are passed in (``stellarnet.evaluation.spectral_model`` for the Kurucz
emulator, used by ``python -m stellarnet.evaluate`` and ``scripts/crlb.py``).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from stellarnet.io import grids
from stellarnet.common.labels import LABEL_NAMES, LABEL_UNITS
from stellarnet.evaluation.metrics import DEFAULT_SNR_EDGES, snr_bin_index, snr_bin_names

__all__ = [
    "CATALOGUE_NOTE",
    "DEFAULT_STEPS",
    "GAUSS_MAE_FACTOR",
    "GIANT_STAGES",
    "GOAL_RATIO",
    "GOAL_SNR",
    "NOISE_DESCRIPTIONS",
    "NOISE_MODELS",
    "RATIO_DEFINITION",
    "ModelFn",
    "SingularFisherWarning",
    "box_selection",
    "compute_crlb",
    "crlb_by_bin",
    "crlb_covariance",
    "crlb_for_stars",
    "crlb_goal",
    "crlb_report",
    "crlb_sigma",
    "crlb_table_markdown",
    "fisher_matrix",
    "jacobian",
    "mae_over_crlb",
    "noise_sigma",
    "subset_rows",
    "to_model_grid",
]

#: ``model_fn(labels (N, L) in physical units) -> model flux (N, P)``. It may also carry an
#: attribute ``jacobian(labels) -> (N, P, L)`` with the analytic derivative (then used by
#: :func:`jacobian` instead of finite differences).
ModelFn = Callable[[np.ndarray], np.ndarray]

#: Default central-difference steps in physical units (K, dex, dex, dex), per label name.
DEFAULT_STEPS: dict[str, float] = {"TEFF": 10.0, "LOGG": 0.02, "FE_H": 0.01, "ALPHA_FE": 0.01, "M_H": 0.01}

#: E|x| / σ for a zero-mean Gaussian: MAE = σ·√(2/π) ≈ 0.798 σ.
GAUSS_MAE_FACTOR: float = math.sqrt(2.0 / math.pi)

#: Relative eigenvalue threshold below which the (scaled) Fisher matrix counts as singular.
SINGULAR_RCOND: float = 1e-10

#: Noise models of :func:`compute_crlb`: ``flux_err`` = the data's own per-pixel normalized
#: errors, ``snr`` = white noise 1/SNR per pixel; masked pixels are excluded in both.
NOISE_MODELS: tuple[str, ...] = ("flux_err", "snr")
NOISE_DESCRIPTIONS: dict[str, str] = {"flux_err": "shard per-pixel normalized errors, masked pixels excluded",
                                      "snr": "1/SNR per pixel, masked pixels excluded"}

#: Evolutionary stages counted as giants, and the accuracy goal: MAE/CRLB ≤ GOAL_RATIO for
#: giants at SNR ≥ GOAL_SNR.
GIANT_STAGES: tuple[str, ...] = ("RGB", "RC")
GOAL_SNR: float = 100.0
GOAL_RATIO: float = 2.0

#: What the ratio means when the reference labels are a catalogue's (not the truth).
CATALOGUE_NOTE = ("Against catalogue labels the ratio includes the catalogue's own label noise (on real data "
                  "that is what a user has), so it is an upper limit on the network's own excess over the bound.")

RATIO_DEFINITION = ("ratio = MAE / (median CRLB · sqrt(2/pi)) = achieved Gaussian sigma over the bound; "
                    "ratio_per_star = mean(|residual| / CRLB) / sqrt(2/pi)")


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


# ----------------------------------------------------------------------------------------------
# summaries
def _names(label_names: Sequence[str] | None, n: int) -> list[str]:
    names = list(label_names) if label_names is not None else list(LABEL_NAMES[:n])
    if len(names) != n:
        raise ValueError(f"{len(names)} label names for {n} labels")
    return names


def _bins(snr: np.ndarray, edges: Sequence[float]) -> tuple[list[str], np.ndarray]:
    return snr_bin_names(edges), snr_bin_index(np.asarray(snr, float), edges)


def _q(x: np.ndarray, q: float) -> float:
    return float(np.quantile(x, q)) if x.size else math.nan


def crlb_by_bin(
    crlb: np.ndarray,
    snr: np.ndarray,
    *,
    edges: Sequence[float] = DEFAULT_SNR_EDGES,
    label_names: Sequence[str] | None = None,
    mask: np.ndarray | None = None,
) -> dict[str, dict[str, dict[str, float | int]]]:
    """Summary of per-star CRLB σ (N, L) per label per SNR bin (plus ``"all"``):
    ``{label: {bin: {n, median, p16, p84}}}`` in label units; only finite bounds of rows in
    ``mask`` (bool (N,), default all) count. JSON-able (NaN for empty bins)."""
    crlb = np.atleast_2d(np.asarray(crlb, np.float64))
    names = _names(label_names, crlb.shape[1])
    bnames, idx = _bins(snr, edges)
    sel = np.ones(crlb.shape[0], bool) if mask is None else np.asarray(mask, bool)
    out: dict[str, dict[str, dict[str, float | int]]] = {}
    for j, name in enumerate(names):
        per: dict[str, dict[str, float | int]] = {}
        for b, bname in [(k, nm) for k, nm in enumerate(bnames)] + [(None, "all")]:
            rows = sel & (idx >= 0 if b is None else idx == b)
            x = crlb[rows, j]
            x = x[np.isfinite(x)]
            per[bname] = {"n": int(x.size), "median": _q(x, 0.5), "p16": _q(x, 0.16), "p84": _q(x, 0.84)}
        out[name] = per
    return out


def mae_over_crlb(
    residuals: np.ndarray,
    crlb: np.ndarray,
    snr: np.ndarray,
    *,
    edges: Sequence[float] = DEFAULT_SNR_EDGES,
    label_names: Sequence[str] | None = None,
    mask: np.ndarray | None = None,
) -> dict[str, dict[str, dict[str, float | int]]]:
    """Achieved error relative to the CRLB, per label per SNR bin (plus ``"all"``).

    ``residuals``: (N, L) pred − true in label units (K, dex); ``crlb``: (N, L) per-star bound σ;
    ``snr``: (N,); ``mask``: optional bool (N,) rows to use. Rows with a non-finite residual or
    bound are skipped per label. For each bin → ``{n, mae, median_crlb, sigma_achieved, ratio,
    ratio_per_star}``:

    * ``sigma_achieved = MAE / √(2/π)`` — the Gaussian σ that has this MAE;
    * ``ratio = MAE / (median_crlb · √(2/π))`` — achieved σ over the (median) bound: 1 means the
      method reaches the CRLB, 2 means errors twice the best possible (for Gaussian errors
      MAE = σ·√(2/π));
    * ``ratio_per_star = mean(|Δ_i| / crlb_i) / √(2/π)`` — the same with each residual scaled by
      its own bound (robust to a bin mixing stars with different bounds; equals k when every
      star's error is Gaussian with σ_i = k·crlb_i).

    Residuals against noisy catalogue labels include the catalogue noise, so the ratio is then
    an upper limit on the method's own excess over the bound. Returns a JSON-able dict.
    """
    res = np.atleast_2d(np.asarray(residuals, np.float64))
    crlb = np.atleast_2d(np.asarray(crlb, np.float64))
    if res.shape != crlb.shape:
        raise ValueError(f"residuals shape {res.shape} != crlb shape {crlb.shape}")
    names = _names(label_names, res.shape[1])
    bnames, idx = _bins(snr, edges)
    if idx.shape[0] != res.shape[0]:
        raise ValueError(f"snr has {idx.shape[0]} rows for {res.shape[0]} stars")
    sel = np.ones(res.shape[0], bool) if mask is None else np.asarray(mask, bool)
    out: dict[str, dict[str, dict[str, float | int]]] = {}
    for j, name in enumerate(names):
        per: dict[str, dict[str, float | int]] = {}
        ok = sel & np.isfinite(res[:, j]) & np.isfinite(crlb[:, j]) & (crlb[:, j] > 0)
        for b, bname in [(k, nm) for k, nm in enumerate(bnames)] + [(None, "all")]:
            rows = ok & (idx >= 0 if b is None else idx == b)
            a = np.abs(res[rows, j])
            c = crlb[rows, j]
            if a.size == 0:
                per[bname] = {"n": 0, "mae": math.nan, "median_crlb": math.nan, "sigma_achieved": math.nan,
                              "ratio": math.nan, "ratio_per_star": math.nan}
                continue
            mae = float(a.mean())
            med = float(np.median(c))
            per[bname] = {
                "n": int(a.size),
                "mae": mae,
                "median_crlb": med,
                "sigma_achieved": mae / GAUSS_MAE_FACTOR,
                "ratio": mae / (med * GAUSS_MAE_FACTOR),
                "ratio_per_star": float(np.mean(a / c)) / GAUSS_MAE_FACTOR,
            }
        out[name] = per
    return out


def _fmt(v: Any, unit: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    v = float(v)
    if unit == "K":
        return f"{v:.1f}"
    return f"{v:.4f}" if abs(v) < 0.1 else f"{v:.3f}"


def crlb_table_markdown(
    summary: Mapping[str, Mapping[str, Mapping[str, Any]]],
    key: str = "median",
    *,
    title: str | None = None,
) -> str:
    """Markdown table labels × SNR bins of ``summary[label][bin][key]`` (from
    :func:`crlb_by_bin` with ``key='median'``, or :func:`mae_over_crlb` with ``key='ratio'`` /
    ``'median_crlb'`` / ``'mae'``), with the star count per bin in the header."""
    labels = list(summary)
    if not labels:
        return ""
    bins = list(summary[labels[0]])
    counts = [summary[labels[0]][b].get("n", "") for b in bins]
    head = "| label | " + " | ".join(f"{b} (n={c})" for b, c in zip(bins, counts)) + " |"
    sep = "| --- |" + " ---: |" * len(bins)
    unit_key = key not in ("ratio", "ratio_per_star")
    rows = []
    for name in labels:
        unit = LABEL_UNITS.get(name, "") if unit_key else ""
        cells = [_fmt(summary[name][b].get(key), unit) if unit_key else
                 ("–" if summary[name][b].get(key) is None or not math.isfinite(float(summary[name][b][key]))
                  else f"{float(summary[name][b][key]):.2f}") for b in bins]
        rows.append(f"| {name}{f' ({unit})' if unit else ''} | " + " | ".join(cells) + " |")
    lines = ([f"**{title}**", ""] if title else []) + [head, sep, *rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# a shard split against a spectral model (used by ``stellarnet.evaluate`` and ``scripts/crlb.py``)
def subset_rows(n: int, max_stars: int | None = None, seed: int = 0) -> np.ndarray:
    """Sorted row indices: all ``n`` rows, or a seeded random subset of ``max_stars`` of them."""
    if max_stars is not None and int(max_stars) < n:
        return np.sort(np.random.default_rng(seed).choice(n, int(max_stars), replace=False))
    return np.arange(n)


def to_model_grid(arr: np.ndarray, grid: str, model_grid: str, fill: float) -> np.ndarray:
    """(N, P_grid) array on the pixel grid ``grid`` → (N, P_model) on ``model_grid`` (grid names of
    :mod:`stellarnet.io.grids`, e.g. ``"dr17"`` shards for the ``"dr12"`` emulator); pixels the
    data grid lacks get ``fill`` (e.g. False for a good-pixel mask, inf for an error)."""
    g, m = grids.grid_name(grid), grids.grid_name(model_grid)
    if g == m:
        return arr
    src = grids.grid_indices(g)
    dst = grids.grid_indices(m)
    pos = np.clip(np.searchsorted(src, dst), 0, src.size - 1)
    have = src[pos] == dst
    out = np.full((arr.shape[0], dst.size), fill, dtype=arr.dtype)
    out[:, have] = arr[:, pos[have]]
    return out


def box_selection(labels: np.ndarray, snr: np.ndarray, lower: Sequence[float], upper: Sequence[float],
                  ) -> tuple[np.ndarray, dict[str, int]]:
    """Which stars the bound can be computed for: finite labels (N, L) and SNR > 0 (``usable``),
    labels inside the model's box ``lower <= labels <= upper`` (the model extrapolates badly
    outside). Returns (bool (N,) selected, counts ``{n, n_in_box, n_outside_box, n_no_labels}``)."""
    labels = np.atleast_2d(np.asarray(labels, np.float64))
    snr = np.asarray(snr, np.float64)
    usable = np.all(np.isfinite(labels), axis=1) & np.isfinite(snr) & (snr > 0)
    lo = np.asarray(lower, np.float64)
    hi = np.asarray(upper, np.float64)
    filled = np.where(np.isfinite(labels), labels, -np.inf)
    inside = usable & np.all((filled >= lo) & (filled <= hi), axis=1)
    counts = {"n": int(labels.shape[0]), "n_in_box": int(inside.sum()),
              "n_outside_box": int((usable & ~inside).sum()), "n_no_labels": int((~usable).sum())}
    return inside, counts


def compute_crlb(
    model_fn: ModelFn,
    labels: np.ndarray,
    snr: np.ndarray,
    flux_err: np.ndarray,
    good: np.ndarray,
    bounds: tuple[Sequence[float], Sequence[float]] | None = None,
    *,
    noise_models: Sequence[str] = NOISE_MODELS,
    steps: float | Sequence[float] | np.ndarray | Mapping[str, float] | None = None,
    label_names: Sequence[str] | None = None,
    chunk: int = 128,
    progress: Callable[[str], None] | None = None,
) -> dict[str, np.ndarray]:
    """Per-star CRLB σ (N, L) in label units for each noise model in ``noise_models`` (see
    :data:`NOISE_MODELS`), one Jacobian per ``chunk`` stars shared by all noise models.

    ``labels`` (N, L) physical units, inside ``bounds``; ``snr`` (N,); ``flux_err`` (N, P) and
    ``good`` (N, P) bool on the model's pixel grid (see :func:`to_model_grid`). ``progress`` gets
    one line per chunk."""
    unknown = [k for k in noise_models if k not in NOISE_MODELS]
    if unknown:
        raise ValueError(f"unknown noise model(s) {unknown}; choose from {list(NOISE_MODELS)}")
    labels = np.atleast_2d(np.asarray(labels, np.float64))
    snr = np.asarray(snr, np.float64)
    n = labels.shape[0]
    out = {k: np.empty((n, labels.shape[1])) for k in noise_models}
    t0 = time.perf_counter()
    for s in range(0, n, chunk):
        sl = slice(s, min(s + chunk, n))
        J = jacobian(model_fn, labels[sl], steps, label_names=label_names, bounds=bounds, chunk=chunk)
        for k in noise_models:
            sig = flux_err[sl] if k == "flux_err" else 1.0 / snr[sl, None]
            out[k][sl] = crlb_sigma(fisher_matrix(J, sig, good[sl]))
        if progress is not None:
            progress(f"CRLB {sl.stop}/{n} stars ({time.perf_counter() - t0:.0f} s)")
    return out


def crlb_goal(
    residuals: np.ndarray,
    crlb: np.ndarray,
    snr: np.ndarray,
    mask: np.ndarray | None,
    *,
    label_names: Sequence[str] | None = None,
    goal_snr: float = GOAL_SNR,
    goal_ratio: float = GOAL_RATIO,
    reference_err: np.ndarray | None = None,
) -> dict[str, dict[str, Any]]:
    """MAE/CRLB of the rows in ``mask`` (e.g. giants) with SNR ≥ ``goal_snr``, per label:
    :func:`mae_over_crlb`'s numbers plus ``within_2x`` (ratio ≤ ``goal_ratio``; None when no star
    counts).

    With ``reference_err`` (N, L), the reference labels' own 1-σ errors (e.g. the catalogue's),
    also ``median_reference_err`` and ``floor_ratio = median(√(CRLB² + err²)) / median(CRLB)``:
    the ratio an estimator at the bound would get against these noisy references (Gaussian
    errors; only as good as the reference errors are)."""
    res = mae_over_crlb(residuals, crlb, snr, edges=[0.0, goal_snr, math.inf], label_names=label_names, mask=mask)
    key = f">={goal_snr:g}"
    r = np.atleast_2d(np.asarray(residuals, np.float64))
    c = np.atleast_2d(np.asarray(crlb, np.float64))
    rows = np.asarray(snr, np.float64) >= goal_snr
    if mask is not None:
        rows &= np.asarray(mask, bool)
    out: dict[str, dict[str, Any]] = {}
    for j, (name, per) in enumerate(res.items()):
        v = dict(per[key])
        if reference_err is not None:
            e = np.atleast_2d(np.asarray(reference_err, np.float64))[:, j]
            ok = rows & np.isfinite(r[:, j]) & np.isfinite(c[:, j]) & (c[:, j] > 0) & np.isfinite(e)
            if ok.any():
                v["median_reference_err"] = float(np.median(e[ok]))
                v["floor_ratio"] = float(np.median(np.hypot(c[ok, j], e[ok])) / np.median(c[ok, j]))
            else:
                v["median_reference_err"] = v["floor_ratio"] = math.nan
        ok_goal = None if not (v["n"] and math.isfinite(v["ratio"])) else bool(v["ratio"] <= goal_ratio)
        out[name] = {**v, "within_2x": ok_goal}
    return out


def crlb_report(
    model_fn: ModelFn,
    bounds: tuple[Sequence[float], Sequence[float]],
    *,
    labels_at: np.ndarray,
    snr: np.ndarray,
    flux_err: np.ndarray,
    pix_mask: np.ndarray,
    grid: str,
    model_grid: str,
    label_names: Sequence[str],
    reference: np.ndarray | None = None,
    reference_err: np.ndarray | None = None,
    pred: np.ndarray | None = None,
    groups: Mapping[str, np.ndarray] | None = None,
    goal_group: str = "giants",
    edges: Sequence[float] = DEFAULT_SNR_EDGES,
    noise: str = "flux_err",
    steps: Sequence[float] | None = None,
    chunk: int = 128,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The CRLB section of an evaluation: per-star bound at ``labels_at`` and the network's
    MAE/CRLB per label per SNR bin, per group of stars.

    Arrays are rows of one split (already subset): ``labels_at`` (N, L) physical units in the
    order ``label_names`` (the model's labels), ``snr`` (N,), ``flux_err`` / ``pix_mask`` (N, P)
    on the data grid ``grid`` (mapped to ``model_grid``); ``reference`` (N, L) labels the
    residuals are taken against (default ``labels_at``) and ``reference_err`` (N, L) their 1-σ
    errors (optional: adds the catalogue-noise floor to the goal, see :func:`crlb_goal`),
    ``pred`` (N, L) predictions (NaN where
    a label is not predicted; None = bound only); ``groups`` name → bool (N,) (``"all"`` is always
    added). Only stars with finite labels and SNR inside ``bounds`` count (counts in the result).
    ``noise``: one of :data:`NOISE_MODELS`. Returns a JSON-able dict with ``crlb_by_bin``
    (median σ per group), ``mae_over_crlb`` (per group) and ``goal`` (``goal_group`` at
    SNR ≥ :data:`GOAL_SNR`, met if every label with stars there is within :data:`GOAL_RATIO`;
    None if none has), or ``skipped`` and
    ``reason`` when no star is inside the box.
    """
    t0 = time.perf_counter()
    names = list(label_names)
    labels_at = np.atleast_2d(np.asarray(labels_at, np.float64))
    snr = np.asarray(snr, np.float64)
    if noise not in NOISE_MODELS:
        raise ValueError(f"unknown noise model {noise!r}; choose from {list(NOISE_MODELS)}")
    sel_mask, counts = box_selection(labels_at, snr, bounds[0], bounds[1])
    sel = np.flatnonzero(sel_mask)
    h = _steps_array(steps, len(names), names)
    out: dict[str, Any] = {
        **counts, "label_names": names, "label_units": [LABEL_UNITS.get(n, "") for n in names],
        "box": {n: [float(a), float(b)] for n, a, b in zip(names, bounds[0], bounds[1])},
        "grid": grid, "model_grid": model_grid, "noise": noise, "noise_description": NOISE_DESCRIPTIONS[noise],
        "snr_edges": [float(e) for e in edges], "steps": h.tolist(),
    }
    if sel.size == 0:
        out.update(skipped=True, reason="no star with finite labels inside the spectral model's label box",
                   seconds=time.perf_counter() - t0)
        return out
    good = to_model_grid(np.asarray(pix_mask)[sel].astype(bool), grid, model_grid, False)
    ferr = to_model_grid(np.asarray(flux_err)[sel].astype(np.float64), grid, model_grid, np.inf)
    crlb = compute_crlb(model_fn, labels_at[sel], snr[sel], ferr, good, bounds, noise_models=(noise,),
                        steps=h, chunk=chunk, progress=progress)[noise]
    snr_s = snr[sel]
    grp = {"all": np.ones(sel.size, bool)}
    for g, m in (groups or {}).items():
        if g != "all":
            grp[g] = np.asarray(m, bool)[sel]
    order = [g for g in grp if g != "all"] + ["all"]
    out["n_by_group"] = {g: int(grp[g].sum()) for g in order}
    out["crlb_by_bin"] = {g: crlb_by_bin(crlb, snr_s, edges=edges, label_names=names, mask=grp[g]) for g in order}
    if pred is not None:
        ref = labels_at if reference is None else np.atleast_2d(np.asarray(reference, np.float64))
        res = np.atleast_2d(np.asarray(pred, np.float64))[sel] - ref[sel]
        out["definition"] = RATIO_DEFINITION
        out["gauss_mae_factor"] = GAUSS_MAE_FACTOR
        out["mae_over_crlb"] = {g: mae_over_crlb(res, crlb, snr_s, edges=edges, label_names=names, mask=grp[g])
                                for g in order}
        if goal_group in grp:
            err = None if reference_err is None else np.atleast_2d(np.asarray(reference_err, np.float64))[sel]
            per = crlb_goal(res, crlb, snr_s, grp[goal_group], label_names=names, reference_err=err)
            verdicts = [v["within_2x"] for v in per.values() if v["within_2x"] is not None]
            met = all(verdicts) if verdicts else None  # over the labels that have stars
            out["goal"] = {"group": goal_group, "snr_min": GOAL_SNR, "max_ratio": GOAL_RATIO, "labels": per, "met": met}
    out["seconds"] = time.perf_counter() - t0
    return out
