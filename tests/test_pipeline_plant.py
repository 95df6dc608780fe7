"""Planted demographic-sensitive expert (issue 4 acceptance): profiling ranks it first, AALS picks
its layer, ARR lowers its selection rate.

The model is a fare-tiny OLMoE edited in the test so that the truth is known by construction:

* attention outputs are zeroed, so routing depends on the token alone (a descriptor changes the
  routing of its own tokens only, never of the shared tokens around it);
* the planted axis's descriptors are written in upper-case bytes that occur in no other prompt;
  their embeddings are the lower-case letters' plus a component on a reserved hidden dimension
  ``U`` that nothing writes to and no router except the planted one reads;
* at layer ``L_STAR`` the router row of expert ``E_STAR`` reads only ``U`` (it fires on planted
  bytes and on nothing else); the layer's other rows are scaled down (same ranking);
* expert ``E_STAR`` writes a large value on a reserved dimension ``BOOST`` that only the LM head
  reads (it boosts one token), so when it fires the next-token distribution changes a lot.

"Ranks first" = the largest phi over all (layer, expert) slots, under the paper's per-layer
min-max (Eq. 4) and under global min-max, and the largest raw ARD (Eq. 1).
"""

import numpy as np
import pytest
import torch

L_STAR, E_STAR, U, BOOST = 2, 5, 63, 62
PLANTED = ["KAZAKH", "QAJAR", "ZULU", "HAUSA"]


@pytest.fixture(scope="module")
def planted():
    from fare_core.tiny import build_tiny_model, build_tokenizer
    from fare_pipeline.prompts import build_prompt_set, load_resources

    tok = build_tokenizer()
    res = load_resources()
    ps = build_prompt_set(templates=res["templates"][:4], professions=res["professions"][:6],
                          descriptors={"nationality": PLANTED, "gender": ["female", "male"]}, contexts_per_descriptor="all")
    planted_chars = sorted(set("".join(PLANTED)))
    assert not any(set(planted_chars) & set(p.text) for p in ps.prompts if p.axis != "nationality")
    one = lambda c: tok(c, add_special_tokens=False)["input_ids"][0]
    model = build_tiny_model("olmoe", seed=0)
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[[one(c) for c in planted_chars]] = emb[[one(c.lower()) for c in planted_chars]]
        emb[:, U] = -0.02
        emb[[one(c) for c in planted_chars], U] = 0.05
        emb[:, BOOST] = 0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.experts.down_proj[:, [U, BOOST], :] = 0
            layer.mlp.gate.weight[:, [U, BOOST]] = 0
            layer.input_layernorm.weight[BOOST] = 0
            layer.post_attention_layernorm.weight[BOOST] = 0
        layer = model.model.layers[L_STAR]
        g = layer.mlp.gate.weight
        g *= 0.1
        g[E_STAR] = 0
        g[E_STAR, U] = 0.4
        ex = layer.mlp.experts
        inter = ex.down_proj.shape[-1]
        ex.gate_up_proj[E_STAR] = 0
        ex.gate_up_proj[E_STAR, 0, U] = 1.0
        ex.gate_up_proj[E_STAR, inter, U] = 1.0
        ex.down_proj[E_STAR] = 0
        ex.down_proj[E_STAR, BOOST, 0] = 10.0
        model.lm_head.weight[:, BOOST] = 0
        model.lm_head.weight[one(" "), BOOST] = 3.0
    return model, tok, ps


def test_profiling_ranks_planted_expert_first(planted, tmp_path):
    from fare_models.profile import load_profile
    from fare_pipeline.fsp import FSPOptions, compute_fsp
    from fare_pipeline.profiling import profile_model

    model, tok, ps = planted
    out = profile_model(model, tok, ps, tmp_path, model_id="planted", split="all", plots=False)
    phi = load_profile(tmp_path / "phi.safetensors").phi.numpy()
    rows = out["result"].layers
    assert np.unravel_index(phi.argmax(), phi.shape) == (rows.index(L_STAR), E_STAR)
    assert phi[rows.index(L_STAR), E_STAR] == pytest.approx(1.8)  # max of ARD, JSD and PMI in its layer
    ard = out["result"].metrics["ard"]
    assert np.unravel_index(ard.argmax(), ard.shape) == (rows.index(L_STAR), E_STAR)
    assert ard[rows.index(L_STAR), E_STAR] > 1.5 * np.sort(ard.ravel())[-2]  # a clear margin
    rec = out["recorder"]
    glob = compute_fsp(rec.counts, rec.tokens, rec.group_names, layers=rec.layer_indices,
                       options=FSPOptions(normalization="minmax_global")).phi.numpy()
    assert np.unravel_index(glob.argmax(), glob.shape) == (rows.index(L_STAR), E_STAR)
    # the planted expert is never selected on neutral prompts and often on the planted axis
    c, groups = rec.counts.numpy(), rec.group_names
    assert c[rows.index(L_STAR), E_STAR, groups.index("neutral")] == 0
    assert all(c[rows.index(L_STAR), E_STAR, groups.index(d)] > 50 for d in PLANTED)


def test_aals_picks_planted_layer_and_arr_lowers_selection(planted, tmp_path):
    from fare_models.surgery import ARR
    from fare_pipeline.engine import Engine, encode_request
    from fare_pipeline.evalsets import EvalSet
    from fare_pipeline.fsp import compute_fsp
    from fare_pipeline.profiling import record_routing
    from fare_pipeline.stages import aals_probes

    model, tok, ps = planted
    rec = record_routing(model, tok, ps)
    phi = compute_fsp(rec.counts, rec.tokens, rec.group_names, layers=rec.layer_indices).phi.float()
    # CrowS-style probe pairs: the planted descriptor vs the same letters in lower case (equal length)
    ev = EvalSet()
    rows = [[ev.add(encode_request(tok, "", p.text)), ev.add(encode_request(tok, "", p.text.replace(p.group, p.group.lower())))]
            for p in ps.prompts if p.group in PLANTED]
    ev.crows_rows, ev.crows_length_matched = np.asarray(rows), np.ones(len(rows), bool)
    ev.ppl_rows = np.asarray([ev.add(encode_request(tok, "", p.text)) for p in ps.neutral])
    for mode in ("cached", "naive"):
        res, m = aals_probes(model, Engine(model, tok, ev.requests, mode=mode), ev, phi, rec.layer_indices)
        assert res.selected == [L_STAR] and not res.fallback
        assert m["base"]["pref"] == 0.0  # the planted expert decides every pair
        assert res.delta_bias[res.layers.index(L_STAR)] > 0.2
        assert max(r for l, r in zip(res.layers, res.ratio) if l != L_STAR) <= 0.0
    # ARR at lambda > 0 lowers the planted expert's selection rate (Recorder counts), lambda = 0 does not
    before = rec.counts.numpy()[rec.layer_indices.index(L_STAR), E_STAR].sum()
    with ARR(model, phi, 0.0, layers=[L_STAR]):
        same = record_routing(model, tok, ps).counts.numpy()[rec.layer_indices.index(L_STAR), E_STAR].sum()
    with ARR(model, phi, 1.0, layers=[L_STAR]):
        after = record_routing(model, tok, ps).counts.numpy()[rec.layer_indices.index(L_STAR), E_STAR].sum()
    assert same == before > 400 and after < 0.1 * before
