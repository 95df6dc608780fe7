"""fare_analysis.runs: run identity from the run's own records, settings, streamed samples, bad folders."""

import json
import subprocess
import sys

import pytest
from helpers_runs import crows_item, write_run, xstest_item

from fare_analysis.runs import iter_samples, load_run
from fare_core.errors import FareError


def _crows(n=4):
    return [crows_item(i, i % 2 == 0) for i in range(n)]


def test_lm_eval_run_identity_settings_and_samples(tmp_path):
    write_run(tmp_path / "r", {"fare_crows_pairs": _crows(), "fare_xstest": [xstest_item(0, True)]}, limit=4.0,
              model_args="pretrained=fare-tiny,intervention=arr,lam=0.5",
              fare_moe={"intervention": "arr", "lam": 0.5, "layers": [1]})
    run = load_run(tmp_path / "r")
    assert run.kind == "lm-eval" and sorted(run.tasks) == ["fare_crows_pairs", "fare_xstest"]
    ident = run.identity
    assert (ident["model"], ident["method"], ident["p"], ident["intervention"], ident["lam"]) == (
        "fare-tiny:olmoe", "none", None, "arr", 0.5)
    assert ident["label"] == "fare-tiny:olmoe arr lam=0.5"
    cfg = run.eval_config
    assert cfg["batch_size"] == "8" and cfg["limit"] == 4.0 and cfg["dtype"] == "torch.float32"
    assert cfg["judge"] == {"fare_xstest": "string_match"}  # read from the logged filtered response
    items = list(iter_samples(run, "fare_crows_pairs"))
    assert [it["values"]["stereotype_preference"] for it in items] == [1.0, 0.0, 1.0, 0.0]
    assert all(it["key"].endswith("#0") for it in items) and items[0]["doc"]["pair_id"] == 0


def test_identity_of_a_compressed_checkpoint_comes_from_its_manifest_not_the_folder_name(tmp_path):
    ckpt = tmp_path / "magnitude_p0.75"  # a misleading folder name: the manifest decides
    ckpt.mkdir()
    (ckpt / "fare_compression.json").write_text(json.dumps({
        "format": "fare-compression/1", "base_model": "fare-tiny", "method": "hc_smoe",
        "params": {"n_clusters": 4, "calib_p": 0.25}, "calibration": {"p": 0.25, "n": 4}}))
    write_run(tmp_path / "r", {"fare_crows_pairs": _crows()}, model_args={"pretrained": str(ckpt)},
              fare_moe={"model_id": str(ckpt)})
    ident = load_run(tmp_path / "r").identity
    assert (ident["model"], ident["method"], ident["p"]) == ("fare-tiny:olmoe", "hc_smoe", 0.25)
    assert ident["method_params"]["n_clusters"] == 4 and ident["method_source"].endswith("fare_compression.json")


def test_relative_checkpoint_path_is_found_from_any_working_directory(tmp_path, monkeypatch):
    """A sweep records `study/checkpoints/ck` relative to where it ran; the manifest is still found
    (from the run folder's parents) when the run is read from another directory."""
    ckpt = tmp_path / "study" / "checkpoints" / "ck"
    ckpt.mkdir(parents=True)
    (ckpt / "fare_compression.json").write_text(json.dumps({
        "format": "fare-compression/1", "base_model": "fare-tiny", "method": "magnitude",
        "params": {"ratio": 0.5}}))
    run = tmp_path / "study" / "cells" / "c1"
    write_run(run, {"fare_crows_pairs": _crows()}, model_args={"pretrained": "study/checkpoints/ck"},
              fare_moe={"model_id": "study/checkpoints/ck"})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    ident = load_run(run).identity
    assert (ident["model"], ident["method"], ident["method_params"]) == ("fare-tiny:olmoe", "magnitude", {"ratio": 0.5})


