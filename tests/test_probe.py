"""fare_pipeline.probe: prefix-cached suffix runs equal full forwards under ARR (tiny MoE models)."""

import math

import pytest
import torch

from fare_pipeline.probe import PrefixCache, nll_and_count, pair_preference, sequence_logprob


def _batch(tok, texts):
    enc = [tok(t)["input_ids"] for t in texts]
    T = max(map(len, enc))
    ids = torch.zeros(len(enc), T, dtype=torch.long)
    am = torch.zeros(len(enc), T, dtype=torch.long)
    for i, e in enumerate(enc):
        ids[i, : len(e)] = torch.tensor(e)
        am[i, : len(e)] = 1
    return ids, am


@pytest.mark.parametrize("model_type", ["olmoe", "qwen2_moe"])
def test_suffix_equals_full_forward_under_arr(model_type):
    from fare_models.surgery import ARR, RoutingController
    from fare_core.tiny import build_tiny_model, build_tokenizer

    model, tok = build_tiny_model(model_type), build_tokenizer()
    ids, am = _batch(tok, ["The nurse answered.", "The female engineer stayed late.", "A chef"])
    ctl = RoutingController.of(model)
    n_layers = len(ctl.layers)
    phi = torch.rand(n_layers, ctl.layers[0].num_experts, generator=torch.Generator().manual_seed(0))
    cache = PrefixCache(model)
    base = cache.run(ids, am)
    with torch.inference_mode():
        torch.testing.assert_close(base, model(input_ids=ids, attention_mask=am).logits)
    n_dec = len(cache.layers)
    assert cache.layer_evals == n_dec
    for moe in ctl.layers:
        with ARR(model, phi, lam=3.0, layers=[moe.index]), torch.inference_mode():
            full = model(input_ids=ids, attention_mask=am).logits
            part = cache.run_from(moe.index)
        torch.testing.assert_close(part, full, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(full, base)  # the probe really changed something
    assert cache.layer_evals == n_dec + sum(n_dec - m.index for m in ctl.layers)


def test_scoring_by_hand():
    # vocabulary of 2, uniform logits: every scored token has log-prob log(1/2)
    logits = torch.zeros(2, 3, 2)
    ids = torch.tensor([[0, 1, 1], [1, 0, 0]])
    am = torch.tensor([[1, 1, 1], [1, 1, 0]])
    torch.testing.assert_close(sequence_logprob(logits, ids, am), torch.tensor([2 * math.log(0.5), math.log(0.5)]))
    nll, n = nll_and_count(logits, ids, am)
    assert n == 3 and nll == pytest.approx(3 * math.log(2))
    assert pair_preference(torch.tensor([1.0, -2.0, 3.0, 0.0]), torch.tensor([0.0, 0.0, 0.0, 0.0])) == 0.5


def test_run_probes_cached_equals_naive_with_fewer_layer_evals():
    from fare_models.surgery import ARR, RoutingController
    from fare_core.tiny import build_tiny_model, build_tokenizer
    from fare_pipeline.probe import run_probes

    model, tok = build_tiny_model("olmoe"), build_tokenizer()
    ctl = RoutingController.of(model)
    phi = torch.rand(len(ctl.layers), 8, generator=torch.Generator().manual_seed(1))
    pairs = [("The poor man stole it.", "The rich man stole it."), ("She cannot drive.", "He cannot drive."),
             ("Old people are slow.", "Young people are slow.")]
    texts = ["The doctor carefully reviewed the report.", "Yesterday the pilot explained the plan."]
    configs = [("base", None, None)] + [
        (f"layer{m.index}", (lambda i=m.index: ARR(model, phi, 1.0, layers=[i])), m.index) for m in ctl.layers
    ] + [(f"lam{lam}", (lambda lam=lam: ARR(model, phi, lam, layers=[2, 3])), 2) for lam in (0.5, 2.0)]
    fast = run_probes(model, tok, pairs, texts, configs, batch_size=2, cached=True)
    slow = run_probes(model, tok, pairs, texts, configs, batch_size=2, cached=False)
    for name, r in slow["results"].items():
        assert fast["results"][name]["pref"] == r["pref"]
        assert fast["results"][name]["ppl"] == pytest.approx(r["ppl"], rel=1e-5)
    assert len({round(r["ppl"], 9) for r in slow["results"].values()}) > 1  # probes differ from each other
    # per batch: naive 7 configs x 4 layers; cached 4 (base) + 4+3+2+1 (AALS) + 2+2 (grid)
    n_batches = 2 + 1
    assert slow["layer_evals"] == n_batches * 7 * 4 and fast["layer_evals"] == n_batches * 18


def test_aals_and_tune_drivers_agree_cached_vs_naive():
    from fare_core.tiny import build_tiny_model, build_tokenizer
    from fare_pipeline.probe import aals_probe, tune_probe

    model, tok = build_tiny_model("olmoe"), build_tokenizer()
    phi = torch.rand(4, 8, generator=torch.Generator().manual_seed(2))
    pairs = [("The poor man stole it.", "The rich man stole it."), ("She cannot drive.", "He cannot drive.")]
    texts = ["The doctor carefully reviewed the report."]
    a_fast, o_fast = aals_probe(model, tok, phi, pairs, texts, cached=True)
    a_slow, o_slow = aals_probe(model, tok, phi, pairs, texts, cached=False)
    assert a_fast.selected == a_slow.selected and a_fast.layers == [0, 1, 2, 3]
    assert o_fast["layer_evals"] < o_slow["layer_evals"]
    t_fast, _ = tune_probe(model, tok, phi, a_fast.selected, pairs, texts, lambdas=[0.0, 1.0, 4.0], beta=10.0)
    t_slow, _ = tune_probe(model, tok, phi, a_fast.selected, pairs, texts, lambdas=[0.0, 1.0, 4.0], beta=10.0,
                           cached=False)
    assert t_fast.lambda_star == t_slow.lambda_star and t_fast.feasible
    assert [row["ppl"] for row in t_fast.grid] == pytest.approx([row["ppl"] for row in t_slow.grid], rel=1e-5)
