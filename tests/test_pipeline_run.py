"""`fare run` on fare-tiny end to end (every report table, byte-identical reruns, resume) and the
bad inputs of issue 4: profile of another model, empty prompt set, no feasible lambda, unknown axis."""

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fare_models.cli import main

SMALL_VAL = ["--quick", "--contexts-per-descriptor", "3", "--crows-val", "24", "--ppl-val", "12"]  # fare layers / tune
SMALL_GEN = ["--quick", "--bold", "3", "--stereo-completion", "3", "--stereoset", "3", "--max-new-tokens", "3",
             "--permutations", "200", "--bootstrap", "100"]  # fare transfer
SMALL = SMALL_VAL + SMALL_GEN[1:] + ["--crows-test", "24", "--ppl-test", "12", "--tqa", "3", "--random-seeds", "2"]
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
    # one stated lambda (issue 12): report.md opens with the operating point; Tables 3, 6, 7, 8 use lambda* and say so
    from fare_pipeline.fsp import FSPOptions
    from fare_pipeline.stages import lambda_label

    lam = man["lambda_star"]
    assert man["lambda_used"] == (lam if lam is not None else 1.0) and man["control_lambda"] == 1.0
    report = (rep / "report.md").read_text().splitlines()
    assert report[0] == "# FARE report: fare-tiny:olmoe"
    opening = {None: "**No feasible lambda\\*:**", 0.0: "**lambda\\* = 0: the operating point is no intervention.**"}
    assert report[2].startswith(opening.get(lam, f"Operating point: ARR at lambda\\* = {lam:g} on AALS layers"))
    title = lambda stem: (rep / f"{stem}.md").read_text().splitlines()[0]  # noqa: E731
    for stem in ("table3_architecture", "table6_main", "table7_generation_transfer", "table8_expert_identification"):
        assert f"ARR at {lambda_label(man['lambda_used'], lam)}" in title(stem), stem
    for stem in ("table4_synthetic_ablation", "table5_cross_architecture"):
        assert f"control {lambda_label(1.0, lam)}" in title(stem), stem
    assert json.loads((a / "transfer" / "transfer.json").read_text())["lambda"] == man["lambda_used"]
    assert json.loads((a / "ablate" / "selections.json").read_text())["lambda_baselines"] == man["lambda_used"]
    aals = json.loads((a / "layers" / "aals.json").read_text())
    assert man["aals_fallback"] == aals["fallback"] and ("**AALS fallback:**" in report[4]) == aals["fallback"]
    # the FSP options are part of the profile stage key and of the manifest
    key = json.loads((a / "profile" / "stage.json").read_text())["key"]
    assert key["fsp"] == FSPOptions().to_dict() == man["fsp"]
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
    assert "[tune] started" in err and re.search(r"\[tune\] done in [0-9.]+ s", err)


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
        assert main(["layers", "--model", "fare-tiny", "--profile", str(path), "--out", str(tmp_path / "l"), *SMALL_VAL]) == 2
        assert msg in capsys.readouterr().err
    assert not (tmp_path / "l").exists()
    # the profile of this model works, and a rerun with the same inputs resumes
    for _ in range(2):
        assert main(["layers", "--model", "fare-tiny", "--profile", str(tiny_profile), "--out", str(tmp_path / "l"), *SMALL_VAL]) == 0
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
            "--beta", "0", "--out", str(out), *SMALL_VAL]
    assert main(args) == 0
    assert "no feasible lambda" in capsys.readouterr().err
    op = json.loads((out / "lambda_star.json").read_text())
    assert op["lambda_star"] is None and not op["feasible"] and "no grid point meets PPL" in op["reason"]
    rows = _rows(out / "lambda_grid.csv")
    assert [r["lambda"] for r in rows] == ["50.0", "100.0"]
    assert all(float(r["ppl"]) > op["budget"] and r["feasible"] == "False" for r in rows)
    # downstream stages run without lambda*: Table 6 reports the baseline only, no crash
    assert main(["transfer", "--model", "fare-tiny", "--profile", str(tiny_profile), "--select", "1", "--tune", str(out),
                 "--protocols", "stereo_completion", "--out", str(tmp_path / "x"), *SMALL_GEN]) == 0
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
    from fare_pipeline.transfer import PROTOCOLS

    assert f"allowed: a comma-separated subset of {', '.join(PROTOCOLS)}" in capsys.readouterr().err
    assert main(["tune", "--model", "fare-tiny", "--profile", str(tiny_profile), "--select", "7", "--out",
                 str(tmp_path / "t"), *SMALL_VAL]) == 2
    assert "layer 7 is not an MoE layer" in capsys.readouterr().err


