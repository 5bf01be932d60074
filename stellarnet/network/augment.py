"""Training-time augmentation (domain randomization) of spectra: the effects by which real spectra
differ from any one survey's, drawn fresh for every batch, so the network cannot lean on one
pipeline's conventions.

:class:`SpectrumAugment` is a parameter-free module. It changes a batch only in training mode
(``module.train()``); in evaluation mode — validation, test, prediction — it returns its inputs
unchanged. Each effect is applied to a random share ``prob`` of the spectra, with an amplitude
drawn uniformly up to its maximum:

* **lower S/N**: for a share ``snr_prob`` of the spectra, Gaussian noise is added to bring the S/N
  (1 / the median error of the good pixels) down to a value drawn log-uniformly between ``snr_min``
  and the spectrum's own, and the error array grows with it (× the S/N ratio) — a survey observes
  many stars below a training set's S/N cut, where the network must know that it knows less;
* **continuum**: flux and error × (1 + Σₖ cₖ Tₖ(x)) per chip, Chebyshev T₀…T_degree,
  cₖ ~ U(−a, a) — other normalization conventions and smooth continuum residuals;
* **outliers**: a fraction U(0, f) of the good pixels moved by ±U(5, 30) σ, their error × U(lo, hi)
  (finite, not masked) — sky-line / telluric residuals and cosmic rays;
* **error convention**: the whole error array × U(lo, hi), or (probability ``err_flat_prob``) flattened
  to its median — how errors are quoted must not change the labels;
* **radial velocity**: a sub-pixel shift (first-order Taylor step), up to ``rv_pixels`` pixels
  (0.36 px ≈ 1.5 km/s on the 6e-6 dex grid);
* **line-spread function**: width × (1 + f), f ~ U(lo, hi): Gaussian convolution (f > 0) or a
  first-order deconvolution (f < 0); APOGEE's LSF σ ≈ 1.37 pixels;
* **flagged pixels**: a fraction U(0, m) of the pixels masked in scattered runs of 1–3 (flux 1,
  error :data:`~stellarnet.preparation.spectra.BAD_PIXEL_ERR`, ``pix_mask`` 0, as ``prepare_spectrum``
  leaves a flagged pixel) — pipelines flag many single pixels around sky lines; a network that
  only saw a few long bad-pixel runs reads a masked pixel in a line as a weaker line.

Masked pixels (``pix_mask`` 0) stay as they were.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from stellarnet.io.grids import LSF_SIGMA_PIX
from stellarnet.network.encoders import median_error

__all__ = ["SpectrumAugment", "lower_snr_copy"]

_N_LEVELS = 6



def _chip_basis(n_pixels: int, degree: int) -> torch.Tensor:
    """(P, n_chips·(degree+1)) per-chip Chebyshev basis (one chip when the grid is unknown)."""
    from stellarnet.io import grids
    from stellarnet.refinement.basis import continuum_basis

    grid = grids.grid_name(n_pixels) if n_pixels in grids.GRID_ALIASES else None
    return continuum_basis(n_pixels, grid, degree)


class SpectrumAugment(nn.Module):
    """Random, physically motivated perturbations of a batch of normalized spectra (training only).

    Args:
        n_pixels: spectrum length (chips from the grid of that length, else one chip).
        prob: probability that each effect is applied to a given spectrum.
        continuum: maximum |cₖ| of the per-chip continuum polynomial (0.02 = 2 %).
        continuum_degree: its degree.
        outlier_fraction: maximum fraction of a spectrum's pixels made outliers.
        outlier_err_factor: (lo, hi) factor on an outlier's error.
        err_scale: (lo, hi) factor on the whole error array.
        err_flat_prob: probability of a flattened error array.
        rv_pixels: maximum sub-pixel shift (pixels).
        lsf: (lo, hi) fractional change of the LSF width.
        mask_fraction: maximum fraction of a spectrum's pixels flagged in short runs (0: none).
        snr_prob: share of the spectra given a lower S/N (0: none); snr_min: the lowest S/N drawn.
    """

    def __init__(self, n_pixels: int, prob: float = 0.5, continuum: float = 0.02, continuum_degree: int = 4,
                 outlier_fraction: float = 0.03, outlier_err_factor: Sequence[float] = (2.0, 10.0),
                 err_scale: Sequence[float] = (0.5, 2.0), err_flat_prob: float = 0.15, rv_pixels: float = 0.36,
                 lsf: Sequence[float] = (-0.25, 0.3), mask_fraction: float = 0.0, snr_prob: float = 0.0,
                 snr_min: float = 10.0) -> None:
        super().__init__()
        if not 0.0 <= prob <= 1.0 or not 0.0 <= err_flat_prob <= 1.0:
            raise ValueError(f"prob and err_flat_prob must be in [0, 1], got {prob}, {err_flat_prob}")
        if not 0.0 <= outlier_fraction < 0.5 or not 0.0 <= mask_fraction < 0.5:
            raise ValueError(f"outlier_fraction and mask_fraction must be in [0, 0.5), got {outlier_fraction}, "
                             f"{mask_fraction}")
        self.mask_fraction = float(mask_fraction)
        if not 0.0 <= snr_prob <= 1.0 or snr_min <= 0:
            raise ValueError(f"snr_prob must be in [0, 1] and snr_min > 0, got {snr_prob}, {snr_min}")
        self.snr_prob, self.snr_min = float(snr_prob), float(snr_min)
        for name, pair in (("outlier_err_factor", outlier_err_factor), ("err_scale", err_scale), ("lsf", lsf)):
            if len(pair) != 2 or pair[0] > pair[1]:
                raise ValueError(f"{name} must be a (lo, hi) pair, got {pair}")
        if lsf[0] <= -0.5 or min(err_scale) <= 0:
            raise ValueError(f"lsf must stay > -0.5 and err_scale > 0, got {lsf}, {err_scale}")
        self.prob, self.continuum, self.outlier_fraction = float(prob), float(continuum), float(outlier_fraction)
        self.outlier_err_factor = tuple(float(v) for v in outlier_err_factor)
        self.err_scale = tuple(float(v) for v in err_scale)
        self.err_flat_prob, self.rv_pixels = float(err_flat_prob), float(rv_pixels)
        self.lsf = tuple(float(v) for v in lsf)
        self.register_buffer("basis", _chip_basis(int(n_pixels), int(continuum_degree)), persistent=False)
        # blur kernels with variances 0, Δ, …, (levels − 1)Δ covering the largest |LSF change|
        big = max(abs((1.0 + self.lsf[0]) ** 2 - 1.0), abs((1.0 + self.lsf[1]) ** 2 - 1.0), 1e-6)
        self.lsf_var_step = LSF_SIGMA_PIX**2 * big / (_N_LEVELS - 1)
        x = torch.arange(-4, 5, dtype=torch.float32)
        kernels = [(x == 0).float()] + [torch.exp(-0.5 * x**2 / (k * self.lsf_var_step)) for k in range(1, _N_LEVELS)]
        ladder = torch.stack([k / k.sum() for k in kernels])
        self.register_buffer("lsf_ladder", ladder, persistent=False)

    def _pick(self, n: int, device: torch.device) -> torch.Tensor:
        return (torch.rand(n, 1, device=device) < self.prob).float()

    def forward(self, flux: torch.Tensor, flux_err: torch.Tensor,
                pix_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Augmented ``(flux, flux_err, pix_mask)``; the inputs themselves in evaluation mode."""
        if not self.training:
            return flux, flux_err, pix_mask
        with torch.no_grad():
            flux, flux_err = self._augment(flux.float(), flux_err.float(), pix_mask > 0)
            if self.mask_fraction > 0:
                flux, flux_err, pix_mask = self._flag(flux, flux_err, pix_mask)
            return flux, flux_err, pix_mask

    def _flag(self, flux: torch.Tensor, err: torch.Tensor,
              pix_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Flag a fraction U(0, mask_fraction) of the pixels of a share ``prob`` of the spectra, in runs of
        1–3 pixels (each run grows by one more pixel with probability ½, twice; mean length 1.75)."""
        from stellarnet.preparation.spectra import BAD_PIXEL_ERR

        n, dev = flux.shape[0], flux.device
        frac = torch.rand(n, 1, device=dev) * self.mask_fraction * self._pick(n, dev)
        run = torch.rand(flux.shape, device=dev) < frac / 1.75
        hit = run.clone()
        for _ in range(2):
            run = torch.roll(run, 1, dims=1) & (torch.rand(flux.shape, device=dev) < 0.5)
            run[:, 0] = False
            hit |= run
        flux = torch.where(hit, torch.ones_like(flux), flux)
        err = torch.where(hit, torch.full_like(err, BAD_PIXEL_ERR), err)
        return flux, err, torch.where(hit, torch.zeros_like(pix_mask), pix_mask)

    def _augment(self, flux: torch.Tensor, err: torch.Tensor, good: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, dev = flux.shape[0], flux.device
        orig_flux, orig_err = flux, err
        u = lambda *shape: torch.rand(*shape, device=dev)  # noqa: E731
        if self.lsf != (0.0, 0.0):
            f = (self.lsf[0] + (self.lsf[1] - self.lsf[0]) * u(n)) * self._pick(n, dev)[:, 0]
            flux = self._lsf(flux, f)
        if self.rv_pixels > 0:
            shift = (2 * u(n, 1) - 1) * self.rv_pixels * self._pick(n, dev)
            grad = torch.zeros_like(flux)
            grad[:, 1:-1] = 0.5 * (flux[:, 2:] - flux[:, :-2])
            flux = flux - shift * grad  # f(x − δ) ≈ f(x) − δ f'(x)
        if self.snr_prob > 0:
            flux, err = self._lower_snr(flux, err, good)
        if self.continuum > 0:
            coef = (2 * u(n, self.basis.shape[1]) - 1) * self.continuum * self._pick(n, dev)
            poly = 1.0 + coef @ self.basis.T
            flux, err = flux * poly, err * poly
        if self.outlier_fraction > 0:
            frac = u(n, 1) * self.outlier_fraction * self._pick(n, dev)
            r1, r2 = u(*flux.shape), u(*flux.shape)
            hit = (r1 < frac) & good
            # given a hit, r1 / frac and r2 are uniform: one draw gives the error factor, one the deviation
            # (r2 < 2/3: downward, as sky-line / telluric residuals; else upward, as cosmic rays)
            sign = torch.where(r2 < 2 / 3, -1.0, 1.0)
            size = 5.0 + 25.0 * torch.where(r2 < 2 / 3, 1.5 * r2, 3.0 * r2 - 2.0)
            lo, hi = self.outlier_err_factor
            flux = torch.where(hit, flux + sign * size * err, flux)
            err = torch.where(hit, err * (lo + (hi - lo) * r1 / frac.clamp_min(1e-12)), err)
        if self.err_scale != (1.0, 1.0):
            lo, hi = self.err_scale
            scale = 1.0 + (lo + (hi - lo) * u(n, 1) - 1.0) * self._pick(n, dev)
            err = err * scale
        if self.err_flat_prob > 0:
            rows = torch.nonzero(u(n) < self.err_flat_prob)[:, 0]
            if rows.numel():
                g = good[rows]
                med = torch.where(g, err[rows], torch.full_like(err[rows], float("nan"))).nanmedian(1, keepdim=True).values
                err = err.clone()
                err[rows] = torch.where(g & torch.isfinite(med), med.expand_as(g).to(err.dtype), err[rows])
        # masked pixels keep their contract values (flux 1, BAD_PIXEL_ERR)
        return torch.where(good, flux, orig_flux), torch.where(good, err, orig_err)

    def _lower_snr(self, flux: torch.Tensor, err: torch.Tensor, good: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A share ``snr_prob`` of the spectra observed at a lower S/N: S/N' ~ logU(snr_min, S/N), noise of
        σ·√(k² − 1) added and σ × k, k = S/N / S/N' (S/N = 1 / the median error of the good pixels)."""
        n, dev = flux.shape[0], flux.device
        snr = 1.0 / median_error(err, good)
        ok = torch.isfinite(snr) & (snr > self.snr_min) & (torch.rand(n, 1, device=dev) < self.snr_prob)
        log_lo = torch.log(torch.full_like(snr, self.snr_min))
        log_hi = torch.log(torch.where(ok, snr, torch.full_like(snr, self.snr_min)))
        target = torch.exp(log_lo + (log_hi - log_lo) * torch.rand(n, 1, device=dev))
        k = torch.where(ok, snr / target, torch.ones_like(snr)).clamp_min(1.0)
        flux = flux + err * torch.sqrt(k**2 - 1.0) * torch.randn_like(flux)
        return flux, err * k

    def _lsf(self, flux: torch.Tensor, change: torch.Tensor) -> torch.Tensor:
        """Per-spectrum LSF width × (1 + change): Gaussian blur of variance σ_L²((1+f)² − 1) for f > 0,
        first-order deconvolution ``2f − blur`` for f < 0. Each spectrum's 9-pixel kernel interpolates
        linearly in variance between a ladder of :data:`_N_LEVELS` fixed Gaussians (variances 0 … the
        largest needed); applied as one unfold-multiply (a grouped convolution is ~5× slower on CPU)."""
        if not bool((change != 0).any()):
            return flux
        var = (LSF_SIGMA_PIX**2) * (((1.0 + change) ** 2) - 1.0).abs()  # (n,) pixels²
        ladder = self.lsf_ladder.to(flux.dtype)
        pos = (var / self.lsf_var_step).clamp(0, ladder.shape[0] - 1)
        lo = pos.floor().long().clamp(max=ladder.shape[0] - 2)
        frac = (pos - lo.to(pos.dtype))[:, None]
        kern = (1 - frac) * ladder[lo] + frac * ladder[lo + 1]  # (n, 9) per-spectrum kernel
        half = ladder.shape[1] // 2
        padded = F.pad(flux[:, None], (half, half), mode="replicate")[:, 0]  # (n, P + 2 half)
        smooth = (padded.unfold(1, ladder.shape[1], 1) * kern[:, None, :]).sum(-1)
        c = change[:, None]
        return torch.where(c > 0, smooth, torch.where(c < 0, 2.0 * flux - smooth, flux))


def lower_snr_copy(flux: np.ndarray, flux_err: np.ndarray, pix_mask: np.ndarray, seed: int = 0,
                   snr_min: float = 10.0) -> tuple[np.ndarray, np.ndarray]:
    """Copies of normalized spectra (N, P) observed at a lower S/N, as the training augmentation does it
    (:class:`SpectrumAugment`'s lower-S/N effect applied to every spectrum, S/N' ~ logU(``snr_min``, its
    own), seeded): ``(flux, flux_err)`` float32; masked pixels (``pix_mask`` 0) and spectra already
    below ``snr_min`` unchanged. For calibrating a σ below a training set's S/N cut."""
    aug = SpectrumAugment(flux.shape[1], prob=0.0, continuum=0.0, outlier_fraction=0.0, err_scale=(1.0, 1.0),
                          err_flat_prob=0.0, rv_pixels=0.0, lsf=(0.0, 0.0), snr_prob=1.0, snr_min=snr_min).train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        f, e, _ = aug(*(torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) for a in (flux, flux_err, pix_mask)))
    return f.numpy(), e.numpy()
