"""One error discipline for every entry point (``python -m stellarnet.<entry>``).

:func:`report_errors` wraps an entry point's ``main``: a failure becomes one line on stderr,
``error: <what, naming the file / column / key>: <what to do>``, and exit status 1, instead of a
raw traceback. The original exception (with its chain) is re-raised unchanged when
``HYDRA_FULL_ERROR=1`` is set, so a developer still gets the full traceback.

Errors the project raises on purpose (bad input, bad configuration) are printed as they are;
anything else is an unexpected failure and says so, with how to get the traceback.
The messages users can meet are listed in ``docs/troubleshooting.md``.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from typing import Any, Callable, TypeVar

log = logging.getLogger("stellarnet")

F = TypeVar("F", bound=Callable[..., Any])

#: Exit status of a run that failed (bad input, bad configuration, or an unexpected error).
EXIT_FAILURE = 1
#: Exit status of a run stopped with Ctrl-C (128 + SIGINT, as shells report it).
EXIT_INTERRUPTED = 130

#: Exception types whose message is written for users (the project's own errors derive from
#: these): printed as they are.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, KeyError, OSError, LookupError)


class StellarnetError(Exception):
    """Base of the project's own errors that do not derive from :data:`USER_ERRORS` (a shard dataset,
    checkpoint or prediction that cannot be used): their messages are written for users."""


def one_line(exc: BaseException) -> str:
    """``exc``'s message as the CLI prints it: the type for unexpected errors, the text kept
    (a multi-line message, e.g. a cut report, follows on the next lines)."""
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    text = text.strip() or type(exc).__name__
    if isinstance(exc, USER_ERRORS + (StellarnetError,)):
        return text
    return (f"unexpected {type(exc).__name__}: {text} (a bug or an input the checks do not know; rerun with "
            "HYDRA_FULL_ERROR=1 for the traceback and report it)")


def report_errors(main: F) -> F:
    """Decorate an entry point's ``main(cfg)`` (below ``@hydra.main``): errors → one line, exit 1."""

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return main(*args, **kwargs)
        except KeyboardInterrupt:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            print("interrupted: partial outputs were left under temporary names or not written", file=sys.stderr)
            sys.exit(EXIT_INTERRUPTED)
        except Exception as exc:  # noqa: BLE001 - the boundary: everything is reported, nothing hidden
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            log.debug("entry point failed", exc_info=True)
            print(f"error: {one_line(exc)}", file=sys.stderr)
            sys.exit(EXIT_FAILURE)

    return wrapper  # type: ignore[return-value]