@pytest.mark.slow
def test_lambda_star_zero_is_used_by_every_table(tiny_profile, tmp_path, capsys):
    """lambda* = 0 (no intervention): Tables 3, 6, 7 and 8 stay at lambda = 0 (equal to the base model) and say so;
    only the Table 4/5 controls use the control lambda, labelled as such."""
    from fare_models.profile import load_profile
    from fare_pipeline.profiling import load_model
    from fare_pipeline.prompts import build_prompt_set
    from fare_pipeline.stages import Ctx, Sizes, run_ablate, run_evaluate

    model, tok, mid = load_model("fare-tiny")
    ctx = Ctx(model, tok, mid, "olmoe", sizes=Sizes(crows_test=8, ppl_test=4, tqa=2, mask_n=1, baseline_n=1,
                                                    n_permutations=100, n_bootstrap=50), log=lambda m: None)
    prof = load_profile(tiny_profile)
    ps = build_prompt_set(contexts_per_descriptor=2)
    desc = json.loads((tiny_profile.parent / "fsp_descriptors.json").read_text())["descriptors"]
    for d in ("e", "a"):
        (tmp_path / d).mkdir()
    run_evaluate(ctx, prof.phi, prof.layers, [1], 0.0, ps, tmp_path / "e")
    run_ablate(ctx, prof.phi, prof.layers, [1], 0.0, ps, desc, tmp_path / "a", n_random=1)
    title = lambda path: path.read_text().splitlines()[0]  # noqa: E731
    t6 = _rows(tmp_path / "e" / "table6_main.csv")[0]
    assert "ARR at lambda*=0 = no intervention" in title(tmp_path / "e" / "table6_main.md")
    assert t6["crows_fare"] == t6["crows_base"] and t6["ppl_fare"] == t6["ppl_base"]
    t8 = {r["method"]: r for r in _rows(tmp_path / "a" / "table8_expert_identification.csv")}
    assert "ARR at lambda*=0 = no intervention" in title(tmp_path / "a" / "table8_expert_identification.md")
    for method in ("FARE FSP", "SAFEx SES", "Random experts (1x avg)"):
        assert (t8[method]["crows"], t8[method]["ppl"]) == (t8["Baseline"]["crows"], t8["Baseline"]["ppl"]), method
    assert float(_rows(tmp_path / "a" / "table3_architecture.csv")[0]["delta_crows_pp"]) == 0.0
    assert "ARR at lambda*=0 = no intervention" in title(tmp_path / "a" / "table3_architecture.md")
    assert "ARR at the control lambda=1 (not lambda*=0)" in title(tmp_path / "a" / "table4_synthetic_ablation.md")
    assert json.loads((tmp_path / "a" / "selections.json").read_text())["lambda_baselines"] == 0.0
    # Table 7 through the stage command: lambda 0 generates exactly the baseline's text
    assert main(["transfer", "--model", "fare-tiny", "--profile", str(tiny_profile), "--select", "1", "--lam", "0",
                 "--protocols", "stereo_completion", "--out", str(tmp_path / "x"), *SMALL_GEN]) == 0
    t7 = _rows(tmp_path / "x" / "table7_generation_transfer.csv")[0]
    assert t7["changed_generations"] == "0" and t7["mean_a"] == t7["mean_b"]
    assert "ARR at lambda*=0 = no intervention" in title(tmp_path / "x" / "table7_generation_transfer.md")
    assert json.loads((tmp_path / "x" / "transfer.json").read_text())["lambda"] == 0.0


