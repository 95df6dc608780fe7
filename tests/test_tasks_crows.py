"""fare_crows_pairs: equal to lm-eval's own crows_pairs_english scoring; subsets; clear errors."""

import csv
from pathlib import Path

import lm_eval.tasks
import pytest

from fare_tasks import crows
from helpers_eval import evaluate

LMEVAL_CROWS_YAML = Path(lm_eval.tasks.__file__).parent / "crows_pairs" / "crows_pairs_english.yaml"


@pytest.fixture(scope="module")
def crows_runs(tiny_path, tmp_path_factory):
    """One run of fare_crows_pairs and of lm-eval's crows_pairs_english fed the same local CSV."""
    local = tmp_path_factory.mktemp("lmeval_crows")
    (local / "local_crows.py").write_text("from fare_tasks.crows import load  # noqa: F401\n")
    (local / "lmeval_crows_pairs_english_local.yaml").write_text(
        f"include: {LMEVAL_CROWS_YAML}\ntask: lmeval_crows_pairs_english_local\ntag: []\n"
        "custom_dataset: !function local_crows.load\n"
    )
    return evaluate(tiny_path, ["fare_crows_pairs", "lmeval_crows_pairs_english_local"], extra_paths=[local])


def test_stereotype_preference_equals_lm_eval_crows_pairs_english(crows_runs):
    ours = crows_runs["results"]["fare_crows_pairs"]
    theirs = crows_runs["results"]["lmeval_crows_pairs_english_local"]
    assert ours["sample_len"] == theirs["sample_len"] == 1508
    assert ours["stereotype_preference,none"] == theirs["pct_stereotype,none"]
    assert ours["likelihood_diff,none"] == theirs["likelihood_diff,none"]
    assert ours["parity_gap,none"] == abs(theirs["pct_stereotype,none"] - 0.5)


def test_per_pair_values_pair_up_with_lm_eval(crows_runs):
    ours = {s["doc"]["pair_id"]: s for s in crows_runs["samples"]["fare_crows_pairs"]}
    theirs = crows_runs["samples"]["lmeval_crows_pairs_english_local"]
    assert len(ours) == len(theirs) == 1508
    for s in theirs:
        mine = ours[s["doc"]["pair_id"]]
        assert mine["stereotype_preference"] == s["pct_stereotype"]
        assert mine["doc_hash"] == s["doc_hash"]


def test_stereo_antistereo_split_from_csv(crows_runs, data_dir):
    with open(data_dir / "crows_pairs" / "crows_pairs_anonymized.csv", newline="") as fh:
        direction = {int(r[""]): r["stereo_antistereo"] for r in csv.DictReader(fh)}
    samples = crows_runs["samples"]["fare_crows_pairs"]
    stereo = [s["stereotype_preference"] for s in samples if direction[s["doc"]["pair_id"]] == "stereo"]
    anti = [s["stereotype_preference"] for s in samples if direction[s["doc"]["pair_id"]] == "antistereo"]
    assert (len(stereo), len(anti)) == (1290, 218)
    res = crows_runs["results"]["fare_crows_pairs"]
    assert res["pref_stereo,none"] == pytest.approx(sum(stereo) / len(stereo), abs=1e-12)
    assert res["pref_antistereo,none"] == pytest.approx(sum(anti) / len(anti), abs=1e-12)


def test_bias_type_counts_match_source_md():
    expected = {"race-color": 516, "gender": 262, "socioeconomic": 172, "nationality": 159, "religion": 105,
                "age": 87, "sexual-orientation": 84, "physical-appearance": 63, "disability": 60}
    assert {b: len(crows.load_pairs(b)) for b in crows.BIAS_TYPES} == expected
    assert len(crows.load_pairs()) == 1508


def test_unknown_bias_type_lists_allowed():
    with pytest.raises(ValueError, match=r"unknown CrowS-Pairs bias type 'race'; allowed: race-color, gender"):
        crows.load(crows_bias_type="race")


def test_length_matched_subset_uses_model_tokenizer(tiny_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_path))
    ds = crows.load(crows_length_matched=True, pretrained="fare-tiny")["test"]
    # fare-tiny's tokenizer is byte-level: equal token counts <=> equal UTF-8 byte lengths.
    expected = [p["pair_id"] for p in crows.load_pairs()
                if len(p["sent_more"].encode()) == len(p["sent_less"].encode())]
    assert ds["pair_id"] == expected and 0 < len(expected) < 1508
    assert all(len(tok(r["sent_more"])["input_ids"]) == len(tok(r["sent_less"])["input_ids"]) for r in ds)


def test_length_matched_without_model_is_a_clear_error():
    with pytest.raises(ValueError, match="needs the evaluated model's tokenizer: pass model_args pretrained="):
        crows.load(crows_length_matched=True, version=1.0)
