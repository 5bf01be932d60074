"""Feature encoders: a strided 1-D CNN for spectra and a small MLP for photometry.

Both modules map a batch (see the batch-dict table in ``docs/architecture.md``) to a fixed-size
feature vector and expose ``out_dim`` so the fusion trunk can be sized automatically.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

__all__ = ["SpectralConvEncoder", "PhotometryMLP", "spectral_input_channels", "RobustInputs", "der_snr_noise",
           "median_error"]


def spectral_input_channels(
    flux: torch.Tensor,
    flux_err: torch.Tensor,
    pix_mask: torch.Tensor,
    err_scale: float = 50.0,
) -> torch.Tensor:
    """The original (``inputs="absolute"``) three CNN input channels, shape (B, 3, P).

    Channels:

    0. ``(flux - 1) * pix_mask`` - continuum-normalized flux (dimensionless) minus the continuum
       level, so bad pixels (flux 1 by contract) and masked pixels are exactly 0;
    1. ``pix_mask / (1 + err_scale * flux_err)`` - a pixel weight in [0, 1]: ~1 for a noiseless
       pixel, ``1/(1 + 50*0.01) = 0.67`` for S/N 100 at the default ``err_scale``, ~0 for bad
       pixels (``flux_err`` = ``BAD_PIXEL_ERR``) or an infinite error;
    2. ``pix_mask`` - 1 good, 0 bad.

    The labels of a network on these channels move when the error array is quoted differently
    (rescaled, flattened) and one corrupted pixel with an inflated error enters channel 0 in full:
    models trained with ``inputs="robust"`` use :class:`RobustInputs` instead.

    Args:
        flux: (B, P) continuum-normalized flux (dimensionless).
        flux_err: (B, P) normalized flux error (dimensionless, same units as ``flux``).
        pix_mask: (B, P) 1 for good pixels, 0 for bad.
        err_scale: scale (1 / normalized-flux units) of the error weighting.
    """
    mask = pix_mask.to(flux.dtype)
    err = torch.nan_to_num(flux_err.abs(), nan=float("inf"), posinf=float("inf"))
    weight = mask / (1.0 + err_scale * err)
    return torch.stack(((flux - 1.0) * mask, weight, mask), dim=1)


#: DER_SNR's constant (Stoehr et al. 2008): noise = 1.482602 / √6 · median|2fᵢ − fᵢ₋₂ − fᵢ₊₂|
DER_SNR_FACTOR = 1.482602 / math.sqrt(6.0)


def _masked_median(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Median over dim 1 of ``x`` where ``valid``, (B, 1); NaN for a row with nothing valid."""
    return torch.where(valid, x, torch.full_like(x, float("nan"))).nanmedian(dim=1, keepdim=True).values


def median_error(flux_err: torch.Tensor, good: torch.Tensor) -> torch.Tensor:
    """1/SNR of each spectrum (B, 1): the median error of its ``good`` pixels (normalized-flux units;
    NaN for a row with none) — the S/N a catalogue quotes."""
    return _masked_median(flux_err, good)


def der_snr_noise(flux: torch.Tensor, good: torch.Tensor, stride: int = 3) -> torch.Tensor:
    """Per-spectrum noise (B, 1) measured from the flux alone (DER_SNR, Stoehr et al. 2008):
    1.482602/√6 · median |2fᵢ − fᵢ₋₂ − fᵢ₊₂| over pixels where i and i ± 2 are all ``good``
    (every ``stride``-th pixel: the median of ~2,400 values is as good and 3× cheaper)."""
    c = flux[:, 2:-2:stride]
    d = (2.0 * c - flux[:, :-4:stride] - flux[:, 4::stride]).abs()
    ok = good[:, 2:-2:stride] & good[:, :-4:stride] & good[:, 4::stride]
    return DER_SNR_FACTOR * _masked_median(d, ok)


