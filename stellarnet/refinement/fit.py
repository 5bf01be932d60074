"""The χ² refinement fit (The Payne's fitting step): per star, damped Gauss–Newton minimization of
χ² = Σ w (f − model(θ) · (1 + continuum correction))² from the network's labels, through a
:class:`~stellarnet.refinement.emulator.SpectrumEmulator`, with a per-chip continuum correction, an optional
line-shape (LSF width / velocity) nuisance, iterative pixel and chip-segment clipping, the formal σ from
(JᵀWJ)⁻¹ (× a correlated-noise factor), the reduced χ² and the residuals' companion score
(double-lined binaries). Reads no files."""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from stellarnet.refinement.basis import (
    _chips,
    _segment_clip,
    chip_segments,
    continuum_basis,
    continuum_spline_basis,
    fit_weights,
)
from stellarnet.refinement.emulator import SpectrumEmulator
from stellarnet.refinement.residuals import NOISE_LAGS, _chip_straddles, companion_score, noise_correlation_factor

#: the keyword arguments of :func:`refine_labels` a saved refinement stage may set
FIT_KEYS = ("iters", "clip_rounds", "clip_iters", "clip_threshold", "damping", "bound", "continuum_degree",
            "continuum_knots", "pixel_clip", "fit_lsf", "lsf_per_chip", "noise_correlation")


def fit_settings(settings: Mapping[str, Any] | None) -> dict[str, Any]:
    """The :func:`refine_labels` keywords (:data:`FIT_KEYS`) among ``settings`` (others are ignored)."""
    return {k: v for k, v in (settings or {}).items() if k in FIT_KEYS}


@dataclass
class RefineResult:
    """Refined labels (N, L) in physical units, their formal σ (from (JᵀWJ)⁻¹, physical units),
    the reduced χ² of the fit (N,), the number of masked segments (N,), the fraction of good
    pixels used (N,), the fraction of the usable pixels rejected as outliers (N,) and, when fitted, the
    change of the LSF variance (N,) in pixels² and the residual shift (N,) in pixels, and the residuals'
    pixel-to-pixel correlations (N, 2) at lags 1 and 2, and the companion score (N,)
    (:func:`companion_score`: the fit residuals' best match to the star's own lines at another velocity),
    and ``outlier_pixels``: (rows, columns) int64 arrays of the single pixels rejected as outliers (those
    counted in ``outlier_fraction``; chip segments dropped as a whole are not in it); with ``return_model``
    also ``model_flux`` (N, P) the fitted model (emulator × continuum correction, line shape applied) and
    ``fit_weight`` (N, P) the weights the final fit used (0: masked, clipped or dropped), NaN / 0 where not fit;
    with ``members`` ``emulator_spread`` (N, L): the RMS change of the labels (physical units) were the fit
    made with each member emulator instead (:func:`refine_labels`)."""

    labels: np.ndarray
    sigma: np.ndarray
    chi2: np.ndarray
    masked_segments: np.ndarray
    pixel_fraction: np.ndarray
    outlier_fraction: np.ndarray | None = None
    lsf_variance: np.ndarray | None = None
    shift: np.ndarray | None = None
    noise_correlation: np.ndarray | None = None
    companion: np.ndarray | None = None
    outlier_pixels: tuple[np.ndarray, np.ndarray] | None = None
    model_flux: np.ndarray | None = None
    fit_weight: np.ndarray | None = None
    emulator_spread: np.ndarray | None = None


#: lower limit of the reduced χ² by which the fit's σ and residuals are scaled (errors quoted 3x too large at most)
CHI2_SCALE_FLOOR = 0.1


#: the clip before the first Gauss–Newton step, against the starting model (the network's labels, no
#: continuum correction yet), is this many times ``pixel_clip``: only what no label error explains goes
GROSS_CLIP_FACTOR = 4.0


