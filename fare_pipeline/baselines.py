"""Expert-identification baselines (SPEC section 7; paper Table 8), applied with ARR at lambda*.

* SAFEx-style stable expert selection (SES, Lai et al. 2025) adapted to fairness: the prompts
  are split into seeded shards; in each shard experts are ranked by ARD (Eq. 1, demographic vs
  neutral); an expert is *stable* when it is in the shard top-n in at least ``stability`` of
  the shards. The stable experts (at most n, by stability then mean ARD) are selected.
* Random expert selection: n seeded random experts.
* :func:`binary_profile` turns a selection into a phi profile (1 on selected experts, else 0)
  so every baseline runs through the same ARR path as FSP.

Shard aggregates come from one profiling pass with groups named ``<group>#<shard>``
(:func:`shard_group_of` gives the mapping for ``profiling.record_routing(group_of=...)``).
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np
import torch

from .fsp import FSPOptions, compute_fsp
from .prompts import NEUTRAL, Prompt

SHARD_SEP = "#"


def shard_of(prompt: Prompt, n_shards: int, seed: int = 0) -> int:
    """Seeded shard of a prompt's context (a neutral prompt and its variants share a shard)."""
    if not (isinstance(n_shards, int) and n_shards >= 1):
        raise ValueError(f"n_shards={n_shards!r}; must be a positive integer")
    h = hashlib.sha256(f"{seed}|shard|{prompt.context_id}".encode()).hexdigest()
    return int(h, 16) % n_shards


def shard_group_of(n_shards: int, seed: int = 0):
    """``group_of`` callable for record_routing: ``"<group>#<shard>"``."""
    return lambda p: f"{p.group}{SHARD_SEP}{shard_of(p, n_shards, seed)}"


def _split_names(group_names: Sequence[str]) -> dict[int, list[int]]:
    shards: dict[int, list[int]] = {}
    for i, name in enumerate(group_names):
        base, sep, shard = name.rpartition(SHARD_SEP)
        if not sep or not shard.isdigit():
            raise ValueError(f"group {name!r} has no '{SHARD_SEP}<shard>' suffix; record with shard_group_of()")
        shards.setdefault(int(shard), []).append(i)
    return shards


def ses_select(
    counts,
    tokens,
    group_names: Sequence[str],
    *,
    n: int = 10,
    stability: float = 0.8,
    layers: Sequence[int] | None = None,
    selected: Sequence[int] | None = None,
    neutral: str = NEUTRAL,
) -> dict:
    """SES over shard aggregates [L, E, G*shards]; returns selected (layer id, expert) pairs."""
    c = counts.detach().cpu().numpy() if isinstance(counts, torch.Tensor) else np.asarray(counts)
    t = tokens.detach().cpu().numpy() if isinstance(tokens, torch.Tensor) else np.asarray(tokens)
    if not 0.0 < stability <= 1.0:
        raise ValueError(f"stability={stability!r}; must lie in (0, 1]")
    if not (isinstance(n, int) and n >= 1):
        raise ValueError(f"n={n!r}; must be a positive integer")
    L, E, _ = c.shape
    ids = list(range(L)) if layers is None else [int(x) for x in layers]
    rows = list(range(L)) if selected is None else [ids.index(int(s)) for s in selected if int(s) in ids]
    if not rows:
        raise ValueError(f"no selected layer among the profile rows {ids}")
    shards = _split_names(group_names)
    hits = np.zeros((L, E))
    ard_sum = np.zeros((L, E))
    opts = FSPOptions(weights={"ard": 1.0, "jsd": 0.0, "pmi": 0.0, "ent": 0.0})
    for shard, cols in sorted(shards.items()):
        names = [group_names[i].rpartition(SHARD_SEP)[0] for i in cols]
        ard = compute_fsp(c[:, :, cols], t[:, cols], names, neutral=neutral, options=opts).metrics["ard"]
        cells = sorted(((r, e) for r in rows for e in range(E)), key=lambda x: (-ard[x], ids[x[0]], x[1]))[:n]
        for cell in cells:
            hits[cell] += 1
        ard_sum += ard
    share = hits / len(shards)
    stable = [(r, e) for r in rows for e in range(E) if share[r, e] >= stability - 1e-12]
    stable.sort(key=lambda x: (-share[x], -ard_sum[x], ids[x[0]], x[1]))
    pick = stable[:n]
    return {
        "selected": sorted((ids[r], int(e)) for r, e in pick),
        "stability": {f"{ids[r]}:{e}": float(share[r, e]) for r, e in stable},
        "n_shards": len(shards),
        "n": n,
        "threshold": stability,
    }


def random_experts(num_experts: int, layers: Sequence[int], selected: Sequence[int] | None = None, *,
                   n: int = 10, seed: int = 0) -> list[tuple[int, int]]:
    """n distinct (layer id, expert) pairs drawn uniformly from the selected layers."""
    pool = [(int(layer), e) for layer in (selected if selected is not None else layers) for e in range(num_experts)]
    if not 1 <= n <= len(pool):
        raise ValueError(f"n={n!r}; allowed: 1..{len(pool)} experts in the selected layers")
    rng = np.random.default_rng(seed)
    return sorted(pool[i] for i in rng.choice(len(pool), size=n, replace=False))


def binary_profile(pairs, layers: Sequence[int], num_experts: int, value: float = 1.0) -> torch.Tensor:
    """phi [len(layers), E]: ``value`` on the given (layer id, expert) pairs, 0 elsewhere."""
    ids = [int(x) for x in layers]
    phi = torch.zeros(len(ids), num_experts, dtype=torch.float64)
    for layer, e in pairs:
        if layer not in ids or not 0 <= e < num_experts:
            raise ValueError(f"expert ({layer}, {e}) is outside layers {ids} x experts 0..{num_experts - 1}")
        phi[ids.index(layer), e] = value
    return phi