def test_identity_of_on_the_fly_compression_from_model_args_string(tmp_path):
    write_run(tmp_path / "r", {"fare_crows_pairs": _crows()},
              model_args="pretrained=fare-tiny,compression=magnitude,compression_sparsity=0.5,compression_calib_p=0.1",
              fare_moe={"compression": "magnitude"})
    ident = load_run(tmp_path / "r").identity
    assert ident["method"] == "magnitude" and ident["method_params"]["sparsity"] == 0.5 and ident["p"] == 0.1


def test_fare_run_folder_identity_from_its_manifest(tmp_path):
    (tmp_path / "x" / "report").mkdir(parents=True)
    (tmp_path / "x" / "report" / "manifest.json").write_text(json.dumps(
        {"command": "run", "model": "fare-tiny", "revision": None, "lambda_star": 0.5, "selected_layers": [1],
         "seed": 0, "sizes": {}}))
    run = load_run(tmp_path / "x")
    assert run.kind == "fare-run" and run.tasks == {}
    assert (run.identity["model"], run.identity["intervention"], run.identity["lam"]) == ("fare-tiny:olmoe", "arr", 0.5)


@pytest.mark.parametrize("case, expected", [
    ("missing", "no such folder"),
    ("empty", "empty folder; run lm_eval --log_samples"),
    ("no_samples", "re-run lm_eval with --log_samples"),
    ("bad_json", "cannot read results_"),
    ("other", "no lm-eval results_*.json"),
])
def test_bad_folders_give_one_line_errors_naming_folder_and_fix(tmp_path, case, expected):
    folder = tmp_path / case
    if case == "empty":
        folder.mkdir()
    elif case == "no_samples":
        write_run(folder, {"fare_crows_pairs": _crows()}, samples=False)
    elif case == "bad_json":
        write_run(folder, {"fare_crows_pairs": _crows()})
        next(folder.rglob("results_*.json")).write_text("{not json")
    elif case == "other":
        folder.mkdir()
        (folder / "notes.txt").write_text("x")
    with pytest.raises(FareError) as err:
        load_run(folder)
    msg = str(err.value)
    assert expected in msg and str(folder) in msg and "\n" not in msg


def test_fare_compare_cli_bad_input_is_one_line_without_traceback(tmp_path):
    (tmp_path / "empty").mkdir()
    write_run(tmp_path / "nosamples", {"fare_crows_pairs": _crows()}, samples=False)
    for args in (["compare", str(tmp_path / "empty"), str(tmp_path / "empty")],
                 ["compare", str(tmp_path / "nosamples"), str(tmp_path / "nosamples")]):
        proc = subprocess.run([sys.executable, "-m", "fare_models.cli", *args], capture_output=True, text=True, check=False)
        assert proc.returncode != 0, proc.stderr
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert str(tmp_path) in lines[0]


def test_one_folder_several_results_files_merges_tasks_and_keeps_per_task_settings(tmp_path):
    write_run(tmp_path / "r", {"fare_crows_pairs": _crows()}, limit=12.0, stamp="2026-01-01T00-00-00.1")
    write_run(tmp_path / "r", {"fare_xstest": [xstest_item(0, True)]}, limit=6.0, stamp="2026-01-01T00-00-01.1")
    run = load_run(tmp_path / "r")
    assert sorted(run.tasks) == ["fare_crows_pairs", "fare_xstest"]
    assert run.eval_config["limit"] == {"fare_crows_pairs": 12.0, "fare_xstest": 6.0}
    assert run.eval_config["batch_size"] == "8"


def test_one_folder_with_runs_of_two_configurations_is_refused(tmp_path):
    # lm-eval puts both under out/fare-tiny/: the identities differ, so this is not one run
    write_run(tmp_path / "r", {"fare_crows_pairs": _crows()}, stamp="2026-01-01T00-00-00.1")
    write_run(tmp_path / "r", {"fare_xstest": [xstest_item(0, True)]}, stamp="2026-01-01T00-00-01.1",
              model_args="pretrained=fare-tiny,compression=magnitude", fare_moe={"compression": "magnitude"})
    with pytest.raises(FareError, match="different models or configurations.*own --output_path"):
        load_run(tmp_path / "r")
