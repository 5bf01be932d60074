"""``STELLARNET_FLAG`` (:data:`stellarnet.io.bitmasks.STELLARNET_FLAG`) and σ that grows where estimates
disagree: the flag thresholds, how many combined σ the network and the refinement are apart, the
σ inflation that follows, the physically possible label ranges, and the bits of each star."""

from __future__ import annotations

from typing import Any

import numpy as np

#: refined labels further than this many (network) σ from the network's estimate are not trusted
#: unless the fit explains the spectrum (reduced χ² ≤ FLAG_HIGH_CHI2): then the network is the one
#: misled (e.g. by many flagged pixels), and the disagreement inflates the refined σ instead
REFINE_MAX_SHIFT = 5.0


#: STELLARNET_FLAG thresholds (stellarnet.io.bitmasks.STELLARNET_FLAG)
FLAG_HIGH_CHI2 = 2.0


FLAG_OUTLIER_FRACTION = 0.01


FLAG_DISAGREE_SIGMA = 3.0


FLAG_MIN_PIXEL_FRACTION = 0.7


#: BINARY_CANDIDATE: the refinement's companion score (forward.companion_score, in σ) above this
FLAG_COMPANION = 8.0

#: BAD_CONTINUUM: a chip segment's upper envelope (90th percentile of the normalized flux) off 1 by more than
#: this (every shift of the suite stays below 0.17, `norm_smooth`'s pseudo-continuum the highest; 0.07 in
#: distribution): the normalization the spectrum arrived with is spoiled (docs/robustness.md)
FLAG_CONTINUUM_OFFSET = 0.2


def physical_ranges(label_names: list[str]) -> np.ndarray:
    """(L, 2) physically possible range of each label (:data:`stellarnet.preparation.cuts.PHYSICAL_LABEL_RANGES`;
    ±inf for a label without one)."""
    from stellarnet.preparation.cuts import PHYSICAL_LABEL_RANGES

    return np.array([PHYSICAL_LABEL_RANGES.get(n, (-np.inf, np.inf)) for n in label_names], np.float64).reshape(-1, 2)


def disagreement_ratio(labels: np.ndarray, sigma: np.ndarray, other_labels: np.ndarray,
                       other_sigma: np.ndarray) -> np.ndarray:
    """|labels − other| / √(σ² + σ_other²) per star and label, (N, L) float64 (NaN where undefined):
    how many combined σ two estimates of the same label are apart."""
    diff = np.abs(np.asarray(labels, np.float64) - np.asarray(other_labels, np.float64))
    comb = np.sqrt(np.asarray(sigma, np.float64) ** 2 + np.asarray(other_sigma, np.float64) ** 2)
    with np.errstate(invalid="ignore", divide="ignore"):
        return diff / comb


def disagreement_factor(labels: np.ndarray, sigma: np.ndarray, other_labels: np.ndarray,
                        other_sigma: np.ndarray) -> np.ndarray:
    """Per star and label, max(1, :func:`disagreement_ratio`): the Birge ratio of two estimates of
    the same label (here the refinement's and the network's). Where they disagree by more than their
    σ allow, one of them carries an error its σ does not describe (an emulator that is wrong for this
    kind of star, a spectrum unlike the training set), and the σ of the reported value is scaled up
    by that ratio, as the Particle Data Group scales the error of inconsistent measurements.
    (N, L) float64; non-finite inputs give 1."""
    ratio = disagreement_ratio(labels, sigma, other_labels, other_sigma)
    return np.where(np.isfinite(ratio), np.maximum(1.0, ratio), 1.0)


def stellarnet_flags(res: dict[str, Any], pixel_fraction: np.ndarray, label_range: np.ndarray | None,
                     physical_range: np.ndarray | None = None,
                     continuum_level: np.ndarray | None = None) -> np.ndarray:
    """The STELLARNET_FLAG bitmask (N,) int32 of a :meth:`Predictor.predict` result.

    Bits (:data:`stellarnet.io.bitmasks.STELLARNET_FLAG`): REFINE_FAILED (``refine_flag`` 1),
    NOT_REFINED (no refinement, or ``refine_flag`` 2), HIGH_CHI2 (reduced χ² > :data:`FLAG_HIGH_CHI2`),
    OUTSIDE_TRAINING (a label outside ``label_range``), OUTLIER_PIXELS (more than
    :data:`FLAG_OUTLIER_FRACTION` of the usable pixels clipped), NET_REFINE_DISAGREE (refined − network
    more than :data:`FLAG_DISAGREE_SIGMA` × √(σ_net² + σ_fit²) in some label), MASKED_SEGMENTS,
    FEW_PIXELS (usable pixel fraction below :data:`FLAG_MIN_PIXEL_FRACTION`), UNPHYSICAL (a label
    non-finite or outside ``physical_range``, (L, 2)), BINARY_CANDIDATE (companion score above
    :data:`FLAG_COMPANION`), BAD_CONTINUUM (``continuum_level`` (N, S), the upper envelope of each chip
    segment (:func:`stellarnet.preparation.spectra.continuum_envelope`), off 1 by more than
    :data:`FLAG_CONTINUUM_OFFSET` somewhere).
    """
    from stellarnet.io.bitmasks import STELLARNET_FLAG as F

    n = len(pixel_fraction)
    flag = np.zeros(n, np.int64)

    def set_bit(name: str, where: np.ndarray) -> None:
        nonlocal flag
        flag |= np.where(where, 1 << F.bit(name), 0)

    labels = np.asarray(res["labels"], np.float64)
    if "refine_flag" in res:
        rf = np.asarray(res["refine_flag"])
        set_bit("REFINE_FAILED", rf == 1)
        set_bit("NOT_REFINED", rf == 2)
        with np.errstate(invalid="ignore"):
            set_bit("HIGH_CHI2", np.asarray(res["refine_chi2"]) > FLAG_HIGH_CHI2)
            set_bit("OUTLIER_PIXELS", np.asarray(res["refine_outlier_fraction"]) > FLAG_OUTLIER_FRACTION)
            set_bit("MASKED_SEGMENTS", np.asarray(res["refine_masked_segments"]) > 0)
            apart = disagreement_ratio(labels, res["sigma_refined"], res["labels_network"], res["sigma_network"])
            set_bit("NET_REFINE_DISAGREE", (rf == 0) & (apart > FLAG_DISAGREE_SIGMA).any(1))
            if "refine_companion" in res:
                set_bit("BINARY_CANDIDATE", np.asarray(res["refine_companion"]) > FLAG_COMPANION)
    else:
        set_bit("NOT_REFINED", np.ones(n, bool))
    if label_range is not None:
        with np.errstate(invalid="ignore"):
            out = (labels < label_range[:, 0]) | (labels > label_range[:, 1])
        set_bit("OUTSIDE_TRAINING", out.any(1))
    set_bit("FEW_PIXELS", np.asarray(pixel_fraction) < FLAG_MIN_PIXEL_FRACTION)
    if continuum_level is not None:
        with np.errstate(invalid="ignore"):
            set_bit("BAD_CONTINUUM", (np.abs(np.asarray(continuum_level) - 1.0) > FLAG_CONTINUUM_OFFSET).any(1))
    if physical_range is not None and len(labels):
        with np.errstate(invalid="ignore"):
            impossible = ~np.isfinite(labels) | (labels < physical_range[:, 0]) | (labels > physical_range[:, 1])
        set_bit("UNPHYSICAL", impossible.any(1))
    return flag.astype(np.int32)
