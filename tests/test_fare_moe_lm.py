"""The ``fare_moe`` lm-eval model: equality with lm-eval's ``hf``, model_args validation, CLI discovery."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

from fare_core.errors import FareError
from fare_models.lm import FareMoeLM
from fare_models.profile import save_profile
from fare_models.surgery import RoutingController
from fare_tasks.data import read_csv

REPO = Path(__file__).resolve().parents[1]


def ll_requests(pairs):
    return [Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i) for i, p in enumerate(pairs)]


@pytest.fixture(scope="module")
def tiny_lm():
    return FareMoeLM(pretrained="fare-tiny", batch_size=32)


@pytest.fixture(scope="module")
def profile_file(tmp_path_factory, tiny_lm):
    layers = [layer.index for layer in tiny_lm.routing.layers]
    phi = torch.rand(len(layers), 8, generator=torch.Generator().manual_seed(0))
    path = tmp_path_factory.mktemp("profile") / "phi.safetensors"
    return save_profile(path, phi, layers, "fare-tiny:olmoe", "olmoe")


@pytest.mark.slow
def test_intervention_none_equals_hf_on_all_crows_pairs(tiny_path, tiny_lm):
    rows = read_csv("crows_pairs", "crows_pairs_anonymized.csv")
    assert len(rows) == 1508
    reqs = ll_requests([("", r[col]) for r in rows for col in ("sent_more", "sent_less")])
    hf = HFLM(pretrained=str(tiny_path), batch_size=32, device="cpu")
    ours = tiny_lm.loglikelihood(reqs, disable_tqdm=True)
    theirs = hf.loglikelihood(reqs, disable_tqdm=True)
    assert len(ours) == 3016
    assert ours == theirs  # bit-identical floats and greedy flags


def test_arr_and_mask_change_loglikelihoods_and_lam0_does_not(tiny_lm, profile_file):
    reqs = ll_requests([("The nurse said", " she was tired."), ("", "A quiet morning in the city.")])
    base = tiny_lm.loglikelihood(reqs, disable_tqdm=True)
    # same batch size as tiny_lm: padding to another length changes matmul shapes, hence rounding
    lm0 = FareMoeLM(pretrained="fare-tiny", intervention="arr", profile=str(profile_file), lam=0.0, batch_size=32)
    assert lm0.loglikelihood(reqs, disable_tqdm=True) == base
    lm2 = FareMoeLM(pretrained="fare-tiny", intervention="arr", profile=str(profile_file), lam=4.0, layers="0|2",
                    batch_size=32)
    assert [e.layers for e in lm2.edits] == [[0, 2]]
    assert lm2.loglikelihood(reqs, disable_tqdm=True) != base
    lmm = FareMoeLM(pretrained="fare-tiny", intervention="mask", mask="0:1|0:2|3:7", batch_size=32)
    assert lmm.loglikelihood(reqs, disable_tqdm=True) != base
    lmm.remove_interventions()
    assert lmm.loglikelihood(reqs, disable_tqdm=True) == base


def test_record_routing_counts_real_tokens_only(tmp_path):
    out = tmp_path / "routing"
    lm = FareMoeLM(pretrained="fare-tiny", batch_size=4, record_routing=str(out))
    pairs = [("The doctor", " is here."), ("", "Hello world"), ("A", "B"), ("Some longer context here", " ok")]
    lm.loglikelihood(ll_requests(pairs), disable_tqdm=True)
    # lm-eval feeds context+continuation minus the last token; an empty context gets the prefix token
    expected = sum(len((c or "\x00").encode()) + len(x.encode()) - 1 for c, x in pairs)
    meta = json.loads((out / "routing.json").read_text())
    from fare_models.surgery import load_routing

    tensors, _ = load_routing(out)
    assert meta["layers"] == [0, 1, 2, 3] and meta["groups"] == ["all"] and meta["model"] == "fare-tiny:olmoe"
    assert tensors["tokens"].tolist() == [[expected]] * 4
    assert tensors["counts"].sum(1).tolist() == [[expected * 2]] * 4  # top-2
    assert meta["complete"] is True and _["complete"] is True


def test_record_routing_of_an_interrupted_run_is_marked_partial(tmp_path):
    out = tmp_path / "routing"
    lm = FareMoeLM(pretrained="fare-tiny", batch_size=4, record_routing=str(out))
    seen = []

    def interrupted(requests, **kwargs):  # lm-eval's batch loop, stopped by Ctrl-C half-way
        seen.append(json.loads((out / "routing.json").read_text())["complete"])
        raise KeyboardInterrupt

    lm._loglikelihood_tokens = interrupted
    with pytest.raises(KeyboardInterrupt):
        lm.loglikelihood(ll_requests([("A", "B")]), disable_tqdm=True)
    assert seen == [False]  # marked partial while the requests run
    assert json.loads((out / "routing.json").read_text())["complete"] is False
    del lm._loglikelihood_tokens
    lm.loglikelihood(ll_requests([("A", "B")]), disable_tqdm=True)
    assert json.loads((out / "routing.json").read_text())["complete"] is True


def test_real_token_mask_handles_sequences_ending_in_pad_id(tiny_lm):
    tiny_lm._known_inputs = {(5, 6, 0), (7, 8, 9, 10)}
    try:
        mask = tiny_lm._real_token_mask(torch.tensor([[5, 6, 0, 0], [7, 8, 9, 10], [3, 0, 0, 0]]))
    finally:
        tiny_lm._known_inputs = None
    assert mask.sum(1).tolist() == [3, 4, 1]


def _dense_model_dir(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from fare_core.tiny import build_tokenizer

    cfg = AutoConfig.for_model("llama", hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               num_key_value_heads=1, intermediate_size=64, vocab_size=258)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "dense")
    build_tokenizer().save_pretrained(tmp_path / "dense")
    return str(tmp_path / "dense")


def _doge_moe_dir(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from fare_core.tiny import build_tokenizer

    cfg = AutoConfig.for_model("doge", hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               num_key_value_heads=1, intermediate_size=64, vocab_size=258, is_moe=True,
                               num_experts=16, num_experts_per_tok=2)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "doge")
    build_tokenizer().save_pretrained(tmp_path / "doge")
    return str(tmp_path / "doge")


def _profile(tmp_path, shape=(4, 8), model="fare-tiny:olmoe", model_type="olmoe", layers=(0, 1, 2, 3), fill=None):
    phi = torch.rand(*shape) if fill is None else torch.full(shape, fill)
    return str(save_profile(tmp_path / "p.safetensors", phi, list(layers)[: shape[0]], model, model_type))


def _text_file(tmp_path):
    path = tmp_path / "phi.txt"
    path.write_text("not a profile\n")
    return str(path)


BAD_INPUTS = {
    "dense model": (lambda t: dict(pretrained=_dense_model_dir(t)), r"'llama'.*not a Mixture-of-Experts model"),
    "unknown MoE": (lambda t: dict(pretrained=_doge_moe_dir(t)), r"model_type 'doge' is a Mixture-of-Experts family"),
    "profile wrong shape": (lambda t: dict(intervention="arr", profile=_profile(t, shape=(4, 5))),
                            r"profile has 5 experts for layer 0; the model has 8"),
    "profile of another model": (lambda t: dict(intervention="arr", profile=_profile(t, model="allenai/OLMoE-1B-7B-0924")),
                                 r"computed for model 'allenai/OLMoE-1B-7B-0924', not 'fare-tiny:olmoe'"),
    "profile of another family": (lambda t: dict(intervention="arr", profile=_profile(t, model_type="mixtral")),
                                  r"model_type 'mixtral'"),
    "layer out of range": (lambda t: dict(intervention="arr", profile=_profile(t), layers="1|9"),
                           r"layer 9 is not an MoE layer.*MoE layers: \[0, 1, 2, 3\]"),
    "negative lam": (lambda t: dict(intervention="arr", profile=_profile(t), lam=-0.5), r"lam=-0.5 .*>= 0"),
    "non-numeric lam": (lambda t: dict(intervention="arr", profile=_profile(t), lam="strong"),
                        r"lam='strong' is not a number"),
    "unknown intervention": (lambda t: dict(intervention="steer"), r"intervention='steer' is not allowed.*none, arr, mask"),
    "malformed mask": (lambda t: dict(intervention="mask", mask="3-5|2:1"), r"mask entry '3-5' is malformed"),
    "mask expert out of range": (lambda t: dict(intervention="mask", mask="1:8"), r"expert 8 out of range for layer 1"),
    "misspelled argument": (lambda t: dict(intervention="arr", profile=_profile(t), lamda=1.0),
                            r"unknown model_args key 'lamda'; did you mean 'lam'\?"),
    "misspelled hf argument": (lambda t: dict(batchsize=4), r"unknown model_args key 'batchsize'; did you mean 'batch_size'\?"),
    "unknown tiny architecture": (lambda t: dict(pretrained="fare-tiny:llama"), r"unknown fare-tiny architecture 'llama'"),
    "mistyped local path": (lambda t: dict(pretrained="/data/olmo3"),
                            r"pretrained='/data/olmo3': no such directory, and not a valid hub id"),
    "missing profile": (lambda t: dict(intervention="arr", profile=str(t / "nope.safetensors")),
                        r"profile='.*nope.safetensors': no such file"),
    "profile not safetensors": (lambda t: dict(intervention="arr", profile=_text_file(t)),
                                r"profile '.*phi.txt' is not a safetensors file"),
    "NaN profile": (lambda t: dict(intervention="arr", profile=_profile(t, fill=float("nan"))),
                    r"has 32 non-finite phi values \(first: nan at layer 0, expert 0\); phi must be finite"),
    "inf profile": (lambda t: dict(intervention="arr", profile=_profile(t, fill=float("inf"))),
                    r"32 non-finite phi values \(first: inf"),
    "lam without arr": (lambda t: dict(lam=5), r"lam= is only used with intervention=arr \(got intervention=none\)"),
    "arr_target without arr": (lambda t: dict(intervention="mask", mask="0:1", arr_target="selection"),
                               r"arr_target= is only used with intervention=arr \(got intervention=mask\)"),
    "profile_check without arr": (lambda t: dict(profile_check="shape"), r"profile_check= is only used with intervention=arr"),
    "layers without arr": (lambda t: dict(layers="1|2"), r"layers= is only used with intervention=arr"),
    # checked before the model loads: the missing model directory would fail otherwise
    "unwritable record_routing": (lambda t: dict(pretrained=str(t / "no-model"), record_routing="/proc/x"),
                                  r"record_routing='/proc/x' is not writable .*give a directory you can write to"),
    "record_trace is a file": (lambda t: dict(record_trace=_text_file(t)), r"record_trace='.*phi.txt' is a file"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_model_args_give_one_line_errors(case, tmp_path):
    make, message = BAD_INPUTS[case]
    kwargs = {"pretrained": "fare-tiny", **make(tmp_path)}
    with pytest.raises(FareError, match=message) as info:
        FareMoeLM(**kwargs)
    assert "\n" not in str(info.value)


def test_json_model_args_lists_are_accepted(profile_file):
    lm = FareMoeLM(pretrained="fare-tiny", intervention="arr", profile=str(profile_file), layers=[1, 3])
    assert lm.edits[0].layers == [1, 3]
    lmm = FareMoeLM(pretrained="fare-tiny", intervention="mask", mask=[[0, 1], [2, 3]])
    assert {i: m.nonzero().flatten().tolist() for i, m in lmm.edits[0].masks.items()} == {0: [1], 2: [3]}
    assert isinstance(lmm.routing, RoutingController)


def _cli_env(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_stock_lm_eval_cli_finds_fare_moe_and_fare_tasks(tmp_path, profile_file):
    import importlib.util

    assert importlib.util.find_spec("_fare_moe_autoload"), "fare-moe is not installed: run `pip install .`"
    exe = shutil.which("lm_eval", path=str(Path(sys.executable).parent)) or shutil.which("lm_eval")
    assert exe, "lm_eval console script not found"
    out = tmp_path / "results"
    cmd = [exe, "--model", "fare_moe", "--model_args",
           f"pretrained=fare-tiny,intervention=arr,profile={profile_file},lam=1.0",
           "--tasks", "fare_crows_pairs", "--limit", "8", "--output_path", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_cli_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    assert "fare_crows_pairs" in results["results"]
    assert results["config"]["model"] == "fare_moe"


def test_fare_console_script_lists_and_rejects_commands():
    from fare_models.cli import main

    assert main(["--help"]) == 0
    assert main(["no-such-command"]) == 2
