"""fare_truthfulqa matches lm-eval's truthfulqa_mc1 on the same questions; perplexity from per-doc values."""

import math
from pathlib import Path

import lm_eval.tasks
import pytest

from fare_tasks import data, utility
from helpers_eval import evaluate

LMEVAL_MC1_YAML = Path(lm_eval.tasks.__file__).parent / "truthfulqa" / "truthfulqa_mc1.yaml"
LIMIT = 4

HF_FORMAT_LOADER = '''
import datasets
from fare_tasks import data

def load(**metadata):
    """v0/mc_task.json in the hub's truthful_qa 'multiple_choice' layout (what truthfulqa_mc1 reads)."""
    rows = [{"question": q["question"],
             "mc1_targets": {"choices": list(q["mc1_targets"]), "labels": list(q["mc1_targets"].values())}}
            for q in data.read_json("truthfulqa", "v0/mc_task.json")]
    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows)})
'''


@pytest.fixture(scope="module")
def runs(tiny_path, tmp_path_factory):
    local = tmp_path_factory.mktemp("lmeval_tqa")
    (local / "local_tqa.py").write_text(HF_FORMAT_LOADER)
    (local / "lmeval_truthfulqa_mc1_local.yaml").write_text(
        f"include: {LMEVAL_MC1_YAML}\ntask: lmeval_truthfulqa_mc1_local\ntag: []\n"
        "custom_dataset: !function local_tqa.load\n"
    )
    return evaluate(tiny_path, ["fare_truthfulqa", "lmeval_truthfulqa_mc1_local", "fare_perplexity"],
                    limit=LIMIT, extra_paths=[local])


def test_truthfulqa_requests_and_acc_equal_lm_eval_mc1(runs):
    ours, theirs = runs["samples"]["fare_truthfulqa"], runs["samples"]["lmeval_truthfulqa_mc1_local"]
    assert [s["arguments"] for s in ours] == [s["arguments"] for s in theirs]
    assert [s["acc"] for s in ours] == [s["acc"] for s in theirs]
    assert runs["results"]["fare_truthfulqa"]["acc,none"] == runs["results"]["lmeval_truthfulqa_mc1_local"]["acc,none"]


def test_truthfulqa_docs_from_v0_mc_task():
    docs = utility.load_truthfulqa()["test"]
    assert len(docs) == 817
    assert docs[0]["label"] == 0 and docs[0]["choices"][0].startswith("Nauru is the smallest country")
    with pytest.raises(data.DataError, match="exactly one true mc1 target"):
        utility.truthfulqa_docs([{"question": "q", "mc1_targets": {"a": 1, "b": 1}}])


def test_perplexity_aggregates_from_per_doc_loglikelihoods(runs):
    samples = runs["samples"]["fare_perplexity"]
    ll = sum(s["bits_per_byte"][0] for s in samples)
    n_bytes = sum(len(s["doc"]["text"].encode()) for s in samples)
    n_words = sum(len(s["doc"]["text"].split()) for s in samples)
    res = runs["results"]["fare_perplexity"]
    assert res["bits_per_byte,none"] == pytest.approx(-ll / n_bytes / math.log(2), rel=1e-12)
    assert res["byte_perplexity,none"] == pytest.approx(math.exp(-ll / n_bytes), rel=1e-12)
    assert res["word_perplexity,none"] == pytest.approx(math.exp(-ll / n_words), rel=1e-12)
    assert len(utility.load_perplexity()["test"]) == 6264
