"""The network's components from Hydra-style ``_target_`` dicts: only targets inside the stellarnet
package are built (a checkpoint must not run arbitrary code), components of model folders written before
the package was restructured are found where they live now (:data:`MOVED_TARGET_PREFIXES`), and a
``data_spec`` is checked before anything is built."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from hydra.utils import instantiate
from torch import nn

ALLOWED_TARGET_PREFIX = "stellarnet."


#: where components of model folders written before the package was restructured now live
#: (old module prefix → new): those folders store the old ``_target_`` strings in their hyper-parameters.
MOVED_TARGET_PREFIXES: dict[str, str] = {"stellarnet.models.": "stellarnet.network."}


DEFAULT_NET: dict[str, dict[str, Any]] = {
    "spectral_encoder": {"_target_": "stellarnet.network.encoders.SpectralConvEncoder"},
    "photometry": {"_target_": "stellarnet.network.encoders.PhotometryMLP"},
    "trunk": {"_target_": "stellarnet.network.heads.TrunkMLP"},
    "regression_head": {"_target_": "stellarnet.network.heads.HeteroscedasticHead"},
    "classification_head": {"_target_": "stellarnet.network.heads.ClassificationHead"},
}


# ----------------------------------------------------------------------------------------------
# plain-container helpers
# ----------------------------------------------------------------------------------------------
def _check_targets(cfg: Any, where: str) -> None:
    """Refuse ``_target_`` outside the stellarnet package (a checkpoint must not run arbitrary code)."""
    if isinstance(cfg, dict):
        target = cfg.get("_target_")
        if target is not None and not (isinstance(target, str) and target.startswith(ALLOWED_TARGET_PREFIX)):
            raise ValueError(f"{where}._target_={target!r} is not allowed; targets must start with {ALLOWED_TARGET_PREFIX!r}")
        for k, v in cfg.items():
            _check_targets(v, f"{where}.{k}")
    elif isinstance(cfg, list):
        for i, v in enumerate(cfg):
            _check_targets(v, f"{where}[{i}]")


def current_targets(cfg: Any) -> Any:
    """``cfg`` with every ``_target_`` of a moved module rewritten to where it lives now
    (:data:`MOVED_TARGET_PREFIXES`); other values unchanged, ``cfg`` itself not modified."""
    if isinstance(cfg, dict):
        out = {k: current_targets(v) for k, v in cfg.items()}
        target = out.get("_target_")
        if isinstance(target, str):
            for old, new in MOVED_TARGET_PREFIXES.items():
                if target.startswith(old):
                    out["_target_"] = new + target[len(old):]
        return out
    if isinstance(cfg, list):
        return [current_targets(v) for v in cfg]
    return cfg


def _build(cfg: dict[str, Any], where: str, **sizes: Any) -> nn.Module:
    _check_targets(cfg, where)
    cfg = current_targets(cfg)
    if "_target_" not in cfg:
        raise ValueError(f"{where} needs a _target_")
    return instantiate(cfg, _convert_="all", **sizes)


def validate_data_spec(spec: dict[str, Any]) -> None:
    """Check the keys and lengths of a ``data_spec`` dict (from the shard manifest); raise ``ValueError``."""
    missing = [k for k in ("n_pixels", "label_names", "label_mean", "label_std") if k not in spec]
    if missing:
        raise ValueError(f"data_spec lacks required keys {missing}")
    n_lab = len(spec["label_names"])
    for key in ("label_mean", "label_std", "label_units"):
        if spec.get(key) is not None and len(spec[key]) != n_lab:
            raise ValueError(f"data_spec[{key!r}] has {len(spec[key])} entries, label_names has {n_lab}")
    if any(not (float(s) > 0) for s in spec["label_std"]):
        raise ValueError(f"data_spec['label_std'] must be positive, got {spec['label_std']}")
    n_phot = len(spec.get("phot_features") or [])
    for key in ("phot_mean", "phot_std"):
        if n_phot and len(spec.get(key) or []) != n_phot:
            raise ValueError(f"data_spec[{key!r}] must have {n_phot} entries (one per phot_features)")
    if n_phot and any(not (float(s) > 0) for s in spec["phot_std"]):
        raise ValueError(f"data_spec['phot_std'] must be positive, got {spec['phot_std']}")
    wl = spec.get("wavelength")
    if wl is not None and len(wl) != int(spec["n_pixels"]):
        raise ValueError(f"data_spec['wavelength'] has {len(wl)} entries but n_pixels={spec['n_pixels']}")
    for task, weights in (spec.get("class_weights") or {}).items():
        names = (spec.get("class_tasks") or {}).get(task)
        if names is None:
            raise ValueError(f"data_spec['class_weights'] names unknown task {task!r}")
        if weights is not None and len(weights) != len(names):
            raise ValueError(f"class_weights[{task!r}] has {len(weights)} entries for {len(names)} classes")


@contextlib.contextmanager
def dropout_only(module: nn.Module) -> Iterator[None]:
    """Context in which only ``module``'s ``nn.Dropout`` layers are in training mode (MC dropout):
    batch-norm statistics and the photometry feature dropout stay in evaluation mode."""
    drops = [m for m in module.modules() if isinstance(m, nn.Dropout)]
    states = [m.training for m in drops]
    try:
        for m in drops:
            m.train(True)
        yield
    finally:
        for m, st in zip(drops, states):
            m.train(st)


def has_dropout(module: nn.Module) -> bool:
    """Whether MC dropout can sample anything: some ``nn.Dropout`` layer of ``module`` has ``p > 0``."""
    return any(isinstance(m, nn.Dropout) and m.p > 0 for m in module.modules())
