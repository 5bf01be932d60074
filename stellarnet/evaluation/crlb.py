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
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from stellarnet.common.labels import LABEL_UNITS
from stellarnet.evaluation.crlb_summary import GAUSS_MAE_FACTOR, RATIO_DEFINITION, crlb_by_bin, mae_over_crlb
from stellarnet.evaluation.fisher import ModelFn, _steps_array, crlb_sigma, fisher_matrix, jacobian
from stellarnet.evaluation.metrics import DEFAULT_SNR_EDGES
from stellarnet.io import grids

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
