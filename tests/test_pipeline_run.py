"""`fare run` on fare-tiny end to end (every report table, byte-identical reruns, resume) and the
bad inputs of issue 4: profile of another model, empty prompt set, no feasible lambda, unknown axis."""

import csv
import json
from pathlib import Path

import pytest

from fare_models.cli import main

SMALL = ["--quick", "--contexts-per-descriptor", "3", "--crows-val", "24", "--crows-test", "24", "--ppl-val", "12",
         "--ppl-test", "12", "--tqa", "3", "--bold", "3", "--stereo-completion", "3", "--stereoset", "3",
         "--max-new-tokens", "3", "--random-seeds", "2", "--permutations", "200", "--bootstrap", "100"]
REPORT = ["table5_1_routing_sensitivity", "table2_group_masking", "table3_architecture", "table4_synthetic_ablation",
          "table5_cross_architecture", "table6_main", "table7_generation_transfer", "table8_expert_identification",
          "table8_tests", "aals", "lambda_grid", "fsp_layers", "fsp_experts"]
STAGES = ["prompts", "profile", "layers", "tune", "evaluate", "ablate", "transfer"]


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _numbers(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in ("timings.json", "work.json")}


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    for name in ("a", "b"):
        assert main(["run", "--model", "fare-tiny", "--out", str(root / name), *SMALL]) == 0
    return root


@pytest.mark.slow
def test_run_writes_every_table_and_reruns_byte_identical(two_runs, capsys):
    a, b = two_runs / "a", two_runs / "b"
    rep = a / "report"
    for stem in REPORT:
        assert (rep / f"{stem}.csv").is_file() and (rep / f"{stem}.md").is_file(), stem
    for png in ("phi_heatmap.png", "jsd_by_axis.png", "aals.png"):
        assert (rep / png).stat().st_size > 1000
    man = json.loads((rep / "manifest.json").read_text())
    assert man["model"] == "fare-tiny:olmoe" and man["seed"] == 0 and man["revision"] is None
    assert man["versions"]["torch"] and man["splits"]["validation_fraction"] == 0.5
    assert set(man["stage_keys"]) == set(STAGES)
    # the CrowS split is recorded and disjoint; sizes as asked
    val = json.loads((a / "layers" / "validation_split.json").read_text())["crows_pair_ids"]
    test = json.loads((a / "evaluate" / "test_split.json").read_text())["crows_pair_ids"]
    assert len(val) == 24 and len(test) == 24 and not set(val) & set(test)
    # Table 6 agrees with the per-item values it was computed from
    row = _rows(rep / "table6_main.csv")[0]
    items = _rows(a / "evaluate" / "per_item_crows.csv")
    assert float(row["crows_base"]) == pytest.approx(sum(float(r["base"]) for r in items) / len(items))
    assert json.loads(row["layers"].replace("|", ",").join("[]")) == man["selected_layers"]
    grid = _rows(rep / "lambda_grid.csv")
    assert [float(r["lambda"]) for r in grid] == [0.0, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0]
    assert sum(r["selected"] == "True" for r in grid) == (1 if man["feasible"] else 0)
    # same seeds -> identical bytes for every number file (timings are kept apart)
    na, nb = _numbers(a), _numbers(b)
    assert na.keys() == nb.keys() and len(na) > 60
    assert [k for k in na if na[k] != nb[k]] == []
    # work.json (this invocation's decoder-layer work, counted by hooks) is deterministic too
    work = json.loads((a / "work.json").read_text())
    assert (b / "work.json").read_bytes() == (a / "work.json").read_bytes()
    stages = work["stages"]
    assert stages["profile"]["token_layer_evals"] > 0 and stages["prompts"]["token_layer_evals"] == 0
    assert stages["total"]["token_layer_evals"] == sum(v["token_layer_evals"] for k, v in stages.items() if k != "total")
    # the AALS stage's own engine count (layers/work.json) is the hook count of that stage
    assert json.loads((a / "layers" / "work.json").read_text())["token_layer_evals"] == stages["layers"]["token_layer_evals"]
    # resume: a rerun skips every finished stage and changes nothing
    capsys.readouterr()
    assert main(["run", "--model", "fare-tiny", "--out", str(a), *SMALL]) == 0
    err = capsys.readouterr().err
    assert all(f"[{s}] up to date" in err for s in STAGES)
    assert _numbers(a) == na
    # a changed setting invalidates that stage and the ones after it, not the ones before
    assert main(["run", "--model", "fare-tiny", "--out", str(a), *SMALL, "--beta", "0.5"]) == 0
    err = capsys.readouterr().err
    assert "[layers] up to date" in err and "[tune] up to date" not in err and "[ablate] up to date" not in err


@pytest.fixture(scope="module")
def tiny_profile(tmp_path_factory):
    from fare_pipeline.prompts import build_prompt_set

    root = tmp_path_factory.mktemp("prof")
    build_prompt_set(contexts_per_descriptor=2).write(root / "prompts")
    assert main(["profile", "--model", "fare-tiny", "--prompts", str(root / "prompts"), "--out", str(root / "p"),
                 "--no-plots"]) == 0
    return root / "p" / "phi.safetensors"


