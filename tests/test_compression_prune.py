"""prune_experts: pruned model == unmodified model with the removed experts masked, and it survives
save_pretrained/from_pretrained (no missing/unexpected keys, identical logits) on 8 architectures."""

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from fare_compression.prune import prune_experts
from fare_core.adapters import moe_layers
from fare_core.tiny import TINY_CONFIGS, build_tiny_model

ARCHS = list(TINY_CONFIGS)


class _MaskLogits(TorchFunctionMode):
    """Inside one router: -inf on masked columns of the first E-wide linear output (the logits)."""

    def __init__(self, mask):
        super().__init__()
        self.mask, self.done = mask, False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (F.linear, torch.matmul, torch.mm) and not self.done and out.shape[-1] == self.mask.numel():
            self.done = True
            out = out.masked_fill(self.mask, float("-inf"))
        return out


def _mask_experts(model, drop: dict[int, list[int]]):
    """Independent oracle: make dropped experts unselectable (logits and selection biases -inf)."""
    handles = []
    for layer in moe_layers(model):
        mask = torch.zeros(layer.num_experts, dtype=torch.bool)
        mask[drop[layer.index]] = True
        with torch.no_grad():
            for _, b in layer.selection_biases:
                b.masked_fill_(mask.view([1] * (b.dim() - 1) + [-1]), float("-inf"))
        state = {}

        def pre(mod, args, mask=mask, state=state):
            state["m"] = _MaskLogits(mask)
            state["m"].__enter__()

        def post(mod, args, out, state=state):
            state.pop("m").__exit__(None, None, None)

        handles += [layer.router.register_forward_pre_hook(pre), layer.router.register_forward_hook(post)]
    return handles


def _keep_drop(model):
    keep, drop = {}, {}
    for layer in moe_layers(model):
        E = layer.num_experts
        G = getattr(layer.router, "num_group", 1) or 1
        size = E // G
        # drop the expert at offset (index % size) of every group: different ids per layer
        d = [g * size + (layer.index + 1) % size for g in range(G)]
        drop[layer.index] = d
        keep[layer.index] = [e for e in range(E) if e not in d]
    return keep, drop


@pytest.mark.parametrize("arch", ARCHS)
def test_prune_equals_mask_and_round_trips(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    ids = torch.randint(2, 258, (2, 12))
    ref = build_tiny_model(arch)
    keep, drop = _keep_drop(ref)
    E = moe_layers(ref)[0].num_experts
    orig = {l.index: {n: p.detach().clone() for n, p in l.experts.named_parameters()} for l in moe_layers(ref)}
    shared = {(l.index, k, n): p.detach().clone() for l in moe_layers(ref) for k, s in l.shared.items() for n, p in s.named_parameters()}
    _mask_experts(ref, drop)
    with torch.no_grad():
        masked = ref(ids).logits

    model = prune_experts(build_tiny_model(arch), keep)
    E_new = len(next(iter(keep.values())))
    assert E_new < E
    with torch.no_grad():
        pruned = model(ids).logits
    torch.testing.assert_close(pruned, masked, rtol=1e-5, atol=1e-5)
    for l in moe_layers(model):
        assert l.num_experts == E_new and l.router.weight.shape[0] == E_new
        for n, p in l.experts.named_parameters():
            assert p.shape[0] == E_new
            assert torch.equal(p, orig[l.index][n][keep[l.index]])
    for l in moe_layers(model):  # shared experts untouched
        for k, s in l.shared.items():
            for n, p in s.named_parameters():
                assert torch.equal(p, shared[(l.index, k, n)])

    model.save_pretrained(tmp_path)
    re, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    text = re.config.get_text_config()
    assert E_new in [getattr(text, f, None) for f in ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")]
    with torch.no_grad():
        torch.testing.assert_close(re.eval()(ids).logits, pruned, rtol=0, atol=0)


def test_prune_validation():
    m = build_tiny_model("olmoe")
    layers = [l.index for l in moe_layers(m)]
    full = {i: list(range(6)) for i in layers}
    with pytest.raises(ValueError, match="out of range"):
        prune_experts(m, {**full, layers[0]: [0, 1, 2, 3, 4, 8]})
    with pytest.raises(ValueError, match="same number"):
        prune_experts(m, {**full, layers[0]: [0, 1, 2]})
    with pytest.raises(ValueError, match="fewer than top_k"):
        prune_experts(m, {i: [0] for i in layers})
    with pytest.raises(ValueError, match="missing layers"):
        prune_experts(m, {layers[0]: [0, 1]})
    with pytest.raises(ValueError, match="duplicate"):
        prune_experts(m, {**full, layers[0]: [0, 0, 1, 2, 3, 4]})
    d = build_tiny_model("deepseek_v2")
    dl = [l.index for l in moe_layers(d)]
    with pytest.raises(ValueError, match="per group"):
        prune_experts(d, {i: list(range(12)) for i in dl})
