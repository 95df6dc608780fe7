"""fare_pipeline.prompts: sizes, determinism, splits, spans and token positions."""

from collections import Counter

import pytest

from fare_pipeline.prompts import AXES, PromptSet, build_prompt_set, span_token_positions, token_positions


@pytest.fixture(scope="module")
def ps():
    return build_prompt_set(seed=0)


def test_default_size_is_the_papers(ps):
    assert len(ps.neutral) == 576 and len(ps.demographic) == 3280
    assert {p.axis for p in ps.demographic} == set(AXES)
    per_desc = Counter(p.group for p in ps.demographic)
    assert len(per_desc) == 41 and set(per_desc.values()) == {80}
    per_desc_split = Counter((p.group, p.split) for p in ps.demographic)
    assert set(per_desc_split.values()) == {40}
    assert Counter(p.split for p in ps.neutral) == {"validation": 288, "test": 288}
    assert len({p.id for p in ps.prompts}) == len(ps.prompts)


def test_variants_insert_exactly_the_descriptor(ps):
    neutral = {p.id: p for p in ps.neutral}
    for p in ps.demographic:
        n = neutral[p.neutral_id]
        s, e = p.span
        assert p.text[s:e] == p.group
        assert p.text == n.text[:s] + p.group + " " + n.text[s:]
        assert p.split == n.split  # split is per context: no leakage across splits
        assert (p.template_id, p.profession) == (n.template_id, n.profession)


def test_seeded_and_deterministic(tmp_path, ps):
    again = build_prompt_set(seed=0)
    assert again.prompts == ps.prompts
    ps.write(tmp_path / "a")
    again.write(tmp_path / "b")
    assert (tmp_path / "a" / "prompts.jsonl").read_bytes() == (tmp_path / "b" / "prompts.jsonl").read_bytes()
    assert PromptSet.read(tmp_path / "a").prompts == ps.prompts
    other = build_prompt_set(seed=1)
    assert [p.split for p in other.neutral] != [p.split for p in ps.neutral]
    assert {p.id for p in other.demographic} != {p.id for p in ps.demographic}


def test_axis_subset_and_full_crossing():
    g = build_prompt_set(axes=["gender", "age"], contexts_per_descriptor=10)
    assert {p.axis for p in g.demographic} == {"gender", "age"} and len(g.demographic) == 8 * 10
    full = build_prompt_set(axes=["sexuality"], contexts_per_descriptor="all")
    assert len(full.demographic) == 4 * 576


def test_bad_input_errors():
    with pytest.raises(ValueError, match=r"unknown axis 'caste'; allowed: gender, race, religion"):
        build_prompt_set(axes=["gender", "caste"])
    with pytest.raises(ValueError, match="empty prompt set"):
        build_prompt_set(axes=[])
    with pytest.raises(ValueError, match="empty prompt set"):
        build_prompt_set(contexts_per_descriptor=0)
    with pytest.raises(ValueError, match="empty prompt set"):
        build_prompt_set(professions=[])
    with pytest.raises(ValueError, match="contexts_per_descriptor=577"):
        build_prompt_set(contexts_per_descriptor=577)


def test_token_positions_byte_tokenizer(ps):
    from fare_core.tiny import build_tokenizer

    tok = build_tokenizer()  # one token per byte: positions must be exactly the span's characters
    p = next(q for q in ps.demographic if q.group == "Native American")
    out = token_positions(p, tok)
    assert out["positions"] == list(range(*p.span))
    assert len(out["positions"]) + len(out["shared"]) == len(out["input_ids"]) == len(p.text)


def test_token_positions_word_tokenizer(ps):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for p in ps.prompts for w in p.text.replace(",", " ,").replace(".", " .").split()})
    vocab = {"[UNK]": 0, "[BOS]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]")
    neutral = {p.id: p for p in ps.neutral}
    p = next(q for q in ps.demographic if q.group == "Native American" and q.text.startswith("The "))
    out = token_positions(p, tok)
    assert out["positions"] == [1, 2]  # "The | Native | American | <profession> ..."
    # Shared tokens of the variant are exactly the neutral prompt's tokens.
    n_ids = token_positions(neutral[p.neutral_id].text, tok)["input_ids"]
    assert [out["input_ids"][i] for i in out["shared"]] == n_ids
    assert token_positions(neutral[p.neutral_id], tok)["positions"] == []


def test_span_token_positions_by_hand():
    offsets = [(0, 0), (0, 3), (3, 10), (10, 17), (17, 18)]  # special, "The", " female", " doctor", "."
    assert span_token_positions(offsets, (4, 10)) == [2]
    assert span_token_positions(offsets, (2, 11)) == [1, 2, 3]
    with pytest.raises(ValueError, match="span="):
        span_token_positions(offsets, (5, 5))


def test_cli_prompts(tmp_path, capsys):
    from fare_models.cli import main

    assert main(["prompts", "--out", str(tmp_path / "p"), "--axes", "gender,age", "--contexts-per-descriptor", "6"]) == 0
    back = PromptSet.read(tmp_path / "p")
    assert len(back.neutral) == 576 and len(back.demographic) == 8 * 6
    assert (tmp_path / "p" / "prompts_manifest.json").exists()
    assert main(["prompts", "--out", str(tmp_path / "t"), "--axes", "race", "--contexts-per-descriptor", "2",
                 "--tokenizer", "fare-tiny"]) == 0
    import json

    rows = [json.loads(x) for x in (tmp_path / "t" / "token_positions.jsonl").read_text().splitlines()]
    by_id = {p.id: p for p in PromptSet.read(tmp_path / "t").prompts}
    for r in rows:  # byte-level tokenizer: one token per character
        p = by_id[r["id"]]
        assert r["n_tokens"] == len(p.text) and r["positions"] == (list(range(*p.span)) if p.span else [])
    assert main(["prompts", "--out", str(tmp_path / "q"), "--axes", "caste"]) == 2
    assert "unknown axis 'caste'; allowed: gender" in capsys.readouterr().err
