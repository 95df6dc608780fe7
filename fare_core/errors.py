"""User-facing errors: one line naming the bad value and what is allowed.

Raise :class:`FareError` for anything a user can fix (bad argument, missing file, wrong folder).
Every fare entry point (the ``fare`` CLI and the stock ``lm_eval`` CLI through the autoload hook)
prints it as a single line and exits non-zero; ``FARE_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations


class FareError(ValueError):
    """An error the user can fix; its message is the whole story (one line)."""
