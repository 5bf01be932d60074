"""``python -m stellarnet <command> ...``: the ``stellarnet`` console script (:mod:`stellarnet.cli`)."""

import sys

from stellarnet.cli import main

if __name__ == "__main__":
    sys.exit(main())
