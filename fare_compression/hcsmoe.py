"""HC-SMoE expert merging (Chen et al., ICML 2025, arXiv 2410.08589; compression_specs.md section 2).

Paper definition (the default here):

1. calibration forward of the unmodified model; per MoE layer l the block inputs X_l (stat tokens
   only). Run layer by layer (:mod:`fare_compression.layerwise`): layer l is merged after its
   outputs were computed, so every layer sees the unmodified model's inputs, as in the reference's
   single forward pass, with only one layer's X_l held at a time;
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
(its scripts pass the typo ``--cluster=hirarchical``, which falls through to K-means in
``clustering.py group_experts_by_clustering``) and ``freq_topk=2`` (top-2 counts hard-coded in
``compute_all_usages``; taken here as the top-2 of the raw router logits, so ERNIE's selection bias
is not applied in that option). The K-means is the reference's, step for step: representations
``experts[i](X).mean(0)`` in the model dtype over all tokens at once, cast to float32; k-means++ initial centres (first uniform, then proportional to the squared distance to the
nearest centre) drawn from ONE random stream seeded once with ``seed`` and consumed layer after
layer (the reference seeds torch's global generator once per run; its stream equals a CPU
``torch.Generator`` with the same seed when the representations are on CPU, as here); then up to
100 iterations of: distance matrix cdist(o, centres) / d, standardised per centre (column z-score
with the unbiased std + 1e-6, shifted so the minimum is 0), argmin assignment, centres = member
means (an emptied cluster gets a NaN centre, as in the reference), stop when no centre moved by
1e-4 or more. ``linkage`` may also be "single" or "complete". Shared experts are never merged.
Deviation: a cluster whose members were never selected (sum f = 0) gets the plain mean instead of
the reference's all-zero weights.
"""

from __future__ import annotations

import torch

from fare_core.adapters import moe_layers
from fare_core.errors import FareError

from .calibration import CalibrationSet
from .hooks import MoECollector, expert_output, moe_collector
from .layerwise import visit_layers

LINKAGES = ("average", "single", "complete")
CLUSTERINGS = ("hierarchical", "kmeans")


def agglomerative(dist: torch.Tensor, num_clusters: int, linkage: str = "average"):
    """Agglomerative clustering of a symmetric distance matrix down to ``num_clusters`` clusters.

    Lance-Williams updates on the cluster distance matrix (O(E^2) per merge). Returns (clusters,
    merges): clusters = sorted member lists ordered by smallest member; merges = [(A, B, d)] in order.
    """
    if linkage not in LINKAGES:
        raise FareError(f"linkage={linkage!r}; allowed: {', '.join(LINKAGES)}")
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


def _standardize(d: torch.Tensor) -> torch.Tensor:
    """Reference ``_standardize``: per-centre (column) z-score, unbiased std + 1e-6, shifted to min 0."""
    d = (d - d.mean(dim=0)) / (d.std(dim=0) + 1e-6)
    return d - d.min()


def kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Reference k-means++ initial centre indices (draws from ``generator``)."""
    first = torch.randint(0, x.shape[0], (1,), generator=generator).item()
    centers, indices = [x[first]], [first]
    for _ in range(1, k):
        dist = torch.cat([torch.cdist(x, c.unsqueeze(0)) for c in centers], dim=-1)
        d2 = torch.min(dist, dim=-1).values ** 2
        nxt = torch.multinomial(d2 / d2.sum(), 1, generator=generator).item()
        centers.append(x[nxt])
        indices.append(nxt)
    return torch.tensor(indices)


def kmeans(x: torch.Tensor, k: int, generator: torch.Generator | None = None, init: torch.Tensor | None = None,
           iters: int = 100) -> list[list[int]]:
    """The reference K-means on the rows of ``x`` (module docstring); returns the non-empty clusters
    as sorted member lists ordered by smallest member. ``init``: initial centre indices."""
    x = x.to(torch.float32)
    if init is None:
        init = kmeans_plus_plus(x, k, generator if generator is not None else torch.Generator().manual_seed(0))
    centers = x[init]
    assignments = None
    for _ in range(iters):
        assignments = torch.argmin(_standardize(torch.cdist(x, centers) / x.shape[1]), dim=1)
        new = torch.stack([x[assignments == j].mean(dim=0) for j in range(k)])
        max_diff = 0.0
        for j in range(k):
            max_diff = max(max_diff, torch.max(torch.abs(new[j] - centers[j])).item())
        if max_diff < 1e-4:
            break
        centers = new
    groups = [sorted(torch.nonzero(assignments == j).flatten().tolist()) for j in range(k)]
    return sorted((g for g in groups if g), key=lambda g: g[0])


def frequencies(topk_idx: torch.Tensor, logits: torch.Tensor, num_experts: int, freq_topk) -> torch.Tensor:
    """f_i: normalised selection counts over the true top-k ("k") or the top-n of the raw logits."""
    sel = topk_idx if freq_topk in ("k", None) else logits.topk(check_freq_topk(freq_topk), dim=-1).indices
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


def representations(experts, x: torch.Tensor, num_experts: int, chunk: int = 16384,
                    as_reference: bool = False) -> torch.Tensor:
    """o_i = mean ungated output of expert i over the rows of x (CPU float32), [E, H] on CPU.

    Default: float64 sums over token chunks on the experts' device. ``as_reference``: as the
    reference code does before its K-means, ``experts[i](X).mean(0)`` over all tokens at once in the
    model's dtype, then cast to float32."""
    dev, dt = experts.gate_up_proj.device, experts.gate_up_proj.dtype
    if as_reference:
        xd = x.to(dev, dt)
        return torch.stack([expert_output(experts, e, xd).mean(dim=0) for e in range(num_experts)]).float().cpu()
    T = x.shape[0]
    reps = []
    for e in range(num_experts):
        total = None
        for s in range(0, T, chunk):
            part = expert_output(experts, e, x[s:s + chunk].to(dev, dt)).double().sum(0)
            total = part if total is None else total + part
        reps.append((total / T).cpu())
    return torch.stack(reps)


