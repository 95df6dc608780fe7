"""MoE adapter layer: find every routed MoE layer of a transformers model.

One generic discovery rule covers every MoE causal LM that transformers 5 ships: the model
class names its router class in ``_can_record_outputs["router_logits"]``; each instance of that
class is a router, its parent module is the MoE block, ``block.experts`` holds the fused routed
experts and every other child whose name contains ``shared`` is a shared (always-on) expert.

What cannot be discovered is declared per ``model_type`` in :data:`ADAPTERS` (the one place for
architecture-specific facts): the score function used for routing probabilities, whether a
correction bias is added after the score function (ARR saturates there), group-limited routing,
and the families we refuse with a reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from fare_core.errors import FareError

# Canonical routed-expert count fields of transformers configs (aliases resolve to one of these).
EXPERT_COUNT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
_ROUTER_CLASS_NAME = re.compile(r"Router|Gate$|Gating")
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|blocks|h)\.(\d+)(?:\.|$)")


class NotMoEError(FareError):
    """The model has no routed Mixture-of-Experts layer."""


class UnsupportedMoEError(FareError):
    """The model is a Mixture-of-Experts model of a family fare-moe cannot handle."""


@dataclass(frozen=True)
class MoEAdapter:
    """Per-family facts that discovery cannot read off the modules.

    score_fn: turns raw router logits into the per-expert routing probabilities we record
        ("softmax" over experts, or "sigmoid" per expert affinity).
    bias_after_score: a correction bias is added to the *scores* for selection (ERNIE-4.5,
        DeepSeek-V3): ARR on the logits cannot push an expert below its bias.
    group_limited: routing first keeps ``topk_group`` of ``n_group`` expert groups.
    unsupported: reason the family is refused (None = supported).
    """

    score_fn: str = "softmax"
    bias_after_score: bool = False
    group_limited: bool = False
    unsupported: str | None = None


GENERIC = MoEAdapter()

#: The one registry of architecture-specific facts, keyed by ``config.model_type``.
ADAPTERS: dict[str, MoEAdapter] = {
    # Tested core families (tests/test_surgery.py builds a tiny model of each).
    "olmoe": GENERIC,
    "qwen3_moe": GENERIC,
    "qwen2_moe": GENERIC,
    "mixtral": GENERIC,
    "gpt_oss": GENERIC,  # top-k on the logits, softmax over the k
    "deepseek_v2": MoEAdapter(group_limited=True),  # greedy or group_limited_greedy (max)
    "deepseek_v3": MoEAdapter(score_fn="sigmoid", bias_after_score=True, group_limited=True),
    "ernie4_5_moe": MoEAdapter(bias_after_score=True),
    # Other transformers MoE families: discovered generically, facts declared here.
    "deepseek_v32": MoEAdapter(score_fn="sigmoid", bias_after_score=True, group_limited=True),
    "glm4_moe": MoEAdapter(score_fn="sigmoid", bias_after_score=True, group_limited=True),
    "dots1": MoEAdapter(score_fn="sigmoid", bias_after_score=True, group_limited=True),
    "kimi_linear": MoEAdapter(score_fn="sigmoid", bias_after_score=True, group_limited=True),
    "afmoe": MoEAdapter(score_fn="sigmoid", bias_after_score=True),
    "lfm2_moe": MoEAdapter(score_fn="sigmoid", bias_after_score=True),
    "minimax_m2": MoEAdapter(score_fn="sigmoid", bias_after_score=True),
    "llama4_text": MoEAdapter(score_fn="sigmoid"),
    # Refused, with the reason (transformers_moe_internals.md section 8).
    "doge": MoEAdapter(unsupported="its 'experts' are product-key memory rows with no router module"),
    "dbrx": MoEAdapter(unsupported="top-k runs in the block and experts are 2-D [E*I, H] blocks"),
    "longcat_flash": MoEAdapter(unsupported="zero-compute identity experts widen the router"),
    "zaya": MoEAdapter(unsupported="its MLP router has an extra 'skip' class"),
    "inkling_text": MoEAdapter(unsupported="shared experts have router logit columns"),
    "jetmoe": MoEAdapter(unsupported="experts live on the block and attention has its own routers"),
    "deepseek_v4": MoEAdapter(unsupported="hash-routed layers have no logits to steer"),
    "deepseek": MoEAdapter(
        unsupported="deepseek-moe-16b needs trust_remote_code and transformers-4 remote code; "
        "convert it to the Qwen2-MoE layout first"
    ),
}


@dataclass
class MoELayer:
    """One routed MoE layer.

    index: decoder-layer index (dense layers are skipped, so this is not the position in
        ``output_router_logits``); position: 0-based rank among MoE layers.
    """

    index: int
    position: int
    name: str
    block: nn.Module
    router: nn.Module
    experts: nn.Module
    shared: dict[str, nn.Module] = field(default_factory=dict)
    num_experts: int = 0
    top_k: int = 0

    @property
    def selection_biases(self) -> list[tuple[str, nn.Parameter]]:
        """Router parameters/buffers added to scores for selection (e.g. e_score_correction_bias)."""
        out = []
        tensors = list(self.router.named_parameters()) + list(self.router.named_buffers())
        for name, t in tensors:
            if "bias" in name.rsplit(".", 1)[-1] and t.shape[-1] == self.num_experts and name != "bias":
                out.append((name, t))
        return out


def model_type_of(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return type(model).__name__
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return getattr(text, "model_type", None) or getattr(cfg, "model_type", type(model).__name__)


def adapter_for(model: nn.Module) -> MoEAdapter:
    return ADAPTERS.get(model_type_of(model), GENERIC)


def config_expert_count(config) -> int | None:
    """Routed-expert count from a (text) config, or None when the config declares none."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for f in EXPERT_COUNT_FIELDS:
        value = getattr(text, f, None)
        if isinstance(value, int) and value > 1:
            return value
    ffn = getattr(text, "ffn_config", None)  # DBRX
    if ffn is not None and isinstance(getattr(ffn, "moe_num_experts", None), int):
        return ffn.moe_num_experts
    return None


