"""Run one cell: compress (cached checkpoint) -> lm-eval through ``fare_moe`` -> results folder, atomically.

Layout under the sweep folder ``DIR``::

    cells/<cell_id>/cell.json                 what ran (cell, model_args, checkpoint, worker, timings)
    cells/<cell_id>/<model>/results_*.json    lm-eval's own output (--log_samples)
    cells/<cell_id>/<model>/samples_*.jsonl
    cells/.tmp-<cell_id>-<host>-<pid>/        a cell being computed (renamed into place when complete)
    checkpoints/<method>__<key>/              compressed checkpoints, by content key (``--cache`` moves them)

A cell folder exists only complete (temp folder + rename), so "done" is "its folder exists".
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

from fare_core.files import TEMP_NAME

from .grid import INTERVENTION_PARAMS, Cell

CELL_FILE = "cell.json"
WORKER_FILE = "worker.json"
CELL_FORMAT = "fare-sweep-cell/1"
TMP_PREFIX = ".tmp-"


def tmp_name(name: str) -> str:
    return f"{TMP_PREFIX}{name}-{socket.gethostname()}-{os.getpid()}"


def device_and_dtype(cell: Cell) -> tuple[str, str]:
    """The cell's device and dtype names, "auto" resolved as fare_compression resolves it."""
    from fare_compression.layerwise import resolve_device, resolve_dtype

    device = resolve_device(cell.device)
    return str(device), str(resolve_dtype(cell.dtype, device)).removeprefix("torch.")


def checkpoint_dir(cell: Cell, cache_dir: Path) -> Path:
    return Path(cache_dir) / f"{cell.method}__{cell.checkpoint_key()[:24]}"


def compression_params(cell: Cell) -> dict:
    params = dict(cell.params)
    if cell.calibrated:
        params.update({f"calib_{k}": v for k, v in cell.calibration.items()})
        params["calib_p"] = cell.p
    return params


def ensure_checkpoint(cell: Cell, cache_dir: Path, device: str, dtype: str, model: str | None = None
                      ) -> tuple[Path, float, bool]:
    """The cell's compressed checkpoint: reused when its content key is cached, else compressed now.

    Returns (path, seconds, cached). ``compress_checkpoint`` writes a temp folder and renames it,
    so a checkpoint folder with its manifest is complete; two workers racing for one key both
    finish and the second one's rename loses harmlessly.
    """
    from fare_compression import compress_checkpoint
    from fare_compression.checkpoint import MANIFEST

    path = checkpoint_dir(cell, cache_dir)
    if (path / MANIFEST).is_file():
        return path, 0.0, True
    t0 = time.perf_counter()
    try:
        compress_checkpoint(model or cell.model, cell.method, compression_params(cell), out=str(path), device=device,
                            dtype=dtype, device_map=cell.device_map, revision=cell.revision)
    except Exception:
        if (path / MANIFEST).is_file():  # another worker finished the same checkpoint first
            return path, time.perf_counter() - t0, True
        raise
    return path, time.perf_counter() - t0, False


def model_args(cell: Cell, checkpoint: Path | None, device: str, dtype: str, model: str | None = None) -> dict:
    """``fare_moe`` model_args of the cell (JSON-able; lists joined with '|' as the model_arg docs say)."""
    args: dict = {"pretrained": str(checkpoint) if checkpoint else model or cell.model, "device": device,
                  "dtype": dtype}
    if cell.revision and checkpoint is None:
        args["revision"] = cell.revision
    if cell.method in INTERVENTION_PARAMS:
        args["intervention"] = cell.method
        args.update({k: v for k, v in cell.params.items()})
    return args


def read_done(folder: Path) -> dict | None:
    f = Path(folder) / CELL_FILE
    return json.loads(f.read_text()) if f.is_file() else None


