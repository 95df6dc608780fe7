"""User-facing errors: one line naming the bad value and what is allowed.

Raise :class:`FareError` for anything a user can fix (bad argument, missing file, wrong folder).
Every fare entry point prints it as a single line and exits non-zero; ``FARE_DEBUG=1`` shows the
traceback instead:

* the ``fare`` CLI catches it centrally in ``fare_models.cli.main`` (:func:`report`);
* the stock ``lm_eval`` CLI gets :func:`install_excepthook` from the autoload hook, so a
  FareError that lm-eval lets through (also as the ``__cause__``/``__context__`` of what it
  re-raises) ends the process with one line.
"""

from __future__ import annotations

import os
import sys

INTERRUPTED = "interrupted; rerun the same command to resume"


class FareError(ValueError):
    """An error the user can fix; its message is the whole story (one line)."""


def debug() -> bool:
    """``FARE_DEBUG`` set to anything but empty/0: show tracebacks instead of one-line errors."""
    return os.environ.get("FARE_DEBUG", "").strip() not in ("", "0")


def fare_error_in(exc: BaseException | None) -> FareError | None:
    """The FareError ``exc`` is, or was raised from / while handling (None if there is none)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, FareError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)  # as tracebacks show it
    return None


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on a single line."""
    return " ".join(str(exc).split()) or type(exc).__name__


def report(exc: BaseException, prog: str) -> int | None:
    """Print ``exc`` as one line on stderr and return the exit code, or None when it is not ours.

    Ours: a FareError anywhere in the exception chain (exit 2) and KeyboardInterrupt (exit 130).
    With ``FARE_DEBUG=1`` nothing is printed and None is returned, so the caller re-raises.
    """
    if debug():
        return None
    if isinstance(exc, KeyboardInterrupt):
        print(f"{prog}: {INTERRUPTED}", file=sys.stderr)
        return 130
    err = fare_error_in(exc)
    if err is None:
        return None
    print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
    return 2


def install_excepthook(prog: str | None = None) -> None:
    """Make an uncaught FareError end the process with one line (idempotent; chains the old hook)."""
    previous = sys.excepthook
    if getattr(previous, "_fare_moe", False):
        return

    def hook(exc_type, exc, tb):
        if not isinstance(exc, KeyboardInterrupt) and fare_error_in(exc) is not None:
            name = prog or os.path.basename(sys.argv[0] or "python")
            if report(exc, name) is not None:
                return
        previous(exc_type, exc, tb)

    hook._fare_moe = True
    sys.excepthook = hook
