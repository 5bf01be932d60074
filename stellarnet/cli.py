"""The ``stellarnet`` command: one console script with a subcommand per entry point.

``stellarnet <command> [key=value ...]`` runs ``python -m stellarnet.<command> [key=value ...]``
(the same Hydra configuration, overrides and outputs); ``stellarnet`` or ``stellarnet --help``
lists the commands, ``stellarnet <command> --help`` describes the command's main keys, and
``python -m stellarnet`` is the same command.
"""

from __future__ import annotations

import importlib
import sys
from typing import Sequence

#: command → (module whose ``main()`` runs it, one-line description)
COMMANDS: dict[str, tuple[str, str]] = {
    "simulate": ("stellarnet.simulate.__main__", "write the simulated survey (allStar, aspcapStar, GALAH, LAMOST)"),
    "build-shards": ("stellarnet.build_shards", "apply the quality cuts and build the HDF5 shard dataset"),
    "train": ("stellarnet.train", "train the network (+experiment=apogee); writes the model folder <run>/model"),
    "refinement": ("stellarnet.refinement.__main__", "(re)build the chi2 refinement stage of a model folder"),
    "evaluate": ("stellarnet.evaluate", "report + figures of a model folder on a split (and the shift suite)"),
    "predict": ("stellarnet.predict", "labels, errors, classes and flags for a catalogue, spectrum files or shards"),
    "baselines": ("stellarnet.baselines.__main__", "trees and the Cannon-style model on the same splits as the network"),
    "build-features": ("stellarnet.build_features", "the tabular feature table (photometry, indices) of a dataset"),
    "crossval": ("stellarnet.crossval.__main__", "cross-survey validation against GALAH DR3 / LAMOST DR7"),
    "pipeline": ("stellarnet.pipeline.__main__", "every stage in order, each rerun only when its inputs changed"),
}


def usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = ["usage: stellarnet <command> [key=value ...]   (or: python -m stellarnet <command> ...)", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "stellarnet <command> --help   the command's main keys and config groups",
              "stellarnet <command> --cfg job  the composed configuration, without running",
              "Docs: README.md, docs/configuration.md (every key), docs/troubleshooting.md (error messages)."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``stellarnet <command> ...``; returns the exit status for help / unknown commands (the
    commands themselves exit through Hydra and :func:`stellarnet.common.errors.report_errors`)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name = args[0].replace("_", "-")
    if name not in COMMANDS:
        print(f"error: unknown command {args[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    sys.argv = [f"stellarnet {name}", *args[1:]]
    module.main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
