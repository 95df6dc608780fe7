"""The sweep driver: validate the grid, lock ``DIR``, skip finished cells, run the rest, build the leaderboard."""

from __future__ import annotations

import fcntl
import json
import os
import socket
from pathlib import Path

from fare_core.errors import FareError
from fare_core.files import atomic_write

from .cells import read_done, remove_stale_tmp
from .executors import Recorder, import_ray, run_local, run_ray
from .grid import DENSE, load_grid
from .index import INDEX, Index

LOCK = ".sweep.lock"
GRID_COPY = "grid.json"
EXECUTORS = ("local", "ray")


def check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise FareError(f"--out {out}: is a file; pass a folder (new, or one a previous sweep wrote)")
    if out.is_dir() and any(out.iterdir()) and not (out / INDEX).is_file() and not (out / LOCK).is_file():
        raise FareError(f"--out {out}: folder is not empty and holds no sweep ({INDEX}); pass a new folder "
                        "or the folder of the sweep to resume")


class SweepLock:
    """One driver per sweep folder (an flock on DIR/.sweep.lock, released when the process dies)."""

    def __init__(self, out: Path):
        self.path = out / LOCK
        self.fd = None

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise FareError(f"{self.path.parent}: another `fare sweep` is running on this folder") from None
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def run_sweep(grid_path, out, executor: str = "local", ray_address: str | None = None, cache=None,
              ray_num_cpus: int | None = None, max_retries: int = 2, leaderboard: bool = True, log=print) -> int:
    """Run every unfinished cell of the grid into ``out``; 0 when all cells are done, 1 when some failed."""
    if executor not in EXECUTORS:
        raise FareError(f"--executor {executor!r}: allowed: {', '.join(EXECUTORS)}")
    if executor == "ray":
        import_ray()
    out = Path(out)
    check_out_dir(out)
    grid = load_grid(grid_path)  # every check before any compute
    cache_dir = Path(cache) if cache else out / "checkpoints"
    out.mkdir(parents=True, exist_ok=True)
    with SweepLock(out):
        own_cache = cache_dir.resolve() == (out / "checkpoints").resolve()  # shared caches are left alone
        for folder in (out, out / "cells", *([cache_dir] if own_cache else [])):
            remove_stale_tmp(folder)
        atomic_write(out / GRID_COPY, lambda tmp: tmp.write_text(json.dumps(
            {"grid_file": str(Path(grid_path).resolve()), "grid": grid.source}, indent=2, default=str)))
        index = Index(out)
        try:
            index.set_meta(driver={"host": socket.gethostname(), "pid": os.getpid()}, executor=executor)
            index.add_cells(grid.cells)
            status = {r["cell_id"]: r["status"] for r in index.rows()}
            todo = []
            for cell in grid.cells:
                folder = out / "cells" / cell.cell_id()
                record = read_done(folder)
                if record is None:
                    todo.append(cell)
                elif status.get(cell.cell_id()) != "done":  # finished, but killed before it was indexed
                    index.record_done(record, folder)
            log(f"[sweep] {len(grid.cells)} cells: {len(grid.cells) - len(todo)} already done, {len(todo)} to run"
                f" ({executor} executor) -> {out}", flush=True)
            recorder = Recorder(index, out, len(todo), log)
            if executor == "local":
                run_local(todo, out, cache_dir, recorder)
            else:
                run_ray(todo, out, cache_dir, recorder, ray_address, ray_num_cpus, max_retries)
            for folder in (out / "cells", *([cache_dir] if own_cache else [])):
                remove_stale_tmp(folder)
            board_failed = False
            if leaderboard:
                try:
                    build_leaderboard(out, index, grid.leaderboard, log)
                except FareError as e:  # the cells stay done; the leaderboard can be rebuilt
                    log(f"[sweep] leaderboard failed: {e}", flush=True)
                    board_failed = True
                remove_stale_tmp(out)
            rows = index.rows()
        finally:
            index.close()
    ids = {c.cell_id() for c in grid.cells}
    failed = [r for r in rows if r["status"] == "failed" and r["cell_id"] in ids]
    if failed:
        log(f"[sweep] {len(failed)} cell(s) failed; `fare sweep status {out}` shows their errors", flush=True)
        return 1
    return 1 if board_failed else 0


def build_leaderboard(out: Path, index: Index, options: dict | None = None, log=print):
    """``fare leaderboard`` over the finished cells against each model's dense baseline -> DIR/leaderboard/."""
    rows = [r for r in index.rows() if r["status"] == "done"]
    baselines = [r["path"] for r in rows if r["method"] == DENSE]
    runs = [r["path"] for r in rows if r["method"] != DENSE]
    if not baselines or not runs:
        log("[sweep] leaderboard skipped: it needs a finished dense baseline and at least one other finished cell",
            flush=True)
        return None
    from fare_analysis.leaderboard import build_leaderboard as build

    log(f"[sweep] leaderboard: {len(runs)} cells against {len(baselines)} dense baseline(s)", flush=True)
    paths = build(runs, baselines, out / "leaderboard", overwrite=True, log=lambda msg: log(f"[sweep]   {msg}", flush=True),
                  **(options or {}))
    log(f"[sweep] leaderboard -> {out / 'leaderboard'}", flush=True)
    return paths