class RobustInputs(nn.Module):
    """CNN input channels that do not depend on conventions the labels should not depend on.

    Per spectrum (all in float32, whatever the autocast):

    1. **Relative errors** ``r = σ / median(σ)`` over the good pixels: the labels cannot depend on
       the error array's overall scale (a factor 0.5–2 between pipelines is common). A pixel weight
       ``g = mask / (1 + (r / knee)⁴)`` keeps ordinary pixels (g ≈ 1 up to r ≈ 1.5) and removes
       pixels whose error is inflated (r = 5: g = 0.025) — so one corrupted pixel carrying a finite
       inflated error cannot move the labels.
    2. **Renormalization** (known grids only): the flux is divided by a per-chip Chebyshev polynomial
       (``renormalize_degree``) fitted to the continuum pixels (:func:`stellarnet.preparation.spectra.continuum_pixels`)
       with weights ``g`` (not 1/σ²: the error convention must not matter), refitted once without the
       pixels more than 4 robust σ off. Data normalized by another convention, or with a smooth
       residual, is brought back to the training set's convention; on the training set's own
       spectra the polynomial is ≈ 1.
    3. **Noise level from the flux** (:func:`der_snr_noise`), so the network still knows the S/N
       without trusting the reported error scale: the effective error is ``r × noise``.

    Channels: ``clamp(flux − 1, −1, 0.2) · g``; ``g / (1 + err_scale · r · noise)``; ``mask``.

    Args:
        n_pixels: spectrum length; the chips and continuum pixels are those of the grid with that
            many pixels (``dr12`` 7,214, ``dr17`` 7,514); other lengths are not renormalized.
        err_scale: scale of the error weight (1 / normalized-flux units), as in the absolute channels.
        renormalize_degree: per-chip polynomial degree (None: no renormalization).
        knee: relative error at which a pixel's weight is halved.
    """

    def __init__(self, n_pixels: int, err_scale: float = 50.0, renormalize_degree: int | None = 2,
                 knee: float = 2.0) -> None:
        super().__init__()
        self.err_scale = float(err_scale)
        self.knee = float(knee)
        basis = _continuum_design(int(n_pixels), renormalize_degree)
        self.renormalize = basis is not None
        if basis is not None:
            self.register_buffer("basis", basis[0], persistent=False)  # (P, K)
            idx = torch.nonzero(basis[1] > 0)[:, 0]
            self.register_buffer("continuum_index", idx, persistent=False)  # (m,) continuum pixels
            bc = basis[0][idx]
            self.register_buffer("continuum_outer", (bc[:, :, None] * bc[:, None, :]).reshape(len(idx), -1),
                                 persistent=False)  # (m, K²): the normal matrices of a batch are one GEMM

    def _renormalize(self, flux: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        idx = self.continuum_index
        Bc = self.basis[idx]  # (m, K): the fit only touches the ~530 continuum pixels
        fc, w = flux[:, idx], weight[:, idx]
        K = Bc.shape[1]
        eye = 1e-6 * torch.eye(K, dtype=flux.dtype, device=flux.device)
        for _ in range(2):
            a = (w @ self.continuum_outer).view(-1, K, K) + eye
            coef = torch.linalg.solve(a, ((w * fc) @ Bc)[..., None])[..., 0]
            resid = (fc - coef @ Bc.T).abs()
            scatter = _masked_median(resid, w > 0).nan_to_num(1.0)
            w = w * (resid < 4.0 * 1.4826 * scatter + 1e-6).to(w.dtype)
        cont = coef @ self.basis.T
        ok = torch.isfinite(cont) & (cont > 0.5) & (cont < 2.0)
        return torch.where(ok, flux / torch.where(ok, cont, torch.ones_like(cont)), flux)

    def forward(self, flux: torch.Tensor, flux_err: torch.Tensor, pix_mask: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=flux.device.type, enabled=False):
            flux = torch.nan_to_num(flux.float(), nan=1.0, posinf=1.0, neginf=1.0)
            mask = pix_mask.float() * torch.isfinite(flux_err).float()
            err = torch.nan_to_num(flux_err.float().abs(), nan=float("inf"), posinf=float("inf"))
            good = (mask > 0) & (err > 0)
            mask = good.float()
            e_med = _masked_median(err[:, ::3], good[:, ::3]).nan_to_num(1.0).clamp_min(1e-12)
            r = err / e_med
            g = mask / (1.0 + (r / self.knee) ** 4)
            g = torch.nan_to_num(g, nan=0.0)
            if self.renormalize:
                flux = self._renormalize(flux, g)
            noise = der_snr_noise(flux, g > 0.5)
            noise = torch.where(torch.isfinite(noise), noise, e_med)
            weight = g / (1.0 + self.err_scale * torch.nan_to_num(r * noise, posinf=1e30))
            return torch.stack(((flux - 1.0).clamp(-1.0, 0.2) * g, weight, mask), dim=1)


def _continuum_design(n_pixels: int, degree: int | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-chip Chebyshev basis (P, 3·(degree+1)) (:func:`stellarnet.refinement.basis.continuum_basis`) and
    continuum-pixel indicator (P,) of the grid with ``n_pixels`` pixels, or None (unknown grid or ``degree`` None)."""
    from stellarnet.io import grids
    from stellarnet.preparation.spectra import continuum_pixels
    from stellarnet.refinement.basis import continuum_basis

    if degree is None or n_pixels not in grids.GRID_ALIASES:
        return None
    grid = grids.grid_name(n_pixels)
    return continuum_basis(n_pixels, grid, int(degree)), torch.from_numpy(continuum_pixels(grid).astype(np.float32))


class SpectralConvEncoder(nn.Module):
    """Strided 1-D CNN over a gap-removed APOGEE spectrum.

    Architecture: ``len(channels)`` blocks of ``Conv1d(stride) -> BatchNorm1d -> ReLU`` (the strides
    shrink the 7,214/7,514-pixel input quickly, which keeps CPU inference fast), then
    ``AdaptiveAvgPool1d(pool_size)`` (keeps coarse wavelength position, which matters because line
    identity is positional), flatten, dropout and ``Linear -> ReLU`` to ``out_dim`` features.

    With ``linear_dim > 0`` a full-resolution linear branch runs beside the convolutions: a
    bias-free ``Linear(n_pixels -> linear_dim)`` on input channel 0 (masked ``flux - 1``) followed
    by ``BatchNorm1d``. Every pixel keeps its own weights, like the per-pixel coefficients of The
    Cannon, so narrow and weak lines that the strided convolutions average away still reach the
    trunk; near a given star the best estimator of a label is a weighted sum of pixels, and this
    branch learns such sums. Its features are concatenated with the pooled conv features.

    Args:
        n_pixels: number of spectral pixels P (7,514 for ``dr17``, 7,214 for ``dr12``).
        in_channels: number of input channels; must be 3 (see :func:`spectral_input_channels`).
        channels: output channels of each conv block.
        kernel_sizes: kernel size (pixels) of each conv block.
        strides: stride (pixels) of each conv block.
        pool_size: length of the adaptive average pool output (positions kept per channel).
        dropout: dropout probability before the final linear layer (also used for MC dropout).
        out_dim: size of the output feature vector.
        err_scale: error-weight scale of input channel 1 (1 / normalized-flux units).
        linear_dim: width of the full-resolution linear branch (0 = none).
        inputs: ``"absolute"`` (:func:`spectral_input_channels`, the behaviour of models trained
            before it existed) or ``"robust"`` (:class:`RobustInputs`: relative errors, outlier-pixel
            down-weighting, renormalization, noise from the flux).
        renormalize_degree: per-chip degree of the robust inputs' renormalization (None: none).
    """

    def __init__(
        self,
        n_pixels: int,
        in_channels: int = 3,
        channels: Sequence[int] = (8, 16, 32, 32),
        kernel_sizes: Sequence[int] = (9, 5, 5, 5),
        strides: Sequence[int] = (4, 2, 2, 2),
        pool_size: int = 16,
        dropout: float = 0.1,
        out_dim: int = 128,
        err_scale: float = 50.0,
        linear_dim: int = 0,
        inputs: str = "absolute",
        renormalize_degree: int | None = 2,
    ) -> None:
        super().__init__()
        if inputs not in ("absolute", "robust"):
            raise ValueError(f"inputs must be 'absolute' or 'robust', got {inputs!r}")
        if linear_dim < 0:
            raise ValueError(f"linear_dim must be >= 0, got {linear_dim}")
        channels, kernel_sizes, strides = list(channels), list(kernel_sizes), list(strides)
        if in_channels != 3:
            raise ValueError(f"SpectralConvEncoder builds 3 input channels, got in_channels={in_channels}")
        if not (len(channels) == len(kernel_sizes) == len(strides)) or not channels:
            raise ValueError(
                "channels, kernel_sizes and strides must be non-empty and of equal length, got "
                f"{len(channels)}, {len(kernel_sizes)}, {len(strides)}"
            )
        self.n_pixels = int(n_pixels)
        self.err_scale = float(err_scale)
        self.out_dim = int(out_dim)
        self.inputs = (RobustInputs(self.n_pixels, err_scale, renormalize_degree) if inputs == "robust" else None)
        layers: list[nn.Module] = []
        c_in, length = in_channels, self.n_pixels
        for c, k, s in zip(channels, kernel_sizes, strides):
            layers += [
                nn.Conv1d(c_in, c, kernel_size=k, stride=s, padding=k // 2, bias=False),
                nn.BatchNorm1d(c),
                nn.ReLU(inplace=True),
            ]
            c_in = c
            length = (length + 2 * (k // 2) - k) // s + 1
        if length < pool_size:
            raise ValueError(
                f"conv stack reduces {n_pixels} pixels to {length} < pool_size={pool_size}; "
                "use smaller strides or a smaller pool_size"
            )
        self.conv_length = length
        self.convs = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool1d(pool_size)
        self.linear_dim = int(linear_dim)
        self.linear = (
            nn.Sequential(nn.Linear(self.n_pixels, self.linear_dim, bias=False), nn.BatchNorm1d(self.linear_dim))
            if self.linear_dim
            else None
        )
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(c_in * pool_size + self.linear_dim, self.out_dim)
        self.act = nn.ReLU(inplace=True)

    def forward(self, flux: torch.Tensor, flux_err: torch.Tensor, pix_mask: torch.Tensor) -> torch.Tensor:
        """Encode spectra.

        Args:
            flux, flux_err, pix_mask: (B, P) tensors as in the batch dict.

        Returns:
            (B, out_dim) features.
        """
        return self.project(self.conv_features(flux, flux_err, pix_mask))

    def conv_features(self, flux: torch.Tensor, flux_err: torch.Tensor, pix_mask: torch.Tensor) -> torch.Tensor:
        """Deterministic part (convs + pool, and the linear branch if any),
        (B, channels[-1] * pool_size + linear_dim); the expensive part."""
        if flux.shape[-1] != self.n_pixels:
            raise ValueError(f"expected spectra with {self.n_pixels} pixels, got {flux.shape[-1]}")
        if self.inputs is None:
            x = spectral_input_channels(flux, flux_err, pix_mask, self.err_scale)
        else:
            x = self.inputs(flux, flux_err, pix_mask).to(flux.dtype)
        conv = self.pool(self.convs(x)).flatten(1)
        if self.linear is None:
            return conv
        return torch.cat((conv, self.linear(x[:, 0])), dim=1)

    def project(self, conv: torch.Tensor) -> torch.Tensor:
        """Stochastic part (dropout + linear) on :meth:`conv_features`, -> (B, out_dim).

        MC dropout re-runs only this part, so extra samples cost little.
        """
        return self.act(self.fc(self.dropout(conv)))


class PhotometryMLP(nn.Module):
    """MLP over standardized photometric features and their presence mask.

    The input is ``concat(photometry * phot_mask, phot_mask)`` (2F values), so a missing feature is
    0 with mask 0 and the network can tell "missing" from "average". During training each feature is
    dropped (value and mask set to 0) with probability ``feature_dropout``, and all features of a
    star are dropped with probability ``drop_all_prob``, so the model also works on inputs without
    photometry (e.g. predictions from apStar files alone).

    Args:
        n_features: number of photometric features F.
        hidden: widths of the hidden layers.
        out_dim: size of the output feature vector.
        dropout: dropout probability after each hidden layer (also used for MC dropout).
        feature_dropout: train-time probability of dropping each feature independently.
        drop_all_prob: train-time probability of dropping all features of a star.
    """

    def __init__(
        self,
        n_features: int,
        hidden: Sequence[int] = (32,),
        out_dim: int = 32,
        dropout: float = 0.1,
        feature_dropout: float = 0.1,
        drop_all_prob: float = 0.25,
    ) -> None:
        super().__init__()
        if n_features < 1:
            raise ValueError("PhotometryMLP needs n_features >= 1 (leave net.photometry null instead)")
        for name, p in (("feature_dropout", feature_dropout), ("drop_all_prob", drop_all_prob)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {p}")
        self.n_features = int(n_features)
        self.out_dim = int(out_dim)
        self.feature_dropout = float(feature_dropout)
        self.drop_all_prob = float(drop_all_prob)
        layers: list[nn.Module] = []
        d = 2 * self.n_features
        for h in hidden:
            layers += [nn.Linear(d, h), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            d = h
        layers += [nn.Linear(d, self.out_dim), nn.ReLU(inplace=True)]
        self.mlp = nn.Sequential(*layers)

    def forward(self, photometry: torch.Tensor, phot_mask: torch.Tensor) -> torch.Tensor:
        """Encode photometry.

        Args:
            photometry: (B, F) standardized features (dimensionless), missing = 0 (NaN tolerated).
            phot_mask: (B, F) 1 present, 0 missing.

        Returns:
            (B, out_dim) features.
        """
        if photometry.shape[-1] != self.n_features:
            raise ValueError(f"expected {self.n_features} photometric features, got {photometry.shape[-1]}")
        mask = phot_mask.to(photometry.dtype)
        if self.training and (self.feature_dropout > 0 or self.drop_all_prob > 0):
            keep = torch.rand_like(mask) >= self.feature_dropout
            keep &= torch.rand(mask.shape[0], 1, device=mask.device) >= self.drop_all_prob
            mask = mask * keep.to(mask.dtype)
        x = torch.where(mask > 0, torch.nan_to_num(photometry), torch.zeros_like(photometry))
        return self.mlp(torch.cat((x, mask), dim=1))
