"""The robustness shift suite, run on a model folder: accuracy and σ honesty under realistic shifts.

For every shift of :data:`stellarnet.simulate.shifts.SHIFT_SUITE` a fresh set of stars is simulated
in memory (the default population or the shift's mix; S/N log-uniform in 50–400; on average 0.5
bad-pixel runs per spectrum and persistence in ~10 % of the stars), put through the same path as an aspcapStar file read by
``predict`` (gap-inserted 8,575-pixel arrays → ``prepare_spectrum(normalized=True)``), predicted
by the model folder (refined labels and the network's own), and scored against the true labels.
The stars' labels, S/N and noise draws are the same for every shift with the default population.

Per label, on the stars at S/N 100–200 (as the in-distribution table of docs/performance.md):
robust σ (1.4826 × MAD of the error), median bias, robust z std and 1σ coverage of
z = error / σ. Per shift: stage accuracy, red-clump purity and completeness, flag rates.
Optionally the project's baselines (Cannon-style, PCA + XGBoost), trained on the shards' training
split, on the same spectra.

An entry-point-layer module (like :mod:`stellarnet.evaluation.spectral_model`): it may call the simulator,
the library modules never do. Used by ``train`` and ``evaluate`` (``shifts.enabled=true``) and by
``scripts/bench_shift.py``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from stellarnet.evaluation.metrics import red_clump_purity_completeness, robust_scatter
from stellarnet.io.bitmasks import STELLARNET_FLAG
from stellarnet.io.catalogs import fits_strings
from stellarnet.network.inference import Predictor
from stellarnet.network.model_folder import load_model
from stellarnet.physics.kurucz import LABEL_NAMES
from stellarnet.preparation.spectra import prepare_spectrum
from stellarnet.simulate.allstar import draw_detector_defects
from stellarnet.simulate.instrument import observe_spectra
from stellarnet.simulate.population import STAGES, sample_population
from stellarnet.simulate.shifts import Shift, draw_persistence, shift_suite

__all__ = ["simulate", "true_crlb", "run_shift_suite", "train_baselines", "shift_markdown", "write_shift_table",
           "shift_table_from_config", "score_catalogue", "save_shift_results", "SNR_BIN"]

log = logging.getLogger(__name__)

SNR_BIN = (100.0, 200.0)


def simulate(shift: Shift, n: int, seed: int, chunk: int = 256) -> dict[str, np.ndarray]:
    """``n`` stars observed with ``shift``: 8,575-pixel flux/err, true labels, stage codes, S/N."""
    pop = sample_population(n, np.random.default_rng([seed, 1]), shift.mix)
    rng = np.random.default_rng([seed, 2])
    snr = 10 ** rng.uniform(np.log10(50.0), np.log10(400.0), n) * shift.snr_scale
    # fewer bad-pixel runs than a survey row (combined spectra), persistence in ~10 % of the stars
    bad_start, bad_len, persist = draw_detector_defects(rng, n, mean_runs=0.5, persist_cuts=(0.03, 0.06, 0.10))
    if shift.persistence_fraction is not None:
        persist = draw_persistence(n, shift.persistence_fraction, rng)
    flux, err = [], []
    for i, s in enumerate(range(0, n, chunk)):
        sl = slice(s, s + chunk)
        f, e, _ = observe_spectra(pop.labels[sl], snr[sl], np.random.default_rng([seed, 3, i]), bad_start[sl],
                                  bad_len[sl], persist[sl], shift=shift)
        flux.append(f)
        err.append(e)
    return {"flux": np.concatenate(flux), "flux_err": np.concatenate(err), "labels": pop.labels,
            "stage": pop.stage.astype(int), "snr": snr}


def label_metrics(est: np.ndarray, sigma: np.ndarray | None, truth: np.ndarray, names: list[str],
                  crlb: np.ndarray | None = None) -> dict[str, Any]:
    """Per label: robust σ and median bias of ``est − truth``; with ``sigma`` the robust z std, 1σ
    coverage and median σ; with ``crlb`` (N, L; NaN where not computed) the robust σ of
    (est − truth) / CRLB — how far from the Cramér–Rao bound, whatever the stars' own difficulty."""
    out = {}
    for j, name in enumerate(names):
        d = est[:, j] - truth[:, j]
        ok = np.isfinite(d)
        m: dict[str, float] = {"n": int(ok.sum())}
        if crlb is not None and j < crlb.shape[1]:
            with np.errstate(invalid="ignore", divide="ignore"):
                ratio = d / crlb[:, j]
            ratio = ratio[np.isfinite(ratio)]
            if ratio.size:
                m["robust_sigma_over_crlb"] = robust_scatter(ratio)
                m["median_crlb"] = float(np.nanmedian(crlb[:, j]))
        d = d[ok]
        if d.size:
            m["robust_sigma"] = robust_scatter(d)
            m["bias"] = float(np.median(d))
            if sigma is not None:
                z = d / sigma[ok, j]
                m["z_std"] = robust_scatter(z)
                m["coverage_1sigma"] = float(np.mean(np.abs(z) < 1))
                m["median_sigma"] = float(np.median(sigma[ok, j]))
        out[name] = m
    return out