def check_freq_topk(freq_topk):
    if freq_topk not in ("k", None) and not (isinstance(freq_topk, int) and freq_topk >= 1):
        raise FareError(f"freq_topk={freq_topk!r}; allowed: 'k' (true top-k) or a positive integer (reference: 2)")
    return freq_topk


def check_args(E: int, num_clusters, ratio, linkage: str, cluster: str) -> int:
    """Validated clusters per layer."""
    if (num_clusters is None) == (ratio is None):
        raise FareError("HC-SMoE needs exactly one of num_clusters or ratio")
    if ratio is not None:
        from .expert_prune import check_ratio

        num_clusters = int(E * (1 - check_ratio(ratio)))
    if not isinstance(num_clusters, int) or isinstance(num_clusters, bool):
        raise FareError(f"num_clusters={num_clusters!r} must be an integer")
    if num_clusters > E:
        raise FareError(f"num_clusters={num_clusters} is more clusters than the {E} experts per layer")
    if num_clusters < 1:
        raise FareError(f"num_clusters={num_clusters} must be >= 1")
    if cluster not in CLUSTERINGS:
        raise FareError(f"cluster={cluster!r} is not allowed; choose one of: {', '.join(CLUSTERINGS)}")
    if linkage not in LINKAGES:
        raise FareError(f"linkage={linkage!r} is not allowed; choose one of: {', '.join(LINKAGES)}")
    return num_clusters


@torch.no_grad()
def hc_smoe(model, calib: CalibrationSet, num_clusters: int | None = None, ratio: float | None = None,
            linkage: str = "average", cluster: str = "hierarchical", freq_topk="k", batch_size: int = 4,
            seed: int = 0, device=None, pipeline: str = "layerwise", progress: bool = True):
    """Merge the routed experts of every MoE layer into ``num_clusters`` groups; returns (model, info).

    num_clusters: clusters per layer; or ratio in (0,1): num_clusters = int(E * (1 - ratio)).
    seed: the K-means initialisation stream (``cluster="kmeans"``), seeded once for all layers.
    """
    E = moe_layers(model)[0].num_experts
    num_clusters = check_args(E, num_clusters, ratio, linkage, cluster)
    check_freq_topk(freq_topk)
    generator = torch.Generator().manual_seed(int(seed))  # one stream across layers (reference)
    collect, _ = moe_collector(model)
    info = {"num_clusters": num_clusters, "linkage": linkage, "cluster": cluster, "freq_topk": freq_topk,
            "representation": "mean ungated expert output over all stat tokens", "distance": "euclidean",
            "router": "unchanged", "layers": {}}
    if cluster == "kmeans":
        info.update(seed=int(seed), linkage=None, kmeans="reference: k-means++ from one seeded stream, "
                    "per-centre standardised distances, <= 100 iterations")

    def process(i, layer, col):
        if not isinstance(col, MoECollector):
            return
        ex = col.layer.experts
        reps = representations(ex, col.x, col.layer.num_experts, as_reference=cluster == "kmeans")
        if cluster == "hierarchical":
            clusters, _ = agglomerative(torch.cdist(reps, reps), num_clusters, linkage)
        else:
            clusters = kmeans(reps, num_clusters, generator)
        f = frequencies(col.topk_idx, col.logits, col.layer.num_experts, freq_topk)
        merge_groups(ex, clusters, f)
        info["layers"][str(i)] = {"clusters": clusters, "frequencies": [round(float(v), 6) for v in f]}

    visit_layers(model, calib, process, collect, sequential=False, device=device, batch_size=batch_size,
                 pipeline=pipeline, what="hc_smoe", progress=progress)
    return model, info


def run(model, calib=None, tokenizer=None, num_clusters=None, ratio=None, **params):
    """Registry adapter (methods.py); default ratio 0.25 when neither count is given."""
    if num_clusters is None and ratio is None:
        ratio = 0.25
    return hc_smoe(model, calib, num_clusters=num_clusters, ratio=ratio, **params)
