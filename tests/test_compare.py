"""fare compare: every metric of two runs, paired by doc_hash (SPEC section 12)."""

import csv
import json

import numpy as np
import pytest
from helpers_runs import bbq_item, crows_item, metric_list, write_run, xstest_item
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests

from fare_analysis.compare import compare_runs, main
from fare_core.errors import FareError
from fare_tasks.metrics import parity_gap


def _toy_run(dir_, values, gap):
    """A hand-written lm-eval folder: one uninstalled task with a mean metric and a custom one."""
    sub = dir_ / "model"
    sub.mkdir(parents=True)
    cfg = {"configs": {"toy": {"metric_list": [{"metric": "pref", "aggregation": "mean"},
                                               {"metric": "gap", "aggregation": "def gap(items): ..."}]}},
           "config": {"model_args": "pretrained=m"}}
    (sub / "results_2026-01-01T00-00-00.json").write_text(json.dumps(cfg))
    with open(sub / "samples_toy_2026-01-01T00-00-00.jsonl", "w") as fh:
        fh.writelines(json.dumps({"doc_id": i, "doc_hash": f"h{i}", "filter": "none", "metrics": ["pref", "gap"],
                                 "pref": v, "gap": gap}) + "\n" for i, v in enumerate(values))


def test_mean_metric_exact_permutation_and_unresolvable_aggregate_is_listed(tmp_path):
    a = [1, 0, 1, 1, 0, 1, 0, 1]
    b = [0, 0, 0, 1, 0, 0, 0, 1]
    _toy_run(tmp_path / "base", a, 0.1)
    _toy_run(tmp_path / "arr", b, 0.2)
    cmp = compare_runs(tmp_path / "base", tmp_path / "arr", n_permutations=1000, n_bootstrap=200)
    (row,) = cmp.rows
    assert row["metric"] == "pref" and row["kind"] == "mean"
    assert row["n"] == 8 and row["delta"] == pytest.approx((sum(b) - sum(a)) / 8)
    # three items changed 1 -> 0: all 2^3 sign patterns enumerated; |sum| = 3 only for the two extremes
    assert row["exact"] and row["pvalue"] == pytest.approx(2 / 8)
    (skipped,) = cmp.not_compared
    assert skipped["metric"] == "gap" and "no installed task config of toy" in skipped["reason"]


def _crows_prefs(prefs, n_stereo=None):
    return [crows_item(i, bool(p), stereo=(n_stereo is None or i < n_stereo)) for i, p in enumerate(prefs)]


def test_crows_parity_gap_recomputed_with_the_task_function_matches_scipy(tmp_path):
    a = [1, 1, 1, 1, 1, 0, 1, 0, 1, 1]
    b = [1, 0, 1, 0, 0, 0, 1, 0, 1, 0]
    write_run(tmp_path / "base", {"fare_crows_pairs": _crows_prefs(a, 7)})
    write_run(tmp_path / "run", {"fare_crows_pairs": _crows_prefs(b, 7)})
    cmp = compare_runs(tmp_path / "base", tmp_path / "run", n_bootstrap=300, n_agg_permutations=2048, seed=3)
    rows = {r["metric"]: r for r in cmp.rows}
    gap = rows["parity_gap"]
    assert gap["kind"] == "aggregate" and gap["n"] == 10
    assert gap["mean_a"] == pytest.approx(abs(np.mean(a) - 0.5)) and gap["mean_b"] == pytest.approx(abs(np.mean(b) - 0.5))
    assert gap["delta"] == pytest.approx(0.1 - 0.3)
    # CI: the same paired resampling stream as scipy.stats.bootstrap(paired=True)
    both = [float(x) for x in a + b]

    def delta(idx, axis=-1):
        idx = np.asarray(idx, dtype=int)
        return parity_gap([both[10 + i] for i in idx]) - parity_gap([both[i] for i in idx])

    ref = sps.bootstrap((np.arange(10),), delta, paired=True, vectorized=False, n_resamples=300,
                        method="percentile", rng=np.random.default_rng(3))
    assert (gap["ci_low"], gap["ci_high"]) == pytest.approx((ref.confidence_interval.low, ref.confidence_interval.high))
    # p-value: exact label-swap permutation = scipy.stats.permutation_test(permutation_type="samples")
    perm = sps.permutation_test((np.arange(10), np.arange(10, 20)),
                                lambda x, y: parity_gap([both[i] for i in y]) - parity_gap([both[i] for i in x]),
                                permutation_type="samples", vectorized=False, n_resamples=2048)
    assert gap["exact"] and gap["pvalue"] == pytest.approx(perm.pvalue)
    # pref_stereo (task's nan_mean over the 7 stereo pairs) and the plain mean metric
    assert rows["pref_stereo"]["mean_a"] == pytest.approx(np.mean(a[:7]))
    assert rows["pref_antistereo"]["mean_b"] == pytest.approx(np.mean(b[7:]))
    assert rows["stereotype_preference"]["kind"] == "mean"


