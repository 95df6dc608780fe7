"""Compression methods on tiny OLMoE / Qwen3-MoE / Mixtral / ERNIE-4.5: checked against independent
truth (the unmodified model, scipy's linkage, weighted averages recomputed here)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fare_compression import MissingBackendError, apply_compression
from fare_compression.calibration import build_calibration
from fare_compression.hcsmoe import agglomerative, naive_average_linkage
from fare_core.adapters import moe_layers
from fare_core.tiny import build_tiny_model, build_tokenizer

ARCHS = ["olmoe", "qwen3_moe", "mixtral", "ernie4_5_moe"]
CALIB = {"calib_n": 6, "calib_seq_len": 48, "calib_p": 0.5}
HELD_OUT = (
    "The committee met on Tuesday to review the budget for the new library. After a long discussion, "
    "members agreed to fund longer opening hours and a reading programme for children."
)
PPL_FACTOR = 1.5  # compressed perplexity <= 1.5 x dense on held-out text (tiny random models)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def ppl(model, tok) -> float:
    ids = tok(HELD_OUT, return_tensors="pt").input_ids
    with torch.no_grad():
        return float(torch.exp(model(ids, labels=ids).loss))


def reload(model, path):
    from transformers import AutoModelForCausalLM

    model.save_pretrained(path)
    re, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return re.eval()


def expert_mats(model):
    for l in moe_layers(model):
        for e in range(l.num_experts):
            yield l.experts.gate_up_proj.data[e]
            yield l.experts.down_proj.data[e]


def router_capture(model, calib):
    """Independent record: per MoE layer, block inputs and router (logits, weights, indices) on stat tokens."""
    xs, outs, hs = {}, {}, []
    state = {}
    for l in moe_layers(model):
        hs.append(l.router.register_forward_pre_hook(
            lambda m, a, i=l.index: xs.setdefault(i, []).append(a[0].reshape(-1, a[0].shape[-1])[state["m"]])))
        hs.append(l.router.register_forward_hook(
            lambda m, a, o, i=l.index: outs.setdefault(i, []).append([t.reshape(-1, t.shape[-1])[state["m"]] for t in o])))
    with torch.no_grad():
        for ids, attn, stat in calib.batches(4):
            state["m"] = stat.reshape(-1)
            model(input_ids=ids, attention_mask=attn)
    for h in hs:
        h.remove()
    return ({i: torch.cat(v) for i, v in xs.items()},
            {i: [torch.cat([o[k] for o in v]) for k in range(3)] for i, v in outs.items()})


def calib_set(tok):
    return build_calibration(tok, n=6, seq_len=48, p=0.5)


# ----------------------------------------------------------------------------- calibration


def test_calibration_mix_counts_seed_and_nesting(tok):
    sets = {p: build_calibration(tok, n=10, seq_len=32, p=p, seed=3) for p in (0.0, 0.25, 0.5, 1.0)}
    for p, c in sets.items():
        man = c.manifest["sources"]
        assert abs(man["safety"]["tokens"] - p * 10 * 32) <= 32  # within one sequence
        assert man["safety"]["tokens"] + man["general"]["tokens"] == 10 * 32
        assert c.manifest["p"] == p and c.manifest["seed"] == 3 and c.manifest["n"] == 10
    again = build_calibration(tok, n=10, seq_len=32, p=0.25, seed=3)
    assert torch.equal(again.input_ids, sets[0.25].input_ids)
    assert not torch.equal(build_calibration(tok, n=10, seq_len=32, p=0.25, seed=4).input_ids, again.input_ids)
    gen = {p: {tuple(r.tolist()) for r, s in zip(c.input_ids, c.sources) if s == "general"} for p, c in sets.items()}
    assert gen[0.5] <= gen[0.25] <= gen[0.0]  # general subset nested across p
    assert len(gen[0.25]) == 10 - round(2.5)


def test_calibration_refusal_token_statistics(tok):
    c = build_calibration(tok, n=4, seq_len=64, p=1.0, stats_tokens="refusal")
    text = tok.decode(c.input_ids[c.stat_mask])
    assert 0 < c.stat_mask.sum() < c.attention_mask.sum()
    assert "<|user|>" not in text and "Sorry" in text  # only the assistant replies are counted
    assert c.manifest["sources"]["safety"]["stat_tokens"] == int(c.stat_mask.sum())
    with pytest.raises(ValueError, match="outside"):
        build_calibration(tok, n=4, seq_len=32, p=1.5)


# ----------------------------------------------------------------------------- weight sparsity


SPARSE_CASES = [(a, "magnitude", "unstructured") for a in ARCHS] + [(a, "wanda", "2:4") for a in ARCHS] + [
    ("qwen3_moe", "sparsegpt", "unstructured"), ("ernie4_5_moe", "sparsegpt", "2:4"),
    ("olmoe", "wanda", "unstructured"), ("mixtral", "magnitude", "2:4")]


@pytest.mark.parametrize("arch,method,structure", SPARSE_CASES)
def test_sparsity_exact_and_reloads(arch, method, structure, tok, tmp_path):
    model = build_tiny_model(arch)
    dense = ppl(model, tok)
    params = {"ratio": 0.5, "structure": structure, **({} if method == "magnitude" else CALIB)}
    apply_compression(model, method, params, tok)
    mats = list(expert_mats(model))
    mats += [m.weight.data for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and ".layers." in f".{n}" and m.out_features > 1]
    for W in mats:
        if structure == "2:4":
            assert ((W.reshape(W.shape[0], -1, 4) == 0).sum(-1) == 2).all()
        else:
            assert (W == 0).sum().item() == W.numel() // 2
    assert model.fare_compression["details"]["zero_fraction"] >= 0.5
    re = reload(model, tmp_path)
    ids = tok(HELD_OUT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = re(ids).logits
        assert torch.isfinite(out).all() and torch.equal(out, model(ids).logits)
    assert ppl(re, tok) <= PPL_FACTOR * dense


def test_wanda_mask_matches_independent_metric(tok):
    """Layer 0 (no earlier pruning): mask = per-row lowest half of |W| * ||X_j|| with X recorded here."""
    model = build_tiny_model("qwen3_moe")
    calib = calib_set(tok)
    ref = build_tiny_model("qwen3_moe")
    q = ref.model.layers[0].self_attn.q_proj
    seen = []
    h = q.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    xs, _ = router_capture(ref, calib)
    h.remove()
    stat = calib.stat_mask.reshape(-1)
    X = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen])[stat].double()
    W_e = ref.model.layers[0].mlp.experts.gate_up_proj.detach()[3]

    def half_mask(W, Xin):
        score = W.double().abs() * Xin.double().norm(dim=0)
        idx = score.argsort(1)[:, : W.shape[1] // 2]
        return torch.zeros_like(score, dtype=torch.bool).scatter_(1, idx, True)

    apply_compression(model, "wanda", {"ratio": 0.5, **CALIB}, tok)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight == 0, half_mask(q.weight.detach(), X))
    got = model.model.layers[0].mlp.experts.gate_up_proj.data[3]
    assert torch.equal(got == 0, half_mask(W_e, xs[0]))  # expert 3 calibrated on all tokens
    assert torch.equal(got[got != 0], W_e[got != 0])  # no weight update


def test_sparsegpt_reconstructs_better_than_magnitude(tok):
    """Same sparsity, layer 0 q_proj: ||(W - W_sgpt) X|| < ||(W - W_mag) X|| on the calibration inputs."""
    calib = calib_set(tok)
    ref = build_tiny_model("qwen3_moe")
    seen = []
    h = ref.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    router_capture(ref, calib)
    h.remove()
    X = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen])[calib.stat_mask.reshape(-1)]
    W = ref.model.layers[0].self_attn.q_proj.weight.detach()
    errs = {}
    for method in ("sparsegpt", "magnitude"):
        m = build_tiny_model("qwen3_moe")
        apply_compression(m, method, {"ratio": 0.5, **(CALIB if method != "magnitude" else {})}, tok)
        Wp = m.model.layers[0].self_attn.q_proj.weight.detach()
        errs[method] = float(((W - Wp) @ X.T).norm())
    assert errs["sparsegpt"] < errs["magnitude"]


# ----------------------------------------------------------------------------- expert pruning


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("score", ["frequency", "reap"])
def test_expert_pruning_matches_independent_scores(arch, score, tok, tmp_path):
    model = build_tiny_model(arch)
    dense = ppl(model, tok)
    calib = calib_set(tok)
    xs, outs = router_capture(build_tiny_model(arch), calib)
    ref = {l.index: l for l in moe_layers(build_tiny_model(arch))}
    apply_compression(model, f"prune_{score}", {"ratio": 0.25, **CALIB}, tok)
    for l in moe_layers(model):
        E = ref[l.index].num_experts
        _, w, idx = outs[l.index]
        if score == "frequency":
            s = torch.bincount(idx.reshape(-1), minlength=E).double()
        else:
            ex = ref[l.index].experts
            s = torch.zeros(E, dtype=torch.float64)
            for j in range(E):
                rows = (idx == j).any(-1)
                if rows.any():
                    x = xs[l.index][rows]
                    g, u = (x @ ex.gate_up_proj[j].detach().T).chunk(2, -1)
                    y = (F.silu(g) * u) @ ex.down_proj[j].detach().T
                    s[j] = ((w * (idx == j)).sum(-1)[rows].double() * y.double().norm(dim=-1)).mean()
        dropped = sorted(torch.argsort(s, stable=True)[: int(E * 0.25)].tolist())
        keep = [e for e in range(E) if e not in dropped]
        assert l.num_experts == E - len(dropped) == l.router.weight.shape[0] == l.experts.gate_up_proj.shape[0]
        assert torch.equal(l.experts.down_proj, ref[l.index].experts.down_proj.detach()[keep])
    re = reload(model, tmp_path)
    assert re.num_parameters() < build_tiny_model(arch).num_parameters()
    assert ppl(re, tok) <= PPL_FACTOR * dense


# ----------------------------------------------------------------------------- HC-SMoE


def _scipy_clusters(reps: np.ndarray, r: int):
    from scipy.cluster.hierarchy import linkage
    from scipy.spatial.distance import pdist

    Z = linkage(pdist(reps), method="average")
    n = len(reps)
    members = {i: [i] for i in range(n)}
    for step in range(n - r):
        a, b = int(Z[step, 0]), int(Z[step, 1])
        members[n + step] = members.pop(a) + members.pop(b)
    return sorted((sorted(m) for m in members.values()), key=lambda m: m[0])


def test_agglomerative_equals_scipy_and_naive():
    g = torch.Generator().manual_seed(0)
    for n, r in ((8, 3), (16, 6), (12, 1)):
        x = torch.randn(n, 5, generator=g, dtype=torch.float64)
        ours, _ = agglomerative(torch.cdist(x, x), r, "average")
        assert ours == _scipy_clusters(x.numpy(), r)
        assert ours == naive_average_linkage(torch.cdist(x, x), r)


@pytest.mark.parametrize("arch", ARCHS)
def test_hc_smoe_clusters_and_weights(arch, tok, tmp_path):
    model = build_tiny_model(arch)
    dense = ppl(model, tok)
    orig = build_tiny_model(arch)
    calib = calib_set(tok)
    xs, outs = router_capture(orig, calib)
    shared_before = {n: p.clone() for n, p in model.named_parameters() if "shared" in n}
    routers_before = {l.index: l.router.weight.detach().clone() for l in moe_layers(model)}
    apply_compression(model, "hc_smoe", {"num_clusters": 5, **CALIB}, tok)
    info = model.fare_compression["details"]["layers"]
    for l, lo in zip(moe_layers(model), moe_layers(orig)):
        ex = lo.experts
        E = lo.num_experts
        x = xs[l.index]
        reps = []
        for j in range(E):
            g, u = (x @ ex.gate_up_proj[j].detach().T).chunk(2, -1)
            reps.append(((F.silu(g) * u) @ ex.down_proj[j].detach().T).double().mean(0))
        clusters = _scipy_clusters(torch.stack(reps).numpy(), 5)
        assert info[str(l.index)]["clusters"] == clusters
        f = torch.bincount(outs[l.index][2].reshape(-1), minlength=E).double()
        f = f / f.sum()
        for G in clusters:
            for name in ("gate_up_proj", "down_proj"):
                W = getattr(ex, name).detach().double()
                expect = sum(f[i] * W[i] for i in G) / (sum(f[i] for i in G) + torch.finfo(torch.float32).eps)
                for i in G:
                    torch.testing.assert_close(getattr(l.experts, name).data[i].double(), expect, rtol=1e-5, atol=1e-6)
        assert torch.equal(l.router.weight, routers_before[l.index])  # router unchanged
        assert len({tuple(l.experts.down_proj.data[i].flatten()[:4].tolist()) for i in range(E)}) == 5
    for n, p in model.named_parameters():
        if "shared" in n:
            assert torch.equal(p, shared_before[n])
    re = reload(model, tmp_path)
    assert ppl(re, tok) <= PPL_FACTOR * dense


def test_hc_smoe_reference_options(tok):
    model = build_tiny_model("qwen3_moe")
    apply_compression(model, "hc_smoe", {"ratio": 0.5, "cluster": "kmeans", "freq_topk": 2, **CALIB}, tok)
    for info in model.fare_compression["details"]["layers"].values():
        assert sorted(i for G in info["clusters"] for i in G) == list(range(8))
        assert 1 <= len(info["clusters"]) <= 4


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs(tok, monkeypatch):
    from transformers import AutoModelForCausalLM

    from fare_core.tiny import tiny_config

    m = build_tiny_model("qwen3_moe")
    for bad in (0, 1, 1.5, -0.1):
        with pytest.raises(ValueError, match="outside \\(0, 1\\)"):
            apply_compression(m, "magnitude", {"ratio": bad})
    with pytest.raises(ValueError, match="more clusters than the 8 experts"):
        apply_compression(m, "hc_smoe", {"num_clusters": 9, **CALIB}, tok)
    with pytest.raises(ValueError, match="unknown compression method 'gptq'; allowed: .*gptq_w4a16"):
        apply_compression(m, "gptq", {})
    with pytest.raises(ValueError, match="unknown parameter\\(s\\) sparsity"):
        apply_compression(m, "magnitude", {"sparsity": 0.5})
    cfg = tiny_config("qwen3_moe")
    cfg.moe_intermediate_size = 30  # down_proj input dim 30
    torch.manual_seed(0)
    odd = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(ValueError, match="2:4 sparsity needs the input dimension divisible by 4; .*down_proj has 30"):
        apply_compression(odd, "magnitude", {"structure": "2:4"})
    import importlib

    real = importlib.import_module

    def fake(name, *a, **k):
        if name in ("bitsandbytes", "llmcompressor"):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", fake)
    for method in ("bnb_nf4", "gptq_w4a16"):
        with pytest.raises(MissingBackendError, match="fare-moe\\[compress\\]"):
            apply_compression(m, method, {}, tok)


def test_statistics_skip_padding_and_follow_refusal_mask(tok):
    """Routing counts cover exactly the stat tokens: padding never counts, refusal mode counts replies only."""
    from fare_compression.calibration import CalibrationSet
    from fare_compression.expert_prune import frequency_scores

    model = build_tiny_model("qwen3_moe")
    c = build_calibration(tok, n=4, seq_len=32, p=0.5)
    attn = c.attention_mask.clone()
    attn[:, 20:] = 0  # pretend the tails are padding
    ids = c.input_ids.masked_fill(attn == 0, tok.pad_token_id)
    padded = CalibrationSet(ids, attn, attn.bool(), c.sources, c.manifest)
    for cal in (padded, build_calibration(tok, n=4, seq_len=32, p=0.5, stats_tokens="refusal")):
        counts = frequency_scores(model, cal)
        for l in moe_layers(model):
            assert counts[l.index].sum() == int(cal.stat_mask.sum()) * l.top_k
    # the counts over the padded set equal those of the unpadded prefixes run on their own
    short = CalibrationSet(c.input_ids[:, :20], c.attention_mask[:, :20], c.stat_mask[:, :20], c.sources, c.manifest)
    a, b = frequency_scores(model, padded), frequency_scores(model, short)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_wanda_routed_token_statistics(tok):
    """tokens="routed": expert 2's gate_up mask uses only the tokens the router sent to expert 2."""
    calib = calib_set(tok)
    ref = build_tiny_model("qwen3_moe")
    xs, outs = router_capture(ref, calib)
    sel = (outs[0][2] == 2).any(-1)
    W = ref.model.layers[0].mlp.experts.gate_up_proj.detach()[2].double()
    score = W.abs() * xs[0][sel].double().norm(dim=0)
    expected = torch.zeros_like(score, dtype=torch.bool).scatter_(1, score.argsort(1)[:, : W.shape[1] // 2], True)
    model = build_tiny_model("qwen3_moe")
    apply_compression(model, "wanda", {"ratio": 0.5, "tokens": "routed", **CALIB}, tok)
    assert torch.equal(model.model.layers[0].mlp.experts.gate_up_proj.data[2] == 0, expected)
