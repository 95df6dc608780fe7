"""fare sweep --executor ray: a local 2-CPU Ray cluster on loopback; a worker killed mid-cell is retried
(issue 10 section 3)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_sweep_run import GRID as RUN_GRID

from fare_sweep.cells import TMP_PREFIX, WORKER_FILE
from fare_sweep.status import cell_states

pytest.importorskip("ray")

GRID = {**RUN_GRID, "safety_p": [0.5], "methods": {"magnitude": {"ratio": [0.5]}, "wanda": {"ratio": [0.5]}},
        "resources": {"num_gpus": 0, "num_cpus": 1}}


def kill_workers(out: Path, proc, plan: dict) -> dict:
    """kill -9 the worker of each attempt of a cell while it computes, ``plan[name]`` attempts per cell.

    A worker records its pid in the cell's temp folder (worker.json) when it starts the cell;
    returns {name: [killed pids]}.
    """
    killed = {name: [] for name in plan}
    deadline = time.time() + 240
    while any(len(killed[n]) < k for n, k in plan.items()) and time.time() < deadline and proc.poll() is None:
        for name, k in plan.items():
            for f in (out / "cells").glob(f"{TMP_PREFIX}*{name}*/{WORKER_FILE}"):
                try:
                    pid = json.loads(f.read_text())["pid"]
                except (OSError, ValueError):
                    continue
                if len(killed[name]) < k and pid not in killed[name]:
                    os.kill(pid, signal.SIGKILL)
                    assert f.parent.exists()  # killed mid-cell: its folder was not renamed into place
                    killed[name].append(pid)
        time.sleep(0.02)
    return killed


@pytest.mark.slow
def test_ray_two_workers_dead_worker_retried_then_failed(tmp_path):
    """2 CPUs, --max-retries 1: the magnitude cell's worker is killed once (retried, done); the wanda
    cell's worker is killed on both attempts (cell failed, the others unaffected, exit 1)."""
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump(GRID, sort_keys=False))
    out = tmp_path / "sweep"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fare_models.cli", "sweep", str(grid), "--out", str(out), "--executor", "ray",
         "--ray-num-cpus", "2", "--max-retries", "1", "--no-leaderboard"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    try:
        killed = kill_workers(out, proc, {"magnitude": 1, "wanda": 2})
        stdout, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert [len(v) for v in killed.values()] == [1, 2], stdout[-3000:]
    assert proc.returncode == 1, stdout[-3000:]
    lines = [ln for ln in stdout.splitlines() if ln.startswith("[sweep]")]
    assert lines[0].startswith("[sweep] 3 cells: 0 already done, 3 to run (ray executor)")
    assert sum(ln.startswith("[sweep] done") for ln in lines) == 2
    assert any(ln.startswith("[sweep] retry  fare-tiny:olmoe wanda") for ln in lines)
    states = {s["label"]: s for s in cell_states(out)}
    assert [s["status"] for s in states.values()] == ["done", "done", "failed"]
    wanda = states["fare-tiny:olmoe wanda ratio=0.5 p=0.5"]
    assert wanda["error"].startswith("worker died 2 times") and wanda["attempts"] == 2
    retried = json.loads((out / "cells" / states["fare-tiny:olmoe magnitude ratio=0.5"]["cell_id"] / "cell.json")
                         .read_text())
    assert retried["worker"]["pid"] not in killed["magnitude"]  # completed by another worker process
    assert Path(retried["checkpoint"]).is_dir()
    assert not [p for p in out.rglob("*") if p.name.startswith(TMP_PREFIX) or ".tmp-" in p.name]
    results = next((out / "cells" / retried["cell_id"]).glob("*/results_*.json"))
    assert json.loads(results.read_text())["results"]["fare_crows_pairs"]["sample_len"] == 4