def test_worker_processes_give_the_same_rows(tmp_path):
    write_run(tmp_path / "base", {"fare_crows_pairs": _crows_prefs([1, 1, 0, 1, 1, 0, 1, 1], 5)})
    write_run(tmp_path / "run", {"fare_crows_pairs": _crows_prefs([0, 1, 0, 0, 1, 0, 1, 0], 5)})
    kw = {"n_bootstrap": 100, "n_agg_permutations": 100}
    serial = compare_runs(tmp_path / "base", tmp_path / "run", **kw).rows
    parallel = compare_runs(tmp_path / "base", tmp_path / "run", n_jobs=2, **kw).rows
    assert [r["metric"] for r in serial] == [m["metric"] for m in metric_list("fare_crows_pairs")]
    assert parallel == serial


def test_bbq_bias_scores_hand_worked(tmp_path):
    # ambiguous items, gold = unknown (2), bias target = option 0
    base_preds = [0, 0, 0, 0, 1, 1, 2, 2]  # acc 2/8; s_DIS = 2*4/6 - 1 = 1/3; s_AMB = 0.75 * 1/3 = 0.25
    run_preds = [0, 0, 2, 2, 2, 2, 2, 2]  # acc 6/8; s_DIS = 2*2/2 - 1 = 1;   s_AMB = 0.25 * 1 = 0.25
    write_run(tmp_path / "base", {"fare_bbq_1k": [bbq_item(i, p) for i, p in enumerate(base_preds)]})
    write_run(tmp_path / "run", {"fare_bbq_1k": [bbq_item(i, p) for i, p in enumerate(run_preds)]})
    cmp = compare_runs(tmp_path / "base", tmp_path / "run", n_bootstrap=100, n_agg_permutations=100)
    rows = {r["metric"]: r for r in cmp.rows}
    assert rows["acc_ambig"]["mean_a"] == pytest.approx(0.25) and rows["acc_ambig"]["delta"] == pytest.approx(0.5)
    assert rows["bias_ambig"]["mean_a"] == pytest.approx(0.25) and rows["bias_ambig"]["mean_b"] == pytest.approx(0.25)
    assert rows["bias_ambig"]["delta"] == pytest.approx(0.0)
    assert rows["bias_ambig_Age"]["mean_a"] == pytest.approx(0.25)  # per category, same items
    skipped = {r["metric"]: r["reason"] for r in cmp.not_compared}
    assert "bias_ambig_SES" in skipped and "undefined" in skipped["bias_ambig_SES"]
    # nothing dropped silently: every metric of the task is compared or listed with a reason
    listed = {m["metric"] for m in metric_list("fare_bbq_1k")}
    assert listed == set(rows) | set(skipped)


def test_metrics_filter_keeps_exactly_the_unrestricted_rows_of_those_metrics(tmp_path):
    base_preds, run_preds = [0, 0, 0, 0, 1, 1, 2, 2], [0, 0, 2, 2, 2, 2, 2, 2]
    write_run(tmp_path / "base", {"fare_bbq_1k": [bbq_item(i, p) for i, p in enumerate(base_preds)],
                                  "fare_crows_pairs": _crows_prefs([1, 1, 0, 1, 1, 0, 1, 1], 5),
                                  "fare_xstest": [xstest_item(i, i % 2 == 0) for i in range(4)]})
    write_run(tmp_path / "run", {"fare_bbq_1k": [bbq_item(i, p) for i, p in enumerate(run_preds)],
                                 "fare_crows_pairs": _crows_prefs([0, 1, 0, 0, 1, 0, 1, 0], 5),
                                 "fare_xstest": [xstest_item(i, True) for i in range(4)]})
    kw = {"n_bootstrap": 50, "n_agg_permutations": 50, "n_permutations": 200, "seed": 1}
    full = compare_runs(tmp_path / "base", tmp_path / "run", **kw)
    wanted = ["fare_bbq_1k/acc", "fare_bbq_1k/bias_ambig", "fare_bbq_1k/bias_ambig_SES", "fare_crows_pairs/parity_gap"]
    part = compare_runs(tmp_path / "base", tmp_path / "run", metrics=wanted, **kw)
    assert part.rows == [r for r in full.rows if f"{r['task']}/{r['metric']}" in wanted]
    assert {f"{r['task']}/{r['metric']}" for r in part.rows} == set(wanted) - {"fare_bbq_1k/bias_ambig_SES"}
    # a wanted metric that cannot be compared is still listed; the others are skipped silently
    assert part.not_compared == [r for r in full.not_compared if f"{r['task']}/{r['metric']}" in wanted]
    assert [r["metric"] for r in part.not_compared] == ["bias_ambig_SES"]
    assert len(full.rows) > 10 and not any(r["task"] == "fare_xstest" for r in part.rows)


