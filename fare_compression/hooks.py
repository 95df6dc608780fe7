"""Calibration forward passes and per-expert computation on fused transformers-5 experts.

Every routed experts module in transformers 5 is called as ``experts(hidden [T,H], top_k_index
[T,k], top_k_weights [T,k])`` on flattened tokens, and holds ``gate_up_proj [E,2I,H]`` (gate rows
first) and ``down_proj [E,H,I]``; E_i(x) = W_down,i (act(W_gate,i x) * W_up,i x). A forward
pre-hook on the experts therefore sees the MoE input, the selection and the combine weights
without depending on the dispatch implementation (eager / batched_mm / grouped_mm).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fare_core.adapters import MoELayer, model_type_of, moe_layers
from fare_core.errors import FareError

from .calibration import CalibrationSet


class UnsupportedLayoutError(FareError):
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


class StopForward(Exception):
    """Raised by a hook to end a calibration forward early (caught by the driver)."""


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
            raise StopForward
        handle = stop_after.register_forward_hook(_raise)
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for ids, attn, stat in calib.batches(batch_size):
                state.flat, state.shape = stat.reshape(-1).to(device), tuple(stat.shape)
                try:
                    model(input_ids=ids.to(device), attention_mask=attn.to(device), use_cache=False)
                except StopForward:
                    pass
    finally:
        state.flat = None
        if handle is not None:
            handle.remove()


class NoHooks:
    """Collector of a layer that needs no statistics (e.g. a dense decoder layer)."""

    def remove(self) -> None:
        pass


class MoECollector:
    """Hooks on one MoE layer recording, for stat tokens only, the experts' input X [T,H] (float32,
    CPU), the router logits [T,E], the selected experts [T,k] and the combine weights [T,k]."""

    def __init__(self, layer: MoELayer, state: MaskState, keep_inputs: bool = True):
        self.layer, self.state, self.keep_inputs = layer, state, keep_inputs
        self._parts: dict[str, list] = {"x": [], "logits": [], "idx": [], "w": []}
        self.x = self.logits = self.topk_idx = self.topk_w = None
        self._handles = [layer.experts.register_forward_pre_hook(self._pre),
                         layer.router.register_forward_hook(self._post)]

    def _pre(self, mod, args):
        x, idx, w = args[0], args[1], args[2]
        m = self.state.flat
        if self.keep_inputs:
            self._parts["x"].append(x.reshape(-1, x.shape[-1])[m].detach().float().cpu())
        self._parts["idx"].append(idx.reshape(-1, idx.shape[-1])[m].detach().cpu())
        self._parts["w"].append(w.reshape(-1, w.shape[-1])[m].detach().float().cpu())

    def _post(self, mod, args, out):
        z = out[0] if isinstance(out, tuple) else out
        self._parts["logits"].append(z.reshape(-1, z.shape[-1])[self.state.flat].detach().float().cpu())

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        cat = {k: torch.cat(v) if v else None for k, v in self._parts.items()}
        self.x, self.logits, self.topk_idx, self.topk_w = cat["x"], cat["logits"], cat["idx"], cat["w"]
        self._parts = {}


def moe_collector(model: nn.Module, keep_inputs: bool = True):
    """``collect`` function for :func:`fare_compression.layerwise.visit_layers` (MoE layers only)."""
    mt = model_type_of(model)
    by_index = {}
    for layer in moe_layers(model):
        check_layout(layer, mt)
        by_index[layer.index] = layer

    def collect(i, decoder_layer, state):
        return MoECollector(by_index[i], state, keep_inputs) if i in by_index else NoHooks()

    return collect, by_index


def selection_counts(topk_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """How many stat tokens selected each expert (top-k membership counts), [E] float64."""
    return torch.bincount(topk_idx.reshape(-1), minlength=num_experts).double()
