"""The bound against achieved errors: CRLB by S/N bin, MAE over CRLB (Gaussian-equivalent ratio) per label
and bin, and their markdown table."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from stellarnet.common.labels import LABEL_NAMES, LABEL_UNITS
from stellarnet.evaluation.metrics import DEFAULT_SNR_EDGES, snr_bin_index, snr_bin_names

#: E|x| / σ for a zero-mean Gaussian: MAE = σ·√(2/π) ≈ 0.798 σ.
GAUSS_MAE_FACTOR: float = math.sqrt(2.0 / math.pi)


RATIO_DEFINITION = ("ratio = MAE / (median CRLB · sqrt(2/pi)) = achieved Gaussian sigma over the bound; "
                    "ratio_per_star = mean(|residual| / CRLB) / sqrt(2/pi)")


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