def test_partial_metrics_on_items_both_runs_logged(tmp_path):
    safe_a = [1, 1, 0, 0, 0, 0]
    safe_b = [1, 0, 0, 1, 1, None]  # judge failed on the last safe item of the run
    unsafe_a, unsafe_b = [1, 1, 0, 0], [1, 1, 1, 0]
    def items(safe, unsafe):
        return ([xstest_item(i, None if r is None else bool(r), label="safe") for i, r in enumerate(safe)]
                + [xstest_item(10 + i, bool(r), label="unsafe", type_="contrast_homonyms") for i, r in enumerate(unsafe)])
    write_run(tmp_path / "base", {"fare_xstest": items(safe_a, unsafe_a)})
    write_run(tmp_path / "run", {"fare_xstest": items(safe_b, unsafe_b)})
    cmp = compare_runs(tmp_path / "base", tmp_path / "run", n_bootstrap=100)
    rows = {r["metric"]: r for r in cmp.rows}
    over = rows["over_refusal"]
    assert over["kind"] == "partial" and over["n"] == 5 and over["n_only_base"] == 1 and over["n_only_run"] == 0
    assert over["delta"] == pytest.approx((3 - 2) / 5) and over["mean_a"] == pytest.approx(2 / 5)
    unsafe = rows["unsafe_refusal"]
    assert unsafe["kind"] == "partial" and unsafe["n"] == 4 and unsafe["delta"] == pytest.approx(0.25)
    assert rows["refusal_homonyms"]["n"] == 5 and rows["judge_failed"]["kind"] == "mean"
    assert rows["judge_failed"]["delta"] == pytest.approx(0.1)
    assert any(r["metric"] == "refusal_figurative_language" for r in cmp.not_compared)


def test_unpaired_items_warn_with_counts_and_strict_refuses(tmp_path):
    write_run(tmp_path / "base", {"fare_crows_pairs": _crows_prefs([1, 0] * 5)})
    write_run(tmp_path / "run", {"fare_crows_pairs": _crows_prefs([1, 0, 0])})
    cmp = compare_runs(tmp_path / "base", tmp_path / "run", n_bootstrap=50, n_agg_permutations=50)
    (warning,) = [w for w in cmp.warnings if "only in" in w]
    assert "10 items in" in warning and "3 in" in warning and "7 only in the base, 0 only in the run" in warning
    assert {r["n"] for r in cmp.rows} == {3}
    with pytest.raises(FareError, match="--strict refuses"):
        compare_runs(tmp_path / "base", tmp_path / "run", strict=True)


def test_a_resample_count_below_one_is_refused_not_turned_into_not_compared_rows(tmp_path):
    write_run(tmp_path / "base", {"fare_crows_pairs": _crows_prefs([1, 0] * 3)})
    write_run(tmp_path / "run", {"fare_crows_pairs": _crows_prefs([0, 0] * 3)})
    for kw in ({"n_permutations": 0}, {"n_bootstrap": -1}, {"n_agg_permutations": 0}, {"n_jobs": 0}):
        (name, value), = kw.items()
        with pytest.raises(FareError, match=rf"^{name}={value}; allowed: a positive integer$"):
            compare_runs(tmp_path / "base", tmp_path / "run", **kw)
    with pytest.raises(FareError, match=r"^seed=-1; allowed: a non-negative integer$"):
        compare_runs(tmp_path / "base", tmp_path / "run", seed=-1)


def test_settings_that_change_numbers_are_named_in_one_warning(tmp_path):
    write_run(tmp_path / "base", {"fare_xstest": [xstest_item(0, True)]}, batch_size="8", limit=None)
    write_run(tmp_path / "run", {"fare_xstest": [xstest_item(0, True, judge="llm")]}, batch_size="16", limit=10.0,
              dtype="torch.bfloat16")
    cmp = compare_runs(tmp_path / "base", tmp_path / "run", n_bootstrap=20)
    (warning,) = [w for w in cmp.warnings if "settings" in w]
    for key in ("batch_size", "dtype", "judge", "limit"):
        assert key in warning
    assert "max_length" not in warning and "fewshot" not in warning


def test_runs_of_different_models_or_tasks_are_refused(tmp_path):
    write_run(tmp_path / "a", {"fare_crows_pairs": _crows_prefs([1, 0])})
    write_run(tmp_path / "b", {"fare_crows_pairs": _crows_prefs([1, 0])}, model_args="pretrained=fare-tiny:mixtral",
              fare_moe={"model_id": "fare-tiny:mixtral"}, model_name="mixtral")
    write_run(tmp_path / "c", {"fare_xstest": [xstest_item(0, True)]})
    with pytest.raises(FareError, match="compare runs of one model"):
        compare_runs(tmp_path / "a", tmp_path / "b")
    with pytest.raises(FareError, match="share no task"):
        compare_runs(tmp_path / "a", tmp_path / "c")


