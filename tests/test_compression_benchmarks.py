"""benchmarks/gpu_study.sh runs on CPU with --tiny (one cell per method family, both study models);
benchmarks/compress_memory.py's verdict flags growth with depth."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_study_tiny_runs_every_family_on_cpu():
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_study.sh"), "--tiny", "--json"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    cells = {(r["model"], r["method"]) for r in rows}
    assert cells == {(m, f) for m in ("qwen3_30b_a3b", "ernie45_21b_a3b")
                     for f in ("wanda", "prune_reap", "hc_smoe", "gptq_w4a16", "bnb_nf4")}
    for r in rows:
        assert r["compute_device"] == "cpu" and r["layers"] == 2 and r["weights_gib"] > 0
        if "skipped" not in r:
            assert r["seconds"] > 0 and r["seconds_per_layer"] == pytest.approx(r["seconds"] / 2)


def test_compress_memory_verdict():
    spec = importlib.util.spec_from_file_location("compress_memory", ROOT / "benchmarks" / "compress_memory.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    flat = [{"method": "wanda", "pipeline": "layerwise", "depth": d, "peak_mib": 12.0 + 0.01 * d,
             "weights_mib": 7.0 * d} for d in (2, 16)]
    growing = [{"method": "hc_smoe", "pipeline": "layerwise", "depth": d, "peak_mib": 2.0 * d,
                "weights_mib": 7.0 * d} for d in (2, 16)]
    assert mod.verdict(flat)[0] is True
    ok, lines = mod.verdict(flat + growing)
    assert ok is False and any("hc_smoe layerwise" in ln and "GROWS" in ln for ln in lines)
