"""bitsandbytes 8-bit (LLM.int8) and 4-bit (NF4/FP4) with the routed experts really quantised.

transformers 5's ``BitsAndBytesConfig`` path replaces only ``nn.Linear`` and leaves the fused
expert tensors ([E,2I,H], [E,H,I]) in full precision (compression_libs.md: confirmed at run time
on Qwen3-MoE, OLMoE, Mixtral and ERNIE). Here every routed experts module is first *unfused* into
:class:`UnfusedExperts` (per expert ``gate_proj``/``up_proj``/``down_proj`` ``nn.Linear``, gate =
rows [0:I] of ``gate_up_proj[e]``, up = rows [I:2I]) with the same
``forward(hidden, top_k_index, top_k_weights)``; then every Linear of the decoder layers except
routers and the 1-output shared-expert gate is swapped for ``bnb.nn.Linear8bitLt``
(``has_fp16_weights=False``, outlier ``threshold=6.0``) or ``bnb.nn.Linear4bit`` (``nf4`` by
default, bnb's blocksize 64). Embeddings, norms, routers and ``lm_head`` stay in full precision.

Saving: :func:`dequantized_state_dict` gives the original (fused) layout holding the exact
dequantised values, so ``fare compress`` writes an ordinary checkpoint that ``from_pretrained``
loads; re-applying the same bnb method to it reproduces the same quantised weights (NF4 and
int8 absmax quantisation is idempotent on its own output), which is what the manifest's
``reapply_on_load`` asks ``fare_moe`` to do.
"""

from __future__ import annotations

import torch
from torch import nn

from fare_core.adapters import model_type_of, moe_layers
from fare_core.errors import FareError

from .hooks import check_layout
from .layerwise import decoder_layers

QUANT_TYPES = ("nf4", "fp4")


class UnfusedExperts(nn.ModuleList):
    """Per-expert Linear modules with the fused experts' call signature (eager dispatch)."""

    def __init__(self, fused: nn.Module):
        E, two_i, H = fused.gate_up_proj.shape
        inter = two_i // 2
        mods = []
        for e in range(E):
            m = nn.Module()
            m.gate_proj = nn.Linear(H, inter, bias=False)
            m.up_proj = nn.Linear(H, inter, bias=False)
            m.down_proj = nn.Linear(inter, H, bias=False)
            with torch.no_grad():
                m.gate_proj.weight.copy_(fused.gate_up_proj.data[e, :inter])
                m.up_proj.weight.copy_(fused.gate_up_proj.data[e, inter:])
                m.down_proj.weight.copy_(fused.down_proj.data[e])
            mods.append(m)
        super().__init__(mods)
        self.__dict__["act_fn"] = fused.act_fn  # not a registered child: keeps the list = experts only
        self.num_experts = E

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for e in torch.unique(top_k_index).tolist():
            tok, pos = torch.where(top_k_index == e)
            x = hidden_states[tok]
            m = self[e]
            y = m.down_proj(self.act_fn(m.gate_proj(x)) * m.up_proj(x))
            out.index_add_(0, tok, (y * top_k_weights[tok, pos, None]).to(out.dtype))
        return out


def unfuse_experts(model) -> list[str]:
    """Replace every fused routed-experts module by :class:`UnfusedExperts`; returns their names."""
    names = []
    mt = model_type_of(model)
    for layer in moe_layers(model):
        check_layout(layer, mt)
        block_name = layer.name.rpartition(".")[0]
        layer.block.experts = UnfusedExperts(layer.experts)
        names.append(f"{block_name}.experts")
    return names


def _quantized_linear(lin: nn.Linear, bits: int, threshold: float, quant_type: str, double_quant: bool):
    import bitsandbytes as bnb

    W = lin.weight.data.float().cpu()
    bias = lin.bias is not None
    if bits == 8:
        q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=bias, has_fp16_weights=False,
                                threshold=threshold)
        q.weight = bnb.nn.Int8Params(W, requires_grad=False, has_fp16_weights=False)
    else:
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=bias, compute_dtype=lin.weight.dtype,
                              quant_type=quant_type, compress_statistics=double_quant)
        q.weight = bnb.nn.Params4bit(W, requires_grad=False, quant_type=quant_type,
                                     compress_statistics=double_quant)
    if bias:
        q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
    return q.to(lin.weight.device)  # quantisation happens on .to()


