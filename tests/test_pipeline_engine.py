"""fare_pipeline.engine: prefix-tree packing, exact log-likelihoods (vs per-request forwards and vs
lm-eval's HFLM), honest work counts, base-pass reuse across calls."""

import numpy as np
import pytest
import torch

from fare_pipeline.engine import (
    Engine,
    build_batches,
    encode_request,
    make_arr,
    make_mask,
    pack_rows,
)


@pytest.fixture(scope="module")
def tiny():
    from fare_core.tiny import build_tiny_model, build_tokenizer

    return build_tiny_model("olmoe", seed=0), build_tokenizer()


def test_pack_rows_shares_prefixes_by_hand():
    seqs = [[1, 2, 3], [1, 2, 4], [5, 6], [1, 2, 3, 7]]
    (row,) = pack_rows(seqs, max_row_tokens=100)
    # lexicographic order [1,2,3] [1,2,3,7] [1,2,4] [5,6]: 7 distinct prefix-tree nodes
    assert [(i, nodes) for i, nodes, _ in row] == [(0, [0, 1, 2]), (3, [0, 1, 2, 3]), (1, [0, 1, 4]), (2, [5, 6])]
    # a full row takes a request only if it shares more than it adds, and never beyond 4x the limit
    assert [[i for i, _, _ in r] for r in pack_rows(seqs, max_row_tokens=4)] == [[0, 3, 1], [2]]
    assert [[i for i, _, _ in r] for r in pack_rows(seqs, max_row_tokens=1)] == [[0, 3], [1], [2]]
    # a request that mostly shares its prefix stays in the row (TruthfulQA choices after one context)
    ctx = list(range(10, 30))
    assert len(pack_rows([ctx + [1], ctx + [2], ctx + [3]], max_row_tokens=8)) == 1


def _reference_ll(model, ids, n_ctx):
    with torch.inference_mode():
        lp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    return sum(float(lp[t - 1, ids[t]]) for t in range(n_ctx, len(ids)))


def test_cached_and_naive_equal_per_request_forwards(tiny):
    model, tok = tiny
    reqs = [encode_request(tok, "", s) for s in ("The poor man stole it.", "The rich man stole it.",
                                                  "Women can't drive.", "Men can't drive.")]
    reqs += [encode_request(tok, "Q: What is 2+2?\nA:", c) for c in (" 4", " 5", " four")]
    assert reqs[0][1] == 1 and reqs[0][0][0] == tok.bos_token_id  # prefix token as empty context
    phi = torch.rand(4, 8, generator=torch.Generator().manual_seed(3))
    configs = [("base", None, None), ("l2", make_arr(model, phi, 2.0, [2]), 2), ("l1+3", make_arr(model, phi, 1.0, [1, 3]), 1)]
    got = {mode: Engine(model, tok, reqs, mode=mode, max_row_tokens=32).score(configs) for mode in ("cached", "naive")}
    from fare_models.surgery import ARR

    for name, edit in (("base", None), ("l2", lambda: ARR(model, phi, 2.0, layers=[2])), ("l1+3", lambda: ARR(model, phi, 1.0, layers=[1, 3]))):
        if edit is None:
            ref = [_reference_ll(model, ids, c) for ids, c in reqs]
        else:
            with edit():
                ref = [_reference_ll(model, ids, c) for ids, c in reqs]
        for mode in ("cached", "naive"):
            np.testing.assert_allclose(got[mode][name], ref, rtol=1e-5, atol=1e-4)
    assert not np.allclose(got["cached"]["base"], got["cached"]["l2"])


