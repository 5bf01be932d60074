"""Feature encoders: a strided 1-D CNN for spectra and a small MLP for photometry.

Both modules map a batch (see the batch-dict table in ``docs/architecture.md``) to a fixed-size
feature vector and expose ``out_dim`` so the fusion trunk can be sized automatically.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["SpectralConvEncoder", "PhotometryMLP", "spectral_input_channels"]


def spectral_input_channels(
    flux: torch.Tensor,
    flux_err: torch.Tensor,
    pix_mask: torch.Tensor,
    err_scale: float = 50.0,
) -> torch.Tensor:
    """Stack the three CNN input channels, shape (B, 3, P).

    Channels:

    0. ``(flux - 1) * pix_mask`` - continuum-normalized flux (dimensionless) minus the continuum
       level, so bad pixels (flux 1 by contract) and masked pixels are exactly 0;
    1. ``pix_mask / (1 + err_scale * flux_err)`` - a pixel weight in [0, 1]: ~1 for a noiseless
       pixel, ``1/(1 + 50*0.01) = 0.67`` for S/N 100 at the default ``err_scale``, ~0 for bad
       pixels (``flux_err`` = ``BAD_PIXEL_ERR``) or an infinite error;
    2. ``pix_mask`` - 1 good, 0 bad.

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
    ) -> None:
        super().__init__()
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
        x = spectral_input_channels(flux, flux_err, pix_mask, self.err_scale)
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
