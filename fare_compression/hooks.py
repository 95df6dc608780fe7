"""Calibration forward passes and per-expert computation on fused transformers-5 experts.

Every routed experts module in transformers 5 is called as ``experts(hidden [T,H], top_k_index
[T,k], top_k_weights [T,k])`` on flattened tokens, and holds ``gate_up_proj [E,2I,H]`` (gate rows
first) and ``down_proj [E,H,I]``; E_i(x) = W_down,i (act(W_gate,i x) * W_up,i x). A forward
pre-hook on the experts therefore sees the MoE input, the selection and the combine weights
without depending on the dispatch implementation (eager / batched_mm / grouped_mm).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from fare_core.adapters import MoELayer, model_type_of, moe_layers

from .calibration import CalibrationSet


class UnsupportedLayoutError(ValueError):
    """The experts of this architecture are not stored as [E,2I,H] / [E,H,I] (e.g. GPT-OSS)."""


def check_layout(layer: MoELayer, model_type: str = "") -> None:
    ex = layer.experts
    gu, dn = getattr(ex, "gate_up_proj", None), getattr(ex, "down_proj", None)
    if not (isinstance(gu, torch.Tensor) and isinstance(dn, torch.Tensor) and gu.dim() == 3 and dn.dim() == 3):
        raise UnsupportedLayoutError(f"{model_type}: experts have no fused gate_up_proj/down_proj tensors")
    E, two_i, H = gu.shape
    if dn.shape != (E, H, two_i // 2) or getattr(ex, "gate_up_proj_bias", None) is not None:
        raise UnsupportedLayoutError(
            f"{model_type}: experts layout gate_up_proj{tuple(gu.shape)} down_proj{tuple(dn.shape)} (transposed or "
            "with biases, e.g. GPT-OSS) is not supported; supported: [E,2I,H] and [E,H,I] without bias"
        )


def expert_hidden(experts: nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
    """act(W_gate x) * W_up x for expert e: the input of down_proj[e], [T, I]."""
    gate, up = nn.functional.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
    return experts.act_fn(gate) * up


def expert_output(experts: nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
    """Ungated E_e(x), [T, H]."""
    return nn.functional.linear(expert_hidden(experts, e, x), experts.down_proj[e])


class _Stop(Exception):
    pass


@dataclass
class MaskState:
    """Flattened stat mask of the batch being run ([B*T] bool), read by hooks."""

    flat: torch.Tensor | None = None
    shape: tuple = ()


def run_calibration(model: nn.Module, calib: CalibrationSet, state: MaskState, batch_size: int = 4,
                    stop_after: nn.Module | None = None) -> None:
    """Forward every calibration batch (no grad); ``stop_after``: abort each pass after that module."""
    handle = None
    if stop_after is not None:
        def _raise(mod, args, out):
            raise _Stop
        handle = stop_after.register_forward_hook(_raise)
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for ids, attn, stat in calib.batches(batch_size):
                state.flat, state.shape = stat.reshape(-1).to(device), tuple(stat.shape)
                try:
                    model(input_ids=ids.to(device), attention_mask=attn.to(device), use_cache=False)
                except _Stop:
                    pass
    finally:
        state.flat = None
        if handle is not None:
            handle.remove()


@dataclass
class MoECapture:
    """Per MoE layer (by decoder index): stat-token inputs X [T,H], router logits [T,E],
    selected experts [T,k] and combine weights [T,k] of the unmodified model."""

    x: dict[int, torch.Tensor] = field(default_factory=dict)
    logits: dict[int, torch.Tensor] = field(default_factory=dict)
    topk_idx: dict[int, torch.Tensor] = field(default_factory=dict)
    topk_w: dict[int, torch.Tensor] = field(default_factory=dict)


@contextmanager
def _hooks(handles):
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def capture_moe(model: nn.Module, calib: CalibrationSet, batch_size: int = 4, keep_inputs: bool = True) -> MoECapture:
    """One forward pass of the unmodified model recording every MoE layer's routing on stat tokens."""
    layers = moe_layers(model)
    for layer in layers:
        check_layout(layer, model_type_of(model))
    state, cap = MaskState(), MoECapture()
    acc: dict[str, dict[int, list]] = {"x": {}, "logits": {}, "idx": {}, "w": {}}
    handles = []
    for layer in layers:
        li = layer.index

        def pre(mod, args, li=li):
            x, idx, w = args[0], args[1], args[2]
            m = state.flat
            if keep_inputs:
                acc["x"].setdefault(li, []).append(x.reshape(-1, x.shape[-1])[m].detach().float().cpu())
            acc["idx"].setdefault(li, []).append(idx.reshape(-1, idx.shape[-1])[m].detach().cpu())
            acc["w"].setdefault(li, []).append(w.reshape(-1, w.shape[-1])[m].detach().float().cpu())

        def post(mod, args, out, li=li):
            z = out[0] if isinstance(out, tuple) else out
            acc["logits"].setdefault(li, []).append(z.reshape(-1, z.shape[-1])[state.flat].detach().float().cpu())

        handles += [layer.experts.register_forward_pre_hook(pre), layer.router.register_forward_hook(post)]
    with _hooks(handles):
        run_calibration(model, calib, state, batch_size)
    for key, dst in (("x", cap.x), ("logits", cap.logits), ("idx", cap.topk_idx), ("w", cap.topk_w)):
        for li, parts in acc[key].items():
            dst[li] = torch.cat(parts)
    return cap


def selection_counts(topk_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """How many stat tokens selected each expert (top-k membership counts), [E] float64."""
    return torch.bincount(topk_idx.reshape(-1), minlength=num_experts).double()
