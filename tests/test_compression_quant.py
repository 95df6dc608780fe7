"""bitsandbytes (experts unfused and really quantised), GPTQ via llm-compressor, checkpoint + manifest,
``fare compress``. Library tests are skipped only when the library is not importable."""

import importlib.util
import json

import pytest
import torch

from fare_compression import apply_compression
from fare_compression.checkpoint import check_reload, read_manifest, reapply_from_manifest, save_compressed
from fare_core.adapters import moe_layers
from fare_core.tiny import build_tiny_model, build_tokenizer

ARCHS = ["olmoe", "qwen3_moe", "mixtral", "ernie4_5_moe"]
CALIB = {"calib_n": 6, "calib_seq_len": 48, "calib_p": 0.5}
HELD_OUT = (
    "The committee met on Tuesday to review the budget for the new library. After a long discussion, "
    "members agreed to fund longer opening hours and a reading programme for children."
)
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
HAS_LLMC = importlib.util.find_spec("llmcompressor") is not None and importlib.util.find_spec("compressed_tensors") is not None


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def ids_of(tok):
    return tok(HELD_OUT, return_tensors="pt").input_ids


def ppl(model, ids) -> float:
    with torch.no_grad():
        return float(torch.exp(model(ids, labels=ids).loss))


# ----------------------------------------------------------------------------- bitsandbytes


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes not installed (pip install --no-deps -r requirements-compress.txt)")
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["bnb_int8", "bnb_nf4"])
def test_bnb_quantises_experts(arch, method, tok, tmp_path):
    import bitsandbytes as bnb

    ids = ids_of(tok)
    model = build_tiny_model(arch)
    with torch.no_grad():
        dense_logits = model(ids).logits
    dense_ppl = ppl(model, ids)
    n_layers = len(moe_layers(model))
    E = moe_layers(model)[0].num_experts
    apply_compression(model, method, {})
    qcls, qdtype = (bnb.nn.Linear8bitLt, torch.int8) if method == "bnb_int8" else (bnb.nn.Linear4bit, torch.uint8)
    expert_q = [m for n, m in model.named_modules() if ".experts." in n and isinstance(m, qcls)]
    assert len(expert_q) == n_layers * E * 3  # gate, up, down of every routed expert
    assert all(m.weight.dtype == qdtype for m in expert_q)
    assert not any(hasattr(m, "gate_up_proj") for m in model.modules())  # no fused fp32 experts left
    assert not any(isinstance(l.router, qcls) for l in moe_layers(model))
    with torch.no_grad():
        q_logits = model(ids).logits
    assert torch.isfinite(q_logits).all()
    delta = (q_logits - dense_logits).abs().mean().item()
    assert 0 < delta < (0.01 if method == "bnb_int8" else 0.1)
    assert ppl(model, ids) <= 1.05 * dense_ppl

    save_compressed(model, tok, tmp_path)
    re, _ = check_reload(tmp_path)  # raises on missing/unexpected keys
    with torch.no_grad():
        torch.testing.assert_close(re(ids).logits, q_logits, atol=1e-4, rtol=1e-4)
    for l in moe_layers(re):
        for W in (l.experts.gate_up_proj.data, l.experts.down_proj.data):
            if method == "bnb_nf4":  # NF4: 16 codes x one absmax per block of 64 weights
                blocks = W.reshape(-1, 64)
                assert max(len(torch.unique(b)) for b in blocks) <= 16
            else:  # LLM.int8: W_row = round(W_row * 127 / absmax_row) * absmax_row / 127
                rows = W.reshape(-1, W.shape[-1])
                q = rows * 127 / rows.abs().amax(1, keepdim=True)
                assert (q - q.round()).abs().max() < 1e-3
    assert read_manifest(tmp_path)["reapply_on_load"] is True
    again = reapply_from_manifest(re, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, q_logits, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- GPTQ


GPTQ_CASES = [(a, "gptq_w4a16") for a in ARCHS] + [("qwen3_moe", "gptq_w8a16")]


@pytest.mark.skipif(not HAS_LLMC, reason="llmcompressor/compressed-tensors not installed (pip install --no-deps -r requirements-compress.txt)")
@pytest.mark.parametrize("arch,method", GPTQ_CASES)
def test_gptq_all_experts_quantised_and_reloads(arch, method, tok, tmp_path):
    ids = ids_of(tok)
    model = build_tiny_model(arch)
    with torch.no_grad():
        dense_logits = model(ids).logits
    dense_ppl = ppl(model, ids)
    orig = {l.index: l.experts.gate_up_proj.detach().clone() for l in moe_layers(model)}
    params = {**CALIB, "group_size": 32}
    apply_compression(model, method, params, tok)
    manifest = save_compressed(model, tok, tmp_path)
    assert manifest["calibration"]["p"] == 0.5
    re, _ = check_reload(tmp_path)  # Mixtral: fails without the key rename
    cfg = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    bits = next(iter(cfg["config_groups"].values()))["weights"]["num_bits"]
    assert bits == (4 if method == "gptq_w4a16" else 8)
    for l in moe_layers(re):
        W = l.experts.gate_up_proj.data
        assert not torch.equal(W, orig[l.index])  # experts were quantised (all of them calibrated)
        if method == "gptq_w4a16":
            assert max(len(torch.unique(g)) for g in W.reshape(-1, 32)) <= 16
    # every expert's gate = saved per-group scale x integers in the int range (scales read from disk)
    from safetensors.torch import load_file

    sd = {}
    for f in tmp_path.glob("*.safetensors"):
        sd.update(load_file(str(f)))
    lo, hi = (-8, 7) if method == "gptq_w4a16" else (-128, 127)
    for l in moe_layers(re):
        inter = l.experts.down_proj.shape[-1]
        for e in range(l.experts.gate_up_proj.shape[0]):
            key = next(k for k in sd if f"layers.{l.index}." in k and f"experts.{e}." in k
                       and (k.endswith("gate_proj.weight_scale") or k.endswith("w1.weight_scale")))
            scale = sd[key].float().repeat_interleave(32, dim=1)
            q = l.experts.gate_up_proj.data[e, :inter] / scale
            assert (q - q.round()).abs().max() < 1e-3 and q.min() >= lo - 1e-3 and q.max() <= hi + 1e-3
    with torch.no_grad():
        out = re(ids).logits
    assert torch.isfinite(out).all()
    assert (out - dense_logits).abs().mean() < (0.15 if method == "gptq_w4a16" else 0.02)
    assert ppl(re, ids) <= 1.1 * dense_ppl


# ----------------------------------------------------------------------------- CLI


def test_cli_compress_saves_manifest_and_smaller_model(tmp_path, capsys):
    from fare_models.cli import main as fare_main
    from fare_core.tiny import tiny_model_path

    out = tmp_path / "pruned"
    rc = fare_main(["compress", "--model", "fare-tiny:qwen3_moe", "--method", "prune_frequency", "--set", "ratio=0.25",
                    "--calib-p", "0.25", "--calib-n", "8", "--calib-seq-len", "32", "--out", str(out)])
    assert rc == 0
    man = read_manifest(out)
    assert man["method"] == "prune_frequency" and man["params"] == {"ratio": 0.25}
    src = man["calibration"]["sources"]
    assert src["safety"]["sequences"] == 2 and src["general"]["sequences"] == 6
    assert src["safety"]["tokens"] == 2 * 32 and man["calibration"]["seed"] == 0
    re, _ = check_reload(out)
    assert re.config.num_experts == 6
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(tiny_model_path("fare-tiny:qwen3_moe")).num_experts == 8
    assert re.model.layers[0].mlp.experts.gate_up_proj.shape[0] == 6
    assert (out / "tokenizer.json").is_file()
    assert fare_main(["compress", "--model", "fare-tiny:qwen3_moe", "--method", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "allowed: magnitude" in capsys.readouterr().err
