"""fare_pipeline.fsp against hand-worked tables, scipy and an independent loop implementation."""

import json
import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon
from scipy.stats import spearmanr

from fare_pipeline.fsp import FSPOptions, compute_fsp, gini, minmax, spearman, top_share

# ---------------------------------------------------------------- hand-worked table (top-1 routing)
# 1 layer, 3 experts, groups neutral / female / male with 10 / 10 / 20 tokens.
NAMES = ["neutral", "female", "male"]
COUNTS = np.array([[[5, 2, 10], [3, 6, 6], [2, 2, 4]]], float)  # [L=1, E=3, G=3]
TOKENS = np.array([[10, 10, 20]], float)


def test_ard_by_hand():
    # P(e|n) = .5 .3 .2 ; P(e|female) = .2 .6 .2 ; P(e|male) = .5 .3 .2
    for agg, want in [("mean", [0.15, 0.15, 0.0]), ("max", [0.3, 0.3, 0.0]), ("token_weighted", [0.1, 0.1, 0.0])]:
        r = compute_fsp(COUNTS, TOKENS, NAMES, options=FSPOptions(ard_aggregate=agg))
        np.testing.assert_allclose(r.metrics["ard"][0], want, atol=1e-15)


def test_pmi_by_hand():
    # P(e) pooled over all 40 tokens: 17/40, 15/40, 8/40
    r = compute_fsp(COUNTS, TOKENS, NAMES, options=FSPOptions(pmi_smoothing=0.0))
    np.testing.assert_allclose(r.metrics["pmi"][0], [math.log2(0.5 / 0.425), math.log2(0.6 / 0.375), 0.0], atol=1e-12)
    # default smoothing 1e-6 moves values by < 1e-5
    r = compute_fsp(COUNTS, TOKENS, NAMES)
    np.testing.assert_allclose(r.metrics["pmi"][0], [math.log2(0.5 / 0.425), math.log2(1.6), 0.0], atol=1e-5)
    # printed form log2(P(e|g) / (P(e) P(g))), P(female) = 1/4, P(male) = 1/2
    r = compute_fsp(COUNTS, TOKENS, NAMES, options=FSPOptions(pmi_form="printed", pmi_smoothing=0.0))
    want = [max(math.log2(0.2 / (0.425 * 0.25)), math.log2(0.5 / (0.425 * 0.5))),
            max(math.log2(0.6 / (0.375 * 0.25)), math.log2(0.3 / (0.375 * 0.5))),
            max(math.log2(0.2 / (0.2 * 0.25)), math.log2(0.2 / (0.2 * 0.5)))]
    np.testing.assert_allclose(r.metrics["pmi"][0], want, atol=1e-12)
    # neutral baseline, mean over groups: female log2(.2/.5), log2(.6/.3), 0 ; male 0, 0, 0
    r = compute_fsp(COUNTS, TOKENS, NAMES, options=FSPOptions(pmi_baseline="neutral", pmi_aggregate="mean", pmi_smoothing=0.0))
    np.testing.assert_allclose(r.metrics["pmi"][0], [math.log2(0.4) / 2, 0.5, 0.0], atol=1e-12)


def test_jsd_by_hand_and_scipy():
    r = compute_fsp(COUNTS, TOKENS, NAMES)
    pd_, pn = np.array([0.4, 0.4, 0.2]), np.array([0.5, 0.3, 0.2])  # demographic pooled 12/12/6 of 30
    m = (pd_ + pn) / 2
    by_hand = 0.5 * (pd_ * np.log(pd_ / m) + pn * np.log(pn / m))
    np.testing.assert_allclose(r.metrics["jsd"][0], by_hand, rtol=1e-12)
    assert r.metrics["jsd"][0, 2] == 0.0
    assert r.layer["jsd"][0] == pytest.approx(jensenshannon(pd_, pn) ** 2, rel=1e-12)
    # per group: female .2 .6 .2 vs neutral; male equals neutral -> 0
    np.testing.assert_allclose(r.layer["jsd_by_group"][0], [jensenshannon([0.2, 0.6, 0.2], pn) ** 2, 0.0], atol=1e-15)


