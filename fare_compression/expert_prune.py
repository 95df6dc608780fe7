"""Expert pruning by routing frequency and by REAP saliency (compression_specs.md sections 3, 4).

Per MoE layer, drop the ``int(E * ratio)`` experts with the lowest score (same ratio in every layer;
no global ranking), then remove them structurally with :func:`fare_compression.prune.prune_experts`
(router rows, fused expert tensors, selection biases, config count).

* frequency: |X_j| = number of calibration (stat) tokens whose top-k selection contains j.
* REAP (Lasby et al. 2025): S_j = (1/|X_j|) sum_{x in X_j} g_j(x) ||E_j(x)||_2 with E_j the ungated
  expert output and g_j the combine weight the model actually applied to expert j (router output,
  after any renormalisation/scaling, as llm-compressor's port does); S_j = 0 for never-selected j.

Group-limited routers (DeepSeek) drop ``int(E/G * ratio)`` per group so groups stay equal.
Scores come from the unmodified model, one decoder layer at a time (:mod:`fare_compression.layerwise`):
only the current layer's inputs are held; the experts are removed after all layers are scored.
"""

from __future__ import annotations

import torch

from fare_core.adapters import moe_layers
from fare_core.errors import FareError

from .calibration import CalibrationSet
from .hooks import MoECollector, expert_output, moe_collector, selection_counts
from .layerwise import visit_layers
from .prune import _group_count, prune_experts

SCORES = ("frequency", "reap")


def check_ratio(ratio, what: str = "ratio") -> float:
    try:
        r = float(ratio)
    except (TypeError, ValueError):
        raise FareError(f"{what}={ratio!r} must be a number in (0, 1)") from None
    if not 0.0 < r < 1.0:
        raise FareError(f"{what}={ratio!r} is outside (0, 1); allowed: a number strictly between 0 and 1")
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
            raise FareError(f"ratio={ratio} removes no expert from {size} experts per {'group' if G > 1 else 'layer'}")
        if E - n_drop * G < layer.top_k:
            raise FareError(f"ratio={ratio} keeps {E - n_drop * G} experts, fewer than top_k={layer.top_k}")
        kept = []
        for g in range(G):
            ids = torch.arange(g * size, (g + 1) * size)
            order = torch.argsort(s[ids], stable=True)  # lowest first; ties: lower id dropped first
            kept += ids[order[n_drop:]].tolist()
        keep[layer.index] = sorted(kept)
    return keep


def _expert_output_norms(ex, j: int, x: torch.Tensor, chunk: int = 16384) -> torch.Tensor:
    """||E_j(x)||_2 per row of x (CPU float32 input), computed on the experts' device in chunks."""
    dev, dt = ex.gate_up_proj.device, ex.gate_up_proj.dtype
    return torch.cat([expert_output(ex, j, x[s:s + chunk].to(dev, dt)).float().norm(dim=-1).cpu()
                      for s in range(0, len(x), chunk)])


def layer_scores(col: MoECollector, score: str) -> torch.Tensor:
    """Per-expert score of one MoE layer from its collected statistics."""
    E = col.layer.num_experts
    if score == "frequency":
        return selection_counts(col.topk_idx, E)
    x, idx, w, ex = col.x, col.topk_idx, col.topk_w, col.layer.experts
    s = torch.zeros(E, dtype=torch.float64)
    for j in range(E):
        hit = idx == j  # [T, k]
        rows = hit.any(-1)
        if not rows.any():
            continue
        g = (w * hit).sum(-1)[rows]
        s[j] = (g * _expert_output_norms(ex, j, x[rows])).double().mean()
    return s


@torch.no_grad()
def expert_scores(model, calib: CalibrationSet, score: str = "frequency", batch_size: int = 4, device=None,
                  pipeline: str = "layerwise", progress: bool = True) -> dict[int, torch.Tensor]:
    """{MoE decoder-layer index: per-expert score} from the unmodified model, one layer at a time."""
    if score not in SCORES:
        raise FareError(f"unknown expert-pruning score {score!r}; allowed: {', '.join(SCORES)}")
    collect, _ = moe_collector(model, keep_inputs=score == "reap")
    scores: dict[int, torch.Tensor] = {}

    def process(i, layer, col):
        if isinstance(col, MoECollector):
            scores[i] = layer_scores(col, score)

    visit_layers(model, calib, process, collect, sequential=False, device=device, batch_size=batch_size,
                 pipeline=pipeline, what=f"prune_{score} scores", progress=progress)
    return scores


def frequency_scores(model, calib: CalibrationSet, batch_size: int = 4, **kw) -> dict[int, torch.Tensor]:
    return expert_scores(model, calib, "frequency", batch_size, **kw)


def reap_scores(model, calib: CalibrationSet, batch_size: int = 4, **kw) -> dict[int, torch.Tensor]:
    return expert_scores(model, calib, "reap", batch_size, **kw)


def prune_by_score(model, calib: CalibrationSet, ratio, score: str = "frequency", batch_size: int = 4,
                   device=None, pipeline: str = "layerwise", progress: bool = True):
    """Prune ``ratio`` of the experts per layer by ``score`` in {"frequency", "reap"}; returns (model, info)."""
    ratio = check_ratio(ratio)
    scores = expert_scores(model, calib, score, batch_size, device, pipeline, progress)
    keep = keep_lowest_dropped(scores, ratio, model)
    prune_experts(model, keep)
    info = {"score": score, "ratio": ratio, "kept": {str(k): v for k, v in keep.items()},
            "scores": {str(k): [round(float(x), 6) for x in v] for k, v in scores.items()}}
    return model, info


def run(model, calib=None, tokenizer=None, score="frequency", ratio=0.25, batch_size=4, device=None,
        pipeline="layerwise", progress=True):
    """Registry adapter (methods.py)."""
    return prune_by_score(model, calib, ratio, score, batch_size, device, pipeline, progress)
