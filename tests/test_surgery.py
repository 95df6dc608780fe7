"""Routing surgery on tiny random models of every core MoE family.

Independent truth: the unmodified model (bit identity), ``output_router_logits`` plus a per-family
re-implementation of the routing rule written here from the transformers source (selection
reference), and the structurally pruned model (masking oracle).
"""

import copy

import pytest
import torch

from fare_compression.prune import prune_experts
from fare_core.errors import FareError
from fare_core.tiny import TINY_CONFIGS, build_tiny_model
from fare_models.surgery import ARR, ExpertMask, Recorder, RoutingController, RoutingEdit, load_routing

ARCHS = list(TINY_CONFIGS)
MONOTONE = {"olmoe", "qwen3_moe", "qwen2_moe", "mixtral", "gpt_oss"}  # plain top-k of a monotone score
BIAS_AFTER_SCORE = {"ernie4_5_moe", "deepseek_v3"}


@pytest.fixture(scope="module", params=ARCHS)
def arch(request):
    model = build_tiny_model(request.param)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 258, (3, 19), generator=gen)
    return request.param, model, ids


def reference_selection(model_type, layer, z):
    """Top-k expert sets computed from raw logits z [N, E], following each family's router code."""
    r, k = layer.router, layer.top_k
    z = z.float()
    if model_type == "gpt_oss":
        return torch.topk(z, k, dim=-1).indices
    if model_type == "ernie4_5_moe":
        return torch.topk(z.softmax(-1) + r.moe_statics.e_score_correction_bias, k, dim=-1).indices
    if model_type == "deepseek_v2":
        p = z.softmax(-1)
        G = r.num_group
        group_scores = p.view(-1, G, p.shape[-1] // G).max(-1).values
        keep = torch.zeros_like(group_scores).scatter_(1, group_scores.topk(r.topk_group, dim=-1).indices, 1)
        p = p.masked_fill(~keep.repeat_interleave(p.shape[-1] // G, dim=-1).bool(), 0.0)
        return torch.topk(p, k, dim=-1).indices
    if model_type == "deepseek_v3":
        s = z.sigmoid() + r.e_score_correction_bias
        G = r.num_group
        group_scores = s.view(-1, G, s.shape[-1] // G).topk(2, dim=-1).values.sum(-1)
        keep = torch.zeros_like(group_scores).scatter_(1, group_scores.topk(r.topk_group, dim=-1).indices, 1)
        s = s.masked_fill(~keep.repeat_interleave(s.shape[-1] // G, dim=-1).bool(), float("-inf"))
        return torch.topk(s, k, dim=-1).indices
    return torch.topk(z.softmax(-1), k, dim=-1).indices  # olmoe, qwen*_moe, mixtral


class Tap(RoutingEdit):
    """Test observer: keeps (raw logits, selected indices) of every router call."""

    def __init__(self, model):
        super().__init__(model)
        self.calls = {}

    def observes(self, layer):
        return True

    def observe(self, layer, raw, edited, indices):
        self.calls.setdefault(layer.index, []).append((raw, indices))


def same_sets(a, b):
    return torch.equal(a.sort(-1).values, b.sort(-1).values)


def test_lam0_bit_identical_fp32_and_bf16(arch):
    name, model, ids = arch
    layers = RoutingController.of(model).layers
    phi = torch.rand(len(layers), layers[0].num_experts)
    for dtype in (torch.float32, torch.bfloat16):
        m = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
        with torch.no_grad():
            base = m(ids).logits
            with ARR(m, phi, lam=0.0):
                steered = m(ids).logits
        assert torch.equal(base, steered), f"{name} {dtype}: lam=0 changed the logits"
    assert not RoutingController.of(model)._handles, "hooks left attached after exit"


def test_recorder_matches_output_router_logits_and_padding_is_excluded(arch):
    name, model, ids = arch
    layers = RoutingController.of(model).layers
    attn = torch.ones_like(ids)
    attn[1, :7] = 0  # left padding in row 1
    attn[2, :2] = 0
    with torch.no_grad():
        base = model(ids, attention_mask=attn, output_router_logits=True)
        with Recorder(model) as rec, Tap(model) as tap:
            out = model(ids, attention_mask=attn)
    assert torch.equal(out.logits, base.logits), "recording changed the model output"
    valid = attn.reshape(-1).bool()
    assert rec.tokens.tolist() == [[int(valid.sum())]] * len(layers)
    for pos, layer in enumerate(layers):
        z = base.router_logits[pos]
        raw, idx = tap.calls[layer.index][0]
        assert torch.equal(raw, z), f"{name}: recorded logits differ from output_router_logits"
        ref = reference_selection(name, layer, z)
        assert same_sets(idx, ref), f"{name} layer {layer.index}: recorded experts != routing rule"
        expected = torch.bincount(ref[valid].reshape(-1), minlength=layer.num_experts)
        assert rec.counts[pos, :, 0].tolist() == expected.tolist()
        assert int(rec.counts[pos].sum()) == int(valid.sum()) * layer.top_k


def test_arr_equals_routing_rule_on_penalised_logits(arch):
    """Eq. 6: the selection under ARR is the family's rule applied to z - lam*phi (first MoE layer)."""
    name, model, ids = arch
    layers = RoutingController.of(model).layers
    first = layers[0]
    phi = torch.rand(len(layers), first.num_experts, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        base = model(ids, output_router_logits=True)
        for lam in (0.5, 2.0, 8.0):
            with Tap(model) as tap, ARR(model, phi, lam=lam, layers=[first.index]):
                steered = model(ids)
            raw, idx = tap.calls[first.index][0]
            assert torch.equal(raw, base.router_logits[0]), "ARR must see the unmodified logits z"
            expected = reference_selection(name, first, base.router_logits[0] - lam * phi[0])
            assert same_sets(idx, expected), f"{name} lam={lam}: selection != rule on z - lam*phi"
            assert not torch.equal(steered.logits, base.logits)


def test_arr_penalty_removes_the_penalised_expert(arch):
    name, model, ids = arch
    layers = RoutingController.of(model).layers
    first = layers[0]
    with torch.no_grad(), Recorder(model) as rec:
        model(ids)
    top = int(rec.counts[0, :, 0].argmax())
    phi = torch.zeros(len(layers), first.num_experts)
    phi[0, top] = 1.0
    target = "selection" if name in BIAS_AFTER_SCORE else "logits"
    with torch.no_grad(), Recorder(model) as rec2, ARR(model, phi, lam=50.0, layers=[first.index], target=target):
        model(ids)
    assert rec.counts[0, top, 0] > 0 and rec2.counts[0, top, 0] == 0, f"{name}: penalised expert still selected"


@pytest.mark.parametrize("name", sorted(MONOTONE))
def test_arr_per_token_phi_mass_is_non_increasing_in_lam(name):
    model = build_tiny_model(name)
    ids = torch.randint(2, 258, (2, 23), generator=torch.Generator().manual_seed(5))
    layers = RoutingController.of(model).layers
    phi = torch.rand(len(layers), layers[0].num_experts, generator=torch.Generator().manual_seed(7))
    masses = []
    for lam in (0.0, 0.5, 2.0, 8.0, 32.0):
        with torch.no_grad(), Tap(model) as tap, ARR(model, phi, lam=lam, layers=[layers[0].index]):
            model(ids)
        idx = tap.calls[layers[0].index][0][1]
        masses.append(phi[0][idx].sum(-1))
    for before, after in zip(masses, masses[1:]):
        assert bool((after <= before + 1e-6).all())
    assert masses[-1].mean() < masses[0].mean()


@pytest.mark.parametrize("name", sorted(BIAS_AFTER_SCORE))
def test_bias_after_score_routers_warn_when_arr_cannot_remove_an_expert(name):
    model = build_tiny_model(name)
    layers = RoutingController.of(model).layers
    first = layers[0]
    bias = first.selection_biases[0][1].reshape(-1)
    strongest = int(bias.argmax())
    phi = torch.zeros(len(layers), first.num_experts)
    phi[0, strongest] = 1.0
    with pytest.warns(UserWarning, match=rf"{first.index}: \[{strongest}\]"):
        ARR(model, phi, lam=1.0, layers=[first.index])


def test_masked_model_equals_pruned_model(arch):
    name, model, ids = arch
    layers = RoutingController.of(model).layers
    E = layers[0].num_experts
    drop = [0, 5] if E == 8 else [0, 5, 10, 15]  # one per routing group for 16 experts in 4 groups
    keep = {layer.index: [e for e in range(E) if e not in drop] for layer in layers}
    with torch.no_grad():
        with ExpertMask(model, [(layer.index, e) for layer in layers for e in drop]), Recorder(model) as rec:
            masked = model(ids).logits
        assert int(rec.counts[:, drop, :].sum()) == 0, "a masked expert was selected"
        pruned = prune_experts(copy.deepcopy(model), keep)(ids).logits
        unmasked = model(ids).logits
    torch.testing.assert_close(masked, pruned, rtol=0, atol=1e-6)
    assert not torch.equal(masked, unmasked)


@pytest.mark.parametrize("name", ["qwen2_moe", "ernie4_5_moe", "deepseek_v2", "deepseek_v3"])
def test_shared_experts_untouched(name):
    model = build_tiny_model(name)
    ids = torch.randint(2, 258, (2, 13), generator=torch.Generator().manual_seed(2))
    layers = RoutingController.of(model).layers
    assert layers[0].shared, f"{name} should have shared experts"
    before = {k: v.clone() for k, v in model.state_dict().items() if "shared" in k}
    outputs = {}

    def grab(key):
        def hook(module, args, output):
            outputs[key] = output.clone()
        return hook

    shared = next(iter(layers[0].shared.values()))
    phi = torch.rand(len(layers), layers[0].num_experts)
    with torch.no_grad():
        h = shared.register_forward_hook(grab("base"))
        model(ids)
        h.remove()
        h = shared.register_forward_hook(grab("edited"))
        with ARR(model, phi, lam=5.0), ExpertMask(model, [(layers[0].index, 1)]):
            model(ids)
        h.remove()
    assert torch.equal(outputs["base"], outputs["edited"]), f"{name}: shared expert output changed"
    after = {k: v for k, v in model.state_dict().items() if "shared" in k}
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_edits_compose_and_detach_cleanly():
    model = build_tiny_model("qwen2_moe")
    ids = torch.randint(2, 258, (2, 11), generator=torch.Generator().manual_seed(0))
    layers = RoutingController.of(model).layers
    phi = torch.rand(len(layers), layers[0].num_experts)
    with torch.no_grad():
        base = model(ids).logits
        with ARR(model, phi, lam=3.0) as arr, ExpertMask(model, [(layers[1].index, 2)]), Recorder(model) as rec:
            model(ids)
            assert len(RoutingController.of(model)._handles) == 2 * len(layers)
        assert arr.lam == 3.0 and int(rec.counts[1, 2].sum()) == 0
        assert all(not layer.router._forward_hooks and not layer.router._forward_pre_hooks for layer in layers)
        assert torch.equal(model(ids).logits, base)


def test_recorder_memory_is_independent_of_tokens_and_trace_shards(tmp_path):
    model = build_tiny_model("olmoe")
    ids = torch.randint(2, 258, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), Recorder(model, groups=["a", "b"], trace_dir=tmp_path / "trace", shard_tokens=40) as rec:
        sizes = []
        for step in range(3):
            rec.set_groups([0, 1])
            model(ids, output_router_logits=step == 0)
            state = [rec._counts, rec._prob_sums, rec._tokens, *(t for acc in rec._acc.values() for t in acc.values())]
            sizes.append(sum(t.numel() for t in state))
    assert len(set(sizes)) == 1
    assert rec.tokens.tolist() == [[48, 48]] * 4
    torch.testing.assert_close(rec.prob_sums.sum(1), rec.tokens.double())  # softmax rows sum to 1
    shards = sorted((tmp_path / "trace").glob("trace-*.safetensors"))
    assert len(shards) == 2  # 32 tokens per forward: flushed at 64 >= 40 tokens, then the rest at exit
    from safetensors.torch import load_file

    total = sum(load_file(str(s))["layer0.selected"].shape[0] for s in shards)
    assert total == 96
    rec.save(tmp_path / "agg")
    tensors, meta = load_routing(tmp_path / "agg")
    assert meta["groups"] == ["a", "b"] and torch.equal(tensors["counts"], rec.counts)
    lines = (tmp_path / "agg" / "routing.csv").read_text().splitlines()
    assert len(lines) == 1 + 4 * 2 * 8


def test_bad_edits_give_clear_errors():
    model = build_tiny_model("olmoe")
    layers = RoutingController.of(model).layers
    phi = torch.rand(len(layers), 8)
    cases = [
        (lambda: ARR(model, phi, lam=-1.0), "lam"),
        (lambda: ARR(model, phi, lam=1.0, layers=[9]), "layer 9 is not an MoE layer"),
        (lambda: ARR(model, torch.rand(len(layers), 5), lam=1.0), "experts"),
        (lambda: ARR(model, phi, lam=1.0, target="selection"), "arr_target='selection'"),
        (lambda: ExpertMask(model, [(0, 8)]), "expert 8 out of range"),
        (lambda: ExpertMask(model, [(0, e) for e in range(7)]), "fewer than top_k"),
        (lambda: ARR(model, torch.where(torch.arange(8) == 3, float("nan"), phi), lam=1.0), "non-finite values"),
    ]
    for make, message in cases:
        with pytest.raises(FareError, match=message) as info:
            make()
        assert "\n" not in str(info.value)