def test_phi_by_hand():
    r = compute_fsp(COUNTS, TOKENS, NAMES, options=FSPOptions(pmi_smoothing=0.0))
    j = r.metrics["jsd"][0]
    p0, p1 = math.log2(0.5 / 0.425), math.log2(1.6)
    want = (1.0 * np.array([1.0, 1.0, 0.0])
            + 0.5 * np.array([j[0] / max(j), j[1] / max(j), 0.0])
            + 0.3 * np.array([p0 / p1, 1.0, 0.0]))
    np.testing.assert_allclose(r.phi[0].numpy(), want, rtol=1e-12)
    assert r.phi.shape == (1, 3) and isinstance(r.phi, torch.Tensor)
    # weights are options: ARD only -> phi == ARD^
    r2 = compute_fsp(COUNTS, TOKENS, NAMES, options=FSPOptions(weights={"ard": 1.0, "jsd": 0.0, "pmi": 0.0}))
    np.testing.assert_allclose(r2.phi[0].numpy(), [1.0, 1.0, 0.0])


# ---------------------------------------------------------------- simulated top-2 routing


def _simulate(seed=0, L=3, E=8, k=2, groups=("neutral", "female", "male", "Muslim", "Jewish"), planted=None):
    rng = np.random.default_rng(seed)
    G = len(groups)
    counts = np.zeros((L, E, G))
    probs = np.zeros((L, E, G))
    tokens = np.zeros((L, G))
    base = rng.dirichlet(np.ones(E) * 2, size=L)
    if planted:
        base[planted[0]] = np.full(E, 1.0 / E)  # planted expert starts as an average one
    for g in range(G):
        n_tok = int(rng.integers(150, 300))
        for l in range(L):
            w = base[l] * rng.uniform(0.85, 1.15, E)
            if planted and g > 0 and l == planted[0]:
                w[planted[1]] *= 4.0  # demographic tokens love this expert
            w /= w.sum()
            p = rng.dirichlet(w * 30 + 1e-3, size=n_tok)  # [T, E] routing probabilities
            top = np.argsort(-p, axis=1)[:, :k]
            counts[l, :, g] += np.bincount(top.ravel(), minlength=E)
            probs[l, :, g] += p.sum(0)
            tokens[l, g] = n_tok
    return counts, probs, tokens, list(groups)


@pytest.fixture(scope="module")
def sim():
    return _simulate()


def _loop_reference(counts, tokens, names, w=(1.0, 0.5, 0.3), s=1e-6):
    """Independent, deliberately naive per-entry implementation of ARD / JSD / PMI / phi."""
    L, E, G = counts.shape
    ni = names.index("neutral")
    demo = [g for g in range(G) if g != ni]
    phi = np.zeros((L, E))
    for l in range(L):
        ard, jsd, pmi = [], [], []
        tot_d = sum(counts[l, e, g] for e in range(E) for g in demo)
        tot_n = sum(counts[l, e, ni] for e in range(E))
        for e in range(E):
            pn = counts[l, e, ni] / tokens[l, ni]
            ard.append(sum(abs(counts[l, e, g] / tokens[l, g] - pn) for g in demo) / len(demo))
            a = sum(counts[l, e, g] for g in demo) / tot_d
            b = counts[l, e, ni] / tot_n
            mm = (a + b) / 2
            jsd.append(0.5 * ((a * math.log(a / mm) if a > 0 else 0) + (b * math.log(b / mm) if b > 0 else 0)))
            pe = sum(counts[l, e, g] for g in range(G)) / sum(tokens[l, g] for g in range(G))
            pmi.append(max(math.log2((counts[l, e, g] / tokens[l, g] + s) / (pe + s)) for g in demo))
        for wi, vals in zip(w, (ard, jsd, pmi)):
            lo, hi = min(vals), max(vals)
            phi[l] += [wi * (v - lo) / (hi - lo) for v in vals]
    return phi


