"""Robustness end to end, as a user meets a survey the model was not trained on: the shift suite's
perturbations written into a survey in the real file formats (allStar + aspcapStar files,
``python -m stellarnet.simulate shift=<name>``), predicted from the allStar by
``python -m stellarnet.predict`` (readers, preprocessing, network, refinement, flags: the
command's own path), and the catalogue scored against the survey's truth file
(:func:`stellarnet.benchmarks.shift_suite.score_catalogue`). Complements ``scripts/bench_shift.py``, which
simulates in memory and calls the predictor directly: the two should agree.

    python scripts/bench_shift_files.py --model <run>/model [--shifts none,combined] [--n 4000]
        [--seed 5] [--work /tmp/shift_files] [--out shift_files.json] [--markdown shift_files.md]
        [--predict-args "survey_residual=false mc_samples=0"]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from stellarnet.benchmarks.shift_suite import SNR_BIN, save_shift_results, score_catalogue
from stellarnet.simulate.shifts import shift_suite
from stellarnet.simulate.survey import simulate_survey


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="model folder (model.pt [+ emulator.pt])")
    ap.add_argument("--shifts", default="none,combined", help="comma-separated suite names")
    ap.add_argument("--n", type=int, default=4000, help="stars per survey")
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--work", default="shift_files", help="where the surveys and catalogues are written")
    ap.add_argument("--out", default="shift_files.json")
    ap.add_argument("--markdown", default=None, help="also write the table as markdown here")
    ap.add_argument("--predict-args", default="", help="extra key=value overrides for stellarnet.predict, space-separated")
    args = ap.parse_args(argv)
    work = Path(args.work)
    res: dict = {"model": args.model, "n_stars": args.n, "seed": args.seed, "predict_args": args.predict_args,
                 "shifts": {}}
    for name in args.shifts.split(","):
        t0 = time.perf_counter()
        paths = simulate_survey(work / name / "survey", n_stars=args.n, seed=args.seed, external=False,
                                progress=False, shift=None if name == "none" else name)
        t_sim = time.perf_counter() - t0
        out_dir = work / name / "predictions"
        t0 = time.perf_counter()
        run = subprocess.run([sys.executable, "-m", "stellarnet.predict", f"ckpt_path={args.model}",
                              f"input={paths['allstar']}", f"output_dir={out_dir}", "overwrite=true",
                              "trainer.enable_progress_bar=false", *args.predict_args.split()],
                             capture_output=True, text=True)
        if run.returncode != 0:
            print(run.stdout[-2000:], run.stderr[-4000:], file=sys.stderr)
            return run.returncode
        t_pred = time.perf_counter() - t0
        scale = shift_suite([name])[name].snr_scale  # the same stars, whatever their S/N
        entry = score_catalogue(out_dir / "predictions.fits", paths["truth"], snr_bin=tuple(v * scale for v in SNR_BIN))
        entry.update(seconds_simulate=t_sim, seconds_predict=t_pred)
        res["shifts"][name] = entry
        res["label_names"] = list(entry.get("refined", entry["network"]))
        res.setdefault("snr_bin", list(SNR_BIN))
        print(f"{name}: {entry['n_rows']} rows, {t_sim:.0f} s simulate + {t_pred:.0f} s predict", file=sys.stderr)
    print(save_shift_results(res, args.out, args.markdown))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
