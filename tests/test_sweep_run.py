"""fare sweep end to end on fare-tiny: kill -9 mid-cell, resume, index, status, truth (issue 10 section 2)."""

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import lm_eval
import pytest
import torch
import yaml

from fare_sweep.cells import TMP_PREFIX, WORKER_FILE
from fare_sweep.evaluate import metric_rows, task_manager
from fare_sweep.run import run_sweep
from fare_sweep.status import cell_states, format_status

GRID = {
    "models": ["fare-tiny"],
    "tasks": ["fare_crows_pairs"],
    "limit": 4,
    "batch_size": 4,
    "calibration": {"n": 4, "seq_len": 32, "seed": 0},
    "safety_p": [0.0, 0.5],
    "methods": {"magnitude": {"ratio": [0.5]}, "wanda": {"ratio": [0.5]}, "mask": {"mask": ["0:1", "0:99"]}},
    "device": "cpu",
    "leaderboard": {"n_permutations": 100, "n_bootstrap": 100},
}


def tree_hashes(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def results_of(cell_dir: Path) -> dict:
    return json.loads(next(cell_dir.glob("*/results_*.json")).read_text())


def direct_eval(model_args: dict) -> dict:
    """lm-eval's own simple_evaluate, outside the sweep, with the sweep's settings."""
    tasks = GRID["tasks"]
    return lm_eval.simple_evaluate(model="fare_moe", model_args=model_args, tasks=tasks, limit=GRID["limit"],
                                   batch_size=GRID["batch_size"], task_manager=task_manager(tasks, model_args))


def kill_mid_cell(grid: Path, out: Path) -> list[str]:
    """Start `fare sweep` (a pipe, not a terminal); kill -9 it while its second cell is being computed."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "fare_models.cli", "sweep", str(grid), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
                            start_new_session=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line.rstrip())
            if sum(ln.startswith("[sweep] start") for ln in lines) == 2:
                break
        deadline = time.time() + 120
        while not list((out / "cells").glob(f"{TMP_PREFIX}*/{WORKER_FILE}")) and time.time() < deadline:
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, lines
    return lines


@pytest.mark.slow
def test_kill_resume_index_status_and_truth(tmp_path):
    from fare_models.profile import save_profile

    save_profile(tmp_path / "phi.safetensors", torch.rand(4, 8), list(range(4)), "fare-tiny:olmoe", "olmoe")
    grid = tmp_path / "grid.yaml"
    methods = {**GRID["methods"], "arr": {"profile": "phi.safetensors", "lam": [1.0]}}
    grid.write_text(yaml.safe_dump({**GRID, "methods": methods}, sort_keys=False))
    out = tmp_path / "sweep"

    first = kill_mid_cell(grid, out)
    assert first[0].startswith("[sweep] 7 cells: 0 already done, 7 to run")
    assert any(ln.startswith("[sweep] done   fare-tiny:olmoe dense in ") and "ETA" in ln for ln in first)
    cells = out / "cells"
    done_before = {p.name: tree_hashes(p) for p in cells.iterdir() if not p.name.startswith(TMP_PREFIX)}
    assert len(done_before) == 1 and list(cells.glob(f"{TMP_PREFIX}*"))  # killed mid-cell: a temp folder left
    states = {s["label"]: s for s in cell_states(out)}
    assert states["fare-tiny:olmoe dense"]["status"] == "done"
    killed = states["fare-tiny:olmoe magnitude ratio=0.5"]
    assert (killed["status"], killed["note"]) == ("pending", "interrupted")
    assert sum(s["status"] == "pending" for s in states.values()) == 6

    log = []
    rc = run_sweep(grid, out, log=lambda *a, **k: log.append(" ".join(map(str, a))))
    assert rc == 1  # the mask on expert 99 fails; the other cells go on
    assert log[0].startswith("[sweep] 7 cells: 1 already done, 6 to run")
    assert sum(ln.startswith("[sweep] start") for ln in log) == 6 and any("ETA" in ln for ln in log)

    # finished cells untouched, every cell complete once, no temp folders anywhere
    for name, hashes in done_before.items():
        assert tree_hashes(cells / name) == hashes
    assert not [p for p in out.rglob("*") if p.name.startswith(TMP_PREFIX) or ".tmp-" in p.name]
    states = cell_states(out)
    failed = states[5]
    assert [s["status"] for s in states] == ["done"] * 5 + ["failed", "done"]
    assert failed["label"] == "fare-tiny:olmoe mask mask=0:99"
    assert "99" in failed["error"] and "\n" not in failed["error"]
    text = format_status(states)
    assert "6 done, 0 running, 1 failed, 0 pending of 7 cells" in text and f"error: {failed['error']}" in text
    finished = [s for s in states if s["status"] == "done"]

    # the leaderboard: one row per finished cell, compressed cells against the dense baseline
    import csv

    with open(out / "leaderboard" / "leaderboard.csv") as f:
        board = list(csv.DictReader(f))
    assert sorted(r["path"] for r in board) == sorted(str(cells / s["cell_id"]) for s in finished)
    assert [r["role"] for r in board].count("baseline") == 1 and (out / "leaderboard" / "index.html").is_file()

    # index: one row per cell, metrics exactly those of lm-eval's results files, no duplicates
    db = sqlite3.connect(out / "index.sqlite")
    assert db.execute("SELECT count(*), count(DISTINCT cell_key) FROM cells").fetchone() == (7, 7)
    for s in finished:
        want = sorted(metric_rows(results_of(cells / s["cell_id"])))
        got = sorted(db.execute("SELECT task, metric, filter, value, stderr FROM metrics WHERE cell_id=?",
                                (s["cell_id"],)).fetchall())
        assert got == want and len(got) > 5
        stages = dict(db.execute("SELECT stage, seconds FROM timings WHERE cell_id=?", (s["cell_id"],)).fetchall())
        assert set(stages) == {"compress", "evaluate", "total"} and stages["total"] >= stages["evaluate"] > 0
    assert db.execute("SELECT count(*) FROM timings WHERE cell_id=?", (failed["cell_id"],)).fetchone() == (0,)

    # independent truth: the dense cell is lm-eval's own run of the model; the magnitude cell (saved
    # checkpoint, reloaded) equals fare_moe compressing on the fly
    by_label = {s["label"]: cells / s["cell_id"] for s in states}
    dense = direct_eval({"pretrained": "fare-tiny", "device": "cpu", "dtype": "float32"})
    assert results_of(by_label["fare-tiny:olmoe dense"])["results"] == json.loads(json.dumps(dense["results"]))
    fly = direct_eval({"pretrained": "fare-tiny", "device": "cpu", "dtype": "float32", "compression": "magnitude",
                       "compression_ratio": 0.5})
    mag = results_of(by_label["fare-tiny:olmoe magnitude ratio=0.5"])["results"]
    assert mag == json.loads(json.dumps(fly["results"])) and mag != dense["results"]
    assert results_of(by_label["fare-tiny:olmoe mask mask=0:1"])["config"]["model_args"]["intervention"] == "mask"
    arr_args = results_of(by_label["fare-tiny:olmoe arr lam=1.0 profile=phi.safetensors"])["config"]["model_args"]
    assert (arr_args["intervention"], arr_args["lam"], arr_args["profile"]) == \
        ("arr", 1.0, str((tmp_path / "phi.safetensors").resolve()))

    # a second sweep with another task set reuses the checkpoints (no recompression)
    ckpts = out / "checkpoints"
    before = {p.name: p.stat().st_mtime_ns for p in ckpts.rglob("*")}
    g2 = tmp_path / "grid2.yaml"
    g2.write_text(yaml.safe_dump({**GRID, "tasks": ["fare_crows_pairs_gender"], "methods": {"wanda": {"ratio": [0.5]}}}))
    log.clear()
    assert run_sweep(g2, tmp_path / "sweep2", cache=ckpts, leaderboard=False,
                     log=lambda *a, **k: log.append(" ".join(map(str, a)))) == 0
    assert sum("(cached checkpoint)" in ln for ln in log) == 2
    assert {p.name: p.stat().st_mtime_ns for p in ckpts.rglob("*")} == before

    # a cell finished on disk but not indexed (driver killed between rename and commit) is indexed on
    # rerun from its folder, not recomputed
    victim = finished[1]["cell_id"]
    with db:
        db.execute("DELETE FROM metrics WHERE cell_id=?", (victim,))
        db.execute("UPDATE cells SET status='running' WHERE cell_id=?", (victim,))
    hashes = tree_hashes(cells / victim)
    log.clear()
    assert run_sweep(grid, out, leaderboard=False, log=lambda *a, **k: log.append(" ".join(map(str, a)))) == 1
    assert log[0].startswith("[sweep] 7 cells: 6 already done, 1 to run")  # only the failed cell is retried
    assert tree_hashes(cells / victim) == hashes
    assert db.execute("SELECT status FROM cells WHERE cell_id=?", (victim,)).fetchone() == ("done",)
    assert sorted(db.execute("SELECT task, metric, filter, value, stderr FROM metrics WHERE cell_id=?",
                             (victim,)).fetchall()) == sorted(metric_rows(results_of(cells / victim)))


def test_ray_worker_in_another_directory_gets_paths_that_resolve(tmp_path, monkeypatch):
    """A Ray worker on a cluster node runs in another working directory than the driver: with a
    relative --out it still writes the cell into the driver's DIR and loads the checkpoint from there;
    cell.json keeps the driver's relative checkpoint path; fare_analysis identifies the cell."""
    from fare_analysis.runs import load_run
    from fare_compression.checkpoint import MANIFEST
    from fare_sweep.executors import _ray_cell
    from fare_sweep.grid import expand
    from fare_sweep.index import Index

    driver, worker_cwd = tmp_path / "driver", tmp_path / "node"
    driver.mkdir()
    worker_cwd.mkdir()
    grid = {**GRID, "limit": 2, "safety_p": [0.0], "methods": {"magnitude": {"ratio": [0.5]}}}
    cell = expand(grid).cells[1]
    assert cell.method == "magnitude"
    monkeypatch.chdir(worker_cwd)
    record = _ray_cell(cell.to_dict(), "sweep", "sweep/checkpoints", 1, str(driver))
    assert list(worker_cwd.iterdir()) == []  # nothing written relative to the worker's own directory
    assert record["checkpoint"].startswith("sweep/checkpoints/")  # recorded as the driver names it
    assert (driver / record["checkpoint"] / MANIFEST).is_file()
    cell_dir = driver / "sweep" / "cells" / cell.cell_id()
    assert json.loads((cell_dir / "cell.json").read_text()) == record
    pretrained = results_of(cell_dir)["config"]["model_args"]["pretrained"]
    assert Path(pretrained) == driver / record["checkpoint"]  # the worker loaded an absolute path
    monkeypatch.chdir(driver)  # the driver indexes the cell from its own directory
    index = Index(Path("sweep"))
    index.add_cells([cell])
    index.record_done(record, Path("sweep") / "cells" / cell.cell_id())
    assert [r["checkpoint"] for r in index.rows()] == [record["checkpoint"]]
    index.close()
    monkeypatch.chdir(tmp_path)
    assert load_run(cell_dir).identity["method"] == "magnitude"
    # the local executor (same directory as the driver) keeps the driver's relative paths, as before
    from fare_sweep.cells import from_driver

    assert from_driver("sweep", str(tmp_path)) == Path("sweep")
    assert from_driver("sweep", str(driver)) == driver / "sweep"
    assert from_driver(driver / "x", str(tmp_path)) == driver / "x"
    assert from_driver("sweep", None) == Path("sweep")


def test_env_forwarded_to_cluster_workers_has_absolute_folders(tmp_path, monkeypatch):
    """FARE_DATA_DIR=data (relative) reaches a cluster worker as the driver's absolute folder."""
    from fare_sweep.executors import FORWARD_ENV, forwarded_env

    monkeypatch.chdir(tmp_path)
    env = {"FARE_DATA_DIR": "data", "HF_HOME": "~/hf", "HF_HUB_OFFLINE": "1", "UNRELATED": "x"}
    assert forwarded_env(env) == {"FARE_DATA_DIR": str(tmp_path / "data"),
                                  "HF_HOME": str(Path("~/hf").expanduser()), "HF_HUB_OFFLINE": "1"}
    assert set(forwarded_env(env)) <= set(FORWARD_ENV)


def test_remove_stale_tmp_names(tmp_path):
    """Temp names of cells and of atomic writers go; the lock, the index and finished folders stay."""
    from fare_sweep.cells import remove_stale_tmp

    temps = [f"{TMP_PREFIX}cell__abc-host-12", ".magnitude__k.tmp-345", ".leaderboard.old-6", ".grid.json.tmp-7"]
    keep = [".sweep.lock", "index.sqlite", "cell__abc", ".tmp", ".x.tmp-", "x.tmp-8"]
    for name in temps[:3] + keep[2:4]:
        (tmp_path / name).mkdir()
    for name in temps[3:] + keep[:2] + keep[4:]:
        (tmp_path / name).write_text("x")
    assert sorted(p.name for p in remove_stale_tmp(tmp_path)) == sorted(temps)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)


def test_ray_worker_in_another_directory_loads_a_relative_local_model(tmp_path, monkeypatch):
    """models: [models/tiny] (a folder relative to the driver) is loaded from the driver's directory by
    a worker running elsewhere; the cell record keeps the grid's name."""
    import shutil

    from fare_core.tiny import tiny_model_path
    from fare_sweep.executors import _ray_cell
    from fare_sweep.grid import expand

    driver, worker_cwd = tmp_path / "driver", tmp_path / "node"
    worker_cwd.mkdir()
    tiny_model_path("fare-tiny")  # built into the cache if needed
    shutil.copytree(tiny_model_path("fare-tiny"), driver / "models" / "tiny")
    cell = expand({**GRID, "models": ["models/tiny"], "limit": 2, "methods": {}}).cells[0]
    monkeypatch.chdir(worker_cwd)
    record = _ray_cell(cell.to_dict(), "sweep", "sweep/checkpoints", 1, str(driver))
    assert record["cell"]["model"] == "models/tiny" and list(worker_cwd.iterdir()) == []
    pretrained = results_of(driver / "sweep" / "cells" / cell.cell_id())["config"]["model_args"]["pretrained"]
    assert Path(pretrained) == driver / "models" / "tiny"