def test_phi_matches_independent_loops(sim):
    counts, _, tokens, names = sim
    r = compute_fsp(counts, tokens, names)
    np.testing.assert_allclose(r.phi.numpy(), _loop_reference(counts, tokens, names), rtol=1e-10, atol=1e-12)
    # torch inputs (as the recorder returns them) give the same numbers
    rt = compute_fsp(torch.tensor(counts, dtype=torch.int64), torch.tensor(tokens, dtype=torch.int64), names)
    torch.testing.assert_close(rt.phi, r.phi)


def test_layer_jsd_and_axes_match_scipy(sim):
    counts, _, tokens, names = sim
    axes = {"female": "gender", "male": "gender", "Muslim": "religion", "Jewish": "religion"}
    r = compute_fsp(counts, tokens, names, group_axes=axes)
    for l in range(counts.shape[0]):
        pn = counts[l, :, 0]
        assert r.layer["jsd"][l] == pytest.approx(jensenshannon(counts[l, :, 1:].sum(1), pn) ** 2, rel=1e-10)
        assert r.layer["jsd_by_axis"]["gender"][l] == pytest.approx(jensenshannon(counts[l, :, 1:3].sum(1), pn) ** 2, rel=1e-10)
        assert r.layer["jsd_by_axis"]["religion"][l] == pytest.approx(jensenshannon(counts[l, :, 3:].sum(1), pn) ** 2, rel=1e-10)
        for gi in range(4):
            assert r.layer["jsd_by_group"][l, gi] == pytest.approx(jensenshannon(counts[l, :, gi + 1], pn) ** 2, rel=1e-10)
    # probability-sum usage: JSD of normalised probability mass
    rp = compute_fsp(counts, tokens, names, prob_sums=sim[1], options=FSPOptions(usage="probability"))
    assert rp.layer["jsd"][0] == pytest.approx(jensenshannon(sim[1][0, :, 1:].sum(1), sim[1][0, :, 0]) ** 2, rel=1e-10)


