"""``fare sweep status DIR``: done / running / failed / pending per cell, with each failed cell's error."""

from __future__ import annotations

import socket
from pathlib import Path

from fare_core.errors import FareError
from fare_core.files import pid_alive

from .cells import read_done
from .index import INDEX, Index


def cell_states(out) -> list[dict]:
    """One dict per indexed cell: cell_id, label, status, seconds, error.

    The folder on disk decides "done"; a cell the index calls running whose driver process (on
    this host) is gone was interrupted and is reported as pending (a rerun recomputes it).
    """
    out = Path(out)
    if not (out / INDEX).is_file():
        raise FareError(f"{out}: no sweep here ({INDEX} missing); pass the --out folder of `fare sweep`")
    index = Index(out)
    try:
        driver = index.meta().get("driver") or {}
        driver_alive = driver.get("host") != socket.gethostname() or pid_alive(int(driver.get("pid", 0) or 0))
        seconds = {r["cell_id"]: r["seconds"] for r in index.conn.execute(
            "SELECT cell_id, seconds FROM timings WHERE stage='total'")}
        states = []
        for r in index.rows():
            status, note = r["status"], ""
            if read_done(out / "cells" / r["cell_id"]) is not None:
                status = "done"
            elif status == "done":
                status, note = "pending", "indexed as done but its folder is missing"
            elif status == "running" and not driver_alive:
                status, note = "pending", "interrupted"
            states.append({"cell_id": r["cell_id"], "label": r["label"], "status": status, "note": note,
                           "attempts": r["attempts"], "seconds": seconds.get(r["cell_id"]), "error": r["error"]})
        return states
    finally:
        index.close()


def format_status(states: list[dict]) -> str:
    counts = {s: sum(1 for x in states if x["status"] == s) for s in ("done", "running", "failed", "pending")}
    lines = [f"{'status':<8} {'time':>8}  cell"]
    for s in states:
        t = f"{s['seconds']:.1f}s" if s["seconds"] is not None else "-"
        extra = f"  [{s['note']}]" if s["note"] else ""
        lines.append(f"{s['status']:<8} {t:>8}  {s['label']}  ({s['cell_id']}){extra}")
        if s["status"] == "failed":
            lines.append(f"{'':<8} {'':>8}    error: {s['error']}")
    lines.append(", ".join(f"{n} {k}" for k, n in counts.items()) + f" of {len(states)} cells")
    return "\n".join(lines)
