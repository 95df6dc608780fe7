"""Pipeline commands as a user meets them (issue 11): help texts, --out checks before any compute,
FSP options on `fare run`. Nothing here loads a model."""

import re
import time

import pytest

from fare_models.cli import main

COMMANDS = ["prompts", "profile", "layers", "tune", "ablate", "transfer", "run", "robustness"]
FORBIDDEN = ["SPEC", "Sizes.", "`"]  # documents a user does not have, reStructuredText markup


def _help(cmd: str, capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def _options(text: str) -> dict[str, str]:
    """{--flag: help text} parsed from argparse's --help output (help on the same or the following lines)."""
    body = text.split("\noptions:\n", 1)[1]
    out, flag = {}, None
    for line in body.splitlines():
        m = re.match(r"^  (-\S+(?:[ ,][^ ].*?)?)(?:  +(\S.*))?$", line)
        if m and line.startswith("  -"):
            flag = re.findall(r"--[a-z0-9-]+|-h", m.group(1))[-1]
            out[flag] = m.group(2) or ""
        elif flag and line.startswith(" " * 6) and line.strip():
            sep = "" if out[flag].endswith("-") else " "  # argparse wraps after hyphens
            out[flag] = (out[flag] + sep + line.strip()).strip()
    return out


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_option_has_help_and_no_internal_references(cmd, capsys):
    text = _help(cmd, capsys)
    opts = _options(text)
    assert len(opts) >= 5 and "--out" in opts
    assert [f for f, h in opts.items() if not h] == []  # every flag explains itself
    assert [s for s in FORBIDDEN if s in text] == []
    if cmd not in ("prompts",):
        assert "--no-progress" in opts and "--progress" in opts


def test_stage_commands_list_only_the_size_flags_they_use(capsys):
    sizes = ["--contexts-per-descriptor", "--crows-val", "--ppl-val", "--crows-test", "--ppl-test", "--tqa", "--bold",
             "--stereo-completion", "--stereoset", "--max-new-tokens", "--permutations", "--bootstrap", "--mask-n",
             "--baseline-n"]
    used = {
        "layers": {"--contexts-per-descriptor", "--crows-val", "--ppl-val"},
        "tune": {"--contexts-per-descriptor", "--crows-val", "--ppl-val"},
        "ablate": {"--contexts-per-descriptor", "--crows-test", "--ppl-test", "--tqa", "--permutations", "--bootstrap",
                   "--mask-n", "--baseline-n"},
        "transfer": {"--bold", "--stereo-completion", "--stereoset", "--max-new-tokens", "--permutations", "--bootstrap"},
        "robustness": {"--contexts-per-descriptor", "--crows-val", "--ppl-val", "--crows-test", "--ppl-test", "--tqa",
                       "--permutations", "--bootstrap"},
        "run": set(sizes),
    }
    for cmd, want in used.items():
        opts = _options(_help(cmd, capsys))
        assert {f for f in sizes if f in opts} == want, cmd
        quick = opts["--quick"]
        assert all(f in quick for f in want) and not any(f in quick for f in set(sizes) - want), cmd
    assert "--random-seeds" not in _options(_help("layers", capsys))
    assert "--random-seeds" not in _options(_help("robustness", capsys))


def test_run_refuses_an_unrelated_folder_before_loading_anything(tmp_path, capsys):
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "chapter1.tex").write_text("keep me")
    t = time.perf_counter()
    assert main(["run", "--model", "fare-tiny", "--quick", "--out", str(mine)]) == 2
    err = capsys.readouterr().err
    assert time.perf_counter() - t < 5 and "loading model" not in err
    assert f"fare run: --out '{mine}' is a non-empty folder that no `fare run` wrote" in err and err.count("\n") == 1
    assert [p.name for p in mine.iterdir()] == ["chapter1.tex"]
    (tmp_path / "file").write_text("x")
    assert main(["run", "--model", "fare-tiny", "--quick", "--out", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err
    # single-stage commands check their --out before the model and the profile are loaded
    assert main(["layers", "--model", "fare-tiny", "--profile", str(tmp_path / "missing.safetensors"),
                 "--out", str(mine)]) == 2
    err = capsys.readouterr().err
    assert "is not a fare stage folder" in err and "loading model" not in err


def test_run_fsp_options(tmp_path, capsys):
    from fare_pipeline.fsp import FSPOptions
    from fare_pipeline.run import fsp_options, run_parser

    args = run_parser().parse_args(["--model", "m", "--out", "o", "--weights", "ard=1,pmi=0.5", "--pmi-form", "printed",
                                    "--top-share-of", "frequency", "--top-share-k", "5"])
    opts = fsp_options(args)
    assert opts == FSPOptions(weights={"ard": 1.0, "pmi": 0.5}, pmi_form="printed", top_share_of="frequency", top_share_k=5)
    assert opts.to_dict()["weights"] == {"ard": 1.0, "jsd": 0.0, "pmi": 0.5, "ent": 0.0}  # unnamed metrics: weight 0
    assert fsp_options(run_parser().parse_args(["--model", "m", "--out", "o"])) == FSPOptions()
    # a bad weight name fails in one line before the model loads
    assert main(["run", "--model", "fare-tiny", "--out", str(tmp_path / "r"), "--weights", "ard=1,bias=2"]) == 2
    err = capsys.readouterr().err
    assert "unknown FSP weight 'bias'; allowed: ard, jsd, pmi, ent" in err and "loading model" not in err
    assert not (tmp_path / "r").exists()


def test_unloadable_model_is_one_line(tmp_path, capsys):
    for model, msg in (("nobody/no-such-model-xyz", "--model 'nobody/no-such-model-xyz' could not be loaded: "),
                       (str(tmp_path / "olmo3"), "no such directory, and not a valid hub id")):
        assert main(["run", "--model", model, "--quick", "--out", str(tmp_path / "r")]) == 2
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err and err.splitlines()[-1].startswith("fare run: ")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("cmd, flag, value, allowed", [
    ("run", "--quantile", "1.5", "a number in [0, 1]"),
    ("layers", "--quantile", "-0.1", "a number in [0, 1]"),
    ("robustness", "--quantile", "nan", "a number in [0, 1]"),
    ("run", "--beta", "-1", "a finite number >= 0"),
    ("tune", "--beta", "inf", "a finite number >= 0"),
    ("robustness", "--beta", "x", "a finite number >= 0"),
    ("run", "--lambda-max", "-2", "a finite number >= 0"),
    ("run", "--grid", "0,-1", "distinct comma-separated numbers >= 0"),
    ("tune", "--grid", "0.5,0.5", "distinct comma-separated numbers >= 0"),
    ("run", "--random-seeds", "0", "an integer >= 1"),
    ("ablate", "--random-seeds", "-3", "an integer >= 1"),
    ("run", "--mask-n", "0", "an integer >= 1"),
    ("ablate", "--baseline-n", "0", "an integer >= 1"),
    ("robustness", "--permutations", "0", "an integer >= 1"),
    ("transfer", "--bootstrap", "-1", "an integer >= 1"),
    ("transfer", "--max-new-tokens", "0", "an integer >= 1"),
])
def test_values_the_stages_would_refuse_fail_before_anything_loads(cmd, flag, value, allowed, tmp_path, capsys):
    # aals.aals_select / aals.select_lambda refuse these only after profiling and the AALS probes;
    # the flags refuse them at parse time, naming the value and what is allowed
    out = tmp_path / "out"
    profile = [] if cmd in ("run", "robustness") else ["--profile", str(tmp_path / "phi.safetensors")]
    argv = [cmd, "--model", "fare-tiny", "--out", str(out), *profile, flag, value]
    t0 = time.perf_counter()
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and time.perf_counter() - t0 < 5
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"argument {flag}: {value!r}: allowed: {allowed}" in err
    assert not out.exists()
