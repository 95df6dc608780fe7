"""Whole-word, case-insensitive term matching for project-written lexicons.

A term is one or more words separated by spaces or hyphens; in text, the separators match any run
of whitespace or hyphens (``"good at math"`` matches ``"Good  at-math"``, ``"wheelchair-bound"``
matches ``"wheelchair bound"``). A trailing ``*`` makes the last word a prefix
(``"criminal*"`` matches ``criminals``, ``criminality``). Terms never match inside a longer word
(``"cheap"`` does not match ``cheapskate`` unless written ``cheap*``). Typographic apostrophes are
normalised to ``'`` before matching.
"""

from __future__ import annotations

import re
from typing import Iterable

_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'"})


def normalise(text: str) -> str:
    return text.translate(_APOSTROPHES)


def _term_pattern(term: str) -> str:
    term = normalise(term).strip()
    prefix = term.endswith("*")
    words = [w for w in re.split(r"[\s\-]+", term.rstrip("*")) if w]
    if not words or any("*" in w for w in words):
        raise ValueError(f"bad lexicon term {term!r}: use words, with at most one '*' at the end")
    body = r"[\s\-]+".join(re.escape(w) for w in words)
    return rf"(?<![\w]){body}" + (r"\w*" if prefix else r"(?![\w])")


class TermMatcher:
    """Finds lexicon terms in text (whole words, case-insensitive)."""

    def __init__(self, terms: Iterable[str]):
        self.terms = sorted({normalise(t).strip().lower() for t in terms if t.strip()})
        if not self.terms:
            raise ValueError("empty lexicon: give at least one term")
        self._regex = re.compile("|".join(f"(?:{_term_pattern(t)})" for t in self.terms), re.IGNORECASE)

    def find(self, text: str) -> list[str]:
        """Matched spans, lower-cased, in order of appearance."""
        return [m.group(0).lower() for m in self._regex.finditer(normalise(text or ""))]

    def contains(self, text: str) -> bool:
        return self._regex.search(normalise(text or "")) is not None