def test_profile_of_another_model_is_rejected(tiny_profile, tmp_path, capsys):
    from fare_models.profile import load_profile, save_profile

    prof = load_profile(tiny_profile)
    other_type = save_profile(tmp_path / "qwen.safetensors", prof.phi, prof.layers, "fare-tiny:qwen3_moe", "qwen3_moe")
    other_id = save_profile(tmp_path / "other.safetensors", prof.phi, prof.layers, "someone/olmoe-7b", "olmoe")
    for path, msg in ((other_type, "profile is for model_type 'qwen3_moe'"),
                      (other_id, "profile was computed for model 'someone/olmoe-7b', not 'fare-tiny:olmoe'")):
        capsys.readouterr()
        assert main(["layers", "--model", "fare-tiny", "--profile", str(path), "--out", str(tmp_path / "l"), *SMALL]) == 2
        assert msg in capsys.readouterr().err
    assert not (tmp_path / "l").exists()
    # the profile of this model works, and a rerun with the same inputs resumes
    for _ in range(2):
        assert main(["layers", "--model", "fare-tiny", "--profile", str(tiny_profile), "--out", str(tmp_path / "l"), *SMALL]) == 0
    assert "[l] up to date" in capsys.readouterr().err
    aals = json.loads((tmp_path / "l" / "aals.json").read_text())
    assert aals["layers"] == [0, 1, 2, 3] and aals["selected"] and (tmp_path / "l" / "aals.png").is_file()


def test_empty_prompt_set_and_unknown_axis(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "prompts.jsonl").write_text("")
    assert main(["run", "--model", "fare-tiny", "--out", str(tmp_path / "r"), "--prompts", str(tmp_path / "empty"), *SMALL]) == 2
    assert "empty prompt set" in capsys.readouterr().err
    assert main(["run", "--model", "fare-tiny", "--out", str(tmp_path / "r"), "--axes", "gender,caste", *SMALL]) == 2
    assert "unknown axis 'caste'; allowed: gender, race" in capsys.readouterr().err
    assert not (tmp_path / "r" / "profile").exists()


def test_no_feasible_lambda_is_reported_not_raised(tiny_profile, tmp_path, capsys):
    out = tmp_path / "t"
    args = ["tune", "--model", "fare-tiny", "--profile", str(tiny_profile), "--select", "1", "--grid", "50,100",
            "--beta", "0", "--out", str(out), *SMALL]
    assert main(args) == 0
    assert "no feasible lambda" in capsys.readouterr().err
    op = json.loads((out / "lambda_star.json").read_text())
    assert op["lambda_star"] is None and not op["feasible"] and "no grid point meets PPL" in op["reason"]
    rows = _rows(out / "lambda_grid.csv")
    assert [r["lambda"] for r in rows] == ["50.0", "100.0"]
    assert all(float(r["ppl"]) > op["budget"] and r["feasible"] == "False" for r in rows)
    # downstream stages run without lambda*: Table 6 reports the baseline only, no crash
    assert main(["transfer", "--model", "fare-tiny", "--profile", str(tiny_profile), "--select", "1", "--tune", str(out),
                 "--protocols", "stereo_completion", "--out", str(tmp_path / "x"), *SMALL]) == 0
    assert (tmp_path / "x" / "table7_generation_transfer.csv").is_file()
    from fare_models.profile import load_profile
    from fare_pipeline.profiling import load_model
    from fare_pipeline.prompts import build_prompt_set
    from fare_pipeline.stages import Ctx, Sizes, run_evaluate

    model, tok, mid = load_model("fare-tiny")
    ctx = Ctx(model, tok, mid, "olmoe", sizes=Sizes(crows_test=8, ppl_test=4, tqa=2))
    prof = load_profile(tiny_profile)
    (tmp_path / "e").mkdir()
    res = run_evaluate(ctx, prof.phi, prof.layers, [1], None, build_prompt_set(contexts_per_descriptor=2), tmp_path / "e")
    assert res["fare"] is None
    row = _rows(tmp_path / "e" / "table6_main.csv")[0]
    assert row["lambda_star"] == "" and row["crows_fare"] == "" and row["crows_p"] == "" and row["crows_base"] != ""


def test_bad_cli_values(tiny_profile, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["tune", "--model", "fare-tiny", "--profile", str(tiny_profile), "--select", "1", "--grid", "x,1",
              "--out", str(tmp_path / "t")])
    assert "'x,1': expected comma-separated numbers" in capsys.readouterr().err
    assert main(["transfer", "--model", "fare-tiny", "--profile", str(tiny_profile), "--select", "1", "--lam", "1",
                 "--protocols", "bold,poems", "--out", str(tmp_path / "x")]) == 2
    assert "allowed: a comma-separated subset of bold, stereo_completion, stereoset" in capsys.readouterr().err
    assert main(["tune", "--model", "fare-tiny", "--profile", str(tiny_profile), "--select", "7", "--out",
                 str(tmp_path / "t"), *SMALL]) == 2
    assert "layer 7 is not an MoE layer" in capsys.readouterr().err
