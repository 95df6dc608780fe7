"""Self-contained HTML page (inline CSS/JS, PNGs as data URIs) from sortable tables, via jinja2.

The template lives in ``fare_analysis/templates/leaderboard.html.j2``; clicking a header sorts
the rows by that column's ``data-value`` (numerically for number columns, empty cells last).
"""

from __future__ import annotations

import base64
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

TEMPLATES = Path(__file__).resolve().parent / "templates"


@dataclass
class Column:
    label: str
    type: str = "text"  # "number" sorts numerically
    help: str = ""


@dataclass
class Cell:
    text: str
    value: object = ""  # sort key written to data-value
    title: str = ""  # hover text (e.g. the CI)
    color: str = ""  # CSS background
    cls: str = ""


@dataclass
class Table:
    id: str
    title: str
    columns: list[Column]
    rows: list[list[Cell]]
    note: str = ""


@dataclass
class Figure:
    path: Path
    caption: str
    data: str = field(init=False, default="")

    def __post_init__(self):
        self.data = base64.b64encode(Path(self.path).read_bytes()).decode("ascii")


def number_cell(x: float | None, *, digits: int = 3, title: str = "", color: str = "", cls: str = "") -> Cell:
    """A numeric cell; None/NaN shows empty and sorts last."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return Cell("", "", title, "", cls)
    return Cell(f"{x:.{digits}f}" if isinstance(x, float) else str(x), repr(float(x)), title, color, cls)


def diverging_colour(x: float | None, scale: float, good_when_positive: bool | None) -> str:
    """Background for a signed value: blue when better than the baseline, red when worse, white at 0.

    ``good_when_positive`` is the metric's ``higher_is_better`` (None: neutral purple/orange scale);
    intensity is ``|x| / scale`` clipped to 1.
    """
    if x is None or not math.isfinite(x) or scale <= 0 or not math.isfinite(scale):
        return ""
    t = min(abs(x) / scale, 1.0)
    if good_when_positive is None:
        rgb = (230, 150, 60) if x > 0 else (150, 110, 200)
    else:
        better = (x > 0) == bool(good_when_positive)
        rgb = (80, 140, 220) if better else (220, 90, 80)
    mix = [round(255 + (c - 255) * 0.75 * t) for c in rgb]
    return "#" + "".join(f"{c:02x}" for c in mix)


def sequential_colour(x: float | None, scale: float) -> str:
    """White-to-orange background for a non-negative value (drift, instability)."""
    if x is None or not math.isfinite(x) or scale <= 0 or not math.isfinite(scale):
        return ""
    t = min(max(x, 0.0) / scale, 1.0)
    rgb = (235, 140, 40)
    return "#" + "".join(f"{round(255 + (c - 255) * 0.75 * t):02x}" for c in rgb)


def render(title: str, note: str, tables: Sequence[Table], figures: Sequence[Figure]) -> str:
    """The page as one string; every value is HTML-escaped by jinja2's autoescape."""
    from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

    env = Environment(loader=FileSystemLoader(str(TEMPLATES)), autoescape=select_autoescape(["html", "j2"]),
                      undefined=StrictUndefined, keep_trailing_newline=True)
    return env.get_template("leaderboard.html.j2").render(title=title, note=note, tables=tables, figures=figures)
