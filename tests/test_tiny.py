"""fare-tiny: deterministic, offline, cached tiny MoE models with a local byte-level tokenizer."""

import hashlib

import pytest

from fare_core import tiny


def _digest(path):
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def test_tiny_model_is_deterministic_and_cached(tmp_path, monkeypatch):
    digests = []
    for sub in ("a", "b"):
        monkeypatch.setenv("FARE_CACHE_DIR", str(tmp_path / sub))
        path = tiny.tiny_model_path("fare-tiny:mixtral")
        digests.append(_digest(path))
        assert tiny.tiny_model_path("fare-tiny:mixtral") == path  # second call reuses the cache
    assert digests[0] == digests[1]


def test_byte_tokenizer_round_trips_any_text_and_keeps_pad_out_of_text():
    tok = tiny.build_tokenizer()
    text = "Ünïcode, emoji 🙂 and\ttabs\n"
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert 0 not in ids and tok.pad_token_id == 0 and tok.eos_token_id == 1
    assert "<|assistant|>" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                      add_generation_prompt=True)


@pytest.mark.parametrize("spec, model_type", [("fare-tiny", "olmoe"), ("fare-tiny:gpt_oss", "gpt_oss")])
def test_tiny_spec_parsing(spec, model_type):
    assert tiny.is_tiny_spec(spec) and tiny.parse_tiny_spec(spec) == model_type


def test_unknown_tiny_architecture_names_the_allowed_ones():
    with pytest.raises(ValueError, match=r"unknown fare-tiny architecture 'dbrx'; allowed: fare-tiny:olmoe"):
        tiny.parse_tiny_spec("fare-tiny:dbrx")


@pytest.mark.parametrize("text", ["The nurse said hello.", "  two  leading, trailing  ", "a\nb\n\n\tc\t ",
                                  "naïve café 東京 🙂", " 'll don't 123 4567 ", ""])
def test_byte_tokenizer_ids_and_offsets_are_a_plain_byte_mapping(text):
    tok = tiny.build_tokenizer()
    enc = tok(text, return_offsets_mapping=True)
    assert enc["input_ids"] == [b + 2 for b in text.encode("utf-8")]
    # every byte's token covers exactly the character it belongs to (word splitting must not move it)
    assert enc["offset_mapping"] == [(i, i + 1) for i, ch in enumerate(text) for _ in ch.encode("utf-8")]


def test_cached_tiny_tokenizer_splits_words(tmp_path, monkeypatch):
    """The on-disk cache is versioned, so a tokenizer cached before the word split is not reused."""
    import json

    monkeypatch.setenv("FARE_CACHE_DIR", str(tmp_path))
    path = tiny.tiny_model_path("fare-tiny")
    assert path.name == f"olmoe-{tiny.TINY_VERSION}" and tiny.TINY_VERSION != "v1"
    pre = json.loads((path / "tokenizer.json").read_text())["pre_tokenizer"]
    # word-level pre-splitting keeps the BPE cache (10,000 entries) holding words, not whole prompts
    assert pre["type"] == "ByteLevel" and pre["use_regex"] is True and pre["add_prefix_space"] is False
