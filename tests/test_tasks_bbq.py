"""BBQ loader: all 58,492 items with target_loc joined; seeded subset; unknown detection; errors."""

import csv
import json
from collections import Counter

import pytest

from fare_tasks import bbq


@pytest.fixture(scope="module")
def docs():
    return bbq.load_docs()


def test_all_items_with_target_loc(docs, data_dir):
    assert len(docs) == 58492
    assert Counter(d["category"] for d in docs)["Race_x_gender"] == 15960
    # SOURCE.md: 16 metadata rows have target_loc = NA
    assert sum(d["target_loc"] == -1 for d in docs) == 16
    # spot-check against the files themselves
    first = json.loads((data_dir / "bbq" / "Age.jsonl").open().readline())
    with open(data_dir / "bbq" / "additional_metadata.csv", newline="") as fh:
        meta = next(r for r in csv.DictReader(fh) if r["category"] == "Age" and r["example_id"] == "0")
    assert docs[0]["choices"] == [first["ans0"], first["ans1"], first["ans2"]]
    assert docs[0]["target_loc"] == int(meta["target_loc"]) and docs[0]["unknown_loc"] == 2


def test_unknown_option_is_never_the_target(docs):
    assert all(d["unknown_loc"] != d["target_loc"] for d in docs)
    ambig = [d for d in docs if d["context_condition"] == "ambig"]
    assert all(d["label"] == d["unknown_loc"] for d in ambig)  # ambiguous: the answer is "unknown"


def test_seeded_subset_is_deterministic_and_ordered(docs):
    a = bbq.subset(docs, 1000, seed=0)
    b = bbq.subset(docs, 1000, seed=0)
    c = bbq.subset(docs, 1000, seed=1)
    key = lambda d: (d["category"], d["example_id"])  # noqa: E731
    assert [key(d) for d in a] == [key(d) for d in b] != [key(d) for d in c]
    assert len({key(d) for d in a}) == 1000
    positions = {key(d): i for i, d in enumerate(docs)}
    assert [positions[key(d)] for d in a] == sorted(positions[key(d)] for d in a)


def test_subset_and_category_errors(docs):
    with pytest.raises(ValueError, match="bbq_subset=0 must be between 1 and 58492"):
        bbq.subset(docs, 0)
    with pytest.raises(ValueError, match="unknown BBQ category 'Race'; allowed: Age, Disability_status"):
        bbq.load_docs("Race")