def test_loglikelihoods_match_lm_eval(tiny_path):
    """Same numbers as lm-eval's HFLM on the fare_crows_pairs / fare_truthfulqa formulation."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=str(tiny_path), device="cpu", batch_size=4)
    pairs = [("", "The poor are lazy."), ("", "Old people can't use phones."),
             ("Q: Where is Paris?\nA:", " In France."), ("Q: Where is Paris?\nA: ", "In Spain.")]
    inst = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
    ref = [ll for ll, _ in lm.loglikelihood(inst, disable_tqdm=True)]
    reqs = [encode_request(lm.tokenizer, c, x) for c, x in pairs]
    got = Engine(lm.model, lm.tokenizer, reqs).score([("base", None, None)])["base"]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)


def test_work_counts_and_base_reuse(tiny):
    model, tok = tiny
    texts = ["The nurse helped.", "The nurse left.", "A chef cooked dinner.", "A chef cooked lunch.", "Hi there"]
    reqs = [encode_request(tok, "", t) for t in texts]
    phi = torch.rand(4, 8, generator=torch.Generator().manual_seed(4))
    # naive: each config is a full forward of padded length-sorted batches; last token dropped (lm-eval)
    naive = Engine(model, tok, reqs, mode="naive", batch_size=2)
    lens = sorted(len(ids) - 1 for ids, _ in reqs)
    positions = sum(len(lens[i : i + 2]) * max(lens[i : i + 2]) for i in range(0, len(lens), 2))
    naive.score([("base", None, None), ("p", make_arr(model, phi, 1.0, [2]), 2)])
    assert naive.token_layer_evals == 2 * 4 * positions and naive.layer_calls == 2 * 4 * 3
    # cached: the tree has fewer nodes than the requests have tokens
    cached = Engine(model, tok, reqs, mode="cached")
    (batch,) = cached.batches
    prefixes = {tuple(ids[: k + 1]) for ids, _ in reqs for k in range(len(ids) - 1)}  # one tree node each
    assert int((batch.input_ids != tok.pad_token_id).sum()) == len(prefixes) < sum(lens)
    cached.score([("base", None, None), ("p", make_arr(model, phi, 1.0, [2]), 2)])
    P = batch.positions
    assert cached.token_layer_evals == P * (4 + 2)
    # a later call reuses the kept base pass: only the suffix runs; an identical config is memoised
    cached.score([("base", None, None), ("q", make_arr(model, phi, 2.0, [3]), 3), ("p2", make_arr(model, phi, 1.0, [2]), 2)])
    assert cached.token_layer_evals == P * (4 + 2 + 1)


def test_equal_configs_scored_once_and_lambda_zero_is_the_base_pass(tiny):
    """Exact reuse within one call: configurations with equal keys (same profile bytes, lambda and
    layers; same mask set in any order) run once, ARR at lambda = 0 runs nothing. Checked against
    the naive engine, which runs every configuration, and against an independent layer counter."""
    from fare_pipeline.work import LayerWork

    model, tok = tiny
    reqs = [encode_request(tok, "", t) for t in ("The nurse helped.", "The nurse left.", "A chef cooked dinner.")]
    phi = torch.rand(4, 8, generator=torch.Generator().manual_seed(5))

    def configs():
        return [("base", None, None), ("a", make_arr(model, phi, 1.0, [2]), 2),
                ("a_again", make_arr(model, phi.clone() ** 1.0, 1.0, [2]), 2),  # power alpha = 1: same bytes
                ("zero", make_arr(model, phi, 0.0, [1]), 1),
                ("m", make_mask(model, [(3, 1), (3, 4)]), 3), ("m_again", make_mask(model, [(3, 4), (3, 1)]), 3),
                ("other", make_arr(model, phi, 2.0, [2]), 2)]

    got = {}
    for mode in ("naive", "cached"):
        eng = Engine(model, tok, reqs, mode=mode)
        with LayerWork(model) as work:
            got[mode] = eng.score(configs())
        assert work.token_layer_evals == eng.token_layer_evals  # two independent counts of the same work
        got[mode + "_work"] = eng.token_layer_evals
        P = sum(b.positions for b in eng.batches)
        # naive: 7 full forwards; cached: base (4 layers) + a (2) + m (1) + other (2), nothing for the rest
        assert eng.token_layer_evals == P * (7 * 4 if mode == "naive" else 4 + 2 + 1 + 2)
    c, n = got["cached"], got["naive"]
    assert np.array_equal(c["a"], c["a_again"]) and np.array_equal(c["m"], c["m_again"])
    assert np.array_equal(c["zero"], c["base"])
    # the shortcut is exact: the naive engine really runs ARR at lambda = 0 and gets the base bit for bit
    assert np.array_equal(n["zero"], n["base"])
    for name in c:
        np.testing.assert_allclose(c[name], n[name], rtol=1e-5, atol=1e-4)
    assert not np.allclose(c["a"], c["other"]) and not np.allclose(c["m"], c["base"])


def test_bad_requests(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="no requests"):
        Engine(model, tok, [])
    with pytest.raises(ValueError, match="mode='fast'; allowed: cached, naive"):
        build_batches([([1, 2], 1)], mode="fast", pad_id=0)
    with pytest.raises(ValueError, match="adds no tokens"):
        encode_request(tok, "abc", "")


def test_half_precision_model_gets_a_mask_of_its_dtype():
    from fare_core.tiny import build_tiny_model, build_tokenizer

    model, tok = build_tiny_model("olmoe").to(torch.bfloat16), build_tokenizer()
    reqs = [encode_request(tok, "", s) for s in ("The poor man stole it.", "The rich man stole it.")]
    eng = Engine(model, tok, reqs, mode="cached")
    assert eng.batches[0].attention_mask.dtype == torch.bfloat16
    got = eng.score([("base", None, None)])["base"]
    ref = Engine(model, tok, reqs, mode="naive").score([("base", None, None)])["base"]
    np.testing.assert_allclose(got, ref, rtol=2e-2)  # equal up to bf16 rounding


def test_sliding_window_models_fall_back_to_padded_rows():
    from fare_core.tiny import build_tiny_model, build_tokenizer

    model, tok = build_tiny_model("gpt_oss"), build_tokenizer()  # sliding_window=128
    short = [encode_request(tok, "", "The poor man stole it."), encode_request(tok, "", "The rich man stole it.")]
    long = [encode_request(tok, "", "x" * 200 + " end."), encode_request(tok, "", "x" * 200 + " stop.")]
    assert Engine(model, tok, short).packed and not Engine(model, tok, long).packed
    for reqs in (short, long):
        got = Engine(model, tok, reqs).score([("base", None, None)])["base"]
        ref = [_reference_ll(model, ids, c) for ids, c in reqs]
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)
