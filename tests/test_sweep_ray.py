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

from fare_sweep.cells import TMP_PREFIX, WORKER_FILE
from fare_sweep.status import cell_states

pytest.importorskip("ray")

GRID = {
    "models": ["fare-tiny"],
    "tasks": ["fare_crows_pairs"],
    "limit": 4,
    "batch_size": 4,
    "calibration": {"n": 4, "seq_len": 32, "seed": 0},
    "safety_p": [0.5],
    "methods": {"magnitude": {"ratio": [0.5]}, "wanda": {"ratio": [0.5]}},
    "resources": {"num_gpus": 0, "num_cpus": 1},
    "device": "cpu",
}


@pytest.mark.slow
def test_ray_two_workers_worker_killed_mid_cell_is_retried(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump(GRID, sort_keys=False))
    out = tmp_path / "sweep"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fare_models.cli", "sweep", str(grid), "--out", str(out), "--executor", "ray",
         "--ray-num-cpus", "2", "--max-retries", "2", "--no-leaderboard"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    try:
        # the worker computing the magnitude cell records its pid in the cell's temp folder: kill -9 it
        deadline, victim, tmp = time.time() + 180, None, None
        while victim is None and time.time() < deadline and proc.poll() is None:
            for f in (out / "cells").glob(f"{TMP_PREFIX}*magnitude*/{WORKER_FILE}"):
                try:
                    victim, tmp = json.loads(f.read_text())["pid"], f.parent
                except (OSError, ValueError):
                    continue
            time.sleep(0.02)
        assert victim is not None and victim != proc.pid, "no worker started the magnitude cell"
        os.kill(victim, signal.SIGKILL)
        assert tmp.exists()  # killed mid-cell: its folder was not yet renamed into place
        stdout, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, stdout[-3000:]
    lines = [ln for ln in stdout.splitlines() if ln.startswith("[sweep]")]
    assert lines[0].startswith("[sweep] 3 cells: 0 already done, 3 to run (ray executor)")
    assert sum(ln.startswith("[sweep] done") for ln in lines) == 3
    states = cell_states(out)
    assert [s["status"] for s in states] == ["done"] * 3
    records = {s["label"]: json.loads((out / "cells" / s["cell_id"] / "cell.json").read_text()) for s in states}
    retried = records["fare-tiny:olmoe magnitude ratio=0.5"]
    assert retried["worker"]["pid"] != victim  # completed by another worker process
    assert not [p for p in out.rglob("*") if p.name.startswith(TMP_PREFIX) or ".tmp-" in p.name]
    results = next((out / "cells" / states[1]["cell_id"]).glob("*/results_*.json"))
    assert json.loads(results.read_text())["results"]["fare_crows_pairs"]["sample_len"] == 4
    assert Path(retried["checkpoint"]).is_dir()
