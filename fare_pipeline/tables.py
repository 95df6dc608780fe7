"""Report tables: one list of row dicts -> ``<stem>.csv`` (full precision) + ``<stem>.md``.

Deterministic bytes for the same rows (floats as ``repr`` in CSV, fixed decimals in Markdown).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from fare_analysis.fare_tables import csv_cell as _csv
from fare_analysis.fare_tables import md_cell as _md


def write_table(rows: Sequence[dict], stem, columns: Sequence[str] | None = None, *, digits: int = 3,
                title: str | None = None) -> tuple[Path, Path]:
    """Write rows as CSV and Markdown; ``columns`` fixes order (default: keys of the first row)."""
    if not rows:
        raise ValueError(f"no rows to write for table {str(stem)!r}")
    cols = list(columns) if columns is not None else list(rows[0])
    missing = sorted({c for c in cols for r in rows if c not in r})
    if missing:
        raise ValueError(f"column {missing[0]!r} missing from some rows; columns: {cols}")
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = stem.with_suffix(".csv"), stem.with_suffix(".md")
    with open(csv_path, "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(cols)
        for r in rows:
            w.writerow([_csv(r[c]) for c in cols])
    lines = [f"### {title}", ""] if title else []
    lines += ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(_md(r[c], digits) for c in cols) + " |" for r in rows]
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path