def _pixel_clip(resid: torch.Tensor, w: torch.Tensor, threshold: float) -> torch.Tensor:
    """Weights with outlier pixels set to 0: ``|f − model| √w`` above ``threshold`` × the star's
    robust scatter of those normalized residuals (1.4826 × MAD, at least 1, so a spectrum whose
    errors are quoted too small is not clipped wholesale). At most 20 % of a star's pixels go."""
    t = resid.abs() * w.sqrt()
    used = w > 0
    mad = torch.where(used, t, torch.full_like(t, float("nan"))).nanmedian(dim=1, keepdim=True).values
    scale = (1.4826 * mad).nan_to_num(1.0).clamp_min(1.0)
    bad = used & (t > threshold * scale)
    too_many = bad.sum(1) > 0.2 * used.sum(1)
    bad[too_many] = False
    return w * (~bad).to(w.dtype)


def _jacobian_and_flux(model: SpectrumEmulator) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Batched ``z (n, L) -> (∂flux/∂z (n, P, L), flux (n, P))`` in one forward-mode pass."""

    def one(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = model(z)
        return y, y

    return torch.func.vmap(torch.func.jacfwd(one, has_aux=True))


#: bounds of the fitted nuisances: the change of the LSF variance (pixels²; APOGEE's σ² ≈ 1.9 px²) and
#: the velocity shift (pixels; 1 px ≈ 4.1 km/s)
LSF_VARIANCE_BOUND = 2.0


SHIFT_BOUND = 1.0


#: Gaussian prior widths of the line-shape nuisances: LSF variance change 0.6 px² (≈ ±15 % in width
#: at 1σ, the spread of APOGEE's fibres), shift 0.25 px (≈ 1 km/s); they keep the marginalization's
#: cost in precision small on spectra that need neither
LINE_SHAPE_PRIOR = (0.6, 0.25)


def _with_prior(A: torch.Tensor, b: torch.Tensor | None, u: torch.Tensor,
                L: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Add the line-shape nuisances' Gaussian prior (:data:`LINE_SHAPE_PRIOR`, centred on 0) to the normal
    equations: precision on the diagonal of their block of A, −precision·u to b. ``u`` (n, U): the LSF
    variance change(s) (one, or one per chip), then the shift."""
    U = u.shape[1]
    prec = torch.tensor([1.0 / LINE_SHAPE_PRIOR[0] ** 2] * (U - 1) + [1.0 / LINE_SHAPE_PRIOR[1] ** 2],
                        dtype=A.dtype, device=A.device)
    A = A.clone()
    A[:, L:L + U, L:L + U] += torch.diag(prec)
    if b is not None:
        b = b.clone()
        b[:, L:L + U] -= prec * u
    return A, b


def _line_shape_mask(n_pixels: int, grid: str | None, per_chip: bool = False) -> torch.Tensor:
    """(P,) float32 mask of the pixels where the line-shape nuisances are defined: all but the two ends
    of each chip; with ``per_chip`` one such row per chip, (C, P): each chip its own LSF change."""
    chips = _chips(n_pixels, grid)
    inner = torch.zeros(len(chips), n_pixels)
    for c, sl in enumerate(chips):
        inner[c, sl.start + 1:sl.stop - 1] = 1.0
    return inner if per_chip else inner.sum(0)


