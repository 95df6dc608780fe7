"""Structural expert pruning of fused transformers-5 MoE layers.

``prune_experts(model, keep)`` removes routed experts for real: every router parameter/buffer,
every fused expert tensor (``gate_up_proj [E,2I,H]``, ``down_proj [E,H,I]``, their biases) and every
block-held selection bias is ``index_select``-ed along its expert dimension, the modules'
``num_experts`` counters are updated, and the config's canonical routed-expert count field
(``num_experts`` / ``num_local_experts`` / ``n_routed_experts`` / ``moe_num_experts``) is set to
the new count, so ``save_pretrained`` writes a smaller checkpoint that ``from_pretrained`` reloads
with no missing or unexpected keys (research note transformers_moe_internals.md section 5.2).

Masking experts with a ``-inf`` router bias and pruning them give the same model: kept experts keep
their relative order, so the softmax over the kept logits and the top-k among them are unchanged.
Shared experts are never touched.
"""

from __future__ import annotations

import torch
from torch import nn

from fare_core.adapters import EXPERT_COUNT_FIELDS, MoELayer, moe_layers
from fare_core.errors import FareError


def _text_config(model):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _count_fields(cfg, num_experts: int) -> list[str]:
    """Canonical config fields holding the routed-expert count (aliases resolved via attribute_map)."""
    amap = getattr(cfg, "attribute_map", {}) or {}
    fields = []
    for f in EXPERT_COUNT_FIELDS:
        canon = amap.get(f, f)
        if canon not in fields and cfg.__dict__.get(canon) == num_experts:
            fields.append(canon)
    return fields


def _expert_dim(name: str, t: torch.Tensor, num_experts: int, experts_container: bool) -> int | None:
    """The dimension of ``t`` indexing experts, or None when ``t`` has none."""
    if experts_container:  # fused expert tensors always lead with the expert dimension
        if t.dim() == 0 or t.shape[0] != num_experts:
            raise FareError(f"expert tensor {name}{tuple(t.shape)} does not lead with {num_experts} experts")
        return 0
    dims = [d for d, s in enumerate(t.shape) if s == num_experts]
    if not dims:
        return None
    if len(dims) > 1:
        if name.endswith("weight") and dims[0] == 0:  # router weight [E, H] with H == E
            return 0
        raise FareError(f"{name}{tuple(t.shape)}: ambiguous expert dimension (several dims of size {num_experts})")
    return dims[0]


@torch.no_grad()
def _index_expert_dim(module: nn.Module, num_experts: int, keep: torch.Tensor, recurse: bool, experts_container: bool):
    """index_select every parameter/buffer of ``module`` along its expert dim; fix ``num_experts`` attrs."""
    for mod in module.modules() if recurse else [module]:
        tensors = list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False))
        for name, t in tensors:
            if t is None:
                continue
            d = _expert_dim(name, t, num_experts, experts_container)
            if d is None:
                continue
            new = t.data.index_select(d, keep.to(t.device)).contiguous()
            if isinstance(t, nn.Parameter):
                setattr(mod, name, nn.Parameter(new, requires_grad=t.requires_grad))
            else:
                mod._buffers[name] = new
        for attr in ("num_experts", "n_routed_experts", "num_local_experts"):
            if getattr(mod, attr, None) == num_experts and not isinstance(mod, nn.Linear):
                setattr(mod, attr, len(keep))
        if isinstance(mod, nn.Linear) and mod.out_features == num_experts:
            mod.out_features = len(keep)


def _group_count(layer: MoELayer) -> int:
    for attr in ("num_group", "n_group"):
        g = getattr(layer.router, attr, None)
        if isinstance(g, int) and g > 1:
            return g
    return 1


def validate_keep(layers: list[MoELayer], keep: dict[int, list[int]]) -> dict[int, torch.Tensor]:
    """Check ``keep`` against the model's MoE layers; return sorted id tensors per layer index."""
    if not isinstance(keep, dict) or not keep:
        raise FareError("keep must be a non-empty dict {decoder-layer index: [expert ids]}")
    indices = [layer.index for layer in layers]
    extra = sorted(set(keep) - set(indices))
    if extra:
        raise FareError(f"keep names layers {extra} that are not MoE layers; MoE layers are {indices}")
    missing = sorted(set(indices) - set(keep))
    if missing:
        raise FareError(
            f"keep must list every MoE layer (the config holds one expert count); missing layers {missing}"
        )
    counts = {li: len(ids) for li, ids in keep.items()}
    if len(set(counts.values())) != 1:
        raise FareError(f"every MoE layer must keep the same number of experts; got counts {counts}")
    out = {}
    for layer in layers:
        ids = list(keep[layer.index])
        E, k = layer.num_experts, layer.top_k
        bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < E]
        if bad:
            raise FareError(f"layer {layer.index}: expert ids {bad} out of range; allowed 0..{E - 1}")
        if len(set(ids)) != len(ids):
            raise FareError(f"layer {layer.index}: duplicate expert ids in {ids}")
        if len(ids) < k:
            raise FareError(f"layer {layer.index}: keeping {len(ids)} experts, fewer than top_k={k}")
        G = _group_count(layer)
        if G > 1:
            t = torch.tensor(ids)
            per_group = torch.bincount(t // (E // G), minlength=G).tolist()
            if len(set(per_group)) != 1:
                raise FareError(
                    f"layer {layer.index}: group-limited router with {G} groups of {E // G} experts needs the "
                    f"same number kept per group; got {per_group}"
                )
            topk_group = getattr(layer.router, "topk_group", G)
            if per_group[0] * topk_group < k:
                raise FareError(
                    f"layer {layer.index}: {per_group[0]} kept per group x topk_group={topk_group} < top_k={k}"
                )
        out[layer.index] = torch.tensor(sorted(ids), dtype=torch.long)
    return out


@torch.no_grad()
def prune_experts(model: nn.Module, keep: dict[int, list[int]]) -> nn.Module:
    """Keep only the listed routed experts in every MoE layer (in place); returns ``model``.

    keep: {decoder-layer index (MoELayer.index): [expert ids]}, the same count in every MoE layer;
    for group-limited routers (DeepSeek) the same count in every group.
    """
    layers = moe_layers(model)
    ids = validate_keep(layers, keep)
    cfg = _text_config(model)
    E = layers[0].num_experts
    if any(layer.num_experts != E for layer in layers):
        raise FareError("MoE layers disagree on the expert count; cannot prune")
    fields = _count_fields(cfg, E)
    if not fields:
        raise FareError(f"no config field among {EXPERT_COUNT_FIELDS} holds the expert count {E}")
    E_new = len(next(iter(ids.values())))
    for layer in layers:
        kt = ids[layer.index]
        _index_expert_dim(layer.router, E, kt, recurse=True, experts_container=False)
        _index_expert_dim(layer.experts, E, kt, recurse=True, experts_container=True)
        _index_expert_dim(layer.block, E, kt, recurse=False, experts_container=False)
    for f in fields:
        setattr(cfg, f, E_new)
    return model
