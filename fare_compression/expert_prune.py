"""Expert pruning by routing frequency and by REAP saliency (compression_specs.md sections 3, 4).

Per MoE layer, drop the ``int(E * ratio)`` experts with the lowest score (same ratio in every layer;
no global ranking), then remove them structurally with :func:`fare_compression.prune.prune_experts`
(router rows, fused expert tensors, selection biases, config count).

* frequency: |X_j| = number of calibration (stat) tokens whose top-k selection contains j.
* REAP (Lasby et al. 2025): S_j = (1/|X_j|) sum_{x in X_j} g_j(x) ||E_j(x)||_2 with E_j the ungated
  expert output and g_j the combine weight the model actually applied to expert j (router output,
  after any renormalisation/scaling, as llm-compressor's port does); S_j = 0 for never-selected j.

Group-limited routers (DeepSeek) drop ``int(E/G * ratio)`` per group so groups stay equal.
"""

from __future__ import annotations

import torch

from fare_core.adapters import moe_layers

from .calibration import CalibrationSet
from .hooks import capture_moe, expert_output, selection_counts
from .prune import _group_count, prune_experts


def check_ratio(ratio, what: str = "ratio") -> float:
    try:
        r = float(ratio)
    except (TypeError, ValueError):
        raise ValueError(f"{what}={ratio!r} must be a number in (0, 1)") from None
    if not 0.0 < r < 1.0:
        raise ValueError(f"{what}={ratio!r} outside (0, 1)")
    return r


def keep_lowest_dropped(scores: dict[int, torch.Tensor], ratio: float, model) -> dict[int, list[int]]:
    """Per layer, keep all but the ``int(E*ratio)`` lowest-scoring experts (per group if grouped)."""
    keep = {}
    for layer in moe_layers(model):
        s = scores[layer.index].double()
        E, G = layer.num_experts, _group_count(layer)
        size = E // G
        n_drop = int(size * ratio)
        if n_drop == 0:
            raise ValueError(f"ratio={ratio} removes no expert from {size} experts per {'group' if G > 1 else 'layer'}")
        if E - n_drop * G < layer.top_k:
            raise ValueError(f"ratio={ratio} keeps {E - n_drop * G} experts, fewer than top_k={layer.top_k}")
        kept = []
        for g in range(G):
            ids = torch.arange(g * size, (g + 1) * size)
            order = torch.argsort(s[ids], stable=True)  # lowest first; ties: lower id dropped first
            kept += ids[order[n_drop:]].tolist()
        keep[layer.index] = sorted(kept)
    return keep


def frequency_scores(model, calib: CalibrationSet, batch_size: int = 4) -> dict[int, torch.Tensor]:
    cap = capture_moe(model, calib, batch_size, keep_inputs=False)
    return {l.index: selection_counts(cap.topk_idx[l.index], l.num_experts) for l in moe_layers(model)}


@torch.no_grad()
def reap_scores(model, calib: CalibrationSet, batch_size: int = 4) -> dict[int, torch.Tensor]:
    cap = capture_moe(model, calib, batch_size)
    out = {}
    for layer in moe_layers(model):
        x, idx, w = cap.x[layer.index], cap.topk_idx[layer.index], cap.topk_w[layer.index]
        ex = layer.experts
        s = torch.zeros(layer.num_experts, dtype=torch.float64)
        for j in range(layer.num_experts):
            hit = idx == j  # [T, k]
            rows = hit.any(-1)
            if not rows.any():
                continue
            g = (w * hit).sum(-1)[rows]
            xj = x[rows].to(ex.gate_up_proj.dtype).to(ex.gate_up_proj.device)
            norms = expert_output(ex, j, xj).float().norm(dim=-1).cpu()
            s[j] = (g * norms).double().mean()
        out[layer.index] = s
    return out


def prune_by_score(model, calib: CalibrationSet, ratio, score: str = "frequency", batch_size: int = 4):
    """Prune ``ratio`` of the experts per layer by ``score`` in {"frequency", "reap"}; returns (model, info)."""
    ratio = check_ratio(ratio)
    if score == "frequency":
        scores = frequency_scores(model, calib, batch_size)
    elif score == "reap":
        scores = reap_scores(model, calib, batch_size)
    else:
        raise ValueError(f"unknown expert-pruning score {score!r}; allowed: frequency, reap")
    keep = keep_lowest_dropped(scores, ratio, model)
    prune_experts(model, keep)
    info = {"score": score, "ratio": ratio, "kept": {str(k): v for k, v in keep.items()},
            "scores": {str(k): [round(float(x), 6) for x in v] for k, v in scores.items()}}
    return model, info


def run(model, calib=None, tokenizer=None, score="frequency", ratio=0.25, batch_size=4):
    """Registry adapter (methods.py)."""
    return prune_by_score(model, calib, ratio, score, batch_size)
