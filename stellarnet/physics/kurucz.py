"""Kurucz spectral emulator: labels (Teff, logg, [Fe/H], [α/Fe]) → model flux on the 7,214 grid.

The emulator is the per-pixel neural network of binspec (El-Badry et al. 2018, MNRAS 476, 528;
weights from the git history of tingyuansen/The_Payne, MIT), shipped as
``data/reference/kurucz_spectral_emulator.npz``. Forward pass per pixel p::

    x_s = (x − x_min) / (x_max − x_min) − 0.5          (4 labels → scaled)
    h_pk = sigmoid(Σ_i w0[p, k, i] x_s[i] + b0[p, k])   (5 hidden units per pixel)
    flux_p = Σ_k w1[p, k] h_pk + b1[p]

The output is an **un-normalized** flux (arbitrary units, ≈ 3–9 on continuum pixels; it carries
the Teff-dependent slope of the stellar continuum across the H band), on the DR12-era gap-removed
grid (8,575-grid indices 322:3242, 3648:6048, 6412:8306). Vacuum wavelengths in
``apogee_wavelength_7214.npz``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from stellarnet.common.labels import LABEL_NAMES
from stellarnet.common.paths import resource

__all__ = ["KuruczEmulator", "LABEL_NAMES", "label_box", "load_emulator"]

#: Emulator label order and units: K, dex (cgs), dex, dex.
N_PIX_EMULATOR = 7214


@dataclass(frozen=True)
class KuruczEmulator:
    """Vectorized numpy (float32) forward pass of the binspec Kurucz emulator.

    Attributes: ``w0`` (7214·5, 4) first-layer weights flattened pixel-major, ``b0`` (7214·5,),
    ``w1`` (7214, 5), ``b1`` (7214,), ``x_min``/``x_max`` (4,) label box (K, dex, dex, dex).
    """

    w0: np.ndarray
    b0: np.ndarray
    w1: np.ndarray
    b1: np.ndarray
    x_min: np.ndarray
    x_max: np.ndarray

    @classmethod
    def from_npz(cls, path: str | None = None) -> "KuruczEmulator":
        """Load the weights (default: the reference file ``kurucz_spectral_emulator.npz``)."""
        p = resource("kurucz_spectral_emulator.npz") if path is None else path
        with np.load(p) as z:
            w0 = np.asarray(z["w_array_0"], np.float32)  # (P, 5, 4)
            b0 = np.asarray(z["b_array_0"], np.float32)  # (P, 5)
            w1 = np.asarray(z["w_array_1"], np.float32)  # (P, 5)
            b1 = np.asarray(z["b_array_1"], np.float32)  # (P,)
            x_min = np.asarray(z["x_min"], np.float64)
            x_max = np.asarray(z["x_max"], np.float64)
        n_pix, n_hid, n_lab = w0.shape
        if (n_pix, n_lab) != (N_PIX_EMULATOR, 4) or b0.shape != (n_pix, n_hid) or w1.shape != (n_pix, n_hid):
            raise ValueError(f"{p}: unexpected emulator weight shapes {w0.shape}, {b0.shape}, {w1.shape}")
        return cls(
            w0=np.ascontiguousarray(w0.reshape(n_pix * n_hid, n_lab)),
            b0=np.ascontiguousarray(b0.reshape(n_pix * n_hid)),
            w1=w1,
            b1=b1,
            x_min=x_min,
            x_max=x_max,
        )

    def _tanh_form(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Weights rewritten for the tanh form of the sigmoid (cached on the instance)."""
        cache = self.__dict__.get("_tanh_cache")
        if cache is None:
            cache = (
                np.ascontiguousarray(0.5 * self.w0.T, dtype=np.float32),  # (4, P*5)
                (0.5 * self.b0).astype(np.float32),
                (0.5 * self.w1).astype(np.float32),
                (self.b1 + 0.5 * self.w1.sum(axis=1)).astype(np.float32),
            )
            object.__setattr__(self, "_tanh_cache", cache)
        return cache

    @property
    def n_pixels(self) -> int:
        return int(self.b1.shape[0])

    @property
    def n_hidden(self) -> int:
        return int(self.w1.shape[1])

    def in_box(self, labels: np.ndarray) -> np.ndarray:
        """Boolean (N,): labels (N, 4) inside the training label box (inclusive)."""
        labels = np.atleast_2d(np.asarray(labels, np.float64))
        return np.all((labels >= self.x_min) & (labels <= self.x_max), axis=1)

    def clip(self, labels: np.ndarray, margin: float = 0.0) -> np.ndarray:
        """Clip labels (N, 4) into the box shrunk by ``margin`` × box width on each side."""
        width = self.x_max - self.x_min
        return np.clip(np.asarray(labels, np.float64), self.x_min + margin * width, self.x_max - margin * width)

    def __call__(self, labels: np.ndarray, chunk: int = 256, check_box: bool = True) -> np.ndarray:
        """Model flux (N, 7214) float32 for labels (N, 4) or (4,) [Teff K, logg dex, [Fe/H], [α/Fe]].

        Computed in chunks of ``chunk`` stars (memory ≈ chunk × 36,070 × 4 bytes). Raises
        ``ValueError`` for labels outside the box when ``check_box`` (the network extrapolates
        badly there).
        """
        labels = np.asarray(labels, np.float64)
        single = labels.ndim == 1
        labels = np.atleast_2d(labels)
        if labels.shape[1] != 4:
            raise ValueError(f"labels must have 4 columns {LABEL_NAMES}, got shape {labels.shape}")
        if check_box:
            bad = ~self.in_box(labels)
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise ValueError(
                    f"{int(bad.sum())} label rows outside the emulator box {label_box()} "
                    f"(first: row {i} = {labels[i].tolist()}); clip them first"
                )
        scaled = ((labels - self.x_min) / (self.x_max - self.x_min) - 0.5).astype(np.float32)
        # sigmoid(z) = ½ (1 + tanh(z/2)): flux = b1 + ½ Σ_k w1 + Σ_k (½ w1) tanh(½ w0·x + ½ b0)
        w0h, b0h, w1h, const = self._tanh_form()
        n = scaled.shape[0]
        out = np.empty((n, self.n_pixels), np.float32)
        for s in range(0, n, chunk):
            h = scaled[s : s + chunk] @ w0h  # (c, P*5)
            h += b0h
            np.tanh(h, out=h)
            h = h.reshape(h.shape[0], self.n_pixels, self.n_hidden)
            np.einsum("npk,pk->np", h, w1h, out=out[s : s + chunk])
            out[s : s + chunk] += const
        return out[0] if single else out


@lru_cache(maxsize=1)
def load_emulator() -> KuruczEmulator:
    """The reference emulator (cached)."""
    return KuruczEmulator.from_npz()


def label_box() -> dict[str, tuple[float, float]]:
    """Emulator training box: label name → (min, max) in K / dex."""
    emu = load_emulator()
    return {name: (float(lo), float(hi)) for name, lo, hi in zip(LABEL_NAMES, emu.x_min, emu.x_max)}
