"""What a new user meets first (issue 11): set-up commands, one-line errors, Ctrl-C, offline built-ins.

Subprocess tests run the real console scripts (``lm_eval``, ``fare``) and check exit code, the one
line on stderr and the absence of a traceback; everything else runs in-process.
"""

import logging
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest
import torch

from fare_core.errors import FareError, install_excepthook, report
from fare_core.files import atomic_write, current_umask

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra)
    env.pop("FARE_DEBUG", None)
    return env


def _readme_test_command() -> str:
    """The before-stop hook's rule: the first indented line after the sentence "Run the tests"."""
    lines = (REPO / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if "run the tests" in line.lower())
    return next(line[4:] for line in lines[start + 1:] if line.startswith("    "))


# ---------------------------------------------------------------------------------------- set-up
def test_readme_test_command_installs_its_dependencies_and_ci_runs_exactly_it():
    cmd = _readme_test_command()
    steps = [s.strip() for s in cmd.split("&&")]
    assert steps[-1] == "python -m pytest tests"
    assert 'pip install ".[dev]"' in steps and steps[0].startswith("pip install torch==")
    from importlib import metadata

    dev = [r for r in metadata.requires("fare-moe") if re.search(r"extra\s*==\s*['\"]dev['\"]", r)]
    assert {re.split(r"[<>=\[ ;]", r)[0] for r in dev} >= {"pytest", "statsmodels"}
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert cmd in ci, "the CI script must run the README's test command verbatim"
    assert ci.index(cmd) > ci.index('. "$VENV/bin/activate"')  # inside CI's fresh venv


