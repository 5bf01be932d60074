"""Robustness benchmark: a model folder (and, optionally, the baselines) on the shift suite
(:mod:`stellarnet.benchmarks.shift_suite`, docs/robustness.md). Writes JSON and a markdown table.

    python scripts/bench_shift.py --model <run>/model [--n 2000] [--shifts none,combined]
        [--baselines data/shards/sim_dr12] [--crlb] [--out bench_shift.json] [--markdown shift_table.md]
"""

from __future__ import annotations

import argparse
import logging

from stellarnet.benchmarks.shift_suite import run_shift_suite, save_shift_results, train_baselines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="model folder (model.pt [+ emulator.pt])")
    ap.add_argument("--n", type=int, default=2000, help="stars per shift")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shifts", default=None, help="comma-separated names (default: the whole suite)")
    ap.add_argument("--baselines", default=None, help="shard dataset whose training split trains the baselines")
    ap.add_argument("--crlb", action="store_true",
                    help="also score each label in units of the star's Cramér–Rao bound at the true labels")
    ap.add_argument("--common-residual", action="store_true",
                    help="treat each shift's stars as one survey: measure the residual they share and divide it out")
    ap.add_argument("--out", default="bench_shift.json")
    ap.add_argument("--markdown", default=None, help="also write the table as markdown here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    names = args.shifts.split(",") if args.shifts else None
    base = train_baselines(args.baselines) if args.baselines else None
    res = run_shift_suite(args.model, names, args.n, args.seed, base, crlb=args.crlb, common_residual=args.common_residual)
    print(save_shift_results(res, args.out, args.markdown))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