def quantize_bnb(model, bits: int = 8, threshold: float = 6.0, quant_type: str = "nf4", double_quant: bool = False,
                 experts: str = "quantize"):
    """Quantise the decoder Linears (+ unfused routed experts) in place; returns (model, info)."""
    if bits not in (4, 8):
        raise FareError(f"bits={bits!r}; allowed: 4, 8")
    if quant_type not in QUANT_TYPES:
        raise FareError(f"quant_type={quant_type!r}; allowed: {', '.join(QUANT_TYPES)}")
    if experts not in ("quantize", "skip"):
        raise FareError(f"experts={experts!r}; allowed: quantize, skip (attention/shared only, must be reported)")
    dtype = next(model.parameters()).dtype  # the dense dtype, for the saved (dequantised) copy
    unfused = unfuse_experts(model) if experts == "quantize" else []
    skip = set()
    for layer in moe_layers(model):
        skip.add(id(layer.router))
    count = 0
    for dl in decoder_layers(model):
        for name, mod in list(dl.named_modules()):
            for child_name, child in list(mod.named_children()):
                if type(child) is nn.Linear and id(child) not in skip and child.out_features > 1:
                    setattr(mod, child_name, _quantized_linear(child, bits, threshold, quant_type, double_quant))
                    count += 1
    model.fare_bnb = {"bits": bits, "unfused": unfused, "dtype": dtype}
    info = {"bits": bits, "quant_type": quant_type if bits == 4 else "int8 (LLM.int8, row-wise absmax)",
            "threshold": threshold if bits == 8 else None, "double_quant": double_quant if bits == 4 else None,
            "experts": experts, "unfused_modules": unfused, "quantized_linears": count,
            "not_quantized": "embeddings, norms, routers, shared_expert_gate, lm_head"}
    return model, info


def _dequantized_weight(mod) -> torch.Tensor:
    import bitsandbytes as bnb

    if isinstance(mod, bnb.nn.Linear8bitLt):
        sd = mod.state_dict()
        return sd["weight"].float() * sd["SCB"].float()[:, None] / 127.0
    if isinstance(mod, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(mod.weight.data, mod.weight.quant_state).float()
    return mod.weight.data.float()


@torch.no_grad()
def dequantized_state_dict(model) -> dict[str, torch.Tensor]:
    """State dict in the model's original fused layout with every quantised weight dequantised."""
    import bitsandbytes as bnb

    out = {}
    qtypes = (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)
    unfused = model.fare_bnb["unfused"]
    for name, mod in model.named_modules():
        prefix = f"{name}." if name else ""
        if any(name.startswith(u + ".") for u in unfused):
            continue  # children of an unfused container: written fused below
        if isinstance(mod, UnfusedExperts):
            gu = [torch.cat([_dequantized_weight(m.gate_proj), _dequantized_weight(m.up_proj)]) for m in mod]
            out[f"{prefix}gate_up_proj"] = torch.stack(gu)
            out[f"{prefix}down_proj"] = torch.stack([_dequantized_weight(m.down_proj) for m in mod])
        elif isinstance(mod, qtypes):
            out[f"{prefix}weight"] = _dequantized_weight(mod)
            if mod.bias is not None:
                out[f"{prefix}bias"] = mod.bias.data.float()
        else:
            skip = getattr(mod, "_non_persistent_buffers_set", set())
            for pn, p in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
                if p is not None and pn not in skip:
                    out[f"{prefix}{pn}"] = p.data
    return out


def dense_copy(model):
    """A plain (original-architecture) model holding the dequantised weights, for save_pretrained.

    Built on the meta device and given the dequantised tensors (cast to the dense dtype) by
    assignment, so saving needs one dense copy of the weights, not two."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    dtype = model.fare_bnb.get("dtype", torch.float32)
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in dequantized_state_dict(model).items()}
    with init_empty_weights(include_buffers=False):  # parameters on meta; buffers (rotary) computed
        fresh = AutoModelForCausalLM.from_config(model.config, dtype=dtype)
    missing, unexpected = fresh.load_state_dict(sd, strict=False, assign=True)
    if getattr(fresh.config, "tie_word_embeddings", False):
        fresh.tie_weights()
        missing = [k for k in missing if not k.startswith("lm_head")]
    meta = [n for n, p in fresh.named_parameters() if p.device.type == "meta"]
    if missing or unexpected or meta:
        raise RuntimeError(f"bnb dense copy: missing {missing}, unexpected {unexpected}, unset {meta}")
    return fresh.eval()


def run(model, calib=None, tokenizer=None, bits=8, threshold=6.0, quant_type="nf4", double_quant=False,
        experts="quantize", device=None, pipeline="layerwise", progress=True):
    """Registry adapter (methods.py). Data-free: every Linear is quantised where its weights live
    (bitsandbytes quantises on ``.to(device)``), so no activation is held and ``device`` is unused."""
    return quantize_bnb(model, bits, threshold, quant_type, double_quant, experts)