def test_main_job_says_where_it_writes_and_that_folder_is_ignored(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "fare").write_text('#!/bin/sh\nmkdir -p "$OUT"\necho "$@" >> "$OUT/calls"\n')
    (fake / "fare").chmod(0o755)
    out = tmp_path / "job"
    proc = subprocess.run(["bash", str(REPO / "examples" / "main_job.sh")], cwd=tmp_path, capture_output=True,
                          text=True, env=dict(os.environ, PATH=f"{fake}{os.pathsep}{os.environ['PATH']}", OUT=str(out)),
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert str(out) in proc.stdout.strip().splitlines()[-1]
    assert len((out / "calls").read_text().splitlines()) == 4  # profile, eval none, eval arr, compare
    default = re.search(r'OUT="\$\{OUT:-([^}]+)\}"', (REPO / "examples" / "main_job.sh").read_text()).group(1)
    assert f"`{default}/`" in (REPO / "README.md").read_text()
    ignored = subprocess.run(["git", "check-ignore", "-q", f"{default}/x"], cwd=REPO, check=False)
    assert ignored.returncode == 0, f"{default}/ is not in .gitignore"


# ------------------------------------------------------------------------------ one-line errors
def _cmd_module(monkeypatch):
    def wrapped(argv):
        try:
            raise FareError("lam=-1 is not allowed; lam must be a number >= 0")
        except FareError as e:
            raise RuntimeError("lm-eval wrapped it") from e

    mod = types.ModuleType("fare_test_commands")
    mod.bad = lambda argv: (_ for _ in ()).throw(FareError("value 'x' is bad;\n  allowed: a, b"))
    mod.wrapped = wrapped
    mod.ctrl_c = lambda argv: (_ for _ in ()).throw(KeyboardInterrupt())
    mod.bug = lambda argv: 1 / 0
    monkeypatch.setitem(sys.modules, "fare_test_commands", mod)
    from fare_models import cli

    for name in ("bad", "wrapped", "ctrl_c", "bug"):
        monkeypatch.setitem(cli.SUBCOMMANDS, name, (f"fare_test_commands:{name}", "test"))
    return cli


def test_fare_main_turns_fare_errors_and_ctrl_c_into_one_line(monkeypatch, capsys):
    cli = _cmd_module(monkeypatch)
    monkeypatch.delenv("FARE_DEBUG", raising=False)
    assert cli.main(["bad"]) == 2
    assert capsys.readouterr().err == "fare bad: error: value 'x' is bad; allowed: a, b\n"
    assert cli.main(["wrapped"]) == 2  # a FareError in the chain of what a library re-raised
    assert capsys.readouterr().err == "fare wrapped: error: lam=-1 is not allowed; lam must be a number >= 0\n"
    assert cli.main(["ctrl_c"]) == 130
    assert capsys.readouterr().err == "fare ctrl_c: interrupted; rerun the same command to resume\n"
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        cli.main(["bug"])
    monkeypatch.setenv("FARE_DEBUG", "1")
    with pytest.raises(FareError):
        cli.main(["bad"])
    with pytest.raises(KeyboardInterrupt):
        cli.main(["ctrl_c"])


def test_excepthook_prints_fare_errors_as_one_line_and_chains_the_previous_hook(monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(sys, "excepthook", lambda *exc: seen.append(exc[1]))
    monkeypatch.delenv("FARE_DEBUG", raising=False)
    install_excepthook("lm_eval")
    install_excepthook("lm_eval")  # idempotent: one wrapper
    try:
        try:
            raise FareError("mask entry '0:999': expert 999 out of range")
        except FareError:
            raise KeyError("re-raised by lm-eval")
    except KeyError as e:
        sys.excepthook(type(e), e, e.__traceback__)
    assert capsys.readouterr().err == "lm_eval: error: mask entry '0:999': expert 999 out of range\n" and not seen
    other = RuntimeError("not ours")
    sys.excepthook(RuntimeError, other, None)
    assert seen == [other]
    monkeypatch.setenv("FARE_DEBUG", "1")
    err = FareError("shown with its traceback")
    sys.excepthook(FareError, err, None)
    assert seen == [other, err]


DRIVER = r'''
import io, sys
from lm_eval.api.registry import get_model  # imports lm_eval.models: the autoload hook runs
for line in sys.stdin.read().splitlines():
    try:
        get_model("fare_moe").create_from_arg_string(line, {"device": "cpu"})  # what lm_eval's CLI does
        print("NO ERROR")
        continue
    except BaseException:
        info = sys.exc_info()
    sys.stderr = io.StringIO()  # what the interpreter's uncaught-exception path prints
    sys.excepthook(*info)
    print(sys.stderr.getvalue().rstrip("\n").replace("\n", "<NEWLINE>"))
    sys.stderr = sys.__stderr__
'''


def test_bad_model_args_through_lm_eval_are_one_line(tmp_path):
    from test_fare_moe_lm import (  # tiny dense llama built from a config; phi file
        _dense_model_dir,
        _profile,
    )

    bad_profile = tmp_path / "phi.txt"
    bad_profile.write_text("not a profile")
    cases = {
        "pretrained=fare-tiny,intervention=arr,lam=-1": "lam=-1 is not allowed; lam must be a finite number >= 0",
        f"pretrained=fare-tiny,intervention=arr,profile={_profile(tmp_path)},layers=99":
            "layer 99 is not an MoE layer of this olmoe model; MoE layers: [0, 1, 2, 3]",
        "pretrained=fare-tiny,intervention=arr,profile=nope.safetensors": "profile='nope.safetensors': no such file",
        "pretrained=fare-tiny,intervention=mask,mask=0:999": "expert 999 out of range for layer 0: allowed 0..7",
        "pretrained=fare-tiny,intervention=foo": "intervention='foo' is not allowed; choose one of: none, arr, mask",
        f"pretrained=fare-tiny,intervention=arr,profile={bad_profile}": "is not a safetensors file",
        f"pretrained={_dense_model_dir(tmp_path)}": "not a Mixture-of-Experts model",
        "pretrained=fare-tiny,lamda=1": "unknown model_args key 'lamda'; did you mean 'lam'?",
        "pretrained=/data/olmo3": "pretrained='/data/olmo3': no such directory, and not a valid hub id",
    }
    proc = subprocess.run([sys.executable, "-c", DRIVER], input="\n".join(cases), capture_output=True, text=True,
                          env=_env(), timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()[-len(cases):]
    for line, expected in zip(lines, cases.values()):
        assert line.startswith("-c: error: "), line  # the program name is argv[0]; `python -c` here
        assert expected in line and "Traceback" not in line and "<NEWLINE>" not in line, line


@pytest.mark.slow  # lm_eval indexes all its tasks first (about 15 s on an idle 2-core machine)
def test_stock_lm_eval_offline_builtin_crows_pairs_bbq_fails_fast_in_one_line(tmp_path):
    """The design card's ``--tasks crows_pairs,bbq`` offline: one line pointing at the fare tasks."""
    cmd = [str(BIN / "lm_eval"), "--model", "fare_moe", "--model_args", "pretrained=fare-tiny",
           "--tasks", "crows_pairs,bbq", "--limit", "1", "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
                          env=_env(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"))
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "Retrying" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("lm_eval: error: task 'crows_pairs_english' downloads 'jannalu/crows_pairs_multilingual'")
    assert "offline mode is set" in last and "use 'fare_crows_pairs' instead" in last


def test_ctrl_c_in_fare_run_is_one_line_and_exit_130(tmp_path):
    cmd = [str(BIN / "fare"), "run", "--model", "fare-tiny", "--quick", "--out", str(tmp_path / "run")]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    deadline = time.monotonic() + 120
    while not lines and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)  # wait for the first progress line: the run is under way
    time.sleep(1.0)
    assert proc.poll() is None, "fare run ended before it could be interrupted:\n" + "".join(lines)[-3000:]
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    reader.join(timeout=10)
    output = "".join(lines)
    assert "Traceback" not in output
    assert output.strip().splitlines()[-1] == "fare run: interrupted; rerun the same command to resume"


# ---------------------------------------------------------------------- built-in tasks offline
def _fake_task(path, task="crows_pairs_english"):
    config = types.SimpleNamespace(task=task, custom_dataset=None, metadata=None, dataset_kwargs=None)
    return types.SimpleNamespace(DATASET_PATH=path, DATASET_NAME="english", config=config)


@pytest.fixture()
def download(monkeypatch):
    import datasets.config
    from lm_eval.api import task as lm_task

    from fare_models import discovery

    discovery.register_all()
    calls = []

    def load_dataset(**kwargs):  # stands in for the hub: records the offline flag it was called under
        calls.append((kwargs["path"], datasets.config.HF_HUB_OFFLINE))
        if datasets.config.HF_HUB_OFFLINE:
            raise ConnectionError(f"Couldn't reach '{kwargs['path']}' on the Hub (OfflineModeIsEnabled)")
        return {"test": ["row"]}

    monkeypatch.setattr(lm_task.datasets, "load_dataset", load_dataset)
    return lm_task.ConfigurableTask.download, calls, discovery


def test_builtin_crows_pairs_downloads_unchanged_when_the_hub_answers(download, monkeypatch):
    fn, calls, discovery = download
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(discovery, "hub_reachable", lambda: True)
    task = _fake_task("jannalu/crows_pairs_multilingual")
    fn(task)
    assert task.dataset == {"test": ["row"]} and calls == [("jannalu/crows_pairs_multilingual", False)]


def test_builtin_bbq_with_the_hub_unreachable_uses_the_cache_only_then_one_line(download, monkeypatch):
    fn, calls, discovery = download
    import datasets.config
    from huggingface_hub import constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    hub_offline = constants.HF_HUB_OFFLINE
    monkeypatch.setattr(discovery, "hub_reachable", lambda: False)
    with pytest.raises(FareError, match=r"task 'bbq_multiple_choice' downloads 'oskarvanderwal/bbq' from the hub, "
                                        r"but the Hugging Face hub is unreachable and it is not cached; use 'fare_bbq'"):
        fn(_fake_task("oskarvanderwal/bbq", "bbq_multiple_choice"))
    assert calls == [("oskarvanderwal/bbq", True)]  # cache only: no retries against the hub
    assert datasets.config.HF_HUB_OFFLINE is False and constants.HF_HUB_OFFLINE is hub_offline  # restored
    other = _fake_task("some/other_dataset", "other")  # every other task is untouched
    fn(other)
    assert other.dataset == {"test": ["row"]}


def test_fare_tasks_do_not_trigger_lm_evals_metadata_hint(download, caplog):
    fn, _, _ = download
    for name in ("fare_xstest", "someone_elses_task"):
        task = _fake_task(None, name)
        task.config.custom_dataset = lambda **kwargs: {"test": []}
        with caplog.at_level(logging.WARNING, logger="lm_eval.api.task"):
            fn(task)
    hints = [r.getMessage().split(":")[0] for r in caplog.records if "--metadata" in r.getMessage()]
    assert hints == ["someone_elses_task"]


# ---------------------------------------------------------------------------- other bullets
def test_toxicity_fallback_notice_prints_once(monkeypatch, caplog):
    from fare_tasks import toxicity

    monkeypatch.setattr(toxicity, "detoxify_available", lambda: False)
    toxicity._notice_lexicon_fallback.cache_clear()
    with caplog.at_level(logging.WARNING, logger=toxicity.__name__):
        assert [toxicity.score_texts(["a calm text"])[0] for _ in range(3)] == ["lexicon"] * 3
    assert sum("detoxify is not installed" in r.getMessage() for r in caplog.records) == 1


def test_outputs_get_umask_permissions_like_any_other_file(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from fare_core.tiny import build_tiny_model, tiny_model_path
    from fare_models.profile import save_profile
    from fare_models.surgery import Recorder

    old = os.umask(0o027)
    try:
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
        save_file({"a": torch.zeros(1)}, str(tmp_path / "raw.safetensors"))  # the library alone: 0600
        profile = save_profile(tmp_path / "phi.safetensors", torch.zeros(4, 8), [0, 1, 2, 3], "m", "olmoe")
        with Recorder(build_tiny_model("olmoe")) as rec:
            routing = rec.save(tmp_path / "routing")

        def folder(tmp):
            tmp.mkdir()
            save_file({"a": torch.zeros(1)}, str(tmp / "model.safetensors"))

        checkpoint = atomic_write(tmp_path / "ckpt", folder)
    finally:
        os.umask(old)

    def mode(path):
        return stat.S_IMODE(path.stat().st_mode)

    assert mode(plain) == 0o640 and mode(tmp_path / "raw.safetensors") == 0o600
    written = [profile, *sorted(routing.iterdir()), checkpoint / "model.safetensors"]
    assert {p.name: mode(p) for p in written} == {p.name: 0o640 for p in written}
    assert mode(checkpoint) == 0o750
    monkeypatch.setenv("FARE_CACHE_DIR", str(tmp_path / "cache"))  # a fresh fare-tiny cache (mkdtemp inside)
    tiny = tiny_model_path("fare-tiny:mixtral")
    umask = current_umask()
    assert {p.name: mode(p) for p in tiny.iterdir()} == {p.name: 0o666 & ~umask for p in tiny.iterdir()}
    assert mode(tiny) == 0o777 & ~umask


def test_report_is_none_for_errors_that_are_not_ours(capsys, monkeypatch):
    monkeypatch.delenv("FARE_DEBUG", raising=False)
    assert report(ValueError("a library's own error"), "fare x") is None
    try:
        try:
            raise FareError("handled inside")
        except FareError:
            raise KeyError("a new error, its context hidden") from None
    except KeyError as e:
        assert report(e, "fare x") is None  # `from None`: the FareError is not the story
    assert report(FareError("bad\nvalue"), "fare x") == 2
    assert capsys.readouterr().err == "fare x: error: bad value\n"


def _task_metadata_errors():
    from fare_tasks import bbq, crows, refusal, safety_tasks, stereoset

    return {
        "refusal_judge": lambda: refusal.JUDGES.configure_from_metadata({"refusal_judge": "no_such_judge"}),
        "harmbench_split": lambda: safety_tasks.load_harmbench(harmbench_split="dev"),
        "bold_seed": lambda: safety_tasks.load_bold(bold_seed="x"),
        "bold_domains": lambda: safety_tasks.load_bold(bold_domains=["sports"]),
        "stereo_axes": lambda: safety_tasks.stereo_completion_prompts(["hair"]),
        "crows_bias_type": lambda: crows.load_pairs("height"),
        "crows_length_matched": lambda: crows.load(crows_length_matched=True),
        "bbq_category": lambda: bbq.load_docs("Height"),
        "bbq_subset": lambda: bbq.subset([{}, {}], 3),
        "bbq_subset not an integer": lambda: bbq.load(bbq_subset="1k"),
        "bbq_seed not an integer": lambda: bbq.load(bbq_subset=10, bbq_seed="seven"),
        "stereoset_split": lambda: stereoset.examples_from_json({}, "extra"),
    }


@pytest.mark.parametrize("name", list(_task_metadata_errors()))
def test_bad_task_metadata_is_a_fare_error_naming_the_value(name, monkeypatch):
    """Task settings come from --metadata / YAML: a bad one is a FareError (one line under lm_eval)."""
    monkeypatch.delenv("FARE_REFUSAL_JUDGE", raising=False)
    with pytest.raises(FareError, match="allowed|must be between|needs the evaluated model's tokenizer"):
        _task_metadata_errors()[name]()
