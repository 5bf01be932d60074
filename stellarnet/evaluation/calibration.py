"""Calibration of predicted (Gaussian) uncertainties.

A model predicts, per star and label, a mean ``pred`` and a total standard deviation ``sigma``
(same physical unit as the label: K for Teff, dex otherwise). With the truth ``true`` and,
optionally, the catalogue error of the truth ``err`` (same unit), the normalized residual is

    z = (pred − true) / sqrt(sigma² + err²)

which is N(0, 1) for perfectly calibrated uncertainties. The metrics here are the standard
deviation and robust (1.4826·MAD) standard deviation of z, the coverage of the central 1σ and 2σ
intervals (expected 0.683 and 0.954) and the reliability curve (expected vs observed coverage of
central Gaussian intervals over a grid of probability levels).

:func:`fit_sigma_scale` fits, per label on a validation split, a factor ``s`` multiplying the
predicted ``sigma`` so that z has unit variance (or unit robust scatter); :func:`apply_sigma_scale`
applies it to the test split. :func:`fit_sigma_two_term` fits ``sqrt((a·σ)² + (b·σ_floor)²)``
for a σ that shrinks with S/N plus one that carries a systematic floor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import optimize, special

from stellarnet.common.stats import (MAD_TO_SIGMA, OUTLIER_CLIP_SIGMA, refit_without_outliers, total_sigma, z_scores,
                                     z_stats)
from stellarnet.evaluation.metrics import _as_2d, _label_list

COVERAGE_1SIGMA = float(special.erf(1 / math.sqrt(2)))  # 0.6827
COVERAGE_2SIGMA = float(special.erf(2 / math.sqrt(2)))  # 0.9545
DEFAULT_LEVELS: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 20)) + (0.99,)


def gaussian_interval_halfwidth(level: np.ndarray | float) -> np.ndarray:
    """Half-width in σ of the central interval of a unit Gaussian containing ``level``."""
    return np.sqrt(2.0) * special.erfinv(np.asarray(level, dtype=float))


def reliability_curve(z: np.ndarray, levels: Sequence[float] = DEFAULT_LEVELS) -> dict[str, list[float]]:
    """Expected vs observed coverage of central intervals.

    For each probability ``p`` in ``levels`` the observed coverage is the fraction of finite z with
    ``|z| ≤ sqrt(2)·erfinv(p)``; a calibrated model has observed = expected = p.
    """
    z = np.asarray(z, dtype=float).ravel()
    z = np.abs(z[np.isfinite(z)])
    lv = np.asarray(levels, dtype=float)
    hw = gaussian_interval_halfwidth(lv)
    obs = [float(np.mean(z <= h)) if z.size else math.nan for h in hw]
    return {"expected": [float(x) for x in lv], "observed": obs}


def calibration_metrics(
    pred: np.ndarray,
    true: np.ndarray,
    sigma: np.ndarray,
    err: np.ndarray | None = None,
    *,
    levels: Sequence[float] = DEFAULT_LEVELS,
) -> dict[str, Any]:
    """Calibration of one label (1-D arrays, physical units).

    Returns ``n``, ``z_mean``, ``z_std``, ``z_robust_std`` (1.4826·MAD), ``coverage_1sigma``
    (expected 0.683), ``coverage_2sigma`` (expected 0.954), ``mean_sigma`` (label unit),
    ``reliability`` (see :func:`reliability_curve`) and ``calibration_error`` (mean
    |observed − expected| over the levels).
    """
    z = z_scores(pred, true, sigma, err).ravel()
    s = total_sigma(sigma, err).ravel()
    ok = np.isfinite(z)
    z, s = z[ok], s[ok]
    n = int(z.size)
    rel = reliability_curve(z, levels)
    if n == 0:
        nan = math.nan
        return {"n": 0, "z_mean": nan, "z_std": nan, "z_robust_std": nan, "coverage_1sigma": nan,
                "coverage_2sigma": nan, "mean_sigma": nan, "reliability": rel, "calibration_error": nan}
    zs = z_stats(z)
    return {
        "n": n,
        "z_mean": float(np.mean(z)),
        "z_std": zs["z_std"],
        "z_robust_std": float(MAD_TO_SIGMA * np.median(np.abs(z - np.median(z)))),
        "coverage_1sigma": zs["coverage_1sigma"],
        "coverage_2sigma": float(np.mean(np.abs(z) <= 2.0)),
        "mean_sigma": float(np.mean(s)),
        "reliability": rel,
        "calibration_error": float(np.mean(np.abs(np.subtract(rel["observed"], rel["expected"])))),
    }


def calibration_report(
    pred: np.ndarray,
    true: np.ndarray,
    sigma: np.ndarray,
    err: np.ndarray | None = None,
    label_names: Sequence[str] | None = None,
    *,
    levels: Sequence[float] = DEFAULT_LEVELS,
) -> dict[str, dict[str, Any]]:
    """:func:`calibration_metrics` per column of (N, L) arrays, keyed by label name."""
    pred = _as_2d(np.asarray(pred, dtype=float))
    true = _as_2d(np.asarray(true, dtype=float))
    sigma = _as_2d(np.asarray(sigma, dtype=float))
    e = None if err is None else _as_2d(np.asarray(err, dtype=float))
    names = _label_list(label_names, pred.shape[1])
    return {
        name: calibration_metrics(pred[:, j], true[:, j], sigma[:, j], None if e is None else e[:, j], levels=levels)
        for j, name in enumerate(names)
    }


def _fit_scale_1d(r: np.ndarray, s: np.ndarray, e: np.ndarray, method: str, bounds: tuple[float, float]) -> float:
    """Scale k so that r / sqrt((k s)² + e²) has unit RMS (method "rms") or robust std ("robust")."""
    ok = np.isfinite(r) & np.isfinite(s) & (s > 0)
    r, s, e = r[ok], s[ok], e[ok]
    if r.size < 2:
        return math.nan
    if method == "rms":
        def f(k: float) -> float:
            return float(np.mean(r**2 / ((k * s) ** 2 + e**2))) - 1.0
    elif method == "robust":
        def f(k: float) -> float:
            z = r / np.sqrt((k * s) ** 2 + e**2)
            return float(MAD_TO_SIGMA * np.median(np.abs(z - np.median(z)))) - 1.0
    else:
        raise ValueError(f"unknown method {method!r} (use 'rms' or 'robust')")
    lo, hi = bounds
    flo, fhi = f(lo), f(hi)
    if flo <= 0:  # catalogue errors alone already explain (or over-explain) the residuals
        return float(lo)
    if fhi >= 0:
        return float(hi)
    return float(optimize.brentq(f, lo, hi, xtol=1e-6, rtol=1e-8))


def fit_sigma_scale(
    pred: np.ndarray,
    true: np.ndarray,
    sigma: np.ndarray,
    err: np.ndarray | None = None,
    *,
    method: str = "rms",
    bounds: tuple[float, float] = (1e-3, 1e3),
    clip_sigma: float | None = OUTLIER_CLIP_SIGMA,
) -> np.ndarray:
    """Per-label post-hoc factor ``k`` for the predicted σ, fitted on a validation split.

    Solves, per label, ``std(z) = 1`` with ``z = (pred − true) / sqrt((k·sigma)² + err²)``
    (``method="rms"``: mean(z²) = 1, the Gaussian maximum-likelihood scale when ``err`` is None;
    ``method="robust"``: 1.4826·MAD(z) = 1, insensitive to outliers). Only the predicted σ is
    scaled, the catalogue error ``err`` is kept. ``k`` is clipped to ``bounds``; NaN if a label has
    fewer than 2 usable rows. Rows whose z lies beyond ``clip_sigma`` robust σ are left out and ``k``
    refitted (a reference catalogue's failed fits; None: every row).

    Parameters are (N, L) or (N,) arrays in physical units; returns an (L,) array (dimensionless).
    """
    pred = np.asarray(pred, dtype=float)
    one_d = pred.ndim == 1
    P = pred.reshape(len(pred), -1)
    T = np.asarray(true, dtype=float).reshape(P.shape)
    S = np.asarray(sigma, dtype=float).reshape(P.shape)
    E = np.zeros_like(P) if err is None else np.nan_to_num(np.asarray(err, dtype=float).reshape(P.shape), nan=0.0)
    R = P - T
    k = np.array([_fit_scale_clipped(R[:, j], S[:, j], E[:, j], method, bounds, clip_sigma)
                  for j in range(P.shape[1])])
    return k[:1] if one_d else k


def _fit_scale_clipped(r: np.ndarray, s: np.ndarray, e: np.ndarray, method: str, bounds: tuple[float, float],
                       clip_sigma: float | None) -> float:
    """:func:`_fit_scale_1d` refitted without the rows whose z lies beyond ``clip_sigma`` robust σ
    (:func:`~stellarnet.common.stats.refit_without_outliers`; None: all rows)."""
    return refit_without_outliers(lambda use: _fit_scale_1d(r[use], s[use], e[use], method, bounds),
                                  lambda k: r / np.sqrt((k * s) ** 2 + e**2),
                                  np.isfinite(r) & np.isfinite(s) & (s > 0), clip_sigma, 2)[0]


def fit_sigma_two_term(
    pred: np.ndarray,
    true: np.ndarray,
    sigma: np.ndarray,
    sigma_floor: np.ndarray,
    err: np.ndarray | None = None,
    *,
    bounds: tuple[float, float] = (1e-3, 1e3),
    unresolved_floor: str = "ml",
    clip_sigma: float | None = OUTLIER_CLIP_SIGMA,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-label ``(a, b)`` of the σ model ``sqrt((a·sigma)² + (b·sigma_floor)²)``, fitted on a
    validation split by Gaussian maximum likelihood with ``pred − true ~ N(0, model² + err²)``.
    ``unresolved_floor="upper"``: where the data cannot exclude b = 0, b is the upper end of its
    68 % profile-likelihood interval instead (:func:`_floor_if_unresolved`).

    ``sigma`` is a statistical σ that shrinks with S/N (e.g. the formal σ of a χ² fit),
    ``sigma_floor`` one that does not (e.g. the network's σ, which carries its systematic floor):
    a single scale on ``sigma`` over-covers at low S/N and under-covers at high S/N when the
    errors have a floor. ``b`` may come out ~0 (no floor needed). Arrays (N, L) or (N,) in
    physical units; returns two (L,) arrays, NaN where a label has fewer than 3 usable rows. Rows
    whose z lies beyond ``clip_sigma`` robust σ of the fit are left out and (a, b) refitted (a
    reference catalogue's failed fits would otherwise inflate both; None: every row).
    """
    P = np.asarray(pred, dtype=float)
    P = P.reshape(len(P), -1)
    R = P - np.asarray(true, dtype=float).reshape(P.shape)
    S = np.asarray(sigma, dtype=float).reshape(P.shape)
    F = np.asarray(sigma_floor, dtype=float).reshape(P.shape)
    E = np.zeros_like(P) if err is None else np.nan_to_num(np.asarray(err, dtype=float).reshape(P.shape), nan=0.0)
    a_out = np.full(P.shape[1], np.nan)
    b_out = np.full(P.shape[1], np.nan)
    lo, hi = np.log(bounds[0]), np.log(bounds[1])
    for j in range(P.shape[1]):
        ok = np.isfinite(R[:, j]) & np.isfinite(S[:, j]) & np.isfinite(F[:, j]) & (S[:, j] > 0) & (F[:, j] >= 0)
        if ok.sum() < 3:
            continue
        def z(fitted: tuple[Any, Any]) -> np.ndarray:
            a, b = np.exp(np.clip(fitted[1].x, lo, hi))
            return R[:, j] / np.sqrt((a * S[:, j]) ** 2 + (b * F[:, j]) ** 2 + E[:, j] ** 2)

        (nll, best), _ = refit_without_outliers(
            lambda use: _fit_two_term_ml(R[use, j], S[use, j], F[use, j], E[use, j], bounds), z, ok, clip_sigma, 3)
        a_out[j], b_out[j] = np.exp(np.clip(best.x, lo, hi))
        if unresolved_floor == "upper":
            a_out[j], b_out[j] = _floor_if_unresolved(nll, best.fun, a_out[j], b_out[j], bounds)
    return a_out, b_out


def _fit_two_term_ml(r: np.ndarray, s: np.ndarray, f: np.ndarray, e: np.ndarray,
                     bounds: tuple[float, float]) -> tuple[Any, Any]:
    """The negative log-likelihood of (log a, log b) for residuals ``r`` ~ N(0, (a s)² + (b f)² + e²)
    and its minimum (a scipy ``OptimizeResult``; ``x`` = (log a, log b), unclipped)."""
    lo, hi = np.log(bounds[0]), np.log(bounds[1])
    r2, s2, f2, e2 = r**2, s**2, f**2, e**2

    def nll(q: np.ndarray) -> float:
        v = np.exp(2 * q[0]) * s2 + np.exp(2 * q[1]) * f2 + e2
        v = np.maximum(v, 1e-300)
        return float(0.5 * np.sum(r2 / v + np.log(v)))

    a0 = _fit_scale_1d(r, s, e, "rms", bounds)
    a0 = a0 if np.isfinite(a0) else 1.0
    best = None
    for q0 in ([np.log(a0), np.log(1e-2)], [np.log(a0) - 0.5, np.log(0.3)]):
        res = optimize.minimize(nll, np.clip(q0, lo, hi), method="Nelder-Mead",
                                options={"xatol": 1e-4, "fatol": 1e-6, "maxiter": 2000})
        if best is None or res.fun < best.fun:
            best = res
    return nll, best


def _floor_if_unresolved(nll: Any, nll_min: float, a: float, b: float, bounds: tuple[float, float],
                         delta: float = 0.5) -> tuple[float, float]:
    """(a, b) at the upper end of b's 68 % profile-likelihood interval when the data cannot exclude
    b = 0 (no floor), else the maximum-likelihood (a, b) unchanged.

    A floor the validation labels cannot resolve (their own errors dwarf it, e.g. catalogue Teff
    errors of ~50 K against a refined σ of ~5 K) is not assumed to be zero: the largest floor the
    data allow at 1σ (Δ NLL = 0.5) is used, with ``a`` refitted for it — a σ that is honest rather
    than optimistic when it cannot be measured.
    """
    lo, hi = np.log(bounds[0]), np.log(bounds[1])

    def profile(log_b: float) -> tuple[float, float]:
        res = optimize.minimize_scalar(lambda la: nll(np.array([la, log_b])), bounds=(lo, hi), method="bounded",
                                       options={"xatol": 1e-4})
        return float(res.fun), float(res.x)

    if profile(lo)[0] - nll_min > delta:  # b = 0 excluded: the floor is measured
        return a, b
    grid = np.linspace(np.log(max(b, bounds[0])), np.log(min(10.0, bounds[1])), 60)
    best = (a, b)
    for log_b in grid:
        value, log_a = profile(log_b)
        if value - nll_min > delta:
            break
        best = (float(np.exp(log_a)), float(np.exp(log_b)))
    return best


def apply_sigma_scale(sigma: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``sigma * scale`` broadcast over rows; labels with a NaN scale are left unchanged."""
    scale = np.asarray(scale, dtype=float)
    scale = np.where(np.isfinite(scale), scale, 1.0)
    sigma = np.asarray(sigma, dtype=float)
    return sigma * (scale if sigma.ndim > 1 else scale.reshape(-1)[0])


# --------------------------------------------------------------------------------------------
# class probabilities: temperature scaling (Guo et al. 2017) and expected calibration error
# --------------------------------------------------------------------------------------------
def expected_calibration_error(probs: np.ndarray, codes: np.ndarray, n_bins: int = 15) -> float:
    """ECE: Σ_bins (n_bin / N) |accuracy − mean confidence| over equal-width confidence bins of
    the top-class probability; rows with code −1 are ignored (NaN when none is left)."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(codes).astype(int).ravel()
    keep = (y >= 0) & np.isfinite(p).all(1)
    p, y = p[keep], y[keep]
    if not len(y):
        return float("nan")
    conf = p.max(1)
    correct = p.argmax(1) == y
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1]), 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        sel = which == b
        if sel.any():
            ece += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return float(ece)


def fit_temperature(probs: np.ndarray, codes: np.ndarray, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """Temperature T minimizing the negative log-likelihood of ``codes`` under ``probs`` ** (1/T)
    (renormalized; the same as softmax(logits / T)); rows with code −1 are ignored. Returns 1.0
    when fewer than 10 rows are usable."""
    from stellarnet.network.inference import apply_temperature

    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(codes).astype(int).ravel()
    keep = (y >= 0) & (y < p.shape[1]) & np.isfinite(p).all(1)
    p, y = p[keep], y[keep]
    if len(y) < 10:
        return 1.0

    def nll(log_t: float) -> float:
        q = apply_temperature(p, float(np.exp(log_t)))
        return float(-np.mean(np.log(np.maximum(q[np.arange(len(y)), y], 1e-300))))

    res = optimize.minimize_scalar(nll, bounds=(np.log(bounds[0]), np.log(bounds[1])), method="bounded",
                                   options={"xatol": 1e-4})
    return float(np.exp(res.x))
