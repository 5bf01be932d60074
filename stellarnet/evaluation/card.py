"""Model card: what a model folder was trained on and how well it did, for people and for predict.

``write_model_card(model_dir, manifest, ...)`` writes two files into the model folder:

* ``provenance.json`` (machine-readable): stellarnet version, date, the training data (allStar file
  and its SHA-256, spectra kind and root, whether it is the simulated survey), cuts and the rows
  each removed, grid, labels and units, split sizes, headline test metrics. ``predict`` copies the
  training-data description into every catalogue's provenance keywords and warns when a model
  trained on simulated spectra is used.
* ``MODEL_CARD.md`` (human-readable): the same, as a page.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any, Mapping

from stellarnet.common.files import atomic_write_text, write_json

PROVENANCE_FILE = "provenance.json"
CARD_FILE = "MODEL_CARD.md"


def _cuts_summary(manifest: Mapping[str, Any]) -> str:
    rows = manifest.get("cut_report") or []
    parts = [f"{r.get('criterion') or r.get('reason') or r.get('name')} (-{r.get('removed', 0)})" for r in rows]
    return "; ".join(parts)


def write_model_card(model_dir: str | Path, manifest: Mapping[str, Any], simulated: bool,
                     metrics: Mapping[str, Any] | None = None) -> dict[str, Path]:
    """Write ``provenance.json`` and ``MODEL_CARD.md`` into ``model_dir`` (atomically)."""
    from stellarnet.common.version import __version__

    model_dir = Path(model_dir)
    src = dict(manifest.get("sources") or {})
    kind = "the project's simulated survey" if simulated else "a survey catalogue"
    description = (f"{kind}: {Path(str(src.get('allstar', '?'))).name} (sha256 {str(src.get('allstar_sha256', ''))[:16]}), "
                   f"{src.get('spectra_kind', '?')} spectra on grid {manifest.get('grid')}, "
                   f"{sum((manifest.get('split_rows') or {}).values())} stars after cuts")
    prov = {
        "stellarnet_version": __version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
        "simulated": bool(simulated),
        "training_data": description,
        "sources": src,
        "grid": manifest.get("grid"),
        "label_names": manifest.get("label_names"),
        "label_columns": manifest.get("label_columns"),
        "label_units": manifest.get("label_units"),
        "split_rows": manifest.get("split_rows"),
        "cuts": manifest.get("cuts"),
        "cut_report": manifest.get("cut_report"),
        "cuts_summary": _cuts_summary(manifest),
        "build_hash": manifest.get("build_hash"),
        "test_metrics": {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float, str))},
    }
    paths = {"provenance": write_json(model_dir / PROVENANCE_FILE, prov)}
    labels = ", ".join(f"{n} [{u}] (allStar {c})" for n, u, c in zip(
        manifest.get("label_names") or [], manifest.get("label_units") or [],
        (manifest.get("label_columns") or {}).values()))
    lines = [
        f"# Model card: {model_dir.name}", "",
        f"Written by stellarnet {prov['stellarnet_version']} on {prov['date']} UTC.", "",
        "## Training data", "",
        f"- {description}.",
        "- **Trained on simulated spectra**: labels and σ on real survey spectra are not validated."
        if simulated else "- Trained on survey spectra with catalogue labels (their systematics are learned too).",
        f"- Labels: {labels}.",
        f"- Splits: {prov['split_rows']} (grouped by field: no star or field in two splits).",
        f"- Cuts: {prov['cuts_summary'] or 'none'}.", "",
        "## Test metrics", "",
    ]
    lines += [f"- `{k}`: {v:.4g}" if isinstance(v, float) else f"- `{k}`: {v}"
              for k, v in sorted(prov["test_metrics"].items())] or ["- (not evaluated)"]
    lines += ["", "## Use", "",
              f"`python -m stellarnet.predict ckpt_path={model_dir} input=<allStar FITS | spectrum files>`; "
              "`stellarnet.load_model(folder).predict(flux, flux_err)` in Python. Catalogue columns: "
              "docs/model.md; quality flags: docs/robustness.md.", ""]
    paths["card"] = atomic_write_text(model_dir / CARD_FILE, "\n".join(lines))
    return paths