def _second_difference(m: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """∂²m/∂x² (n, P) by second differences, zero at the chip ends."""
    d = torch.zeros_like(m)
    d[:, 1:-1] = m[:, 2:] - 2.0 * m[:, 1:-1] + m[:, :-2]
    return d * inner


def _first_difference(m: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """∂m/∂x (n, P) by central differences, zero at the chip ends."""
    d = torch.zeros_like(m)
    d[:, 1:-1] = 0.5 * (m[:, 2:] - m[:, :-2])
    return d * inner


def _line_shape(m: torch.Tensor, u: torch.Tensor, inner: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The emulator flux with the line-shape nuisances ``u`` (n, U) applied to second order, and their
    derivatives (n, P, U). u[:, :-1] = s: LSF variance change (pixels²; the heat equation
    G_s * m = m + (s/2)∇²m + (s²/8)∇⁴m + …), one for the spectrum (``inner`` (P,)) or one per chip
    (``inner`` (C, P), :func:`_line_shape_mask`); u[:, -1] = δ: a shift (pixels, positive = redward;
    m(x − δ) = m − δ m′ + (δ²/2) m″ + …)."""
    dl = u[:, -1:]
    if inner.dim() == 2:  # per chip: s at each pixel is its chip's
        chips, inner = inner, inner.sum(0)
        s = u[:, :-1] @ chips
    else:
        chips, s = None, u[:, :1]
    m2 = _second_difference(m, inner)
    d1 = 0.5 * m2
    d2 = 0.25 * _second_difference(d1, inner)
    g1 = _first_difference(m, inner)
    flux = m + s * d1 + 0.5 * s * s * d2 - dl * g1 + 0.5 * dl * dl * m2
    ds = d1 + s * d2
    ds = ds[..., None] if chips is None else ds[..., None] * chips.T
    return flux, torch.cat([ds, (-g1 + dl * m2)[..., None]], 2)


def _emulate(model: SpectrumEmulator, z: torch.Tensor, u: torch.Tensor | None, inner: torch.Tensor | None,
             jacobian: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Emulator flux (n, P) with the line-shape nuisances ``u`` applied (when not None), and with
    ``jacobian`` its Jacobian (n, P, L [+2]): the labels' columns (of the emulator itself), then the
    nuisances' columns."""
    if not jacobian:
        m = model(z)
        return None, m if u is None else _line_shape(m, u, inner)[0]
    J, m = _jacobian_and_flux(model)(z)
    if u is None:
        return J, m
    m_u, d = _line_shape(m, u, inner)
    return torch.cat([J, d], 2), m_u


def _system(model: SpectrumEmulator, z: torch.Tensor, c: torch.Tensor, basis: torch.Tensor, w: torch.Tensor,
            f: torch.Tensor | None, u: torch.Tensor | None, inner: torch.Tensor | None
            ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The normal equations at ``(z, c, u)``: JᵀWJ, JᵀW r (None without ``f``) and the model flux, with
    the line-shape nuisances' prior when ``u`` is fitted; then the emulator's Jacobian (n, P, L + U)
    and flux (n, P) they were built from."""
    J, m = _emulate(model, z, u, inner, jacobian=True)  # (n, P, L + U), (n, P)
    A, b, model_flux = _normal_equations(J, m, c, basis, w, f)
    if u is not None:
        A, b = _with_prior(A, b, u, z.shape[1])
    return A, b, model_flux, J, m


def _influence(last: tuple[torch.Tensor, torch.Tensor], A_inv: torch.Tensor, c: torch.Tensor, basis: torch.Tensor,
               sw: torch.Tensor, L: int) -> torch.Tensor:
    """The labels' influence vectors √W Ĵ (JᵀWJ)⁻¹[:, :L] (n, P, L) of the fit model
    ``emulator (1 + basis c)``: Ĵ = [J · (1 + basis c) | emulator flux × basis] from the emulator's
    Jacobian J (n, P, L + U) and flux (n, P) of the last step; ``sw`` = √W (n, P)."""
    J, m = last
    D = J.shape[2]
    cont_w = (1.0 + c @ basis.T) * sw
    v = J @ A_inv[:, :D, :L]
    v.mul_(cont_w[..., None]).add_((m * sw)[..., None] * (basis @ A_inv[:, D:, :L]))
    return v


def _gauss_newton(model: SpectrumEmulator, z: torch.Tensor, c: torch.Tensor, basis: torch.Tensor, f: torch.Tensor,
                  w: torch.Tensor, iters: int, damping: float, bound: float, u: torch.Tensor | None = None,
                  inner: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None,
                             tuple[torch.Tensor, torch.Tensor] | None]:
    """Damped Gauss–Newton steps on χ² = Σ w (f − model(z) (1 + basis c))² for the standardized
    labels ``z`` (n, L), the continuum coefficients ``c`` (n, K) and, when ``u`` is given, the
    line-shape nuisances u (n, 2) together. Returns ``(z, c, A, u, (J, m))`` with the undamped JᵀWJ
    ``A`` of the last step, for the formal covariance, and the emulator's Jacobian and flux it was
    built from (None, None if ``iters`` is 0)."""
    L = z.shape[1]
    U = 0 if u is None else u.shape[1]
    eye = torch.eye(L + U + c.shape[1], dtype=z.dtype, device=z.device)
    A, last = None, None
    for _ in range(iters):
        A, b, _, J, m = _system(model, z, c, basis, w, f, u, inner)
        last = (J, m)
        damped = A + damping * torch.diag_embed(torch.diagonal(A, dim1=1, dim2=2)) + 1e-9 * eye
        step = torch.linalg.solve(damped, b)
        z = (z + step[:, :L]).clamp(-bound, bound)
        if u is not None:
            u = u + step[:, L:L + U]
            u = torch.cat([u[:, :-1].clamp(-LSF_VARIANCE_BOUND, LSF_VARIANCE_BOUND),
                           u[:, -1:].clamp(-SHIFT_BOUND, SHIFT_BOUND)], 1)
        c = c + step[:, L + U:]
    return z, c, A, u, last


def _model_flux(model: SpectrumEmulator, z: torch.Tensor, c: torch.Tensor, basis: torch.Tensor,
                u: torch.Tensor | None = None, inner: torch.Tensor | None = None) -> torch.Tensor:
    """``model(z) (1 + basis c)`` (n, P): the emulator's flux (with the line-shape nuisances ``u``)
    times the continuum correction."""
    return _emulate(model, z, u, inner, jacobian=False)[1] * (1.0 + c @ basis.T)


_GRAM_PLANS: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # by id(basis), while it lives


def _weighted_gram(basis: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Bᵀ diag(vₙ) B (n, K, K) for a (P, K) basis and per-star pixel weights v (n, P), as one GEMM
    over the basis-function pairs that overlap somewhere (a per-chip basis is block-diagonal, a
    B-spline one banded: ~30 % of the K² pairs), without an (n, P, K) temporary. The pairs' (P, n_pairs)
    products are computed once per basis tensor."""
    plan = _GRAM_PLANS.get(id(basis))
    if plan is None:
        nz = basis != 0
        overlap = (nz.T.float() @ nz.float()) > 0
        k, l = torch.nonzero(torch.triu(overlap), as_tuple=True)
        plan = (basis[:, k] * basis[:, l], k, l)
        _GRAM_PLANS[id(basis)] = plan
        weakref.finalize(basis, _GRAM_PLANS.pop, id(basis), None)
    products, k, l = plan
    K = basis.shape[1]
    values = v @ products  # (n, n_pairs)
    gram = v.new_zeros(v.shape[0], K, K)
    gram[:, k, l] = values
    gram[:, l, k] = values
    return gram


def _normal_equations(J: torch.Tensor, m: torch.Tensor, c: torch.Tensor, basis: torch.Tensor, w: torch.Tensor,
                      f: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """JᵀWJ (n, L+K, L+K), JᵀW r (n, L+K) (None without ``f``) and the model flux (n, P) of
    ``model(z) (1 + basis c)``, from the emulator's Jacobian J (n, P, L) and flux m (n, P).

    The continuum columns m·T_k are never built: their blocks are products with the (P, K) basis,
    so the cost stays that of the L label columns."""
    cont = 1.0 + c @ basis.T
    model_flux = m * cont
    wc = w * cont
    Jt = J.transpose(1, 2)  # (n, L, P)
    A_zz = (Jt * (wc * cont)[:, None, :]) @ J
    A_zc = (Jt * (wc * m)[:, None, :]) @ basis  # (n, L, K)
    A_cc = _weighted_gram(basis, w * m * m)  # (n, K, K)
    A = torch.cat([torch.cat([A_zz, A_zc], 2), torch.cat([A_zc.transpose(1, 2), A_cc], 2)], 1)
    if f is None:
        return A, None, model_flux
    wr = w * (f - model_flux)
    b = torch.cat([(Jt @ (wr * cont)[..., None])[..., 0], (wr * m) @ basis], 1)
    return A, b, model_flux


def refine_labels(
    model: SpectrumEmulator,
    flux: np.ndarray,
    flux_err: np.ndarray,
    pix_mask: np.ndarray | None,
    init: np.ndarray,
    iters: int = 2,
    clip_rounds: int = 1,
    clip_iters: int = 1,
    clip_threshold: float = 2.0,
    damping: float = 1e-3,
    bound: float = 6.0,
    batch_size: int = 256,
    continuum_degree: int | None = 2,
    continuum_knots: float | None = None,
    pixel_clip: float | None = None,
    fit_lsf: bool = False,
    lsf_per_chip: bool = False,
    noise_correlation: bool = False,
    return_model: bool = False,
    members: Sequence[SpectrumEmulator] | None = None,
) -> RefineResult:
    """χ²-fit labels to spectra with ``model``, starting at ``init`` (N, L), physical units.

    ``iters`` damped Gauss–Newton steps, then ``clip_rounds`` × (mask anomalous chip segments,
    ``clip_iters`` more steps). Standardized labels are kept within ±``bound`` training standard
    deviations. Rows whose ``init`` is not finite come back as NaN.

    With ``continuum_degree`` ≥ 0 the model flux is ``model(θ) × (1 + Σ c_k T_k)`` with per-chip
    Chebyshev polynomials (:func:`continuum_basis`) whose coefficients are fitted with the labels:
    the continuum normalization of a noisy spectrum rests on ~180 continuum pixels per chip, and its
    error — coherent across the chip — would otherwise go into the labels. The formal σ are
    marginalized over the coefficients. None: no continuum correction. With ``continuum_knots`` (Å)
    the correction is a per-chip cubic B-spline with knots that far apart instead
    (:func:`continuum_spline_basis`; used when ``continuum_degree`` is not None).

    With ``pixel_clip`` (e.g. 5), each clip round also rejects single pixels whose residual against
    the current model is more than ``pixel_clip`` robust σ (:func:`_pixel_clip`): corrupted pixels that
    carry a finite error (sky-line and telluric residuals, unflagged cosmic rays) leave the fit,
    iteratively, as the model improves; pixels off the *starting* model by more than
    :data:`GROSS_CLIP_FACTOR` × ``pixel_clip`` robust σ (fill values, unflagged bad columns) leave it
    before the first step, so they cannot drag the continuum and the labels away. None: no pixel clipping.

    With ``fit_lsf`` the line shape is fitted as well, to second order (:func:`_line_shape`): a change s
    of the line-spread function's variance (pixels², within ±:data:`LSF_VARIANCE_BOUND`) and a residual
    shift δ (pixels, within ±:data:`SHIFT_BOUND`; a radial-velocity zero-point error of 1 km/s is
    0.24 px), each with a Gaussian prior (:data:`LINE_SHAPE_PRIOR`). Spectra from another fibre or
    spectrograph, whose lines are broader or narrower than the training survey's, or slightly off in
    velocity, do not bias the labels; σ is marginalized over both. They are returned in ``lsf_variance`` and ``shift``.
    With ``lsf_per_chip`` each chip has its own LSF change (an LSF that varies along the detector;
    ``lsf_variance`` is then the chips' mean).

    With ``noise_correlation`` the formal σ also allows for noise that neighbouring pixels share (the
    visits of a combined spectrum are resampled before they are added): each star's residual
    correlations at lags 1 and 2 scale each label's variance by :func:`noise_correlation_factor`
    (1 for white noise). The correlations are returned in ``noise_correlation`` (lag 1, lag 2).

    With ``return_model`` the fitted model spectra and the final fit weights are returned as well
    (``model_flux``, ``fit_weight``; 2 × 4 bytes × N × P more memory).

    With ``members`` (emulators of the same labels, standardization and pixels, trained on other
    subsets of the training stars: :func:`~stellarnet.refinement.training.train_members`) each star's
    labels are also moved to where each member's model would put them — to first order, the fit's
    influence vectors applied to the member's model minus the fitted one at the fitted labels and
    nuisances — and the RMS of those changes is returned as ``emulator_spread`` (N, L), physical
    units: the emulator's own sampling error, small where the training stars are dense, large where a
    few stars shape the model (the edges of the training set).
    """
    flux = np.asarray(flux, np.float32)
    if flux.ndim != 2 or flux.shape[1] != model.n_pixels:
        raise ValueError(f"flux must be (N, {model.n_pixels}) on the emulator's grid, got {flux.shape}")
    init = np.asarray(init, np.float64)
    if init.shape != (flux.shape[0], len(model.label_names)):
        raise ValueError(f"init must be ({flux.shape[0]}, {len(model.label_names)}), got {init.shape}")
    n, L = init.shape
    out = RefineResult(np.full((n, L), np.nan, np.float32), np.full((n, L), np.nan, np.float32),
                       np.full(n, np.nan, np.float32), np.zeros(n, np.int16), np.zeros(n, np.float32),
                       np.zeros(n, np.float32), np.full(n, np.nan, np.float32) if fit_lsf else None,
                       np.full(n, np.nan, np.float32) if fit_lsf else None,
                       np.full((n, len(NOISE_LAGS)), np.nan, np.float32) if noise_correlation else None,
                       np.full(n, np.nan, np.float32))
    if return_model:
        out.model_flux = np.full(flux.shape, np.nan, np.float32)
        out.fit_weight = np.zeros(flux.shape, np.float32)
    members = [mem.eval() for mem in members or []]
    for mem in members:
        if (mem.n_pixels != model.n_pixels or list(mem.label_names) != list(model.label_names)
                or not torch.allclose(mem.label_mean.cpu(), model.label_mean.cpu())
                or not torch.allclose(mem.label_std.cpu(), model.label_std.cpu())):
            raise ValueError("a member emulator must share the emulator's pixels, labels and label standardization")
    if members:
        out.emulator_spread = np.full((n, L), np.nan, np.float32)
    ok_rows = np.flatnonzero(np.isfinite(init).all(1))
    outlier_rows: list[np.ndarray] = []
    outlier_cols: list[np.ndarray] = []
    w_all = fit_weights(flux, flux_err, pix_mask)
    dev = model.label_mean.device
    seg = chip_segments(model.n_pixels, model.grid).to(dev)
    basis = (continuum_spline_basis(model.n_pixels, model.grid, continuum_knots)
             if continuum_knots is not None and continuum_degree is not None
             else continuum_basis(model.n_pixels, model.grid, continuum_degree)).to(dev)
    inner = _line_shape_mask(model.n_pixels, model.grid, lsf_per_chip).to(dev) if fit_lsf else None
    straddles = _chip_straddles(model.n_pixels, model.grid, dev) if noise_correlation else None
    chips = _chips(model.n_pixels, model.grid)
    n_shape = (len(chips) if lsf_per_chip else 1) + 1  # the LSF change(s), then the shift
    std = model.label_std.cpu().numpy()
    model = model.eval()
    with torch.no_grad():
        for s in range(0, len(ok_rows), batch_size):
            rows = ok_rows[s:s + batch_size]
            f = torch.from_numpy(np.nan_to_num(flux[rows], nan=1.0, posinf=1.0, neginf=1.0)).to(dev)
            w0 = torch.from_numpy(w_all[rows]).to(dev)
            w = w0
            z = model.standardize(torch.as_tensor(init[rows], dtype=torch.float32, device=dev)).clamp(-bound, bound)
            c = torch.zeros(len(rows), basis.shape[1], dtype=z.dtype, device=dev)
            shape = torch.zeros(len(rows), n_shape, dtype=z.dtype, device=dev) if fit_lsf else None  # (LSF Δσ², shift)
            if pixel_clip is not None:  # gross outliers leave before the first step
                w = _pixel_clip(f - _model_flux(model, z, c, basis, shape, inner), w,
                                GROSS_CLIP_FACTOR * float(pixel_clip))
            z, c, A, shape, last = _gauss_newton(model, z, c, basis, f, w, iters, damping, bound, shape, inner)
            w_seg = w0  # the weights after segment clipping only
            for _ in range(clip_rounds):
                resid = f - _model_flux(model, z, c, basis, shape, inner)
                w_new = _segment_clip(resid**2 * w, w, seg, clip_threshold)
                w_seg = torch.where((w > 0) & (w_new == 0), torch.zeros_like(w_seg), w_seg)  # dropped segments
                w = w_new
                if pixel_clip is not None:
                    w = _pixel_clip(resid, w, float(pixel_clip))
                z, c, A_clip, shape, last = _gauss_newton(model, z, c, basis, f, w, clip_iters, damping, bound,
                                                          shape, inner)
                A = A_clip  # None if clip_iters is 0: the weights changed, recomputed below
            if A is None:
                A, _, m, J_em, m_em = _system(model, z, c, basis, w, None, shape, inner)
                last = (J_em, m_em)
            else:  # JᵀWJ of the last (converged) step: one Jacobian fewer per star
                m = _model_flux(model, z, c, basis, shape, inner)
            A_inv = torch.linalg.pinv(A)
            var = torch.diagonal(A_inv[:, :L, :L], dim1=1, dim2=2)
            sw = w.sqrt()
            resid = (f - m) * sw  # normalized residuals of the fit
            influence = (_influence(last, A_inv, c, basis, sw, L)
                         if last is not None and (straddles is not None or members) else None)
            if straddles is not None and influence is not None:
                factor, rho = noise_correlation_factor(resid, influence, straddles)
                var = var * factor
                out.noise_correlation[rows] = rho.cpu().numpy()
            if members and influence is not None:  # Δz = ṽᵀ √W (m_member − m), per member
                moved = torch.stack([torch.einsum("np,npl->nl", (_model_flux(mem, z, c, basis, shape, inner) - m)
                                                  * sw, influence) for mem in members])
                out.emulator_spread[rows] = (moved.pow(2).mean(0).sqrt().cpu().numpy() * std).astype(np.float32)
            n_good = (w > 0).sum(1).clamp_min(1)
            chi2 = (resid * resid).sum(1) / n_good
            # residuals in units of their own scatter: a spectrum the model does not fit anywhere (χ² ≫ 1:
            # another spectral library, errors quoted too small) must not look like a companion
            cont = 1.0 + c @ basis.T
            scale = chi2.clamp_min(CHI2_SCALE_FLOOR).sqrt()[:, None]
            out.companion[rows] = companion_score(resid / scale, (m - cont) * sw, chips).cpu().numpy()
            out.labels[rows] = (z * model.label_std + model.label_mean).cpu().numpy()
            out.sigma[rows] = np.sqrt(np.clip(var.cpu().numpy(), 0, None)) * std
            out.chi2[rows] = chi2.cpu().numpy()
            masked = ((w0 > 0) & (w_seg == 0)).float() @ seg
            out.masked_segments[rows] = (masked > 0).sum(1).cpu().numpy().astype(np.int16)
            # single pixels dropped outside the masked segments: the outlier pixels
            outliers = (w_seg > 0) & (w == 0)
            out.outlier_fraction[rows] = (outliers.sum(1).float()
                                          / (w0 > 0).sum(1).clamp_min(1).float()).cpu().numpy()
            r_idx, c_idx = torch.nonzero(outliers, as_tuple=True)
            outlier_rows.append(rows[r_idx.cpu().numpy()])
            outlier_cols.append(c_idx.cpu().numpy())
            if shape is not None:
                out.lsf_variance[rows] = shape[:, :-1].mean(1).cpu().numpy()  # per chip: their mean
                out.shift[rows] = shape[:, -1].cpu().numpy()
            out.pixel_fraction[rows] = ((w > 0).sum(1).float() / max(1, model.n_pixels)).cpu().numpy()
            if return_model:
                out.model_flux[rows] = m.cpu().numpy()
                out.fit_weight[rows] = w.cpu().numpy()
    out.outlier_pixels = (np.concatenate(outlier_rows).astype(np.int64) if outlier_rows else np.zeros(0, np.int64),
                          np.concatenate(outlier_cols).astype(np.int64) if outlier_cols else np.zeros(0, np.int64))
    return out