@pytest.mark.slow
def test_progress_lines_when_output_is_a_pipe(tiny_profile, tmp_path):
    """Output to a pipe (CI, nohup, log files): stage start/finish lines with elapsed time and progress lines."""
    cmd = [sys.executable, "-m", "fare_models.cli", "layers", "--model", "fare-tiny", "--profile", str(tiny_profile),
           "--out", str(tmp_path / "l"), "--quick", "--contexts-per-descriptor", "1", "--crows-val", "6", "--ppl-val", "3",
           "--progress-interval", "0.2"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)  # both to pipes
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert lines[0] == "loading model fare-tiny ..."
    assert re.search(r"^loaded fare-tiny:olmoe in [0-9.]+ s$", r.stderr, re.MULTILINE)
    assert all(x.startswith("[load_model] running ") for x in lines[1:lines.index("[l] started") - 1])  # heartbeat
    assert "[l] started" in lines and re.search(r"^\[l\] done in [0-9.]+ s$", r.stderr, re.MULTILINE)
    beats = [x for x in lines if x.startswith("[l] running ")]
    assert beats and any(re.search(r"AALS probes \d+/\d+ batches", x) for x in beats)
    assert "Traceback" not in r.stderr and "\r" not in r.stderr  # no progress bars in a pipe
    assert "AALS selected layers" in r.stdout


def test_non_finite_profile_is_refused(tiny_profile, tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(tiny_profile), framework="pt") as f:
        meta, phi = f.metadata(), f.get_tensor("phi")
    for bad in (float("nan"), float("inf")):
        phi[1, 2] = bad
        save_file({"phi": phi}, str(tmp_path / "bad.safetensors"), metadata=meta)
        capsys.readouterr()
        assert main(["layers", "--model", "fare-tiny", "--profile", str(tmp_path / "bad.safetensors"),
                     "--out", str(tmp_path / "l"), *SMALL_VAL]) == 2
        err = capsys.readouterr().err
        assert "non-finite phi" in err and "Traceback" not in err
        assert not (tmp_path / "l").exists()


@pytest.mark.slow
def test_table2_masks_keep_two_experts_per_routing_group(tmp_path):
    """DeepSeek-V3 routes within groups (4 groups of 4 experts in fare-tiny): Table 2 lowers n until every mask
    leaves each group 2 experts, and its title says so."""
    from fare_models.profile import load_profile
    from fare_models.surgery import ExpertMask
    from fare_pipeline.profiling import load_model, profile_model
    from fare_pipeline.prompts import build_prompt_set
    from fare_pipeline.stages import Ctx, Sizes, run_ablate

    model, tok, mid = load_model("fare-tiny:deepseek_v3", progress=False)
    ps = build_prompt_set(contexts_per_descriptor=2)
    r = profile_model(model, tok, ps, tmp_path / "p", model_id=mid, plots=False)
    prof = load_profile(tmp_path / "p" / "phi.safetensors")
    ctx = Ctx(model, tok, mid, "deepseek_v3", sizes=Sizes(crows_test=4, ppl_test=2, tqa=1, mask_n=10, baseline_n=1,
                                                          n_permutations=50, n_bootstrap=20), log=lambda m: None)
    (tmp_path / "a").mkdir()
    with pytest.warns(UserWarning, match="correction bias"):
        run_ablate(ctx, prof.phi, prof.layers, [1, 2], 0.5, ps, r["result"].descriptors, tmp_path / "a", n_random=1)
    sel = json.loads((tmp_path / "a" / "selections.json").read_text())
    n = sel["n_mask"]
    assert 1 <= n < 10
    for pairs in (sel["masking"]["top"], sel["masking"]["bottom"], *sel["masking"]["random"]):
        ExpertMask(model, pairs)  # accepted: top_k left per layer, 2 per routing group
        groups = {}
        for layer, e in pairs:
            groups[(layer, e // 4)] = groups.get((layer, e // 4), 0) + 1
        assert max(groups.values()) <= 2 and len(pairs) == n  # n over the selected layers together
    title = (tmp_path / "a" / "table2_group_masking.md").read_text().splitlines()[0]
    assert "n lowered from 10 so that every routing group keeps 2 experts" in title and f"Top-{n} phi" in \
        (tmp_path / "a" / "table2_group_masking.md").read_text()
