"""Entry point: ``python -m stellarnet.predict ckpt_path=... input=...``.

``input`` is an allStar-format catalogue (spectra under ``spectra_root``), a shard dataset
directory, or aspcapStar/apStar files (glob, comma list or a .txt list). Writes
``predictions.fits`` and ``predictions.csv`` to the run directory (or ``output_dir``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig
from tqdm.auto import tqdm

from stellarnet.data.sources import open_source
from stellarnet.models.inference import load_model
from stellarnet.paths import CONF_DIR
from stellarnet.results import PredictionWriter, predictions_frame

log = logging.getLogger(__name__)


def predict(cfg: DictConfig) -> tuple[dict[str, int], dict[str, Any]]:
    """Run a checkpoint over the configured input, streaming the catalogue to disk chunk by chunk
    (bounded memory for any catalogue size); returns ({stars, read_errors}, output paths)."""
    if not cfg.get("ckpt_path"):
        raise ValueError("ckpt_path is required: python -m stellarnet.predict ckpt_path=<.ckpt or model folder> input=...")
    if not cfg.get("input"):
        raise ValueError("input is required: an allStar FITS, a shard dataset directory, or spectrum files")
    for key, minimum in (("batch_size", 1), ("chunk_size", 1), ("mc_samples", 0)):
        value = cfg.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{key} must be an integer >= {minimum}, got {key}={value!r}")
    predictor = load_model(cfg.ckpt_path)
    inp = cfg.input if isinstance(cfg.input, str) else list(cfg.input)
    kind, n, chunks = open_source(inp, predictor.grid, spectra_root=cfg.get("spectra_root"),
                                  spectra_kind=cfg.spectra_kind, chunk_size=int(cfg.chunk_size))
    log.info("predicting %d stars from %s input %s", n, kind, inp)
    out_dir = Path(cfg.get("output_dir") or cfg.paths.output_dir)
    writer = PredictionWriter(out_dir, n)
    read_errors = 0
    try:
        with tqdm(total=n, desc="predict", unit="star") as bar:
            for chunk in chunks:
                pred = predictor.predict(chunk["flux"], chunk["flux_err"], photometry=chunk["photometry"],
                                         pix_mask=chunk["pix_mask"], mc_samples=int(cfg.mc_samples),
                                         batch_size=int(cfg.batch_size))
                frame = predictions_frame(chunk, pred, predictor.label_names, predictor.class_tasks)
                read_errors += int((frame["READ_ERROR"] != "").sum())
                writer.write(frame)
                bar.update(len(chunk["flux"]))
        paths = writer.close()
    except BaseException:
        writer.abort()
        raise
    return {"stars": writer.written, "read_errors": read_errors}, paths


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="predict")
def main(cfg: DictConfig) -> None:
    summary, paths = predict(cfg)
    print(f"{summary['stars']} stars ({summary['read_errors']} unreadable) → {paths['fits']} and {paths['csv']}")


if __name__ == "__main__":
    main()
