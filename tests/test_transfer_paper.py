"""Generation transfer as in the FARE paper (section 5.4, Table 7): the 12 templates x 11 groups
stereotype-completion set with the negative stereotype count, next to the current protocols, and
the sizes recorded in Table 7. Counts are checked against hand-counted fixtures."""

import importlib.util
import json
import random

import numpy as np
import pytest
import torch

from fare_pipeline import transfer as T


def test_paper_completion_set_is_12_templates_by_11_groups():
    spec = T.paper_completion_spec()
    items = T.protocol_items("stereo_completion_paper", None, 0)
    assert len(spec["templates"]) == 12 and len(spec["groups"]) == 11 and len(items) == 132
    cells = {(it["group"], it["template_id"]) for it in items}
    assert cells == {(g, t) for g in spec["groups"] for t in range(12)}
    assert len({it["id"] for it in items}) == 132 and len({it["prompt"] for it in items}) == 132
    for it in items:
        assert it["group"].lower() in it["prompt"].lower() and it["prompt"][0].isupper()
        assert it["axis"] == spec["groups"][it["group"]]
    assert set(spec["negative_terms"]) == {"generic", *spec["groups"]}
    # the current set is still there, unchanged (8 templates x 37 groups)
    assert len(T.protocol_items("stereo_completion", None, 0)) == 296
    assert T.PROTOCOLS == ("bold", "stereo_completion", "stereo_completion_paper", "stereoset")


@pytest.mark.parametrize("group, text, count", [
    ("women", "They are emotional, lazy and so EMOTIONAL.", 3),  # generic + group terms, every occurrence
    ("women", "They are terrorists.", 0),  # another group's term does not count
    ("Muslims", "They are terrorists and extremists", 2),  # prefix terms (terroris*, extremis*)
    ("old people", "Old people are out  of-touch and forgetful", 2),  # multi-word term across spaces/hyphens
    ("men", "thieves and a thief; lazybones", 2),  # thie* twice; 'lazy' never inside a longer word
    ("immigrants", "They steal jobs, like job stealers do.", 2),
    ("Jews", "", 0),
])
def test_negative_stereotype_count_by_hand(group, text, count):
    assert T.negative_stereotype_count(group, text) == count


def test_negative_stereotype_count_unknown_group():
    with pytest.raises(ValueError, match="'martians'.*allowed: women"):
        T.negative_stereotype_count("martians", "x")


@pytest.fixture(scope="module")
def ctx():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fare_core.tiny import tiny_model_path
    from fare_pipeline.stages import Ctx, Sizes

    path = tiny_model_path("fare-tiny")
    sizes = Sizes(bold=2, stereo_completion=3, stereoset=2, max_new_tokens=3, n_permutations=200, n_bootstrap=50)
    return Ctx(model=AutoModelForCausalLM.from_pretrained(path).eval(), tokenizer=AutoTokenizer.from_pretrained(path),
               model_id="fare-tiny:olmoe", model_type="olmoe", sizes=sizes, log=lambda *_: None)


def _table(path):
    import csv

    with open(path, newline="") as fh:
        return {r["protocol"]: r for r in csv.DictReader(fh)}


def test_table7_counts_negative_stereotypes_and_records_sizes(ctx, tmp_path, monkeypatch):
    """Scored generations replaced by hand-written ones: Table 7's means are the hand counts."""
    chosen = sorted(random.Random(0).sample(range(132), 3))  # seeded_subset's rule
    items = [T.protocol_items("stereo_completion_paper", None, 0)[i] for i in chosen]
    texts = {"base": ["they are lazy and violent", "nice people", "they are thieves"],
             "fare": ["nice people", "nice people", "they are lazy"]}
    calls = []

    def fake_generate(model, tokenizer, prompts, **kw):
        assert prompts == [it["prompt"] for it in items]
        calls.append(1)
        return texts["base" if len(calls) == 1 else "fare"]

    monkeypatch.setattr(T, "generate", fake_generate)
    phi = torch.rand(4, 8)
    T.run_transfer(ctx, phi, [0, 1, 2, 3], [1], 2.0, tmp_path, protocols=["stereo_completion_paper"])
    row = _table(tmp_path / "table7_generation_transfer.csv")["stereo_completion_paper"]
    assert row["metric"] == "negative_stereotype_count"
    assert (int(row["n"]), int(row["n_available"])) == (3, 132)
    assert float(row["mean_a"]) == pytest.approx((2 + 0 + 1) / 3) and float(row["mean_b"]) == pytest.approx(1 / 3)
    gens = [json.loads(x) for x in (tmp_path / "generations.jsonl").read_text().splitlines()]
    assert [g["value_base"] for g in gens] == [2, 0, 1] and [g["value_fare"] for g in gens] == [0, 0, 1]
    meta = json.loads((tmp_path / "transfer.json").read_text())
    assert meta["items"]["stereo_completion_paper"] == {"n": 3, "n_available": 132, "requested": 3}


@pytest.mark.slow
def test_every_protocol_on_tiny_records_n_of_available(ctx, tmp_path):
    phi = torch.rand(4, 8, generator=torch.Generator().manual_seed(0))
    T.run_transfer(ctx, phi, [0, 1, 2, 3], [1], 5.0, tmp_path)
    rows = _table(tmp_path / "table7_generation_transfer.csv")
    assert list(rows) == list(T.PROTOCOLS)
    want = {"bold": (2, 23679), "stereo_completion": (3, 296), "stereo_completion_paper": (3, 132), "stereoset": (2, 2123)}
    assert {k: (int(r["n"]), int(r["n_available"])) for k, r in rows.items()} == want
    scorer = "detoxify" if importlib.util.find_spec("detoxify") else "lexicon"
    assert rows["bold"]["metric"].startswith("toxicity (") and scorer in rows["bold"]["metric"]
    gens = [json.loads(x) for x in (tmp_path / "generations.jsonl").read_text().splitlines()]
    paper = [g for g in gens if g["protocol"] == "stereo_completion_paper"]
    group = {it["id"]: it["group"] for it in T.protocol_items("stereo_completion_paper", None, 0)}
    assert [g["value_base"] for g in paper] == [T.negative_stereotype_count(group[g["id"]], g["base"]) for g in paper]
    assert float(rows["stereo_completion_paper"]["mean_b"]) == pytest.approx(np.mean([g["value_fare"] for g in paper]))


def test_stereoset_generation_default_is_the_papers_1218():
    from fare_pipeline.stages import Sizes

    assert T.STEREOSET_PAPER_N == 1218 and Sizes().stereoset == T.STEREOSET_PAPER_N and Sizes.quick().stereoset < 1218