def stage_codes(names: Any) -> np.ndarray:
    """Stage names (MS, SG, RGB, RC) → their codes in ``STAGES``; −1 for anything else."""
    return np.array([STAGES.index(s) if s in STAGES else -1 for s in names], dtype=int)


def bad_fraction(flag: np.ndarray) -> float:
    """The share of stars with a bad ``STELLARNET_FLAG`` bit."""
    bad = STELLARNET_FLAG.value_of(STELLARNET_FLAG.bad_bits)
    return float(np.mean(np.asarray(flag, np.int64) & bad > 0))


def stage_metrics(pred_stage: np.ndarray, true_stage: np.ndarray) -> dict[str, float]:
    """Stage accuracy and red-clump purity / completeness (stage codes of ``STAGES``)."""
    rc = red_clump_purity_completeness(pred_stage, true_stage, rc_code=STAGES.index("RC"))
    return {"accuracy": float(np.mean(pred_stage == true_stage)), "rc_purity": float(rc["purity"]),
            "rc_completeness": float(rc["completeness"])}


def train_baselines(dataset: str) -> dict[str, Any]:
    """The Cannon-style model and PCA(100) + XGBoost, trained on the shards' training split."""
    from stellarnet.baselines.cannon import CannonModel
    from stellarnet.baselines.pca import SpectralPCAFeatures
    from stellarnet.baselines.trees import TreeBaseline
    from stellarnet.evaluation.split_predictions import load_split

    train = load_split(dataset, "train")
    t0 = time.perf_counter()
    cannon = CannonModel()
    cannon.fit(train["labels"], train["flux"], train["flux_err"], train["pix_mask"])
    log.info("baseline cannon fitted in %.0f s", time.perf_counter() - t0)
    t0 = time.perf_counter()
    pca = SpectralPCAFeatures(n_components=100).fit(train["flux"], train["pix_mask"])
    tree = TreeBaseline("xgboost", pca, use_photometry=False)
    tree.fit({**train, "photometry": None, "classes": None})  # labels only, spectra only (as the Cannon)
    log.info("baseline xgboost fitted in %.0f s", time.perf_counter() - t0)
    return {"cannon": cannon, "xgboost": tree}


