"""Simulate a whole survey: allStar + aspcapStar files + GALAH/LAMOST + truth, in the real formats.

Layout under ``root`` (see ``docs/architecture.md``)::

    allStar-dr17-synspec_rev1.fits
    apogee/spectro/aspcap/dr17/synspec_rev1/<TELESCOPE>/<FIELD>/aspcapStar-dr17-<APOGEE_ID>.fits
    galah/GALAH_DR3_main_allstar_v2.fits
    lamost/LAMOST_LRS_DR7_v2_stellar.fits
    truth/truth.fits
    truth/injected_offsets.json
    simulation.json          (config, its hash, counts, timings; written last)

Deterministic by ``seed`` (independent generator streams per component via
``numpy.random.SeedSequence``); idempotent: a finished survey with the same config hash is
not regenerated.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from stellarnet.common.files import atomic_write_text
from stellarnet.common.paths import default_data_root
from stellarnet.simulate import allstar as A
from stellarnet.simulate import external as X
from stellarnet.simulate.instrument import iter_spectra
from stellarnet.simulate.photometry import EXT, observe
from stellarnet.simulate.population import DEFAULT_MIX, STAGES, sample_population
from stellarnet.simulate.shifts import draw_persistence, shift_suite
from stellarnet.simulate.sky import FieldLayout, ak_infinity, galactic, make_fields, real_positions, sample_positions
from stellarnet.simulate.spectra_files import ASPCAP_SUBDIR, aspcapstar_path, write_many

__all__ = ["simulate_survey", "config_hash", "default_root", "SIMULATION_JSON", "TRUTH_NAME", "OFFSETS_NAME", "TRUTH_DTYPES"]

SIMULATION_JSON = "simulation.json"
TRUTH_NAME = "truth/truth.fits"
OFFSETS_NAME = "truth/injected_offsets.json"
FORMAT_VERSION = 1
# arguments that change the output (hashed); the others only change speed / verbosity
_HASHED = (
    "n_stars", "seed", "spectra", "mix", "stars_per_field", "dup_fraction", "external",
    "galah_fraction", "lamost_fraction", "offsets", "chunk",
)

TRUTH_DTYPES: list[tuple[str, str, tuple[int, ...]]] = (
    [("APOGEE_ID", "S30", ()), ("TELESCOPE", "S8", ()), ("FIELD", "S20", ())]
    + [(c, ">f8", ()) for c in ("RA", "DEC", "GLON", "GLAT")]
    + [(c, ">f4", ()) for c in ("TEFF", "LOGG", "FE_H", "ALPHA_FE", "M_H", "ALPHA_M", "C_FE", "N_FE", "MG_FE")]
    + [("STAGE", "S3", ()), ("STAGE_CODE", ">i2", ())]
    + [(c, ">f4", ()) for c in ("MASS", "RADIUS", "LUM", "M_BOL", "ABS_J", "ABS_H", "ABS_K", "ABS_G", "ABS_BP", "ABS_RP", "JK0")]
    + [(c, ">f8", ()) for c in ("DIST_PC", "PARALLAX_TRUE", "PMRA", "PMDEC")]
    + [(c, ">f4", ()) for c in ("A_K", "A_K_INF", "VHELIO", "SNR")]
    + [("GAIA_SOURCE_ID", ">i8", ()), ("N_ROWS", ">i2", ())]
    + [(c, "|b1", ()) for c in ("IS_BINARY", "METAL_POOR", "IN_GALAH", "IN_LAMOST")]
)


def default_root() -> Path:
    """``$STELLARNET_DATA/sim_survey`` or ``./data/sim_survey``."""
    return default_data_root() / "sim_survey"


def config_hash(config: Mapping[str, Any]) -> str:
    """sha256 (16 hex digits) of the output-determining config entries."""
    sub = {k: config.get(k) for k in _HASHED}
    if config.get("shift"):  # only when set, so the hashes of unshifted surveys stay what they were
        sub["shift"] = config["shift"]
    sub["format_version"] = FORMAT_VERSION
    return hashlib.sha256(json.dumps(sub, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _paths(root: Path, spectra: bool, external: bool) -> dict[str, Path]:
    p = {"root": root, "allstar": root / A.ALLSTAR_NAME, "truth": root / TRUTH_NAME, "simulation": root / SIMULATION_JSON}
    if spectra:
        p["aspcap_dir"] = root / ASPCAP_SUBDIR
    if external:
        p.update(galah=root / X.GALAH_NAME, lamost=root / X.LAMOST_NAME, offsets=root / OFFSETS_NAME)
    return p


def _clean(root: Path) -> None:
    for rel in (A.ALLSTAR_NAME, X.GALAH_NAME, X.LAMOST_NAME, TRUTH_NAME, OFFSETS_NAME, SIMULATION_JSON):
        (root / rel).unlink(missing_ok=True)
    top = root / "apogee"
    if top.exists():
        shutil.rmtree(top)


def _unique_ids(rng: np.random.Generator, n: int) -> np.ndarray:
    ids = rng.integers(10**15, 6 * 10**18, n, dtype=np.int64)
    while np.unique(ids).size < n:
        ids = rng.integers(10**15, 6 * 10**18, n, dtype=np.int64)
    return ids


def _make_stars(n: int, layout: FieldLayout, field: np.ndarray, rngs: dict[str, np.random.Generator], mix: Mapping[str, float]) -> dict[str, Any]:
    """Truth for ``n`` stars in ``layout`` (star i in ``field[i]``)."""
    pop = sample_population(n, rngs["pop"], mix)
    ra, dec = sample_positions(field, layout, rngs["sky"])
    des, ra = A.unique_designations(ra, dec)
    glon, glat = galactic(ra, dec)
    phot = observe(pop, field, glat, layout, rngs["phot"])
    r = rngs["misc"]
    mu = 5.0 * np.log10(phot.dist_pc) - 5.0
    stars: dict[str, Any] = {
        "pop": pop, "phot": phot, "field": field,
        "apogee_id": des, "tmass_id": des, "ra": ra, "dec": dec, "glon": glon, "glat": glat,
        "teff": pop.teff, "logg": pop.logg, "fe_h": pop.fe_h, "alpha_fe": pop.alpha_fe, "stage": pop.stage,
        "c_fe": pop.c_fe, "n_fe": pop.n_fe, "mg_fe": pop.mg_fe,
        "a_k": phot.a_k, "ak_inf": layout.ak_inf[field],
        "gaia_id": _unique_ids(r, n), "gaia_matched": phot.gaia_matched,
        "parallax": phot.parallax, "parallax_error": phot.parallax_error, "pmra": phot.pmra, "pmdec": phot.pmdec,
        "is_binary": r.random(n) < 0.15,
        "vhelio": np.where(pop.metal_poor, r.normal(0, 130, n), r.normal(0, 45, n)),
        "vmag": phot.abs_mag["V"] + mu + EXT["V"] * phot.a_k,
        "gmag": phot.mag["G"],
    }
    for b in ("J", "H", "K", "G", "BP", "RP"):
        stars[b] = phot.mag[b]
    for b in ("J", "H", "K"):
        stars[b + "_ERR"] = phot.mag_err[b]
    return stars


def _point_layout(ra: np.ndarray, dec: np.ndarray, rng: np.random.Generator) -> FieldLayout:
    """One pseudo-field per star (for stars observed only by GALAH/LAMOST)."""
    glon, glat = galactic(ra, dec)
    n = ra.size
    return FieldLayout(
        ra=ra, dec=dec, glon=glon, glat=glat, name=np.array([f"X{i}" for i in range(n)]),
        telescope=np.full(n, "none"), h_limit=np.full(n, 13.0), base_visits=np.ones(n, int),
        ak_inf=ak_infinity(glon, glat, np.exp(rng.normal(0, 0.3, n))),
    )


def _external_only(n: int, dec_range: tuple[float, float], rngs: dict[str, np.random.Generator], mix: Mapping[str, float]) -> dict[str, Any]:
    pos = real_positions()
    sel = np.flatnonzero((pos["DEC"] > dec_range[0]) & (pos["DEC"] < dec_range[1]))
    j = sel[rngs["sky"].integers(0, sel.size, n)]
    ra = (pos["RA"][j] + rngs["sky"].normal(0, 0.5, n) / np.maximum(np.cos(np.radians(pos["DEC"][j])), 0.05)) % 360
    dec = np.clip(pos["DEC"][j] + rngs["sky"].normal(0, 0.5, n), -89.9, 89.9)
    layout = _point_layout(ra, dec, rngs["sky"])
    # positions are the pseudo-field centres: sample_positions would move them by ≤ 1.5°, fine
    return _make_stars(n, layout, np.arange(n), rngs, mix)


def simulate_survey(
    root: str | Path | None = None,
    n_stars: int = 20_000,
    seed: int = 42,
    spectra: bool = True,
    mix: Mapping[str, float] | None = None,
    stars_per_field: int = 300,
    dup_fraction: float = 0.03,
    external: bool = True,
    galah_fraction: float = 0.35,
    lamost_fraction: float = 0.30,
    offsets: Mapping[str, Any] | None = None,
    chunk: int = 256,
    threads: int = 2,
    write_threads: int = 4,
    progress: bool = True,
    overwrite: bool = False,
    shift: str | None = None,
) -> dict[str, Path]:
    """Simulate a survey under ``root`` and return the paths of what was written.

    Parameters: ``n_stars`` unique stars (≈ ``dup_fraction`` more allStar rows);
    ``spectra=False`` writes catalogues only; ``mix`` population fractions (keys RGB, RC, SG, MS,
    MP); ``stars_per_field`` sets the number of plate fields (n_stars / stars_per_field);
    ``galah_fraction``/``lamost_fraction``: fraction of the southern/northern APOGEE stars also
    in GALAH/LAMOST; ``offsets``: overrides of :data:`stellarnet.simulate.external.DEFAULT_OFFSETS`;
    ``threads`` for spectrum generation, ``write_threads`` for file writing. Returns a dict with
    keys ``root, allstar, truth, simulation`` (+ ``aspcap_dir``; ``galah, lamost, offsets``).

    ``shift``: the name of a perturbation of the robustness suite
    (:data:`stellarnet.simulate.shifts.SHIFT_SUITE`, e.g. ``"combined"``) applied to every spectrum —
    another normalization convention, continuum residuals, outlier pixels, LSF, RV zero point, error
    convention, persistence; its population mix replaces ``mix`` and its persistence fraction the
    survey's. A survey in the real file formats that the model was not trained on: what
    ``python -m stellarnet.predict`` is tested against end to end (docs/robustness.md).
    """
    if n_stars < 1:
        raise ValueError("n_stars must be ≥ 1")
    shift_obj = shift_suite([shift])[shift] if shift else None
    if shift_obj is not None and shift_obj.mix is not None:
        mix = dict(shift_obj.mix)
    root = Path(default_root() if root is None else root).resolve()
    mix = dict(DEFAULT_MIX if mix is None else mix)
    offsets_full = X.resolve_offsets(offsets)
    config = {
        "n_stars": int(n_stars), "seed": int(seed), "spectra": bool(spectra), "mix": mix,
        "stars_per_field": int(stars_per_field), "dup_fraction": float(dup_fraction), "external": bool(external),
        "galah_fraction": float(galah_fraction), "lamost_fraction": float(lamost_fraction),
        "offsets": offsets_full, "chunk": int(chunk),
    }
    if shift_obj is not None:
        config["shift"] = {"name": str(shift), **shift_obj.to_dict()}
    h = config_hash(config)
    paths = _paths(root, spectra, external)
    sim_json = paths["simulation"]
    if sim_json.exists():
        try:
            info = json.loads(sim_json.read_text())
        except json.JSONDecodeError:
            info = {}
        if not overwrite and info.get("hash") == h and info.get("status") == "complete" and all(p.exists() for p in paths.values()):
            return paths
        _clean(root)
    elif root.exists() and any(root.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{root} is not empty and holds no {SIMULATION_JSON}; pass overwrite=True or choose another root")
        _clean(root)
    root.mkdir(parents=True, exist_ok=True)
    sim_json.write_text(json.dumps({"status": "incomplete", "hash": h, "config": config}, indent=2))
    t0 = time.perf_counter()
    timing: dict[str, float] = {}

    ss = np.random.SeedSequence(int(seed))
    keys = ("fields", "pop", "sky", "phot", "misc", "rows", "cat", "ext")
    rng = {k: np.random.default_rng(s) for k, s in zip(keys, ss.spawn(len(keys)))}
    spectra_seed = int(ss.generate_state(1)[0])

    n_fields = max(1, int(round(n_stars / max(1, stars_per_field))))
    layout = make_fields(n_fields, rng["fields"])
    field = rng["sky"].integers(0, n_fields, n_stars)
    stars = _make_stars(n_stars, layout, field, rng, mix)
    pop, phot = stars["pop"], stars["phot"]
    if shift_obj is not None and shift_obj.snr_scale != 1.0:  # shorter exposures: the catalogue's SNR says so too
        phot.snr = phot.snr * shift_obj.snr_scale
    plan = A.plan_rows(n_stars, field, stars["dec"], phot.snr, phot.nvisits, layout, rng["rows"], dup_fraction)
    cols = A.allstar_columns(plan, stars, layout, rng["cat"])
    A.write_allstar(paths["allstar"], cols)
    timing["catalogue_s"] = time.perf_counter() - t0
    persist = plan.persist
    if shift_obj is not None and shift_obj.persistence_fraction is not None:  # its own stream: the rest unchanged
        persist = draw_persistence(len(plan), shift_obj.persistence_fraction, np.random.default_rng([int(seed), 7]))

    n_files = 0
    if spectra:
        t1 = time.perf_counter()
        ids = cols["APOGEE_ID"]
        fields_r = cols["FIELD"]
        labels = pop.labels[plan.star]
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(plan), desc="aspcapStar", unit="star")
        for batch in iter_spectra(labels, plan.snr, spectra_seed, plan.bad_start, plan.bad_len, persist, chunk=chunk,
                                  threads=threads, shift=shift_obj):
            items = []
            for j in range(batch.flux.shape[0]):
                r = batch.start + j
                meta = {
                    "APOGEE_ID": str(ids[r]), "TELESCOP": str(plan.telescope[r]), "FIELD": str(fields_r[r]),
                    "RA": round(float(cols["RA"][r]), 7), "DEC": round(float(cols["DEC"][r]), 7),
                    "SNR": round(float(plan.snr[r]), 3), "NVISITS": int(plan.nvisits[r]),
                }
                path = aspcapstar_path(root, meta["TELESCOP"], meta["FIELD"], meta["APOGEE_ID"])
                items.append((path, batch.flux[j], batch.flux_err[j], batch.model[j], meta))
            n_files += write_many(items, threads=write_threads)
            if bar is not None:
                bar.update(len(items))
        if bar is not None:
            bar.close()
        timing["spectra_s"] = time.perf_counter() - t1

    in_galah = np.zeros(n_stars, bool)
    in_lamost = np.zeros(n_stars, bool)
    counts: dict[str, int] = {"stars": n_stars, "rows": len(plan), "duplicates": int(plan.is_dup.sum()), "fields": n_fields, "aspcapStar_files": n_files}
    if external:
        t2 = time.perf_counter()
        re_ = rng["ext"]
        dec = stars["dec"]
        in_galah = (dec < 10.0) & (re_.random(n_stars) < galah_fraction)
        in_lamost = (dec > -10.0) & (dec < 65.0) & (stars["teff"] > 3900) & (re_.random(n_stars) < lamost_fraction)
        sub_rngs = {k: np.random.default_rng(s) for k, s in zip(("pop", "sky", "phot", "misc"), np.random.SeedSequence([int(seed), 1]).spawn(4))}
        n_go = max(10, int(round(0.5 * in_galah.sum())))
        n_lo = max(10, int(round(0.3 * in_lamost.sum())))
        g_only = _external_only(n_go, (-85.0, 10.0), sub_rngs, mix)
        l_only = _external_only(n_lo, (-10.0, 65.0), sub_rngs, mix)
        keep_l = l_only["teff"] > 3900

        def pick(d: dict[str, Any], m: np.ndarray, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
            return {k: np.asarray(d[k])[m] for k in keys}

        gk = ("tmass_id", "ra", "dec", "pmra", "pmdec", "gaia_id", "teff", "logg", "fe_h", "alpha_fe", "vmag")
        gstars = {k: np.concatenate([pick(stars, in_galah, gk)[k], pick(g_only, np.ones(n_go, bool), gk)[k]]) for k in gk}
        lk = ("ra", "dec", "teff", "logg", "fe_h", "vhelio", "gmag")
        lstars = {k: np.concatenate([pick(stars, in_lamost, lk)[k], pick(l_only, keep_l, lk)[k]]) for k in lk}
        X.write_galah(paths["galah"], X.galah_columns(gstars, re_, offsets_full["galah"]))
        X.write_lamost(paths["lamost"], X.lamost_columns(lstars, re_, offsets_full["lamost"]))
        X.write_offsets(paths["offsets"], offsets_full)
        counts.update(galah_overlap=int(in_galah.sum()), galah_only=n_go, lamost_overlap=int(in_lamost.sum()), lamost_only=int(keep_l.sum()))
        timing["external_s"] = time.perf_counter() - t2

    _write_truth(paths["truth"], stars, layout, plan, in_galah, in_lamost)
    timing["total_s"] = time.perf_counter() - t0
    info = {
        "status": "complete", "hash": h, "config": config, "format_version": FORMAT_VERSION,
        "counts": counts, "timing": timing,
        "paths": {k: str(v.relative_to(root)) if v != root else "." for k, v in paths.items()},
    }
    atomic_write_text(sim_json, json.dumps(info, indent=2))
    return paths


def _write_truth(path: Path, stars: dict[str, Any], layout: FieldLayout, plan: A.RowPlan, in_galah: np.ndarray, in_lamost: np.ndarray) -> None:
    pop, phot = stars["pop"], stars["phot"]
    n = len(pop)
    n_rows = np.bincount(plan.star, minlength=n)
    absm = phot.abs_mag
    cols = {
        "APOGEE_ID": np.char.add("2M", stars["apogee_id"].astype("U16")),
        "TELESCOPE": layout.telescope[stars["field"]], "FIELD": layout.name[stars["field"]],
        "RA": stars["ra"], "DEC": stars["dec"], "GLON": stars["glon"], "GLAT": stars["glat"],
        "TEFF": pop.teff, "LOGG": pop.logg, "FE_H": pop.fe_h, "ALPHA_FE": pop.alpha_fe,
        "M_H": pop.fe_h, "ALPHA_M": pop.alpha_fe, "C_FE": pop.c_fe, "N_FE": pop.n_fe, "MG_FE": pop.mg_fe,
        "STAGE": np.asarray(STAGES)[pop.stage], "STAGE_CODE": pop.stage,
        "MASS": pop.mass, "RADIUS": pop.radius, "LUM": pop.lum, "M_BOL": pop.m_bol,
        "ABS_J": absm["J"], "ABS_H": absm["H"], "ABS_K": absm["K"], "ABS_G": absm["G"], "ABS_BP": absm["BP"], "ABS_RP": absm["RP"],
        "JK0": absm["J"] - absm["K"], "DIST_PC": phot.dist_pc, "PARALLAX_TRUE": 1000.0 / phot.dist_pc,
        "PMRA": phot.pmra, "PMDEC": phot.pmdec, "A_K": phot.a_k, "A_K_INF": stars["ak_inf"],
        "VHELIO": stars["vhelio"], "SNR": phot.snr, "GAIA_SOURCE_ID": stars["gaia_id"], "N_ROWS": n_rows,
        "IS_BINARY": stars["is_binary"], "METAL_POOR": pop.metal_poor, "IN_GALAH": in_galah, "IN_LAMOST": in_lamost,
    }
    A.write_fits_table(path, cols, TRUTH_DTYPES, extname="TRUTH")