def _router_classes(model: nn.Module) -> tuple[type, ...]:
    classes = []
    for m in model.modules():
        spec = (getattr(type(m), "_can_record_outputs", None) or {}).get("router_logits")
        for s in spec if isinstance(spec, (list, tuple)) else [spec]:
            cls = getattr(s, "target_class", s)
            if isinstance(cls, type) and _ROUTER_CLASS_NAME.search(cls.__name__) and cls not in classes:
                classes.append(cls)
    return tuple(classes)


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """Every routed MoE layer of ``model``, in decoder order.

    Raises NotMoEError for a dense model and UnsupportedMoEError (naming the model_type) for an
    MoE family we cannot handle.
    """
    model_type = model_type_of(model)
    adapter = ADAPTERS.get(model_type, GENERIC)
    if adapter.unsupported:
        raise UnsupportedMoEError(
            f"model_type {model_type!r} is a Mixture-of-Experts family fare-moe does not support: "
            f"{adapter.unsupported}"
        )
    classes = _router_classes(model)
    cfg = getattr(model, "config", None)
    declared = config_expert_count(cfg) if cfg is not None else None
    if not classes:
        if declared:
            raise UnsupportedMoEError(
                f"model_type {model_type!r} declares {declared} experts but exposes no router module "
                f"fare-moe can hook; supported model types: {', '.join(supported_model_types())}"
            )
        raise NotMoEError(
            f"{type(model).__name__} (model_type {model_type!r}) is not a Mixture-of-Experts model: "
            "it has no routed expert layer"
        )
    layers: list[MoELayer] = []
    for name, mod in model.named_modules():
        if not isinstance(mod, classes):
            continue
        block_name, _, _ = name.rpartition(".")
        block = model.get_submodule(block_name)
        experts = getattr(block, "experts", None)
        if experts is None:
            raise UnsupportedMoEError(
                f"model_type {model_type!r}: MoE block {block_name!r} has no 'experts' child"
            )
        m = _LAYER_INDEX.search(name)
        index = int(m.group(1)) if m else len(layers)
        shared = {n: c for n, c in block.named_children() if "shared" in n and c is not None}
        num_experts = getattr(mod, "num_experts", None)
        if not isinstance(num_experts, int):
            num_experts = getattr(experts, "num_experts", None) or declared
        top_k = getattr(mod, "top_k", None)
        if not isinstance(top_k, int):
            text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
            top_k = getattr(text, "num_experts_per_tok", None) or getattr(text, "top_k_experts", None)
        layers.append(
            MoELayer(index, len(layers), name, block, mod, experts, shared, int(num_experts), int(top_k))
        )
    if not layers:
        raise NotMoEError(f"{type(model).__name__} (model_type {model_type!r}) has no MoE layer instantiated")
    return layers


def supported_model_types() -> list[str]:
    return sorted(k for k, a in ADAPTERS.items() if not a.unsupported)