def true_crlb(labels: np.ndarray, snr: np.ndarray) -> np.ndarray:
    """Per-star Cramér–Rao bound (N, 4) [K, dex, dex, dex] at the true labels, for white noise
    1/S/N per pixel and every pixel usable (the simulator's own spectral model,
    :func:`stellarnet.evaluation.spectral_model.emulator_model`); NaN outside the model's label box. The
    difficulty of the star itself, the same for every shift of the same stars."""
    from stellarnet.evaluation.crlb import box_selection
    from stellarnet.evaluation.fisher import DEFAULT_STEPS, crlb_for_stars
    from stellarnet.evaluation.spectral_model import emulator_model

    model = emulator_model()
    out = np.full((labels.shape[0], len(model.label_names)), np.nan)
    inside, _ = box_selection(labels[:, : len(model.label_names)], snr, model.lower, model.upper)
    if inside.any():
        out[inside] = crlb_for_stars(model.fn, labels[inside, : len(model.label_names)], snr=snr[inside],
                                     steps=[DEFAULT_STEPS[k] for k in model.label_names],
                                     label_names=model.label_names, bounds=model.bounds)
    return out


def run_shift_suite(model: str | Path | Predictor, names: list[str] | None = None, n: int = 1000, seed: int = 0,
                    baselines: Mapping[str, Any] | None = None, crlb: bool = False,
                    common_residual: bool = False) -> dict[str, Any]:
    """Score a model folder (or a loaded :class:`Predictor`) on the named shifts (all when None).

    With ``common_residual`` each shift's stars are treated as one survey, as ``predict
    survey_residual=true`` does: the residual they share is measured on them first
    (:meth:`Predictor.measure_common_residual`) and divided out (entry ``common_residual``).

    With ``crlb`` every label is also scored in units of each star's Cramér–Rao bound
    (:func:`true_crlb`), which separates what a shift does to the model from how hard the shifted
    stars are by themselves (a population with more hot and metal-poor stars has weaker lines)."""
    predictor = model if isinstance(model, Predictor) else load_model(model)
    label_names = predictor.label_names
    source = "<Predictor>" if isinstance(model, Predictor) else str(model)
    results: dict[str, Any] = {"model": source, "n_stars": n, "seed": seed, "snr_bin": SNR_BIN,
                               "common_residual": bool(common_residual),
                               "label_names": label_names, "shifts": {}}
    for name, shift in shift_suite(names).items():
        t0 = time.perf_counter()
        sim = simulate(shift, n, seed)
        flux, err, good = prepare_spectrum(sim["flux"], sim["flux_err"], None, grid=predictor.grid, normalized=True,
                                           allow_empty=True)
        t_sim = time.perf_counter() - t0
        t0 = time.perf_counter()
        saved = predictor.flux_correction
        shared = predictor.measure_common_residual(flux, err, pix_mask=good) if common_residual else None
        try:
            pred = predictor.predict(flux, err, pix_mask=good)
        finally:
            predictor.flux_correction = saved
        t_pred = time.perf_counter() - t0
        lo, hi = (v * shift.snr_scale for v in SNR_BIN)  # the same stars, whatever their S/N
        sel = (sim["snr"] >= lo) & (sim["snr"] < hi)
        truth = sim["labels"][sel]
        bound = true_crlb(truth, sim["snr"][sel]) if crlb else None
        entry: dict[str, Any] = {"shift": shift.to_dict(), "n_bin": int(sel.sum()), "snr_bin": [lo, hi],
                                 "seconds_simulate": t_sim,
                                 "seconds_predict": t_pred}
        if shared is not None:
            entry["common_residual"] = shared
        if "labels_network" in pred:  # χ²-refined: the catalogue's labels and the network's own
            entry["refined"] = label_metrics(pred["labels"][sel], pred["sigma_total"][sel], truth, label_names, bound)
            entry["network"] = label_metrics(pred["labels_network"][sel], pred["sigma_network"][sel], truth,
                                             label_names, bound)
            entry["refined_fraction"] = float(np.mean(pred["refine_flag"] == 0))
            entry["median_chi2"] = float(np.nanmedian(pred["refine_chi2"]))
        else:
            entry["network"] = label_metrics(pred["labels"][sel], pred["sigma_total"][sel], truth, label_names, bound)
        pred_stage = stage_codes(pred["classes"]["stage"]) \
            if "stage" in pred["classes"] else np.full(n, -1)
        entry["stage"] = stage_metrics(pred_stage, sim["stage"])
        flag = pred["stellarnet_flag"]
        entry["flag_rates"] = {b: float(np.mean(flag & (1 << STELLARNET_FLAG.bit(b)) > 0))
                               for b in STELLARNET_FLAG.bits.values()}
        entry["flag_any_bad"] = bad_fraction(flag)
        if baselines:
            entry["baselines"] = {}
            split = {"flux": flux[sel], "flux_err": err[sel], "pix_mask": good[sel].astype(np.float32),
                     "photometry": None}
            for bname, model in baselines.items():
                if bname == "cannon":
                    lab = model.predict(split["flux"], split["flux_err"], split["pix_mask"])
                else:
                    lab = model.predict(split)["labels"]
                entry["baselines"][bname] = label_metrics(lab, None, truth, label_names, bound)
        results["shifts"][name] = entry
        r = entry.get("refined", entry["network"])
        log.info("shift %-15s σ %s | stage %.3f (%.0f + %.0f s)", name,
                 " ".join(f"{r[k].get('robust_sigma', np.nan):.4g}" for k in label_names),
                 entry["stage"]["accuracy"], t_sim, t_pred)
    return results


