"""fare_pipeline.probe: prefix-cached suffix runs equal full forwards under ARR (tiny MoE models)."""

import pytest
import torch

from fare_pipeline.probe import PrefixCache


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
    from fare_core.tiny import build_tiny_model, build_tokenizer
    from fare_models.surgery import ARR, RoutingController

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
