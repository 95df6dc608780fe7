"""HC-SMoE expert merging (Chen et al., ICML 2025, arXiv 2410.08589; compression_specs.md section 2).

Paper definition (the default here):

1. one forward pass of the unmodified model over the calibration set; per MoE layer l the block
   inputs X_l (stat tokens only);
2. expert representation o_i = (1/T) sum_t E_i(x_t): mean *ungated* output over all tokens;
3. D_ij = ||o_i - o_j||_2;
4. agglomerative clustering with average linkage (UPGMA), d(A,B) = mean_{a in A, b in B} D_ab,
   merging the closest pair until r clusters remain (same r in every layer);
5. usage frequency f_i = count(i in TopK(x)) / sum_j count_j over the model's *true* top-k selection;
6. every cluster G gets W^G = sum_{i in G} f_i W_i / (sum_{i in G} f_i + eps) (eps = fp32 eps),
   separately for W_gate, W_up, W_down, and W^G is written into every member (as REAP's
   re-implementation does; the reference ties the member modules instead - same function);
7. the router is unchanged (all E rows): co-selected members' gate values add up.

Options reproducing the released reference code (``hcsmoe`` @ bd77eba1): ``cluster="kmeans"``
(its scripts pass the typo ``--cluster=hirarchical``, which falls through to K-means with
k-means++ initialisation seeded by ``torch.manual_seed(0)``, up to 100 iterations) and
``freq_topk=2`` (top-2 counts hard-coded in ``compute_all_usages``; taken here as the top-2 of the
raw router logits, so ERNIE's selection bias is not applied in that option). ``linkage`` may also be
"single" or "complete". Shared experts are never merged. Deviation: a cluster whose members were
never selected (sum f = 0) gets the plain mean instead of the reference's all-zero weights.
"""

from __future__ import annotations

import torch

from fare_core.adapters import moe_layers

from .calibration import CalibrationSet
from .hooks import capture_moe, expert_output

LINKAGES = ("average", "single", "complete")
CLUSTERINGS = ("hierarchical", "kmeans")


def agglomerative(dist: torch.Tensor, num_clusters: int, linkage: str = "average"):
    """Agglomerative clustering of a symmetric distance matrix down to ``num_clusters`` clusters.

    Lance-Williams updates on the cluster distance matrix (O(E^2) per merge). Returns (clusters,
    merges): clusters = sorted member lists ordered by smallest member; merges = [(A, B, d)] in order.
    """
    if linkage not in LINKAGES:
        raise ValueError(f"linkage={linkage!r}; allowed: {', '.join(LINKAGES)}")
    n = dist.shape[0]
    D = dist.double().clone()
    D.fill_diagonal_(float("inf"))
    members = {i: [i] for i in range(n)}
    active = torch.ones(n, dtype=torch.bool)
    merges = []
    for _ in range(n - num_clusters):
        masked = D.masked_fill(~(active[:, None] & active[None, :]), float("inf"))
        flat = int(torch.argmin(masked))
        a, b = divmod(flat, n)
        a, b = min(a, b), max(a, b)
        d = float(masked[a, b])
        na, nb = len(members[a]), len(members[b])
        if linkage == "average":
            new = (na * D[a] + nb * D[b]) / (na + nb)
        elif linkage == "single":
            new = torch.minimum(D[a], D[b])
        else:
            new = torch.maximum(D[a], D[b])
        D[a], D[:, a] = new, new
        D[a, a] = float("inf")
        active[b] = False
        merges.append((sorted(members[a]), sorted(members[b]), d))
        members[a] = sorted(members[a] + members.pop(b))
    clusters = sorted((m for i, m in members.items() if active[i]), key=lambda m: m[0])
    return clusters, merges


def naive_average_linkage(dist: torch.Tensor, num_clusters: int):
    """Reference-style UPGMA: recompute every cluster-pair average distance at every merge (benchmark)."""
    clusters = [[i] for i in range(dist.shape[0])]
    while len(clusters) > num_clusters:
        best = None
        for i in range(len(clusters)):
            for j in range(i + 1, len(clusters)):
                d = float(dist[clusters[i]][:, clusters[j]].mean())
                if best is None or d < best[0]:
                    best = (d, i, j)
        _, i, j = best
        clusters[i] = sorted(clusters[i] + clusters.pop(j))
    return sorted(clusters, key=lambda m: m[0])


