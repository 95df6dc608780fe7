"""fare_pipeline.baselines: SES stability selection, random experts, binary profiles (hand-worked)."""

from collections import Counter

import numpy as np
import pytest

from fare_pipeline.baselines import binary_profile, random_experts, ses_select, shard_group_of, shard_of
from fare_pipeline.prompts import build_prompt_set

# top-1 routing, 20 tokens per group and shard, 2 layers x 4 experts; neutral uniform everywhere.
U = [0.25, 0.25, 0.25, 0.25]
FEMALE = {  # shard -> [layer0, layer1] P(e | female)
    0: [[0.2, 0.35, 0.25, 0.2], [0.1, 0.2, 0.5, 0.2]],  # ARD: (0,1)=.10 ; (1,2)=.25 top
    1: [[0.15, 0.45, 0.2, 0.2], U],  # (0,1)=.20 top
    2: [[0.15, 0.45, 0.2, 0.2], [0.3, 0.2, 0.25, 0.25]],  # (0,1)=.20 top
}


def _aggregates():
    names, cols = [], []
    for s in range(3):
        names += [f"neutral#{s}", f"female#{s}"]
        cols += [np.array([U, U]), np.array(FEMALE[s])]
    counts = np.stack(cols, axis=2) * 20  # [L, E, G]
    return np.rint(counts), np.full((2, 6), 20.0), names


def test_ses_by_hand():
    c, t, names = _aggregates()
    r = ses_select(c, t, names, n=1, stability=0.6, layers=[5, 9])
    assert r["selected"] == [(5, 1)] and r["n_shards"] == 3
    assert r["stability"] == {"5:1": pytest.approx(2 / 3)}
    loose = ses_select(c, t, names, n=1, stability=0.3, layers=[5, 9])
    assert loose["stability"] == {"5:1": pytest.approx(2 / 3), "9:2": pytest.approx(1 / 3)}
    assert loose["selected"] == [(5, 1)]
    assert ses_select(c, t, names, n=1, stability=1.0, layers=[5, 9])["selected"] == []
    with pytest.raises(ValueError, match="group 'female' has no '#<shard>' suffix"):
        ses_select(c, t, ["neutral#0", "female", "neutral#1", "female#1", "neutral#2", "female#2"])


def test_shards_follow_contexts_and_are_seeded():
    ps = build_prompt_set(axes=["gender"], contexts_per_descriptor=40)
    shards = {p.context_id: shard_of(p, 4) for p in ps.neutral}
    assert all(shard_of(p, 4) == shards[p.context_id] for p in ps.demographic)
    sizes = Counter(shards.values())
    assert len(sizes) == 4 and min(sizes.values()) > 100  # 576 contexts, roughly 144 each
    g = shard_group_of(4, seed=0)
    assert g(ps.neutral[0]) == f"neutral#{shards[ps.neutral[0].context_id]}"
    assert [shard_of(p, 4, seed=1) for p in ps.neutral] != list(shards.values())


def test_random_experts_and_binary_profile():
    pairs = random_experts(8, [3, 5, 7], selected=[3, 7], n=5, seed=2)
    assert len(set(pairs)) == 5 and all(layer in (3, 7) and 0 <= e < 8 for layer, e in pairs)
    assert pairs == random_experts(8, [3, 5, 7], selected=[3, 7], n=5, seed=2)
    phi = binary_profile(pairs, [3, 5, 7], 8)
    assert phi.sum() == 5 and phi[1].sum() == 0
    with pytest.raises(ValueError, match="n=17; allowed: 1..16"):
        random_experts(8, [3, 5, 7], selected=[3, 7], n=17)
    with pytest.raises(ValueError, match=r"expert \(4, 0\) is outside layers"):
        binary_profile([(4, 0)], [3, 5, 7], 8)
