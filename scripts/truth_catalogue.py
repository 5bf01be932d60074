"""Benchmark helper: a copy of the simulated allStar whose labels are the TRUE labels.

Separates what the network can learn from what the catalogue's label noise allows: train once on
the survey's allStar (ASPCAP-like label noise, ~50-100 K / 0.05 dex) and once on this copy (same
stars, same spectra, same cuts and split, labels without noise), then score both against the truth
(``scripts/crlb.py --predictions ... --truth auto`` or ``scripts/compare_vs_truth.py``). Only this
benchmark reads the simulation's truth file; the pipeline sees an ordinary allStar.

    python scripts/truth_catalogue.py --survey data/sim_survey --out /tmp/truth_cat
    python -m stellarnet.train +experiment=apogee \\
        data.survey.allstar=/tmp/truth_cat/allStar-dr17-synspec_rev1.fits \\
        data.survey.spectra_root=data/sim_survey data.shards.out_dir=/tmp/truth_cat/shards

Label columns replaced (where the catalogue value is finite, so flagged/NaN rows stay as they
are): TEFF, LOGG, FE_H, M_H, ALPHA_M. Error columns are kept.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
from astropy.io import fits

LABELS = ("TEFF", "LOGG", "FE_H", "M_H", "ALPHA_M")
ALLSTAR = "allStar-dr17-synspec_rev1.fits"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--survey", default="data/sim_survey", help="simulated survey root (allStar + truth/truth.fits)")
    ap.add_argument("--out", required=True, help="output directory for the allStar copy")
    args = ap.parse_args(argv)
    survey, out = Path(args.survey), Path(args.out)
    truth = fits.getdata(survey / "truth" / "truth.fits", 1)
    row_of = {str(s).strip(): i for i, s in enumerate(truth["APOGEE_ID"])}
    out.mkdir(parents=True, exist_ok=True)
    with fits.open(survey / ALLSTAR) as hdul:
        data = hdul[1].data
        ids = [str(s).strip() for s in data["APOGEE_ID"]]
        missing = [i for i in ids if i not in row_of]
        if missing:
            raise SystemExit(f"{len(missing)} allStar stars are not in the truth file (e.g. {missing[0]})")
        idx = np.array([row_of[i] for i in ids])
        for col in LABELS:
            values = np.array(data[col], copy=True)
            fin = np.isfinite(values)
            rms = float(np.sqrt(np.mean((values[fin] - truth[col][idx][fin]) ** 2)))
            values[fin] = truth[col][idx][fin]
            data[col] = values
            print(f"{col}: {fin.sum()} finite values replaced (catalogue - truth rms {rms:.4g})")
        tmp = out / (ALLSTAR + ".tmp")
        hdul.writeto(tmp, overwrite=True)
    os.replace(tmp, out / ALLSTAR)
    print(f"wrote {out / ALLSTAR}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
