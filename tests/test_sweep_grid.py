"""fare sweep grid: expansion rules and validation before any compute (issue 10 section 1)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from fare_compression import METHODS
from fare_core.errors import FareError
from fare_sweep.grid import DENSE, expand, load_grid

BASE = {
    "models": ["fare-tiny"],
    "tasks": ["fare_crows_pairs", "fare_xstest"],
    "limit": 4,
    "calibration": {"n": 4, "seq_len": 32, "seed": 0},
    "safety_p": [0.0, 0.5],
    "methods": {"magnitude": {"ratio": [0.25, 0.5]}, "wanda": {"ratio": [0.5]}},
}


@pytest.fixture(scope="module")
def profile(tmp_path_factory) -> Path:
    from fare_models.profile import save_profile

    path = tmp_path_factory.mktemp("phi") / "phi.safetensors"
    save_profile(path, torch.rand(4, 8), list(range(4)), "fare-tiny:olmoe", "olmoe")
    return path


def grid(**changes) -> dict:
    g = yaml.safe_load(yaml.safe_dump(BASE))
    g.update(changes)
    return g


def test_expansion_dense_first_and_p_only_for_calibrated(profile):
    g = grid(models=["fare-tiny", {"name": "fare-tiny:qwen3_moe", "resources": {"num_gpus": 1}}],
             methods={**BASE["methods"], "arr": {"profile": str(profile), "lam": [0.5, 1.0]},
                      "mask": {"mask": ["0:1|0:2"]}})
    cells = expand(g).cells
    assert not METHODS["magnitude"].calibrated and METHODS["wanda"].calibrated
    per_model = 1 + 2 + 1 * 2 + 2 + 1  # dense, magnitude x2 ratios, wanda x2 p, arr x2 lambda, mask
    assert len(cells) == 2 * per_model
    for i, model in enumerate(["fare-tiny:olmoe", "fare-tiny:qwen3_moe"]):
        mine = cells[i * per_model:(i + 1) * per_model]
        assert {c.model_id for c in mine} == {model}
        assert mine[0].method == DENSE and mine[0].params == {}
        assert sorted((c.params["ratio"], c.p) for c in mine if c.method == "wanda") == [(0.5, 0.0), (0.5, 0.5)]
        assert sorted(c.params["ratio"] for c in mine if c.method == "magnitude") == [0.25, 0.5]
        assert all(c.p is None for c in mine if c.method != "wanda")
        assert sorted(c.params["lam"] for c in mine if c.method == "arr") == [0.5, 1.0]
    assert cells[per_model].resources == {"num_gpus": 1} and cells[0].resources == {}
    assert len({c.key() for c in cells}) == len({c.cell_id() for c in cells}) == len(cells)


def test_keys_checkpoint_shared_across_task_sets_and_profile_by_content(profile, tmp_path):
    a = expand(grid()).cells
    b = expand(grid(tasks=["fare_crows_pairs"])).cells
    for x, y in zip(a, b):
        assert x.checkpoint_key() == y.checkpoint_key()  # same checkpoint, other tasks
        assert x.key() != y.key()  # other results
    wanda = [c for c in a if c.method == "wanda"]
    assert wanda[0].checkpoint_key() != wanda[1].checkpoint_key()  # p enters the calibrated key
    assert expand(grid(calibration={"n": 8, "seq_len": 32, "seed": 0})).cells[-1].checkpoint_key() \
        != a[-1].checkpoint_key()
    assert a[0].checkpoint_key() is None  # dense: nothing to compress
    copy = tmp_path / "renamed.safetensors"
    shutil.copy(profile, copy)
    k1 = expand(grid(methods={"arr": {"profile": str(profile)}})).cells[1].key()
    k2 = expand(grid(methods={"arr": {"profile": str(copy)}})).cells[1].key()
    assert k1 == k2


def test_yaml_relative_profile_path(profile, tmp_path):
    shutil.copy(profile, tmp_path / "phi.safetensors")
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(grid(methods={"arr": {"profile": "phi.safetensors"}})))
    cells = load_grid(tmp_path / "g.yaml").cells
    assert cells[1].params["profile"] == str((tmp_path / "phi.safetensors").resolve())


@pytest.mark.parametrize("changes, key, words", [
    ({"methods": {"magnitdue": {"ratio": [0.5]}}}, "methods.magnitdue", "did you mean 'magnitude'"),
    ({"methods": {"magnitude": {"ratoi": [0.5]}}}, "methods.magnitude.ratoi", "did you mean 'ratio'"),
    ({"methods": {"wanda": {"calib_p": [0.5]}}}, "methods.wanda.calib_p", "calibration"),
    ({"safety_p": [0.0, 1.5]}, "safety_p", "1.5 is not a proportion in [0, 1]"),
    ({"safety_p": ["half"]}, "safety_p", "'half'"),
    ({"tasks": ["fare_crows_pair"]}, "tasks", "unknown task 'fare_crows_pair'"),
    ({"tasks": []}, "tasks", "no tasks"),
    ({"models": []}, "models", "no models"),
    ({"methods": {"magnitude": {"ratio": [0.5, 0.5]}}}, "methods.magnitude.ratio", "duplicate value 0.5"),
    ({"safety_p": [0.5, 0.5]}, "safety_p", "duplicate value 0.5"),
    ({"models": ["fare-tiny", "fare-tiny:olmoe"]}, "models[1]", "duplicate model"),
    ({"methods": {"dense": {}}}, "methods.dense", "always a cell"),
    ({"method": {}}, "method", "did you mean 'methods'"),
    ({"methods": {"arr": {"lam": [1.0]}}}, "methods.arr.profile", "missing"),
    ({"methods": {"arr": {"profile": "nope.safetensors"}}}, "methods.arr.profile", "not a file"),
    ({"methods": {"mask": {"mask": ["x:y"]}}}, "methods.mask.mask", "'x:y'"),
    ({"calibration": {"n": 0}}, "calibration.n", "integer >= 1"),
    ({"calibration": {"general": "nope.txt"}}, "calibration.general", "'nope.txt'"),
    ({"resources": {"num_gpu": 1}}, "resources.num_gpu", "did you mean 'num_gpus'"),
    ({"dtype": "fp8"}, "dtype", "'fp8'"),
    ({"methods": {"magnitude": {"ratio": [0.5, 1.5]}}}, "methods.magnitude.ratio", "1.5"),
    ({"methods": {"magnitude": {"structure": ["3:4x"]}}}, "methods.magnitude.structure", "3:4x"),
    ({"leaderboard": {"n_permutations": 0}}, "leaderboard.n_permutations", "positive integer"),
])
def test_bad_grid_is_one_line_naming_the_key(changes, key, words):
    with pytest.raises(FareError) as e:
        expand(grid(**changes))
    msg = str(e.value)
    assert f"grid key {key!r}" in msg and words in msg and "\n" not in msg


def test_cli_rejects_bad_grid_before_any_compute(tmp_path):
    """Subprocess: exit 2, one line naming the key, no traceback, no output folder created."""
    g = tmp_path / "g.yaml"
    g.write_text(yaml.safe_dump(grid(methods={"magnitude": {"ratio": [0.5]}, "wanda": {"ratio": [0.5]}},
                                     safety_p=[-0.1])))
    out = tmp_path / "sweep"
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "noray")}
    (tmp_path / "noray" / "ray").mkdir(parents=True)  # a `ray` that cannot be imported
    (tmp_path / "noray" / "ray" / "__init__.py").write_text("raise ImportError('No module named ray')\n")
    code = ("import sys; from fare_models.cli import main; "
            "print('RC', main(sys.argv[1:]), flush=True); print('RC', main(sys.argv[1:3] + ['--out', sys.argv[4], "
            "'--executor', 'ray']))")
    r = subprocess.run([sys.executable, "-c", code, "sweep", str(g), "--out", str(out)], capture_output=True,
                       text=True, env=env, timeout=120, check=False)
    assert r.stdout.split() == ["RC", "2", "RC", "2"], r.stdout + r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("fare sweep")]
    assert "Traceback" not in r.stderr
    assert "grid key 'safety_p'" in lines[0] and "-0.1" in lines[0]
    assert "needs Ray" in lines[1] and "fare-moe[sweep]" in lines[1]
    assert not out.exists()


def test_out_folder_and_status_errors(tmp_path):
    """Nothing is overwritten: a file or a non-sweep folder as --out is refused before anything is written."""
    from fare_sweep.run import run_sweep
    from fare_sweep.status import cell_states

    g = tmp_path / "g.yaml"
    g.write_text(yaml.safe_dump(grid()))
    (tmp_path / "file").write_text("x")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    with pytest.raises(FareError, match="is a file"):
        run_sweep(g, tmp_path / "file")
    with pytest.raises(FareError, match="not empty and holds no sweep"):
        run_sweep(g, tmp_path / "other")
    with pytest.raises(FareError, match="--executor 'slurm': allowed: local, ray"):
        run_sweep(g, tmp_path / "new", executor="slurm")
    with pytest.raises(FareError, match="no sweep here"):
        cell_states(tmp_path / "other")
    assert (tmp_path / "file").read_text() == "x" and sorted(p.name for p in (tmp_path / "other").iterdir()) == ["keep.txt"]
    assert not (tmp_path / "new").exists()
    from fare_sweep.run import SweepLock

    (tmp_path / "busy").mkdir()
    with SweepLock(tmp_path / "busy"), pytest.raises(FareError, match="another `fare sweep` is running"):
        run_sweep(g, tmp_path / "busy")  # one driver per folder


@pytest.mark.parametrize("argv,words", [
    (["--ray-num-cpus", "0", "--executor", "ray"], ["--ray-num-cpus 0", ">= 1"]),
    (["--ray-num-cpus", "2"], ["--ray-num-cpus 2", "needs --executor ray"]),
    (["--ray-address", "auto"], ["--ray-address 'auto'", "needs --executor ray"]),
    (["--executor", "ray", "--ray-address", "auto", "--ray-num-cpus", "2"], ["--ray-num-cpus 2", "local cluster"]),
    (["--max-retries", "-1"], ["--max-retries -1", ">= 0"]),
])
def test_cli_ray_flags_checked_before_anything(tmp_path, argv, words):
    """Ray flags that cannot apply are one FareError naming the flag and value; nothing is created."""
    from fare_sweep.cli import main

    with pytest.raises(FareError) as e:
        main([str(tmp_path / "g.yaml"), "--out", str(tmp_path / "sweep"), *argv])
    assert all(w in str(e.value) for w in words), e.value
    assert list(tmp_path.iterdir()) == []
