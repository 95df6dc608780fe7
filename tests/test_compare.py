"""fare compare: paired comparison of two lm-eval runs from --log_samples files."""

import json

import pytest
from statsmodels.stats.multitest import multipletests

from fare_analysis.compare import compare_runs, main


def _run(dir_, values, gap):
    """A fake lm-eval output folder: one task with a mean metric and a non-mean one."""
    sub = dir_ / "model"
    sub.mkdir(parents=True)
    cfg = {"configs": {"toy": {"metric_list": [{"metric": "pref", "aggregation": "mean"},
                                               {"metric": "gap", "aggregation": "def gap(items): ..."}]}}}
    (sub / "results_2026-01-01T00-00-00.json").write_text(json.dumps(cfg))
    with open(sub / "samples_toy_2026-01-01T00-00-00.jsonl", "w") as fh:
        for i, v in enumerate(values):
            fh.write(json.dumps({"doc_id": i, "doc_hash": f"h{i}", "filter": "none", "metrics": ["pref", "gap"],
                                 "pref": v, "gap": gap}) + "\n")


def test_compare_pairs_items_and_tests_only_mean_metrics(tmp_path):
    a = [1, 0, 1, 1, 0, 1, 0, 1]
    b = [0, 0, 0, 1, 0, 0, 0, 1]
    _run(tmp_path / "base", a, 0.1)
    _run(tmp_path / "arr", b, 0.2)
    rows = compare_runs(tmp_path / "base", tmp_path / "arr", n_permutations=1000, n_bootstrap=200)
    assert [r["metric"] for r in rows] == ["pref"]
    (row,) = rows
    assert row["n"] == 8 and row["delta"] == pytest.approx((sum(b) - sum(a)) / 8)
    # three items changed 1 -> 0: all 2^3 sign patterns enumerated; |sum| = 3 only for the two extremes
    assert row["exact"] and row["pvalue"] == pytest.approx(2 / 8)
    assert row["pvalue_bh"] == pytest.approx(multipletests([row["pvalue"]], method="fdr_bh")[1][0])


def test_compare_cli_errors_without_samples(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), str(tmp_path / "empty")]) == 2
    assert "no samples_*.jsonl" in capsys.readouterr().err