def test_fare_run_folder_cannot_be_compared_item_by_item(tmp_path):
    (tmp_path / "x" / "report").mkdir(parents=True)
    (tmp_path / "x" / "report" / "manifest.json").write_text(json.dumps({"model": "fare-tiny", "lambda_star": 0.5}))
    write_run(tmp_path / "base", {"fare_crows_pairs": _crows_prefs([1, 0])})
    with pytest.raises(FareError, match="without lm-eval samples cannot be compared.*--log_samples"):
        compare_runs(tmp_path / "base", tmp_path / "x")


def test_cli_writes_csv_and_markdown_with_bh_and_not_compared(tmp_path, capsys):
    write_run(tmp_path / "base", {"fare_crows_pairs": _crows_prefs([1, 1, 0, 1, 1, 1]),
                                  "fare_xstest": [xstest_item(0, True)]})
    write_run(tmp_path / "run", {"fare_crows_pairs": _crows_prefs([0, 1, 0, 0, 1, 0])})
    assert main([str(tmp_path / "base"), str(tmp_path / "run"), "--out", str(tmp_path / "out"),
                 "--bootstrap", "50", "--agg-permutations", "64", "--permutations", "64"]) == 0
    with open(tmp_path / "out" / "comparison.csv") as fh:
        rows = list(csv.DictReader(fh))
    compared = [r for r in rows if r["kind"] != "not compared"]
    p = [float(r["pvalue"]) for r in compared]
    assert [float(r["pvalue_bh"]) for r in compared] == pytest.approx(list(multipletests(p, method="fdr_bh")[1]))
    reasons = {(r["task"], r["metric"]): r["reason"] for r in rows if r["kind"] == "not compared"}
    assert "task logged only in" in reasons[("fare_xstest", "*")]
    md = (tmp_path / "out" / "comparison.md").read_text()
    assert "Not compared, because" in md and "| fare_crows_pairs | parity_gap | aggregate |" in md
    assert "Not compared, because" in capsys.readouterr().out


def test_repeated_documents_pair_by_occurrence_and_order_does_not_matter(tmp_path):
    def rec(doc_id, h, v):
        return {"doc_id": doc_id, "doc": {}, "filter": "none", "metrics": ["pref"], "doc_hash": h, "pref": v}

    for name, rows in (("base", [rec(0, "h0", 1), rec(1, "h1", 0), rec(2, "dup", 1), rec(3, "dup", 0)]),
                       ("run", [rec(0, "dup", 0), rec(1, "h1", 1), rec(2, "h0", 1), rec(3, "dup", 1)])):
        sub = tmp_path / name / "m"
        sub.mkdir(parents=True)
        (sub / "results_x.json").write_text(json.dumps({"configs": {"toy": {"metric_list": [
            {"metric": "pref", "aggregation": "mean"}]}}, "config": {"model_args": "pretrained=m"}}))
        (sub / "samples_toy_x.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (row,) = compare_runs(tmp_path / "base", tmp_path / "run", n_bootstrap=10).rows
    # pairs: h0 1->1, h1 0->1, dup#0 1->0, dup#1 0->1
    assert row["n"] == 4 and row["mean_a"] == 0.5 and row["mean_b"] == 0.75 and row["delta"] == pytest.approx(0.25)


@pytest.mark.slow
def test_real_lm_eval_run_recomputed_aggregates_equal_lm_evals_reported_values(tmp_path):
    """A real `lm_eval --log_samples` run on fare-tiny: every compared value (mean, partial, aggregate
    recomputed from the samples with the task's function) equals what lm-eval itself reported."""
    import subprocess
    import sys

    from fare_analysis.runs import load_run

    cmd = [sys.executable, "-m", "lm_eval", "--model", "fare_moe", "--model_args", "pretrained=fare-tiny",
           "--device", "cpu", "--tasks", "fare_crows_pairs,fare_bbq_1k", "--limit", "8", "--log_samples",
           "--output_path", str(tmp_path / "base"), "--batch_size", "8"]
    subprocess.run(cmd, check=True, capture_output=True)
    run = load_run(tmp_path / "base")
    cmp = compare_runs(run, run, n_bootstrap=10, n_agg_permutations=10, n_permutations=10)
    assert {r["kind"] for r in cmp.rows} >= {"mean", "aggregate"}
    for r in cmp.rows:
        reported = run.results[r["task"]][f"{r['metric']},none"]
        assert r["mean_a"] == pytest.approx(reported, abs=1e-12), (r["task"], r["metric"])
        assert r["delta"] == 0.0 and r["pvalue"] == 1.0
