"""Running the pipeline: each stage in order, skipped when its hash is unchanged and its outputs exist,
one progress line per stage, then the summary table (``summary.md`` / ``summary.json``)."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from stellarnet.common.files import atomic_write_text, write_json
from stellarnet.pipeline.cache import PIPELINE_VERSION, STAGE_FILE, Context, _outputs_exist, _read_record, stage_hash
from stellarnet.pipeline.stages import STAGE_NAMES, STAGES

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- runner


def _numbers_text(numbers: Mapping[str, Any], limit: int = 6) -> str:
    items = [f"{k}={v}" for k, v in numbers.items()]
    return "; ".join(items[:limit]) + (f"; … (+{len(items) - limit})" if len(items) > limit else "")


def _clean_dir(d: Path) -> None:
    if d.exists():
        for p in d.iterdir():
            if p.name == STAGE_FILE:
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
    d.mkdir(parents=True, exist_ok=True)


def run_pipeline(cfg: DictConfig, echo: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run (or skip) every stage of ``pipeline.stages`` in order; returns one summary row per stage
    (stage, status ran / skipped / disabled, seconds, hash, numbers) and writes
    ``<pipeline_dir>/summary.md`` and ``summary.json``."""
    import lightning as L

    root = Path(str(cfg.pipeline_dir)).resolve()
    root.mkdir(parents=True, exist_ok=True)
    enabled = list(cfg.pipeline.get("stages") or STAGE_NAMES)
    unknown = sorted(set(enabled) - set(STAGE_NAMES))
    force = set(cfg.pipeline.get("force") or [])
    unknown += sorted(force - set(STAGE_NAMES) - {"all"})
    if unknown:
        raise ValueError(f"unknown pipeline stage(s) {unknown}; stages are {list(STAGE_NAMES)}")
    if "baselines" in enabled and any(fs != "spectra_pca" for fs in cfg.pipeline.baselines.feature_sets):
        if "features" not in enabled and not (root / "features" / STAGE_FILE).exists():
            raise ValueError("baselines with tabular features need the features stage")
    ctx = Context(cfg=cfg, root=root, records={})
    rows: list[dict[str, Any]] = []
    n = len(STAGES)
    for i, stage in enumerate(STAGES, 1):
        d = root / stage.name
        prev = _read_record(d)
        if stage.name not in enabled:
            if prev is not None and prev.get("status") == "complete":
                ctx.records[stage.name] = prev
            row = {"stage": stage.name, "status": "disabled", "seconds": 0.0, "hash": (prev or {}).get("hash"),
                   "numbers": (prev or {}).get("numbers", {}), "ran_seconds": (prev or {}).get("duration_s")}
            rows.append(row)
            echo(f"[{i:2d}/{n}] {stage.name:<9} disabled")
            continue
        t0 = time.perf_counter()
        deps = {}
        optional = stage.optional_deps(ctx)
        for dep in stage.deps + optional:
            rec = ctx.records.get(dep)
            if rec is None or rec.get("status") != "complete":
                if dep in optional:
                    continue
                raise RuntimeError(f"stage {stage.name!r} needs stage {dep!r}, which has no complete outputs "
                                   f"(enable it in pipeline.stages)")
            deps[dep] = rec["hash"]
        conf = stage.config(ctx)
        h = stage_hash({"stage": stage.name, "version": PIPELINE_VERSION, "config": conf, "deps": deps})
        current = (prev is not None and prev.get("status") == "complete" and prev.get("hash") == h
                   and _outputs_exist(prev.get("outputs") or {}))
        if current and stage.name not in force and "all" not in force:
            ctx.records[stage.name] = prev  # type: ignore[assignment]
            secs = time.perf_counter() - t0
            row = {"stage": stage.name, "status": "skipped", "seconds": secs, "hash": h,
                   "numbers": prev.get("numbers", {}), "ran_seconds": prev.get("duration_s")}  # type: ignore[union-attr]
            rows.append(row)
            echo(f"[{i:2d}/{n}] {stage.name:<9} skipped {secs:8.1f} s  (current; ran in "
                 f"{prev.get('duration_s', 0):.1f} s)  {_numbers_text(row['numbers'])}")  # type: ignore[union-attr]
            continue
        if stage.clean:
            _clean_dir(d)
        d.mkdir(parents=True, exist_ok=True)
        started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        record: dict[str, Any] = {"stage": stage.name, "hash": h, "status": "running", "deps": deps,
                                  "config": conf, "started": started, "outputs": {}, "numbers": {}}
        write_json(d / STAGE_FILE, record)
        log.info("stage %s: running (hash %s)", stage.name, h)
        L.seed_everything(int(cfg.seed), workers=True, verbose=False)
        try:
            result = stage.run(ctx, d)
        except BaseException as exc:
            record.update(status="failed", error=f"{type(exc).__name__}: {exc}",
                          duration_s=time.perf_counter() - t0)
            write_json(d / STAGE_FILE, record)
            echo(f"[{i:2d}/{n}] {stage.name:<9} FAILED  {time.perf_counter() - t0:8.1f} s  {type(exc).__name__}: {exc}")
            raise
        secs = time.perf_counter() - t0
        outputs = {k: str(Path(v).resolve()) for k, v in (result.get("outputs") or {}).items()}
        record.update(status="complete", outputs=outputs, numbers=result.get("numbers", {}),
                      duration_s=secs, finished=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        write_json(d / STAGE_FILE, record)
        ctx.records[stage.name] = record
        rows.append({"stage": stage.name, "status": "ran", "seconds": secs, "hash": h, "numbers": record["numbers"]})
        echo(f"[{i:2d}/{n}] {stage.name:<9} ran     {secs:8.1f} s  {_numbers_text(record['numbers'])}")
    _write_summary(root, rows, ctx)
    return rows


def summary_markdown(rows: list[dict[str, Any]], ctx: Context | None = None) -> str:
    """The summary table (+ the feature-set comparison when the baselines stage has one)."""
    lines = ["# stellarnet pipeline summary", "",
             "`seconds`: this run; `stage run [s]`: the run that produced the current outputs.", "",
             "| stage | status | seconds | stage run [s] | key numbers |", "|---|---|---:|---:|---|"]
    for r in rows:
        nums = "; ".join(f"{k}={v}" for k, v in (r.get("numbers") or {}).items())
        produced = r["seconds"] if r["status"] == "ran" else r.get("ran_seconds")
        produced_s = "—" if produced is None else f"{produced:.1f}"
        lines.append(f"| {r['stage']} | {r['status']} | {r['seconds']:.1f} | {produced_s} | {nums} |")
    total = sum(r["seconds"] for r in rows)
    lines += ["", f"Total: {total:.1f} s."]
    if ctx is not None and ctx.has("baselines"):
        md = ctx.records["baselines"]["outputs"].get("comparison_md")
        if md and Path(md).exists():
            lines += ["", Path(md).read_text().replace("# Tree baselines", "## Tree baselines")]
        if ctx.has("evaluate"):
            nums = ctx.records["evaluate"].get("numbers") or {}
            net = ", ".join(f"{k[4:]} {v}" for k, v in nums.items() if k.startswith("mae_"))
            if net:
                lines += [f"Network (same test split) MAE: {net}."]
    return "\n".join(lines) + "\n"


def _write_summary(root: Path, rows: list[dict[str, Any]], ctx: Context) -> None:
    atomic_write_text(root / "summary.md", summary_markdown(rows, ctx))
    write_json(root / "summary.json", {"stages": rows})
