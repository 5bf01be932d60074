"""The tree is the architecture diagram: imports flow one way (``docs/architecture.md``).

Every ``stellarnet`` import in the package (module level or inside a function: a lazy import is
still a dependency) is checked against the layers below; a library layer may import only itself and
the layers listed for it. Entry points (the top-level modules and each package's ``__main__``) may
import anything."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "stellarnet"

#: library layer → the layers it may import (besides itself). Readers → preparation → dataset →
#: network / refinement → evaluation → entries; the simulator writes files in the real formats and
#: never imports the pipeline's preprocessing.
ALLOWED: dict[str, set[str]] = {
    "common": set(),
    "physics": {"common"},
    "io": {"common"},
    "preparation": {"common", "io"},
    "dataset": {"common", "io", "preparation"},
    "features": {"common", "io", "preparation", "dataset"},
    "refinement": {"common", "io", "preparation"},
    "network": {"common", "io", "preparation", "dataset", "refinement"},
    "baselines": {"common", "io", "preparation", "dataset", "features"},
    "evaluation": {"common", "io", "preparation", "dataset", "features", "refinement", "network", "baselines",
                   "physics"},
    "crossval": {"common", "io", "preparation", "evaluation"},
    "simulate": {"common", "io", "physics"},
    "benchmarks": {"common", "io", "preparation", "dataset", "features", "refinement", "network", "baselines",
                   "evaluation", "physics", "simulate"},
    # training and evaluation may run the shift suite (docs/robustness.md) after the model is made
    "workflows": {"common", "io", "preparation", "dataset", "features", "refinement", "network", "baselines",
                  "evaluation", "crossval", "physics", "benchmarks"},
}
#: the documented exceptions: (importing module, imported layer, why)
EXCEPTIONS: set[tuple[str, str]] = {
    # with no real allStar configured, the default survey is simulated before shards are built
    ("stellarnet.dataset.ensure", "simulate"),
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m == "stellarnet" or m.startswith("stellarnet.")}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in ALLOWED) else None


def violations() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        layer = _layer(module)
        if layer is None or path.name == "__main__.py" or layer not in ALLOWED:
            continue  # an entry point
        for imported in sorted(_imports(path)):
            target = _layer(imported)
            if target is None and imported != "stellarnet":
                target = imported.split(".")[1]  # an entry point module
            if target == layer or target in ALLOWED[layer] or (module, target) in EXCEPTIONS:
                continue
            found.append(f"{module} imports {imported} ({layer} may not import {target or 'the package root'})")
    return found


def test_every_library_module_belongs_to_a_layer():
    top_packages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    entry_packages = {"pipeline"}  # the orchestration of every entry point: an entry point itself
    assert top_packages - {"conf", "resources"} <= set(ALLOWED) | entry_packages


def test_imports_flow_one_way():
    assert violations() == []


def test_the_check_sees_a_forbidden_import(tmp_path, monkeypatch):
    assert _layer("stellarnet.io.spectra") == "io" and _layer("stellarnet.train") is None
    assert "evaluation" not in ALLOWED["network"] and "preparation" not in ALLOWED["simulate"]
