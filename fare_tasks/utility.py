"""Utility tasks: TruthfulQA MC1 and held-out perplexity.

TruthfulQA: ``truthfulqa/v0/mc_task.json`` (the original release, what lm-eval's ``truthfulqa_mc1``
loads from the hub), MC1 formulation: one true answer among the ``mc1_targets`` options, prompt =
lm-eval's 6-shot QA preamble + ``Q: {question}\\nA:``, prediction = highest summed log-likelihood,
metric ``acc``.

Perplexity: the 6,264 instructions of ``refusal_pairs/harmless_val.json`` (Alpaca-derived general
prompts, the validation split of the refusal-direction harmless set: held out from the *train*
splits used for calibration), each scored with rolling log-likelihood; word/byte perplexity and
bits per byte as lm-eval's wikitext task.
"""

from __future__ import annotations

import re

from fare_tasks import data

TQA_FILE = ("truthfulqa", "v0/mc_task.json")
PPL_FILE = ("refusal_pairs", "harmless_val.json")


def truthfulqa_docs(obj: list) -> list[dict]:
    source = "/".join(TQA_FILE)
    data.require_nonempty(obj, source)
    data.require_columns(obj, ("question", "mc1_targets"), source)
    docs = []
    for item in obj:
        choices, labels = list(item["mc1_targets"]), list(item["mc1_targets"].values())
        if labels.count(1) != 1:
            raise data.DataError(f"{source}: question {item['question']!r} needs exactly one true mc1 target")
        docs.append({"question": item["question"], "choices": choices, "label": labels.index(1)})
    return docs


def load_truthfulqa(**metadata):
    """lm-eval ``custom_dataset`` of ``fare_truthfulqa``."""
    return data.as_dataset(truthfulqa_docs(data.read_json(*TQA_FILE)), source="/".join(TQA_FILE))


def doc_to_choice(doc: dict) -> list[str]:
    return list(doc["choices"])


def load_perplexity(**metadata):
    """lm-eval ``custom_dataset`` of ``fare_perplexity``: one doc per held-out instruction."""
    source = "/".join(PPL_FILE)
    rows = data.read_json(*PPL_FILE)
    data.require_nonempty(rows, source)
    data.require_columns(rows, ("instruction",), source)
    docs = [{"text": r["instruction"]} for r in rows if r["instruction"].strip()]
    return data.as_dataset(docs, source=source)


def perplexity_results(doc: dict, results) -> dict:
    (loglikelihood,) = results
    words = len(re.split(r"\s+", doc["text"].strip()))
    n_bytes = len(doc["text"].encode("utf-8"))
    return {
        "word_perplexity": (loglikelihood, words),
        "byte_perplexity": (loglikelihood, n_bytes),
        "bits_per_byte": (loglikelihood, n_bytes),
    }
