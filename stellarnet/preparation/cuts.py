"""Quality cuts on an allStar DataFrame, applied in order, with a report of what each removed.

Cuts come from the Hydra config group ``data/cuts`` (``conf/data/cuts/*.yaml``): an ordered
mapping ``name -> spec``. Spec kinds (every spec may also carry a free-text ``reason``):

``{column: SNR, min: 70, max: null, keep_nan: false, inclusive: false}``
    Range cut. Keeps ``min < x < max`` (``<=`` with ``inclusive: true``); either bound may be
    omitted/null. NaN rows are removed unless ``keep_nan: true``.
``{column: flag_sp, eq: 0}`` (one of ``eq, ne, gt, ge, lt, le``)
    Comparison cut (the GALAH / LAMOST configurations' form): keeps rows where the comparison holds
    (and, for float columns, the value is finite).
``{flag: ASPCAPFLAG, bits: [STAR_BAD, 25], mode: any_set, bitmask: ASPCAPFLAG}``
    Bitmask cut: removes rows with any listed bit set. ``bits`` are flag names of the
    :mod:`stellarnet.io.bitmasks` table or bit numbers; ``bits: all`` (or ``bits`` omitted)
    removes rows with any bit set (flag == 0 kept); ``bits: bad`` uses the table's ``bad_bits``.
    ``mode: all_set`` removes only rows with every listed bit set. The bit table is chosen by
    ``bitmask`` or from the column name (``PARAMFLAG_LOGG`` → PARAMFLAG). NaN flag values (only
    possible in float columns) count as no bits set.
``{finite: [TEFF, LOGG, FE_H]}``
    Removes rows where any listed column is NaN/±inf.
``{unique: APOGEE_ID, by: SNR}``
    Keeps one row per ``unique`` value: the one with the highest ``by`` (NaN last; ties → first
    row). Kept rows stay in their original order.

Any spec may carry ``mask: [FE_H, ...]``: rows failing it are kept, with the named columns (or the
columns ``mask_targets`` maps them to) set to NaN — e.g. GALAH's per-element flags blank [α/Fe]
only. The report's ``masked`` column counts them.

This is the one cut engine: the allStar cuts, the GALAH / LAMOST cuts (:func:`stellarnet.preparation.surveys.read_survey`)
and the cross-survey validation's APOGEE selection all go through :func:`apply_cuts`.

A spec that is ``null`` or has ``enabled: false`` is skipped (lets a Hydra override switch a
cut off: ``data.cuts.vscatter=null`` or ``data.cuts.vscatter.enabled=false``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stellarnet.common.files import to_plain
from stellarnet.io.bitmasks import BITMASKS, Bitmask
from stellarnet.io.catalogs import MissingColumnError
from stellarnet.preparation.cut_report import CutReport, CutRow

#: Physically possible ranges (inclusive) of catalogue labels, by allStar column name: values
#: outside are corrupt (wrong units, a sentinel that is not -9999, a bad fit), not extreme stars.
#: Teff in K, logg in dex (cgs), abundances in dex. Used by :func:`physical_range_cuts`.
PHYSICAL_LABEL_RANGES: dict[str, tuple[float, float]] = {
    "TEFF": (2000.0, 50000.0),
    "LOGG": (-1.0, 6.0),
    "FE_H": (-5.0, 1.5),
    "M_H": (-5.0, 1.5),
    "ALPHA_M": (-1.0, 1.5),
    "ALPHA_FE": (-1.0, 1.5),
}


_KIND_KEYS: dict[str, set[str]] = {
    "column": {"column", "min", "max", "keep_nan", "inclusive", "eq", "ne", "gt", "ge", "lt", "le"},
    "flag": {"flag", "bits", "mode", "bitmask"},
    "finite": {"finite"},
    "unique": {"unique", "by"},
}


_COMMON_KEYS = {"reason", "enabled", "mask"}


#: comparison cuts: spec key → (numpy comparison, symbol)
COMPARATORS: dict[str, tuple[Any, str]] = {
    "eq": (np.equal, "=="), "ne": (np.not_equal, "!="), "gt": (np.greater, ">"),
    "ge": (np.greater_equal, ">="), "lt": (np.less, "<"), "le": (np.less_equal, "<="),
}


class CutSpecError(ValueError):
    """A cut specification is malformed (unknown kind/key, unknown bit name, bad bound...)."""


class EmptySelectionError(ValueError):
    """The cuts removed every row. ``.cut`` names the cut, ``.report`` holds the report so far."""

    def __init__(self, message: str, cut: str, report: CutReport):
        super().__init__(message)
        self.cut = cut
        self.report = report


# --------------------------------------------------------------------------- spec handling



def _kind(name: str, spec: Mapping[str, Any]) -> str:
    kinds = [k for k in _KIND_KEYS if k in spec]
    if len(kinds) != 1:
        what = "no" if not kinds else f"several ({', '.join(kinds)})"
        raise CutSpecError(
            f"cut {name!r}: {what} spec kind in {dict(spec)!r}; a spec needs exactly one of "
            f"'column' (range), 'flag' (bitmask), 'finite' (list of columns), 'unique' (id column)"
        )
    kind = kinds[0]
    unknown = set(spec) - _KIND_KEYS[kind] - _COMMON_KEYS
    if unknown:
        raise CutSpecError(
            f"cut {name!r}: unknown key(s) {sorted(unknown)} for a {kind!r} cut; "
            f"allowed: {sorted(_KIND_KEYS[kind] | _COMMON_KEYS)}"
        )
    return kind


def _need(df: pd.DataFrame, cols: list[str], name: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise MissingColumnError(missing, f"the catalogue (needed by cut {name!r})")


def _number(v: Any, name: str, key: str) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool):
        raise CutSpecError(f"cut {name!r}: {key} must be a number, got {v!r}")
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise CutSpecError(f"cut {name!r}: {key} must be a number, got {v!r}") from None
    if math.isnan(x):
        raise CutSpecError(f"cut {name!r}: {key} is NaN")
    return x


def _comparison_cut(df: pd.DataFrame, name: str, spec: Mapping[str, Any], op: str) -> tuple[np.ndarray, str]:
    col = spec["column"]
    if any(k in spec for k in ("min", "max", "keep_nan", "inclusive")):
        raise CutSpecError(f"cut {name!r}: give either a comparison ({op}) or min/max, not both")
    values = df[col].to_numpy()
    fn, symbol = COMPARATORS[op]
    with np.errstate(invalid="ignore"):
        keep = np.asarray(fn(values, spec[op]), dtype=bool)
    if values.dtype.kind == "f":
        keep &= np.isfinite(values)
    return keep, f"{col} {symbol} {spec[op]}"


def _range_cut(df: pd.DataFrame, name: str, spec: Mapping[str, Any]) -> tuple[np.ndarray, str]:
    col = spec["column"]
    _need(df, [col], name)
    ops = [k for k in COMPARATORS if k in spec]
    if len(ops) > 1:
        raise CutSpecError(f"cut {name!r}: give one comparison of {list(COMPARATORS)}, got {ops}")
    if ops:
        return _comparison_cut(df, name, spec, ops[0])
    lo = _number(spec.get("min"), name, "min")
    hi = _number(spec.get("max"), name, "max")
    if lo is None and hi is None:
        raise CutSpecError(f"cut {name!r}: range cut on {col!r} needs 'min' and/or 'max'")
    if lo is not None and hi is not None and lo > hi:
        raise CutSpecError(f"cut {name!r}: min {lo} > max {hi}")
    keep_nan = bool(spec.get("keep_nan", False))
    inclusive = bool(spec.get("inclusive", False))
    s = df[col]
    if not (pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s)):
        raise CutSpecError(f"cut {name!r}: column {col!r} is not numeric (dtype {s.dtype})")
    x = s.to_numpy(dtype=float, na_value=np.nan)
    nan = np.isnan(x)
    keep = ~nan
    with np.errstate(invalid="ignore"):
        if lo is not None:
            keep &= (x >= lo) if inclusive else (x > lo)
        if hi is not None:
            keep &= (x <= hi) if inclusive else (x < hi)
    if keep_nan:
        keep |= nan
    ge, le = (">=", "<=") if inclusive else (">", "<")
    parts = []
    if lo is not None:
        parts.append(f"{col} {ge} {lo:g}")
    if hi is not None:
        parts.append(f"{col} {le} {hi:g}")
    desc = " and ".join(parts) + (" (NaN kept)" if keep_nan else "")
    return keep, desc


def _bitmask_for(name: str, spec: Mapping[str, Any], col: str) -> Bitmask:
    key = spec.get("bitmask")
    if key is None:
        key = col if col in BITMASKS else col.split("_")[0]
        if col.startswith("APOGEE_PIXMASK"):
            key = "APOGEE_PIXMASK"
    if key not in BITMASKS:
        raise CutSpecError(
            f"cut {name!r}: no bit table for {key!r}; set 'bitmask' to one of {sorted(BITMASKS)}"
        )
    return BITMASKS[key]


def _flag_cut(df: pd.DataFrame, name: str, spec: Mapping[str, Any]) -> tuple[np.ndarray, str]:
    col = spec["flag"]
    _need(df, [col], name)
    bm = _bitmask_for(name, spec, col)
    mode = spec.get("mode", "any_set")
    if mode not in ("any_set", "all_set"):
        raise CutSpecError(f"cut {name!r}: mode must be 'any_set' or 'all_set', got {mode!r}")
    bits = spec.get("bits", "all")
    s = df[col]
    if not (pd.api.types.is_integer_dtype(s) or pd.api.types.is_float_dtype(s)):
        raise CutSpecError(
            f"cut {name!r}: flag column {col!r} must hold integers (dtype {s.dtype}); "
            "array columns such as PARAMFLAG must be expanded (PARAMFLAG_LOGG, ...)"
        )
    if pd.api.types.is_float_dtype(s):
        v = s.to_numpy(dtype=float, na_value=np.nan)
        v = np.where(np.isfinite(v), v, 0).astype(np.int64)
    else:
        v = s.to_numpy().astype(np.int64)
    if isinstance(bits, str) and bits.lower() in ("all", "any"):
        if mode == "all_set":
            raise CutSpecError(f"cut {name!r}: 'bits: all' cannot be combined with mode all_set")
        return v == 0, f"{col} == 0 (no bits set)"
    if isinstance(bits, str) and bits.lower() == "bad":
        bit_list: list[int | str] = list(bm.bad_bits)
    elif isinstance(bits, (str, int)):
        bit_list = [bits]
    else:
        bit_list = list(bits)
    if not bit_list:
        raise CutSpecError(f"cut {name!r}: empty 'bits' list")
    nums: list[int] = []
    for b in bit_list:
        if isinstance(b, bool):
            raise CutSpecError(f"cut {name!r}: bad bit {b!r}")
        if isinstance(b, (int, np.integer)) or (isinstance(b, str) and b.isdigit()):
            n = int(b)
            if not 0 <= n < 64:
                raise CutSpecError(f"cut {name!r}: bit number {n} outside 0..63")
        else:
            try:
                n = bm.bit(str(b))
            except KeyError as exc:
                raise CutSpecError(f"cut {name!r}: {exc.args[0]}") from None
        nums.append(n)
    mask = np.uint64(sum(1 << n for n in set(nums))).astype(np.int64)
    hit = v & mask
    bad = (hit == mask) if mode == "all_set" else (hit != 0)
    names = [bm.bits.get(n, str(n)) for n in nums]
    joiner = " and " if mode == "all_set" else ", "
    desc = f"{col}: {'not all of' if mode == 'all_set' else 'none of'} {joiner.join(names)} set"
    return ~bad, desc


def _finite_cut(df: pd.DataFrame, name: str, spec: Mapping[str, Any]) -> tuple[np.ndarray, str]:
    cols = spec["finite"]
    cols = [cols] if isinstance(cols, str) else list(cols)
    if not cols:
        raise CutSpecError(f"cut {name!r}: 'finite' needs at least one column")
    _need(df, cols, name)
    keep = np.ones(len(df), dtype=bool)
    for c in cols:
        s = df[c]
        if not pd.api.types.is_numeric_dtype(s):
            raise CutSpecError(f"cut {name!r}: column {c!r} is not numeric (dtype {s.dtype})")
        keep &= np.isfinite(s.to_numpy(dtype=float, na_value=np.nan))
    return keep, f"finite {', '.join(cols)}"


def _unique_cut(df: pd.DataFrame, name: str, spec: Mapping[str, Any]) -> tuple[np.ndarray, str]:
    col = spec["unique"]
    by = spec.get("by", "SNR")
    if not isinstance(col, str) or not isinstance(by, str):
        raise CutSpecError(f"cut {name!r}: 'unique' and 'by' must be column names")
    _need(df, [col, by], name)
    score = df[by]
    if not pd.api.types.is_numeric_dtype(score):
        raise CutSpecError(f"cut {name!r}: 'by' column {by!r} is not numeric")
    tmp = pd.DataFrame(
        {
            "id": df[col].to_numpy(),
            "score": score.to_numpy(dtype=float, na_value=np.nan),
            "pos": np.arange(len(df)),
        }
    )
    tmp = tmp.sort_values("score", ascending=False, na_position="last", kind="stable")
    pos = tmp.drop_duplicates("id", keep="first")["pos"].to_numpy()
    keep = np.zeros(len(df), dtype=bool)
    keep[pos] = True
    ids = df[col].to_numpy()
    if ids.dtype.kind in "OUS":  # rows without an id are distinct stars, never merged
        keep |= pd.isna(ids) | (ids.astype(str) == "")
    return keep, f"one row per {col} (highest {by})"


_HANDLERS = {"column": _range_cut, "flag": _flag_cut, "finite": _finite_cut, "unique": _unique_cut}


def apply_cuts(df: pd.DataFrame, cuts: Mapping[str, Any] | None, *,
               mask_targets: Mapping[str, Sequence[str]] | None = None,
               allow_empty: bool = False) -> tuple[pd.DataFrame, CutReport]:
    """Apply ``cuts`` (ordered mapping name → spec, or an OmegaConf DictConfig) to ``df``.

    Returns ``(kept_df, report)``; ``kept_df`` keeps the original index of the surviving rows.
    ``mask_targets`` maps a name in a spec's ``mask`` list to the frame columns to blank (default:
    the name itself). Raises :class:`CutSpecError` for malformed specs, :class:`MissingColumnError`
    when a cut's column is absent and, unless ``allow_empty``, :class:`EmptySelectionError` when a
    cut leaves no rows (all three name the cut).
    """
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"apply_cuts needs a pandas DataFrame, got {type(df).__name__}")
    cuts = to_plain(cuts) if cuts is not None else {}
    if not isinstance(cuts, Mapping):
        raise CutSpecError(
            f"cuts must be a mapping name -> spec (e.g. a data/cuts YAML), got {type(cuts).__name__}"
        )
    report = CutReport(n_input=len(df))
    cur = df
    for name, spec in cuts.items():
        name = str(name)
        if spec is None:
            continue
        if not isinstance(spec, Mapping):
            raise CutSpecError(f"cut {name!r}: spec must be a mapping, got {spec!r}")
        kind = _kind(name, spec)
        if not spec.get("enabled", True):
            continue
        keep, desc = _HANDLERS[kind](cur, name, spec)
        before = len(cur)
        masked = 0
        if spec.get("mask"):
            cur = cur.copy()
            for target in spec["mask"]:
                for c in (mask_targets or {}).get(target, [target]):
                    if c in cur.columns:
                        cur.loc[~keep, c] = np.nan
            masked = int((~keep).sum())
        else:
            cur = cur[keep]
        reason = spec.get("reason") or desc
        report.rows.append(CutRow(name, str(reason), before, before - len(cur), len(cur), str(desc), masked))
        if len(cur) == 0 and before > 0 and not allow_empty:
            raise EmptySelectionError(
                f"cut {name!r} ({reason}; applied: {desc}) removed all {before} remaining rows; "
                f"report so far:\n{report}",
                cut=name,
                report=report,
            )
    if len(cur) == 0 and not allow_empty:
        raise EmptySelectionError(
            "the catalogue has no rows to select from", cut="<input>", report=report
        )
    return cur, report


def physical_range_cuts(
    columns, ranges: Mapping[str, tuple[float, float]] | None = None
) -> dict[str, dict[str, Any]]:
    """Range cuts (for :func:`apply_cuts`) that remove rows whose label in ``columns`` lies outside
    its physical range (``ranges``, default :data:`PHYSICAL_LABEL_RANGES`; columns without a range
    are skipped). NaN labels are kept (a missing label is masked, not wrong). Cut names are
    ``physical_<COLUMN>``; each reason names the range, e.g. "TEFF outside the physical range
    [2000, 50000]".
    """
    ranges = PHYSICAL_LABEL_RANGES if ranges is None else to_plain(ranges)
    out: dict[str, dict[str, Any]] = {}
    for col in dict.fromkeys(columns):
        if col not in ranges:
            continue
        lo, hi = ranges[col]
        out[f"physical_{col}"] = {
            "column": col, "min": lo, "max": hi, "inclusive": True, "keep_nan": True,
            "reason": f"{col} outside the physical range [{lo:g}, {hi:g}]",
        }
    return out


def load_cuts(name_or_path: str | os.PathLike) -> dict[str, Any]:
    """Load a cut set: a name in ``conf/data/cuts`` (e.g. ``"dr17_science"``) or a YAML path."""
    from omegaconf import OmegaConf

    from stellarnet.common.paths import CONF_DIR

    p = Path(name_or_path)
    if p.suffix not in (".yaml", ".yml"):
        p = CONF_DIR / "data" / "cuts" / f"{name_or_path}.yaml"
    if not p.exists():
        avail = sorted(x.stem for x in (CONF_DIR / "data" / "cuts").glob("*.yaml"))
        raise FileNotFoundError(f"cut set {str(name_or_path)!r} not found ({p}); available: {avail}")
    cfg = OmegaConf.to_container(OmegaConf.load(p), resolve=True)
    if not isinstance(cfg, dict):
        raise CutSpecError(f"{p} must hold a mapping name -> cut spec")
    return cfg