def test_descriptors_match_scipy_and_hand(sim):
    counts, _, tokens, names = sim
    r = compute_fsp(counts, tokens, names)
    phi = r.phi.numpy()
    for l, d in enumerate(r.descriptors["layers"]):
        f = counts[l].sum(1) / counts[l].sum()
        np.testing.assert_allclose(r.metrics["frequency"][l], f, rtol=1e-12)
        assert d["spearman_phi_f"] == pytest.approx(spearmanr(phi[l], f).statistic, abs=1e-12)
        pairwise = np.abs(f[:, None] - f[None, :]).sum() / (2 * f.size**2 * f.mean())
        assert d["gini"] == pytest.approx(pairwise, rel=1e-12)
        assert d["top_share"] == pytest.approx(1.0)  # 8 experts, top-10 holds everything
    flat_f = np.concatenate([counts[l].sum(1) / counts[l].sum() for l in range(3)])
    assert r.descriptors["model"]["spearman_phi_f"] == pytest.approx(spearmanr(phi.ravel(), flat_f).statistic, abs=1e-12)
    top10 = np.sort(phi.ravel())[::-1][:10].sum() / phi.sum()
    assert r.descriptors["model"]["top_share"] == pytest.approx(top10, rel=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_planted_expert_ranked_first(seed):
    counts, _, tokens, names = _simulate(seed=seed, planted=(1, 5))
    r = compute_fsp(counts, tokens, names)
    assert int(torch.argmax(r.phi[1])) == 5  # first within its layer (per-layer min-max, the default)
    assert int(np.argmax(r.layer["jsd"])) == 1  # and its layer has the largest routing shift
    # Per-layer min-max gives every layer a maximal expert; the global option ranks across layers.
    g = compute_fsp(counts, tokens, names, options=FSPOptions(normalization="minmax_global"))
    top2 = np.sort(g.phi.numpy().ravel())[::-1][:2]
    assert np.unravel_index(int(torch.argmax(g.phi)), g.phi.shape) == (1, 5) and top2[0] > 2 * top2[1]


def test_small_helpers_by_hand():
    assert gini([1, 1, 1, 1]) == 0.0
    assert gini([0, 0, 0, 1]) == pytest.approx(0.75)
    assert gini([1, 2, 3]) == pytest.approx(8 / 36)
    assert top_share([5, 1, 1, 1, 2], k=2) == pytest.approx(0.7)
    ties = [3, 1, 2, 2, 5, 1]
    assert spearman(ties, [1, 2, 3, 4, 5, 6]) == pytest.approx(spearmanr(ties, [1, 2, 3, 4, 5, 6]).statistic)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    np.testing.assert_allclose(minmax(np.array([[2.0, 4.0, 3.0], [1.0, 1.0, 1.0]])), [[0, 1, 0.5], [0, 0, 0]])


def test_expert_mask_zeroes_padding(sim):
    counts, _, tokens, names = sim
    mask = np.ones(counts.shape[:2], bool)
    mask[2, 6:] = False
    c = counts.copy()
    c[2, 6:] = 0
    r = compute_fsp(c, tokens, names, expert_mask=mask)
    assert np.all(r.phi.numpy()[2, 6:] == 0)
    assert r.phi.numpy()[2, :6].max() > 0


def test_bad_input():
    with pytest.raises(ValueError, match=r"neutral group 'neutral' not among groups \['a', 'b'\]"):
        compute_fsp(np.ones((1, 2, 2)), np.ones((1, 2)) * 2, ["a", "b"])
    with pytest.raises(ValueError, match="ard_aggregate='median'; allowed: mean, max, token_weighted"):
        FSPOptions(ard_aggregate="median")
    with pytest.raises(ValueError, match="unknown FSP weight 'entropy'; allowed: ard, jsd, pmi, ent"):
        FSPOptions(weights={"entropy": 1.0})
    with pytest.raises(ValueError, match=r"counts\[0, 0, 1\]=5 exceeds tokens\[0, 1\]=2"):
        compute_fsp(np.array([[[1, 5], [1, 1]]]), np.array([[2, 2]]), ["neutral", "x"])
    with pytest.raises(ValueError, match="tokens must be"):
        compute_fsp(COUNTS, TOKENS[:, :2], NAMES)
    with pytest.raises(ValueError, match="no demographic group"):
        compute_fsp(COUNTS[:, :, :1], TOKENS[:, :1], ["neutral"])


def test_write_outputs_deterministic(tmp_path, sim):
    counts, _, tokens, names = sim
    paths_a = compute_fsp(counts, tokens, names, layers=[1, 2, 3]).write(tmp_path / "a")
    paths_b = compute_fsp(counts, tokens, names, layers=[1, 2, 3]).write(tmp_path / "b")
    for a, b in zip(paths_a, paths_b):
        assert a.read_bytes() == b.read_bytes()
    rows = paths_a[0].read_text().splitlines()
    assert rows[0].startswith("layer,expert,phi,ard,jsd,pmi") and len(rows) == 1 + 3 * 8
    doc = json.loads(paths_a[2].read_text())
    assert doc["options"]["weights"] == {"ard": 1.0, "jsd": 0.5, "pmi": 0.3, "ent": 0.0}
    assert [d["layer"] for d in doc["descriptors"]["layers"]] == [1, 2, 3]


def test_non_finite_phi_is_refused():
    from fare_core.errors import FareError

    # pmi_smoothing=0 and an expert (3) that no demographic group selects: log2(0) = -inf -> NaN after min-max
    counts = np.zeros((1, 4, 3))
    counts[0, :, 0] = [5, 5, 5, 5]
    counts[0, :, 1] = [10, 10, 0, 0]
    counts[0, :, 2] = [10, 0, 10, 0]
    tokens = np.full((1, 3), 10.0)
    args = (counts, tokens, ["neutral", "a", "b"])
    with np.errstate(all="ignore"), pytest.raises(FareError, match=r"FSP: phi has 4 non-finite values .*use a smoothing > 0"):
        compute_fsp(*args, group_axes={"a": "x", "b": "x"}, options=FSPOptions(pmi_smoothing=0.0))
    phi = compute_fsp(*args, group_axes={"a": "x", "b": "x"}).phi  # the default smoothing keeps it finite
    assert torch.isfinite(phi).all()
