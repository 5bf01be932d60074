"""Entry point: ``python -m stellarnet.crossval survey=galah`` (or ``survey=lamost``).

Compares APOGEE labels (``apogee_catalog``) and, when ``predictions`` is set, stellarnet
predictions with an external survey catalogue (GALAH DR3 / LAMOST DR7 format, Hydra group
``survey``): one-to-one crossmatch, offsets Δ = survey − reference (median, bootstrap error,
robust scatter), trends vs Teff / logg / [Fe/H] (binned medians + robust polynomial fits), a joint
fit Δ = a + b·(Teff−5000)/1000 + c·[Fe/H], and a calibration reference → survey fitted on one
random half and validated on the other.

Outputs (in ``output_dir``, default the Hydra run directory):
``crossval_report.json``, ``crossval_report.md``, ``survey_cuts.csv``, per reference
(``apogee``, ``stellarnet``): ``matches_<ref>.csv``, ``calibration_<survey>_<ref>.json``,
``offsets_<ref>.png`` (Δ vs Teff and vs [Fe/H] per label with binned medians and the fit) and
``separation_<ref>.png`` (separation histogram).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from stellarnet.common.files import to_plain
from stellarnet.crossval.calibration import fit_calibration
from stellarnet.crossval.crossmatch import MatchResult, crossmatch
from stellarnet.crossval.offsets import DEFAULT_LABELS, TREND_AXES, UNITS, Comparison, compare
from stellarnet.io.allstar_columns import add_derived_columns
from stellarnet.io.catalogs import MissingColumnError, allstar_columns, read_allstar
from stellarnet.preparation.surveys import SurveyCatalog, apply_survey_cuts, read_survey, survey_spec

log = logging.getLogger(__name__)

APOGEE_REQUIRED = ("APOGEE_ID", "RA", "DEC", "TEFF", "LOGG", "FE_H")
APOGEE_OPTIONAL = ("GAIAEDR3_SOURCE_ID", "SNR", "ASPCAPFLAG", "TEFF_ERR", "LOGG_ERR", "FE_H_ERR",
                   "ALPHA_M", "ALPHA_M_ERR", "M_H", "ALPHA_FE", "ALPHA_FE_ERR")
_APOGEE_LABEL_COLUMNS = ("TEFF", "TEFF_ERR", "LOGG", "LOGG_ERR", "FE_H", "FE_H_ERR", "ALPHA_M",
                         "ALPHA_M_ERR", "M_H", "M_H_ERR", "ALPHA_FE", "ALPHA_FE_ERR")


def load_apogee(path: str | Path, cfg: Mapping[str, Any]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Read the APOGEE allStar for the comparison.

    Returns (positions: one row per APOGEE_ID, highest ``unique_by`` kept, no label cuts;
    reference: positions after ``exclude_aspcapflag`` and ``cuts``; cut report DataFrame).
    """
    cfg = dict(to_plain(cfg) or {})
    available = {c.upper() for c in allstar_columns(path)}
    cols = list(APOGEE_REQUIRED) + [c for c in APOGEE_OPTIONAL if c in available]
    df = add_derived_columns(read_allstar(path, columns=cols, required=APOGEE_REQUIRED).reset_index(drop=True))
    reports = []
    by = cfg.get("unique_by")
    if by and by in df.columns:
        df, rep = apply_survey_cuts(df, {"unique_apogee_id": {
            "unique": "APOGEE_ID", "by": by, "reason": f"duplicate APOGEE_ID (highest {by} kept)"}})
        reports.append(rep)
    positions = df.reset_index(drop=True)
    flags = list(cfg.get("exclude_aspcapflag") or [])
    cuts = {}
    if flags and "ASPCAPFLAG" in positions.columns:
        cuts["aspcapflag"] = {"flag": "ASPCAPFLAG", "bits": flags, "reason": f"ASPCAPFLAG {','.join(flags)}"}
    cuts.update(dict(cfg.get("cuts") or {}))
    ref, rep = apply_survey_cuts(positions, cuts)
    reports.append(rep)
    report = pd.concat(reports, ignore_index=True) if reports else pd.DataFrame()
    return positions, ref.reset_index(drop=True), report