def score_catalogue(predictions: Any, truth: Any, label_names: list[str] | None = None,
                    snr_bin: tuple[float, float] = SNR_BIN) -> dict[str, Any]:
    """Score a ``predict`` catalogue of a simulated survey against its truth file, as the suite does.

    ``predictions``: the catalogue (path or astropy Table: ``APOGEE_ID``, ``SNR``, ``<LABEL>``,
    ``<LABEL>_ERR``, and when refined ``<LABEL>_NET`` / ``<LABEL>_NET_ERR``, ``STAGE``,
    ``STELLARNET_FLAG``); ``truth``: the survey's ``truth/truth.fits`` (path or Table, one row per
    star, keyed by ``APOGEE_ID``). Every catalogue row is scored (duplicate allStar rows of a star
    included, each with its own spectrum); labels on the rows with ``snr_bin[0] ≤ SNR < snr_bin[1]``,
    the stage over all rows. Raises ``KeyError`` naming catalogue stars missing from the truth.
    """
    from astropy.table import Table

    pred = predictions if isinstance(predictions, Table) else Table.read(predictions)
    true = truth if isinstance(truth, Table) else Table.read(truth)
    names = list(label_names or [c for c in LABEL_NAMES if c in pred.colnames])
    where = {star: i for i, star in enumerate(fits_strings(true["APOGEE_ID"]))}
    ids = fits_strings(pred["APOGEE_ID"])
    missing = sorted({i for i in ids if i not in where})
    if missing:
        raise KeyError(f"{len(missing)} catalogue stars are not in the truth file, e.g. {missing[:3]}")
    row = np.array([where[i] for i in ids], dtype=int)
    truth_labels = np.stack([np.asarray(true[c], dtype=float)[row] for c in names], 1)
    snr = np.asarray(pred["SNR"] if "SNR" in pred.colnames else true["SNR"][row], dtype=float)
    sel = (snr >= snr_bin[0]) & (snr < snr_bin[1])

    def cols(suffix: str) -> np.ndarray:
        return np.stack([np.asarray(pred[c + suffix], dtype=float) for c in names], 1)

    out: dict[str, Any] = {"n_rows": len(pred), "n_bin": int(sel.sum()), "snr_bin": list(snr_bin)}
    kind = "refined" if all(c + "_NET" in pred.colnames for c in names) else "network"
    out[kind] = label_metrics(cols("")[sel], cols("_ERR")[sel], truth_labels[sel], names)
    if kind == "refined":
        out["network"] = label_metrics(cols("_NET")[sel], cols("_NET_ERR")[sel], truth_labels[sel], names)
    if "STAGE" in pred.colnames and "STAGE_CODE" in true.colnames:
        out["stage"] = stage_metrics(stage_codes(fits_strings(pred["STAGE"])),
                                     np.asarray(true["STAGE_CODE"], dtype=int)[row])
    if "STELLARNET_FLAG" in pred.colnames:
        out["flag_any_bad"] = bad_fraction(pred["STELLARNET_FLAG"])
    return out


