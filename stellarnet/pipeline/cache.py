"""The pipeline's cache: a stage's record (``<pipeline_dir>/<stage>/stage.json``: config hash, status,
outputs, key numbers, seconds), its hash (its own config slice and the hashes of the stages it depends on),
and the :class:`Context` / :class:`Stage` the stages are written against."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from stellarnet.common.files import to_plain
from stellarnet.common.paths import CONF_DIR

PIPELINE_VERSION = 1


STAGE_FILE = "stage.json"


# --------------------------------------------------------------------------- helpers


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def stage_hash(obj: Any) -> str:
    """sha256 (16 hex digits) of a JSON-serializable object (sorted keys)."""
    text = json.dumps(obj, sort_keys=True, default=_json_default)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read_record(stage_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((stage_dir / STAGE_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _outputs_exist(outputs: Mapping[str, Any]) -> bool:
    return all(Path(v).exists() for v in outputs.values() if isinstance(v, str) and v)


def _entry_body(name: str) -> dict[str, Any]:
    """The keys of an entry point's own config (``conf/<name>.yaml`` minus defaults / hydra)."""
    body = OmegaConf.to_container(OmegaConf.load(CONF_DIR / f"{name}.yaml"), resolve=False)
    assert isinstance(body, dict)
    for k in ("defaults", "hydra", "task_name", "paths", "data", "seed"):
        body.pop(k, None)
    return body


@dataclass
class Context:
    """What the stages share: the composed config, the pipeline directory and the records
    (stage.json contents) of the stages seen so far."""

    cfg: DictConfig
    root: Path
    records: dict[str, dict[str, Any]]

    def out(self, stage: str, key: str) -> str:
        rec = self.records.get(stage)
        if rec is None or rec.get("status") != "complete":
            raise RuntimeError(f"stage {stage!r} has no complete outputs; enable it in pipeline.stages")
        return rec["outputs"][key]

    def has(self, stage: str) -> bool:
        rec = self.records.get(stage)
        return rec is not None and rec.get("status") == "complete"

    def data(self) -> dict[str, Any]:
        return to_plain(self.cfg.data)

    def paths(self, output_dir: Path) -> dict[str, Any]:
        return {"data_dir": str(self.cfg.paths.data_dir), "log_dir": str(self.cfg.paths.log_dir),
                "output_dir": str(output_dir)}

    def entry_cfg(self, name: str, stage_dir: Path, overrides: Any = None, **extra: Any) -> DictConfig:
        """An entry point's config: its own keys + the shared data / paths / seed + overrides."""
        c = OmegaConf.create(_entry_body(name))
        c = OmegaConf.merge(c, {"data": self.data(), "paths": self.paths(stage_dir), "seed": int(self.cfg.seed)},
                            to_plain(overrides) or {}, extra)
        return c  # type: ignore[return-value]


@dataclass(frozen=True)
class Stage:
    """One pipeline stage: ``config(ctx)`` → the plain config slice that determines its outputs
    (hashed with the dependencies' hashes); ``run(ctx, stage_dir)`` → ``{"outputs": {name: path},
    "numbers": {...}}``. ``optional`` dependencies (a tuple, or a function of the context returning
    one) are used when available. ``clean``: empty the stage directory before running."""

    name: str
    deps: tuple[str, ...]
    config: Callable[[Context], Any]
    run: Callable[[Context, Path], dict[str, Any]]
    optional: tuple[str, ...] | Callable[[Context], tuple[str, ...]] = ()
    clean: bool = True

    def optional_deps(self, ctx: Context) -> tuple[str, ...]:
        return self.optional(ctx) if callable(self.optional) else self.optional