def load_predictions(path: str | Path, positions: pd.DataFrame, columns: Mapping[str, str],
                     error_suffix: str | None = "_ERR") -> pd.DataFrame:
    """stellarnet predictions (CSV or FITS with ``APOGEE_ID`` + label columns) joined onto the
    APOGEE positions/ids; label columns renamed to TEFF, LOGG, FE_H, ALPHA_FE (K, dex) and,
    where ``<column><error_suffix>`` exists (e.g. ``TEFF_ERR``), the 1σ uncertainty to
    ``<LABEL>_ERR`` (used by the errors-in-variables correction of the trend fits)."""
    path = Path(path)
    if path.suffix.lower() in (".csv", ".txt"):
        pred = pd.read_csv(path)
    else:
        names = allstar_columns(path)
        pred = read_allstar(path, columns=names)
    wanted = {"APOGEE_ID": "APOGEE_ID", **{v: k.upper() for k, v in columns.items()}}
    missing = [c for c in wanted if c not in pred.columns]
    if missing:
        raise MissingColumnError(missing, f"predictions file {path}", list(pred.columns))
    if error_suffix:
        for k, v in columns.items():
            if f"{v}{error_suffix}" in pred.columns:
                wanted[f"{v}{error_suffix}"] = f"{k.upper()}_ERR"
    pred = pred[list(wanted)].rename(columns=wanted)
    pred["APOGEE_ID"] = pred["APOGEE_ID"].astype(str).str.strip()
    pred = pred.drop_duplicates("APOGEE_ID", keep="first")
    base = positions.drop(columns=[c for c in _APOGEE_LABEL_COLUMNS if c in positions.columns])
    return base.merge(pred, on="APOGEE_ID", how="inner").reset_index(drop=True)


def _num(col: pd.Series) -> np.ndarray:
    return pd.to_numeric(col, errors="coerce").to_numpy(dtype=float)


def plot_offsets(ref: pd.DataFrame, sur: pd.DataFrame, comp: Comparison, path: Path, title: str) -> Path:
    """Δ = survey − reference vs reference Teff and [Fe/H], one row per label: points, binned
    medians with bootstrap errors and the robust polynomial fit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(comp.labels)
    axes_names = [a for a in ("teff", "fe_h") if a in comp.labels]
    fig, axs = plt.subplots(len(labels), max(len(axes_names), 1), squeeze=False,
                            figsize=(5.0 * max(len(axes_names), 1), 2.8 * len(labels)))
    for i, name in enumerate(labels):
        rc, sc = comp.labels[name]
        d = _num(sur[sc]) - _num(ref[rc])
        for j, axis in enumerate(axes_names):
            ax = axs[i, j]
            _, center, scale = TREND_AXES[axis]
            x = _num(ref[comp.labels[axis][0]])
            ax.scatter(x, d, s=3, alpha=0.3, color="0.5", rasterized=True)
            t = comp.trends.get(name, {}).get(axis)
            if t is not None:
                b = t["bins"]
                ax.errorbar(b["x_median"], b["median"], yerr=b["median_err"], fmt="o", color="C3",
                            ms=4, capsize=2, label="binned median")
                if np.isfinite(x).any():
                    xx = np.linspace(np.nanpercentile(x, 1), np.nanpercentile(x, 99), 100)
                    yy = np.polyval(t["fit"].coef[::-1], (xx - center) / scale)
                    ax.plot(xx, yy, color="C0", label="robust fit")
            if np.isfinite(d).any():
                med = float(np.nanmedian(d))
                spread = float(np.nanpercentile(np.abs(d - med), 95)) + 1e-9
                ax.set_ylim(med - 1.5 * spread, med + 1.5 * spread)
            ax.axhline(0, color="k", lw=0.5)
            ax.set_xlabel(f"reference {axis} [{UNITS.get(axis, '')}]")
            ax.set_ylabel(f"Δ {name} [{UNITS.get(name, '')}]")
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_separations(match: MatchResult, path: Path, title: str) -> Path:
    """Histogram of pair separations (arcsec) per match method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    sep = match.pairs["sep_arcsec"].to_numpy(float)
    fin = sep[np.isfinite(sep)]
    hi = max(match.radius_arcsec, float(np.percentile(fin, 99.5)) if len(fin) else 1.0)
    bins = np.linspace(0, hi, 41)
    for method, g in match.pairs.groupby("method"):
        s = g["sep_arcsec"].to_numpy(float)
        s = np.clip(s[np.isfinite(s)], 0, hi)
        ax.hist(s, bins=bins, histtype="step", lw=1.5, label=f"{method} ({len(g)})")
    ax.axvline(match.radius_arcsec, color="k", ls="--", lw=0.8, label="radius")
    ax.set_xlabel("separation [arcsec]")
    ax.set_ylabel("pairs")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) >= 1000 else f"{v:.{digits}f}"
    return str(v)