def kmeans(x: torch.Tensor, k: int, iters: int = 100, seed: int = 0):
    """K-means with k-means++ initialisation (the reference code's fallback clustering)."""
    g = torch.Generator().manual_seed(seed)
    x = x.double()
    centers = [x[int(torch.randint(len(x), (1,), generator=g))]]
    for _ in range(1, k):
        d2 = torch.cdist(x, torch.stack(centers)).min(1).values ** 2
        probs = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1 / len(d2))
        centers.append(x[int(torch.multinomial(probs, 1, generator=g))])
    c = torch.stack(centers)
    labels = None
    for _ in range(iters):
        new = torch.cdist(x, c).argmin(1)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        for j in range(k):
            if (labels == j).any():
                c[j] = x[labels == j].mean(0)
    groups = [sorted(torch.nonzero(labels == j).flatten().tolist()) for j in range(k)]
    return sorted((m for m in groups if m), key=lambda m: m[0])


def frequencies(topk_idx: torch.Tensor, logits: torch.Tensor, num_experts: int, freq_topk) -> torch.Tensor:
    """f_i: normalised selection counts over the true top-k ("k") or the top-n of the raw logits."""
    if freq_topk in ("k", None):
        sel = topk_idx
    elif isinstance(freq_topk, int) and freq_topk >= 1:
        sel = logits.topk(freq_topk, dim=-1).indices
    else:
        raise ValueError(f"freq_topk={freq_topk!r}; allowed: 'k' (true top-k) or a positive integer (reference: 2)")
    c = torch.bincount(sel.reshape(-1), minlength=num_experts).double()
    return c / c.sum()


@torch.no_grad()
def merge_groups(experts, clusters: list[list[int]], f: torch.Tensor) -> None:
    """Write the frequency-weighted average of each cluster into all its members (in place)."""
    eps = torch.finfo(torch.float32).eps
    for G in clusters:
        if len(G) == 1:
            continue
        gi = torch.tensor(G)
        w = f[gi].double()
        if float(w.sum()) == 0.0:
            w = torch.ones_like(w)
        coef = w / (w.sum() + eps)
        for name in ("gate_up_proj", "down_proj"):
            t = getattr(experts, name)
            merged = (t.data[gi].double() * coef.view(-1, 1, 1).to(t.device)).sum(0).to(t.dtype)
            t.data[gi] = merged.unsqueeze(0).expand(len(G), *merged.shape)


@torch.no_grad()
def hc_smoe(model, calib: CalibrationSet, num_clusters: int | None = None, ratio: float | None = None,
            linkage: str = "average", cluster: str = "hierarchical", freq_topk="k", batch_size: int = 4):
    """Merge the routed experts of every MoE layer into ``num_clusters`` groups; returns (model, info).

    num_clusters: clusters per layer; or ratio in (0,1): num_clusters = int(E * (1 - ratio)).
    """
    layers = moe_layers(model)
    E = layers[0].num_experts
    if (num_clusters is None) == (ratio is None):
        raise ValueError("HC-SMoE needs exactly one of num_clusters or ratio")
    if ratio is not None:
        from .expert_prune import check_ratio

        num_clusters = int(E * (1 - check_ratio(ratio)))
    if not isinstance(num_clusters, int) or isinstance(num_clusters, bool):
        raise ValueError(f"num_clusters={num_clusters!r} must be an integer")
    if num_clusters > E:
        raise ValueError(f"num_clusters={num_clusters} is more clusters than the {E} experts per layer")
    if num_clusters < 1:
        raise ValueError(f"num_clusters={num_clusters} must be >= 1")
    if cluster not in CLUSTERINGS:
        raise ValueError(f"cluster={cluster!r}; allowed: {', '.join(CLUSTERINGS)}")
    cap = capture_moe(model, calib, batch_size)
    info = {"num_clusters": num_clusters, "linkage": linkage, "cluster": cluster, "freq_topk": freq_topk,
            "representation": "mean ungated expert output over all stat tokens", "distance": "euclidean",
            "router": "unchanged", "layers": {}}
    for layer in layers:
        ex, li = layer.experts, layer.index
        x = cap.x[li].to(ex.gate_up_proj.device, ex.gate_up_proj.dtype)
        reps = torch.stack([expert_output(ex, e, x).double().mean(0) for e in range(layer.num_experts)]).cpu()
        if cluster == "hierarchical":
            clusters, _ = agglomerative(torch.cdist(reps, reps), num_clusters, linkage)
        else:
            clusters = kmeans(reps, num_clusters)
        f = frequencies(cap.topk_idx[li], cap.logits[li], layer.num_experts, freq_topk)
        merge_groups(ex, clusters, f)
        info["layers"][str(li)] = {"clusters": clusters, "frequencies": [round(float(v), 6) for v in f]}
    return model, info


def run(model, calib=None, tokenizer=None, num_clusters=None, ratio=None, **params):
    """Registry adapter (methods.py); default ratio 0.25 when neither count is given."""
    if num_clusters is None and ratio is None:
        ratio = 0.25
    return hc_smoe(model, calib, num_clusters=num_clusters, ratio=ratio, **params)
