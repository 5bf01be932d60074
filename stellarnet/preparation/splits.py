"""Leakage-free train/val/test splits.

Rows are grouped by sky region (APOGEE ``FIELD`` by default); fields that share a star
(the same ``APOGEE_ID`` observed in two fields or with two telescopes) are merged into one group,
so no field and no star ever straddles two splits. Whole groups are then assigned to splits in a
seeded random order until each split reaches its target fraction of rows.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import pandas as pd

SPLITS = ("train", "val", "test")


def _union_find_groups(regions: np.ndarray, star_ids: np.ndarray) -> np.ndarray:
    """Group index per row: regions connected through shared star ids share a group."""
    region_codes, region_index = np.unique(regions, return_inverse=True)
    parent = np.arange(len(region_codes))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_region: dict[str, int] = {}
    for sid, r in zip(star_ids, region_index):
        j = first_region.setdefault(sid, r)
        if j != r:
            a, b = find(j), find(r)
            if a != b:
                parent[max(a, b)] = min(a, b)
    roots = np.array([find(i) for i in range(len(region_codes))])
    return roots[region_index]


def check_split_fractions(fractions: Mapping[str, Any], where: str = "split.fractions") -> None:
    """ValueError unless ``fractions`` maps only ``SPLITS`` names to numbers in [0, 1] that sum to 1
    (± 1e-6) with a training fraction > 0; the message names the key and the value."""
    if not isinstance(fractions, Mapping) or not fractions:
        raise ValueError(f"{where} must map split names {list(SPLITS)} to fractions, got {fractions!r}")
    unknown = [k for k in fractions if k not in SPLITS]
    if unknown:
        raise ValueError(f"{where} has unknown split(s) {unknown}; the splits are {list(SPLITS)}")
    for name, value in fractions.items():
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
                or not np.isfinite(value) or not 0 <= value <= 1:
            raise ValueError(f"{where}.{name} must be a number in [0, 1], got {value!r}")
    total = float(sum(float(v) for v in fractions.values()))
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"{where} must sum to 1, got {dict(fractions)} (sum {total:g})")
    if float(fractions.get("train", 0)) <= 0:
        raise ValueError(f"{where}.train must be > 0, got {fractions.get('train', 0)!r}")


def assign_splits(
    df: pd.DataFrame,
    fractions: Mapping[str, float],
    by: str = "FIELD",
    star_id: str = "APOGEE_ID",
    seed: int = 42,
) -> np.ndarray:
    """Split name per row ('train'/'val'/'test'), grouping rows by ``by`` and ``star_id``.

    ``fractions`` maps split name → fraction of rows (normalized to sum 1). Raises ValueError
    when a column is missing or there are fewer groups than non-empty splits.
    """
    for col in (by, star_id):
        if col not in df.columns:
            raise ValueError(f"cannot split: column {col!r} is missing (split.by={by!r})")
    check_split_fractions(fractions)
    names = [s for s in fractions if fractions[s] > 0]
    frac = np.array([float(fractions[s]) for s in names])
    frac = frac / frac.sum()
    groups = _union_find_groups(df[by].astype(str).to_numpy(), df[star_id].astype(str).to_numpy())
    uniq, counts = np.unique(groups, return_counts=True)
    if len(uniq) < len(names):
        raise ValueError(
            f"only {len(uniq)} sky groups ({by}) for {len(names)} splits: cannot split without leakage"
        )
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(uniq))
    targets = frac * len(df)
    filled = np.zeros(len(names))
    group_split = np.empty(len(uniq), dtype=object)
    # Make sure every split gets at least one group: seed each with one group first.
    for k, g in enumerate(order[: len(names)]):
        group_split[g] = names[k]
        filled[k] += counts[g]
    for g in order[len(names):]:
        k = int(np.argmax(targets - filled))  # the split furthest below its target
        group_split[g] = names[k]
        filled[k] += counts[g]
    lookup = dict(zip(uniq, group_split))
    return np.array([lookup[g] for g in groups], dtype=object)