def from_driver(path, base: str | None) -> Path:
    """``path`` as this process must open it: a relative path is taken from ``base``, the driver's
    working directory, when this process runs in another one (a Ray worker on a cluster node)."""
    path = Path(path)
    if base is None or path.is_absolute() or Path(base).resolve() == Path.cwd().resolve():
        return path
    return Path(base) / path


def local_model(model: str, base: str | None) -> str:
    """The grid's ``model`` as this process loads it: a relative local folder taken from the driver's
    directory (:func:`from_driver`); hub ids and fare-tiny unchanged."""
    path = from_driver(model, base)
    return str(path) if path != Path(model) and path.is_dir() else model


def run_cell(cell_dict: dict, out_dir: str, cache_dir: str, base: str | None = None) -> dict:
    """Compute one cell into ``out_dir/cells/<cell_id>`` (atomic); returns the cell record (cell.json).

    ``out_dir``/``cache_dir`` are named as the driver names them, from its working directory
    ``base`` (see :func:`from_driver`); the record keeps the checkpoint path in that form. A cell
    whose folder already exists is not recomputed (its record is returned).
    """
    from .evaluate import run_lm_eval

    cell = Cell.from_dict(cell_dict)
    cells = from_driver(out_dir, base) / "cells"
    final = cells / cell.cell_id()
    done = read_done(final)
    if done is not None:
        return done
    tmp = cells / tmp_name(cell.cell_id())
    shutil.rmtree(tmp, ignore_errors=True)  # this process's own earlier attempt, if any
    tmp.mkdir(parents=True)
    try:
        worker = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        (tmp / WORKER_FILE).write_text(json.dumps(worker))
        t0 = time.perf_counter()
        device, dtype = device_and_dtype(cell)
        ckpt, compress_s, cached = None, 0.0, False
        model = local_model(cell.model, base)
        if cell.compressed:
            ckpt, compress_s, cached = ensure_checkpoint(cell, from_driver(cache_dir, base), device, dtype, model)
        args = model_args(cell, ckpt, device, dtype, model)
        t1 = time.perf_counter()
        results = run_lm_eval(args, cell.eval, tmp)
        t2 = time.perf_counter()
        record = {
            "format": CELL_FORMAT, "cell_id": cell.cell_id(), "key": cell.key(), "cell": cell.to_dict(),
            "label": cell.label(), "checkpoint": str(checkpoint_dir(cell, Path(cache_dir))) if ckpt else None,
            "checkpoint_cached": cached,
            "model_args": args, "worker": worker,
            "timings": {"compress": round(compress_s, 3), "evaluate": round(t2 - t1, 3), "total": round(t2 - t0, 3)},
            "results_file": str(next(tmp.glob("*/results_*.json")).relative_to(tmp)),
            "lm_eval_versions": results.get("versions", {}),
        }
        (tmp / WORKER_FILE).unlink()
        (tmp / CELL_FILE).write_text(json.dumps(record, indent=2, sort_keys=True))
        try:
            os.rename(tmp, final)
        except OSError:
            if read_done(final) is None:  # not a lost race: a real error
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            return read_done(final)
        return record
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        release_memory()


def release_memory() -> None:
    """Free the cell's model before the next cell in the same process (local executor, reused Ray workers)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def remove_stale_tmp(folder: Path) -> list[Path]:
    """Delete every temp folder or file in ``folder`` (left by a killed sweep or worker): a cell's
    ``.tmp-<cell_id>-<host>-<pid>`` and atomic writers' ``.<name>.tmp-<pid>`` / ``.<name>.old-<pid>``.

    Only the driver calls this, holding the sweep lock, before any cell starts and after all have
    ended, and only on folders of its own sweep, so no live writer owns a temp folder then.
    """
    removed = []
    if Path(folder).is_dir():
        for p in Path(folder).iterdir():
            if p.name.startswith(TMP_PREFIX) or TEMP_NAME.match(p.name):  # a cell's, or an atomic writer's
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                removed.append(p)
    return removed

