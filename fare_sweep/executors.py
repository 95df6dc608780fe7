"""Executors: run pending cells one after another in this process, or as Ray tasks.

Both call :func:`fare_sweep.cells.run_cell` (the worker writes its cell folder atomically) and
leave the index to the driver (:class:`Recorder`): one transaction per finished cell.
"""

from __future__ import annotations

import json
import os
import socket
import time
import traceback
from pathlib import Path

from fare_core.errors import FareError, one_line

from .cells import TMP_PREFIX, WORKER_FILE, run_cell
from .grid import Cell
from .index import Index

RAY_HINT = "pip install 'fare-moe[sweep]' (or pip install 'ray[default]')"


def describe(exc: BaseException, limit: int = 500) -> str:
    """``Type: message`` on one line (at most ``limit`` characters), for the index and status."""
    text = f"{type(exc).__name__}: {one_line(exc)}"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    m, s = divmod(seconds, 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


class Recorder:
    """Driver side: index updates and one progress line per cell start/finish (elapsed, ETA)."""

    def __init__(self, index: Index, out_dir: Path, total: int, log=print):
        self.index, self.out_dir, self.total, self.log = index, Path(out_dir), total, log
        self.finished = 0
        self.failed = 0
        self.t0 = time.perf_counter()

    def _status(self) -> str:
        elapsed = time.perf_counter() - self.t0
        left = self.total - self.finished
        eta = "?" if not self.finished else _duration(elapsed / self.finished * left)
        return f"elapsed {_duration(elapsed)}, ETA {eta if left else '0s'}"

    def started(self, cell: Cell, host: str | None = None, pid: int | None = None, verb: str = "start") -> None:
        self.index.mark_running(cell.cell_id(), host, pid)
        self.log(f"[sweep] {verb:<6} {cell.label()}  ({self.finished}/{self.total} finished, {self._status()})", flush=True)

    def done(self, cell: Cell, record: dict) -> None:
        self.index.record_done(record, self.out_dir / "cells" / cell.cell_id())
        self.finished += 1
        self.log(f"[sweep] done   {cell.label()} in {_duration(record['timings']['total'])}"
                 f"{' (cached checkpoint)' if record.get('checkpoint_cached') else ''}"
                 f"  ({self.finished}/{self.total} finished, {self._status()})", flush=True)

    def fail(self, cell: Cell, error: str, tb: str | None = None) -> None:
        self.index.record_failed(cell.cell_id(), error, tb)
        self.finished += 1
        self.failed += 1
        self.log(f"[sweep] FAILED {cell.label()}: {error}  ({self.finished}/{self.total} finished, {self._status()})",
                 flush=True)


def run_local(cells: list[Cell], out_dir: Path, cache_dir: Path, recorder: Recorder) -> None:
    """Cells one after another in this process; a Python error fails that cell only."""
    for cell in cells:
        recorder.started(cell, socket.gethostname(), os.getpid())
        try:
            record = run_cell(cell.to_dict(), str(out_dir), str(cache_dir))
        except Exception as e:  # noqa: BLE001 - recorded, the sweep goes on
            recorder.fail(cell, describe(e), traceback.format_exc())
            continue
        recorder.done(cell, record)


def _ray_cell(cell_dict: dict, out_dir: str, cache_dir: str, threads: int, base: str) -> dict:
    """Ray task body (a worker process, whose working directory may not be the driver's ``base``):
    torch threads = the CPUs the cell reserved."""
    import torch

    torch.set_num_threads(max(1, threads))
    return run_cell(cell_dict, out_dir, cache_dir, base)


def _announce_starts(cells, out_dir: Path, recorder: Recorder, seen: set[str]) -> None:
    """A worker starting a cell creates its temp folder with worker.json: one start line per attempt."""
    by_prefix = {f"{TMP_PREFIX}{c.cell_id()}-": c for c in cells}
    folder = Path(out_dir) / "cells"
    for tmp in folder.glob(f"{TMP_PREFIX}*") if folder.is_dir() else ():
        if tmp.name in seen:
            continue
        cell = next((c for prefix, c in by_prefix.items() if tmp.name.startswith(prefix)), None)
        try:
            worker = json.loads((tmp / WORKER_FILE).read_text())
        except (OSError, ValueError):
            continue  # not written yet, or already renamed
        if cell is not None:
            verb = "retry" if cell.cell_id() in seen else "start"
            seen.update((tmp.name, cell.cell_id()))
            recorder.started(cell, worker.get("host"), worker.get("pid"), verb=verb)


#: Environment a remote cluster's workers need to find data, caches and offline settings.
FORWARD_ENV = ("FARE_DATA_DIR", "FARE_CACHE_DIR", "FARE_OFFLINE", "HF_HOME", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
               "TOKENIZERS_PARALLELISM")
#: Those of them that are folders: forwarded as absolute paths (a worker runs in another directory).
FORWARD_PATHS = ("FARE_DATA_DIR", "FARE_CACHE_DIR", "HF_HOME")


def forwarded_env(environ=os.environ) -> dict:
    """The :data:`FORWARD_ENV` variables that are set, folder ones made absolute from this directory."""
    return {k: os.path.abspath(os.path.expanduser(environ[k])) if k in FORWARD_PATHS else environ[k]
            for k in FORWARD_ENV if k in environ}


def import_ray():
    try:
        import ray
    except ImportError:
        raise FareError(f"--executor ray needs Ray, which is not installed: {RAY_HINT}") from None
    return ray


def run_ray(cells: list[Cell], out_dir: Path, cache_dir: Path, recorder: Recorder, address: str | None = None,
            num_cpus: int | None = None, max_retries: int = 2) -> None:
    """Cells as Ray tasks, each reserving its grid resources; a dead worker is retried ``max_retries`` times.

    ``address=None`` starts a local cluster on this machine's loopback; otherwise ``ray.init(address)``
    joins an existing cluster (``auto`` on a cluster node, ``ray://head:10001`` for Ray Client), whose
    workers must see ``out_dir`` and the checkpoint cache at the driver's paths (shared filesystem);
    relative paths are resolved from the driver's working directory, not the worker's.
    """
    ray = import_ray()
    env = forwarded_env()
    if address:
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, _node_ip_address="127.0.0.1",
                 log_to_driver=False)
    try:
        remote = ray.remote(_ray_cell)
        pending = {}
        for cell in cells:
            res = {"num_cpus": cell.resources.get("num_cpus", 1), "num_gpus": cell.resources.get("num_gpus", 0)}
            ref = remote.options(max_retries=max_retries, **res).remote(
                cell.to_dict(), str(out_dir), str(cache_dir), int(res["num_cpus"]), os.getcwd())
            pending[ref] = cell
        recorder.log(f"[sweep] {len(cells)} cells submitted to Ray", flush=True)
        seen: set[str] = set()
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            _announce_starts(pending.values(), out_dir, recorder, seen)
            for ref in ready:
                cell = pending.pop(ref)
                try:
                    record = ray.get(ref)
                except ray.exceptions.RayTaskError as e:  # the cell raised: not retried (deterministic)
                    cause = getattr(e, "cause", None) or e
                    recorder.fail(cell, describe(cause), str(e))
                except ray.exceptions.RayError as e:  # the worker died max_retries + 1 times
                    recorder.fail(cell, f"worker died {max_retries + 1} times ({describe(e)})", str(e))
                else:
                    recorder.done(cell, record)
    finally:
        ray.shutdown()