def shift_markdown(results: dict[str, Any]) -> str:
    """The shift table: per shift and label, robust σ / bias / z std / 1σ coverage."""
    names = results["label_names"]
    lines = [f"S/N {results['snr_bin'][0]:.0f}–{results['snr_bin'][1]:.0f}, {results['n_stars']} stars per shift "
             "(robust σ, bias, z std, 1σ coverage); stage accuracy, RC purity / completeness over all stars.", "",
             "| shift | estimate | " + " | ".join(names) + " | stage acc | RC pur / compl |",
             "|---|---|" + "---|" * len(names) + "---|---|"]
    for shift, e in results["shifts"].items():
        rows = ([("refined", e["refined"])] if "refined" in e else []) + [("network", e["network"])]
        own_bin = [float(v) for v in e.get("snr_bin", results["snr_bin"])]
        label = shift if own_bin == [float(v) for v in results["snr_bin"]] else \
            f"{shift} (S/N {own_bin[0]:.0f}–{own_bin[1]:.0f})"
        rows += [(b, m) for b, m in (e.get("baselines") or {}).items()]
        for i, (kind, m) in enumerate(rows):
            cells = []
            for k in names:
                v = m[k]
                s = f"{v.get('robust_sigma', float('nan')):.3g} ({v.get('bias', float('nan')):+.2g}"
                if "z_std" in v:
                    s += f"; {v['z_std']:.2f}; {100 * v['coverage_1sigma']:.0f} %"
                cells.append(s + ")")
            st = e["stage"]
            tail = (f" {st['accuracy']:.3f} | {st['rc_purity']:.2f} / {st['rc_completeness']:.2f} |" if i == 0
                    else " | |")
            lines.append(f"| {label if i == 0 else ''} | {kind} | " + " | ".join(cells) + " |" + tail)
    return "\n".join(lines) + "\n"




def save_shift_results(results: dict[str, Any], json_path: str | Path, markdown_path: str | Path | None = None) -> str:
    """Write a suite's (or :func:`score_catalogue`'s) results as JSON and, optionally, the markdown
    table (each atomically); returns the table."""
    from stellarnet.common.files import atomic_write_text

    table = shift_markdown(results)
    atomic_write_text(Path(json_path), json.dumps(results, indent=1))
    if markdown_path is not None:
        atomic_write_text(Path(markdown_path), table)
    return table


def write_shift_table(model: str | Path | Predictor, out_dir: str | Path, names: list[str] | None = None,
                      n_stars: int = 1000, seed: int = 0, baselines_dataset: str | Path | None = None,
                      stem: str = "shift_table", common_residual: bool = False) -> dict[str, Path]:
    """Run the suite and write ``<stem>.json`` and ``<stem>.md`` into ``out_dir`` (atomically)."""
    base = train_baselines(str(baselines_dataset)) if baselines_dataset else None
    res = run_shift_suite(model, names, int(n_stars), int(seed), base, common_residual=bool(common_residual))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{stem}.json", "markdown": out_dir / f"{stem}.md"}
    save_shift_results(res, paths["json"], paths["markdown"])
    return paths


def shift_table_from_config(model: str | Path | Predictor, out_dir: str | Path, shifts_cfg: Mapping[str, Any]
                            ) -> dict[str, Path] | None:
    """:func:`write_shift_table` with the ``shifts`` config group's settings; None when not enabled."""
    if not shifts_cfg or not shifts_cfg.get("enabled", False):
        return None
    names = shifts_cfg.get("names")
    return write_shift_table(model, out_dir, names=list(names) if names else None,
                             n_stars=int(shifts_cfg.get("n_stars", 1000)), seed=int(shifts_cfg.get("seed", 0)),
                             baselines_dataset=shifts_cfg.get("baselines_dataset"),
                             common_residual=bool(shifts_cfg.get("common_residual", False)))