def report_markdown(report: Mapping[str, Any]) -> str:
    """Human-readable markdown version of the JSON report."""
    lines = [f"# Cross-survey validation: {report['survey']}", "",
             f"- survey catalogue: `{report['survey_catalog']}` ({report['survey_rows_read']} rows read, "
             f"{report['survey_rows_kept']} after quality cuts)",
             f"- APOGEE catalogue: `{report['apogee_catalog']}` ({report['apogee_rows']} stars after cuts)",
             "", "Δ = survey − reference. Teff in K, logg/[Fe/H]/[α/Fe] in dex. Errors: bootstrap "
             f"({report['settings']['n_boot']} replicates). Scatter = 1.4826·MAD.", ""]
    lines += ["## Survey quality cuts", "", "| cut | reason | before | removed | masked | kept |",
              "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in report["survey_cuts"]:
        lines.append(f"| {r['name']} | {r['reason']} | {r['before']} | {r['removed']} | {r['masked']} | {r['kept']} |")
    for ref_name, res in report["references"].items():
        m = res["match"]
        lines += ["", f"## Reference: {ref_name}", "", "### Crossmatch", "",
                  f"n_apogee = {m['n_apogee']}, n_survey = {m['n_survey']}, n_matched = {m['n_matched']} "
                  f"(gaia {m['by_method']['gaia']}, tmass {m['by_method']['tmass']}, position "
                  f"{m['by_method']['position']}), n_ambiguous = {m['n_ambiguous']}, radius = "
                  f"{m['radius_arcsec']}″", ""]
        sep = m["separation_arcsec"].get("all", {})
        if sep.get("n"):
            lines.append(f"Separation: median {sep['median']:.3f}″, p90 {sep['p90']:.3f}″, "
                         f"p99 {sep['p99']:.3f}″, max {sep['max']:.3f}″")
        lines += ["", "### Offsets", "", "| label | n | median | ± | scatter | mean | std |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in res["comparison"]["offsets"]:
            lines.append(f"| {r['label']} [{r['unit']}] | {r['n']} | {_fmt(r['median'])} | "
                         f"{_fmt(r['median_err'])} | {_fmt(r['scatter'])} | {_fmt(r['mean'])} | {_fmt(r['std'])} |")
        lines += ["", "### Trend fits (Δ vs reference label, x = (label − center)/scale)", "",
                  "EIV: slope corrected for the reference noise on the x axis (errors-in-variables, "
                  "from the reference `_ERR` columns).", "",
                  "| label | axis | center, scale | coefficients (± bootstrap) | n | rejected | EIV |",
                  "| --- | --- | --- | --- | ---: | ---: | --- |"]
        for lab, axes in res["comparison"]["trends"].items():
            for axis, t in axes.items():
                f = t["fit"]
                co = ", ".join(f"{k}: {_fmt(f['coef'][k])} ± {_fmt(f['coef_err'][k])}" for k in f["terms"])
                eiv = "yes" if f["x"].get("errors_in_variables") else "no"
                lines.append(f"| {lab} | {axis} | {f['x']['center']:g}, {f['x']['scale']:g} | {co} | "
                             f"{f['n']} | {f['n_rejected']} | {eiv} |")
        lines += ["", "### Joint fit Δ = const + teff_slope_per_1000K·(Teff−5000)/1000 + feh_slope·[Fe/H]", "",
                  "| label | const | teff_slope_per_1000K | feh_slope | robust σ | n |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for lab, f in res["comparison"]["joint"].items():
            c, e = f["coef"], f["coef_err"]
            lines.append(f"| {lab} | " + " | ".join(f"{_fmt(c[k])} ± {_fmt(e[k])}" for k in f["terms"])
                         + f" | {_fmt(f['scale'])} | {f['n']} |")
        cal = res.get("calibration")
        if cal:
            lines += ["", f"### Calibration (degree {cal['degree']}, validated on the held-out half)", "",
                      f"Saved as `{cal['file']}`.", "",
                      "| label | n_train | n_val | median before → after | scatter before → after "
                      "| RMS before → after |",
                      "| --- | ---: | ---: | --- | --- | --- |"]
            for r in cal["validation"]:
                lines.append(f"| {r['label']} [{r['unit']}] | {r['n_train']} | {r['n_val']} | "
                             f"{_fmt(r['before_median'])} → {_fmt(r['after_median'])} | "
                             f"{_fmt(r['before_scatter'])} → {_fmt(r['after_scatter'])} | "
                             f"{_fmt(r['before_rms'])} → {_fmt(r['after_rms'])} |")
        figs = res.get("figures", {})
        if figs:
            lines += ["", "### Figures", ""] + [f"![{k}]({Path(v).name})" for k, v in figs.items()]
    return "\n".join(lines) + "\n"


def _records(df: pd.DataFrame) -> list[dict[str, Any]]:
    return json.loads(df.to_json(orient="records"))


def run_crossval(cfg: DictConfig | Mapping[str, Any], output_dir: str | Path | None = None) -> dict[str, Any]:
    """Run the whole comparison for one survey; writes the outputs and returns the JSON report."""
    # Convert key by key: `paths`/`hydra` hold ${hydra:...} interpolations that only resolve
    # inside a Hydra run, and are not needed here.
    c = {k: to_plain(cfg[k]) for k in cfg if k not in ("paths", "hydra")}
    spec = survey_spec(c["survey"])
    root = Path(c["survey_root"])
    survey_path = Path(c.get("survey_catalog") or root / spec.path)
    apogee_path = Path(c.get("apogee_catalog") or root / "allStar-dr17-synspec_rev1.fits")
    out = Path(output_dir or c.get("output_dir") or ".")
    out.mkdir(parents=True, exist_ok=True)
    off, mcfg, ccfg = c.get("offsets", {}), c.get("match", {}), c.get("calibration", {})
    n_boot, seed = int(off.get("n_boot", 300)), int(off.get("seed", 0))

    cat: SurveyCatalog = read_survey(survey_path, spec)
    cat.cut_report.to_csv(out / "survey_cuts.csv", index=False)
    log.info("%s: %d rows read, %d after cuts", spec.name, cat.n_read, len(cat.data))
    positions, apogee, apogee_cuts = load_apogee(apogee_path, c.get("apogee", {}))
    references: dict[str, pd.DataFrame] = {"apogee": apogee}
    if c.get("predictions"):
        references["stellarnet"] = load_predictions(c["predictions"], positions,
                                                    c.get("prediction_columns") or {},
                                                    c.get("prediction_error_suffix", "_ERR"))

    report: dict[str, Any] = {
        "survey": spec.name, "survey_catalog": str(survey_path), "apogee_catalog": str(apogee_path),
        "predictions": c.get("predictions"), "survey_rows_read": cat.n_read,
        "survey_rows_kept": len(cat.data), "apogee_rows": len(apogee),
        "survey_cuts": _records(cat.cut_report), "apogee_cuts": _records(apogee_cuts),
        "settings": {"n_boot": n_boot, "seed": seed, "trend_degree": int(off.get("trend_degree", 1)),
                     "match": dict(mcfg), "calibration": dict(ccfg)},
        "references": {},
    }
    bins = {k: v for k, v in (off.get("bins") or {}).items() if v is not None}
    for ref_name, ref in references.items():
        match = crossmatch(ref, cat.data, radius_arcsec=float(mcfg.get("radius_arcsec", 1.0)),
                           use_gaia_id=bool(mcfg.get("use_gaia_id", True)),
                           use_tmass_id=bool(mcfg.get("use_tmass_id", True)),
                           id_max_sep_arcsec=mcfg.get("id_max_sep_arcsec"))
        log.info("%s vs %s: %s", ref_name, spec.name, match.counts())
        mref, msur = match.matched_frames(ref, cat.data)
        match.join(ref, cat.data).to_csv(out / f"matches_{ref_name}.csv", index=False)
        comp = compare(mref, msur, DEFAULT_LABELS, degree=int(off.get("trend_degree", 1)),
                       bins=bins, n_boot=n_boot, seed=seed, min_per_bin=int(off.get("min_per_bin", 10)),
                       errors_in_variables=bool(off.get("errors_in_variables", True)))
        res: dict[str, Any] = {"match": match.summary(), "comparison": comp.as_dict()}
        if ccfg.get("enabled", True):
            calib, val = fit_calibration(
                mref, msur, DEFAULT_LABELS, features=list(ccfg.get("features", ("teff", "logg", "fe_h"))),
                degree=int(ccfg.get("degree", 1)), train_fraction=float(ccfg.get("train_fraction", 0.5)),
                seed=int(ccfg.get("seed", 0)), survey_name=spec.name, reference_name=ref_name)
            path = calib.save(out / f"calibration_{spec.name}_{ref_name}.json")
            res["calibration"] = {"file": path.name, "degree": calib.degree,
                                  "validation": _records(val.reset_index())}
        if c.get("plots", True):
            res["figures"] = {
                "offsets": str(plot_offsets(mref, msur, comp, out / f"offsets_{ref_name}.png",
                                            f"{spec.name} − {ref_name}")),
                "separation": str(plot_separations(match, out / f"separation_{ref_name}.png",
                                                   f"{ref_name} × {spec.name}")),
            }
        report["references"][ref_name] = res
    (out / "crossval_report.json").write_text(json.dumps(report, indent=2, default=_json_default))
    (out / "crossval_report.md").write_text(report_markdown(report))
    return report


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o)}")
