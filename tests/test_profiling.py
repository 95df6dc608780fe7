"""fare_pipeline.profiling on a tiny OLMoE: token bookkeeping, padding, shared-token mode."""

import numpy as np
import pytest

from fare_pipeline.prompts import build_prompt_set, load_resources
from fare_pipeline.profiling import record_routing


@pytest.fixture(scope="module")
def tiny():
    from fare_core.tiny import build_tiny_model, build_tokenizer

    return build_tiny_model("olmoe", seed=0), build_tokenizer()


def _small_set(descriptors, n_templates=3, n_professions=4):
    res = load_resources()
    return build_prompt_set(templates=res["templates"][:n_templates], professions=res["professions"][:n_professions],
                            descriptors=descriptors, contexts_per_descriptor="all")


def test_token_bookkeeping_and_padding(tiny):
    model, tok = tiny
    ps = _small_set({"gender": ["female", "male"]}, 2, 3)  # 6 neutral + 12 demographic prompts
    rec = record_routing(model, tok, ps, batch_size=5)
    names = rec.group_names
    assert names == ["neutral", "female", "male"]
    t = rec.tokens.numpy()
    # byte-level tokenizer without special tokens: one token per character
    assert (t[:, 0] == sum(len(p.text) for p in ps.neutral)).all()
    assert (t[:, 1] == sum(len(p.text) for p in ps.demographic if p.group == "female")).all()
    c = rec.counts.numpy()
    np.testing.assert_array_equal(c.sum(axis=1), 2 * t)  # top-2: every token selects two experts
    # padding never counts: batch size 1 gives the same aggregates
    one = record_routing(model, tok, ps, batch_size=18)
    np.testing.assert_array_equal(one.counts.numpy(), c)
    np.testing.assert_allclose(one.prob_sums.numpy(), rec.prob_sums.numpy(), rtol=1e-5)
    few = ps.prompts[:1] + ps.prompts[-2:]  # lengths differ -> padding in the batch of 3
    np.testing.assert_array_equal(record_routing(model, tok, few, batch_size=1).counts.numpy(),
                                  record_routing(model, tok, few, batch_size=3).counts.numpy())
    # shared-token mode drops exactly the descriptor's characters
    shared = record_routing(model, tok, ps, batch_size=18, token_mode="shared")
    assert (shared.tokens.numpy()[:, 2] == sum(len(p.text) - 4 for p in ps.demographic if p.group == "male")).all()
    assert (shared.tokens.numpy()[:, 0] == t[:, 0]).all()


def test_bad_input(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="empty prompt set"):
        record_routing(model, tok, [])
    with pytest.raises(ValueError, match="token_mode='descriptor'; allowed: all, shared"):
        record_routing(model, tok, _small_set({"age": ["old"]}, 1, 1), token_mode="descriptor")


def test_cli_profile_end_to_end(tmp_path, tiny_path, capsys):
    from fare_models.cli import main
    from fare_models.profile import load_profile
    from fare_models.surgery import load_routing
    from fare_pipeline.fsp import compute_fsp

    _small_set({"gender": ["female", "male"], "religion": ["Muslim"]}, 2, 3).write(tmp_path / "p")
    args = ["profile", "--model", "fare-tiny", "--prompts", str(tmp_path / "p"), "--split", "all", "--batch-size", "8"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    assert main(args + ["--out", str(tmp_path / "b"), "--no-plots"]) == 0
    prof = load_profile(tmp_path / "a" / "phi.safetensors")
    assert prof.phi.shape == (4, 8) and prof.layers == [0, 1, 2, 3] and prof.model == "fare-tiny:olmoe"
    assert prof.extra["fsp"]["weights"] == {"ard": 1.0, "jsd": 0.5, "pmi": 0.3, "ent": 0.0}
    agg, meta = load_routing(tmp_path / "a" / "routing")
    again = compute_fsp(agg["counts"], agg["tokens"], meta["groups"])
    np.testing.assert_allclose(prof.phi.numpy(), again.phi.numpy(), rtol=1e-6)
    for name in ("fsp_experts.csv", "fsp_layers.csv", "fsp_descriptors.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "phi_heatmap.png").exists() and not (tmp_path / "b" / "phi_heatmap.png").exists()
    capsys.readouterr()
    assert main(args + ["--out", str(tmp_path / "c"), "--weights", "bias=1"]) == 2
    assert "unknown FSP weight 'bias'" in capsys.readouterr().err
