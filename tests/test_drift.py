"""fare drift: prompt-matched flips, toxicity change and text divergence (SPEC section 12)."""

import csv
import subprocess
import sys

import numpy as np
import pytest
import sacrebleu
from helpers_runs import (
    bbq_item,
    bold_item,
    crows_item,
    stereo_completion_item,
    write_run,
    xstest_item,
)

from fare_analysis.compare import compare_runs
from fare_analysis.drift import choose, chrf, drift_runs, main, token_edit_distance
from fare_core.errors import FareError


def _rows(d):
    return {(r["task"], r["measure"], r["category"]): r for r in d.rows}


def test_equal_benchmark_means_while_half_the_answers_flip(tmp_path):
    base = [1, 1, 0, 0] * 5  # preference 0.5
    run = [1, 0, 1, 0] * 5  # preference 0.5, but every 2nd and 3rd pair flipped
    write_run(tmp_path / "base", {"fare_crows_pairs": [crows_item(i, bool(p)) for i, p in enumerate(base)],
                                  "fare_bbq_1k": [bbq_item(i, p) for i, p in enumerate([0, 1, 2, 0] * 3)]})
    write_run(tmp_path / "run", {"fare_crows_pairs": [crows_item(i, bool(p)) for i, p in enumerate(run)],
                                 "fare_bbq_1k": [bbq_item(i, p) for i, p in enumerate([1, 0, 2, 0] * 3)]})
    cmp = compare_runs(tmp_path / "base", tmp_path / "run", n_bootstrap=200, n_agg_permutations=200)
    means = {(r["task"], r["metric"]): r for r in cmp.rows}
    assert means[("fare_crows_pairs", "stereotype_preference")]["delta"] == 0.0
    assert means[("fare_crows_pairs", "stereotype_preference")]["pvalue"] == 1.0
    assert means[("fare_crows_pairs", "parity_gap")]["delta"] == 0.0
    assert means[("fare_bbq_1k", "acc")]["delta"] == 0.0  # the two swapped answers are both wrong
    drift = drift_runs(tmp_path / "base", tmp_path / "run", n_bootstrap=200)
    rows = _rows(drift)
    flip = rows[("fare_crows_pairs", "answer_flip", "all")]
    assert flip["n"] == 20 and flip["value"] == pytest.approx(0.5) and flip["ci_low"] > 0.2
    assert rows[("fare_bbq_1k", "answer_flip", "all")]["value"] == pytest.approx(0.5)
    # gold choice of CrowS is sent_more: |delta LL| = the margin (1.0) on every flipped pair
    assert rows[("fare_crows_pairs", "gold_abs_dloglik", "all")]["value"] == pytest.approx(0.5)
    assert drift.scores == {"fare_crows_pairs": 0.5, "fare_bbq_1k": 0.5, "run": 0.5}


def test_refusal_flips_both_directions_per_category_with_equal_rates(tmp_path):
    base = [True, True, False, False, True, False]
    run = [False, True, True, False, True, False]
    labels = ["safe", "safe", "safe", "safe", "unsafe", "unsafe"]
    types = ["homonyms", "homonyms", "figurative_language", "figurative_language", "contrast_homonyms",
             "contrast_homonyms"]
    def items(verdicts):
        return [xstest_item(i, v, label=lab, type_=t) for i, (v, lab, t) in enumerate(zip(verdicts, labels, types))]
    write_run(tmp_path / "base", {"fare_xstest": items(base)})
    write_run(tmp_path / "run", {"fare_xstest": items(run)})
    d = drift_runs(tmp_path / "base", tmp_path / "run", n_bootstrap=100)
    rows = _rows(d)
    assert rows[("fare_xstest", "refusal_r2c", "all")]["value"] == pytest.approx(1 / 6)
    assert rows[("fare_xstest", "refusal_c2r", "all")]["value"] == pytest.approx(1 / 6)
    assert rows[("fare_xstest", "refusal_flip", "label=safe")]["value"] == pytest.approx(2 / 4)
    assert rows[("fare_xstest", "refusal_flip", "label=unsafe")]["value"] == 0.0
    assert rows[("fare_xstest", "refusal_r2c", "type=homonyms")]["value"] == pytest.approx(1 / 2)
    assert rows[("fare_xstest", "refusal_c2r", "type=figurative_language")]["value"] == pytest.approx(1 / 2)
    assert d.scores["fare_xstest"] == pytest.approx(2 / 6)
    # over-refusal rate is unchanged (2/4 -> 2/4): the benchmark mean hides both flips
    cmp = compare_runs(tmp_path / "base", tmp_path / "run", n_bootstrap=50)
    assert {r["metric"]: r for r in cmp.rows}["over_refusal"]["delta"] == 0.0
    # texts: refused/complied texts differ on the two flipped prompts only
    assert rows[("fare_xstest", "exact_match", "all")]["value"] == pytest.approx(4 / 6)


def test_bold_toxicity_change_and_threshold_crossing_per_domain(tmp_path):
    tox_a = [0.1, 0.6, 0.2, 0.7]
    tox_b = [0.6, 0.4, 0.2, 0.9]  # crosses 0.5 on items 0 and 1
    domains = ["gender", "gender", "race", "race"]
    write_run(tmp_path / "base", {"fare_bold_toxicity": [bold_item(i, t, domain=d) for i, (t, d) in
                                                          enumerate(zip(tox_a, domains))]})
    write_run(tmp_path / "run", {"fare_bold_toxicity": [bold_item(i, t, domain=d) for i, (t, d) in
                                                         enumerate(zip(tox_b, domains))]})
    rows = _rows(drift_runs(tmp_path / "base", tmp_path / "run", n_bootstrap=100))
    assert rows[("fare_bold_toxicity", "toxicity_change", "all")]["value"] == pytest.approx(np.mean(
        np.subtract(tox_b, tox_a)))
    assert rows[("fare_bold_toxicity", "toxicity_cross", "domain=gender")]["value"] == pytest.approx(1.0)
    assert rows[("fare_bold_toxicity", "toxicity_cross", "domain=race")]["value"] == 0.0
    assert rows[("fare_bold_toxicity", "toxicity_change", "domain=race")]["value"] == pytest.approx(0.1)


def test_stereotype_completion_flips_both_directions(tmp_path):
    base = ["so emotional today", "kind people", "hysterical again", "calm"]
    run = ["kind people", "so bossy", "hysterical again", "calm"]  # 1 -> 0, 0 -> 1, 1 -> 1, 0 -> 0
    write_run(tmp_path / "base", {"fare_stereo_completion": [stereo_completion_item(i, t) for i, t in enumerate(base)]})
    write_run(tmp_path / "run", {"fare_stereo_completion": [stereo_completion_item(i, t) for i, t in enumerate(run)]})
    d = drift_runs(tmp_path / "base", tmp_path / "run", n_bootstrap=50)
    rows = _rows(d)
    assert rows[("fare_stereo_completion", "stereotype_1to0", "all")]["value"] == 0.25
    assert rows[("fare_stereo_completion", "stereotype_0to1", "axis=gender")]["value"] == 0.25
    assert d.scores["fare_stereo_completion"] == 0.5
    assert rows[("fare_stereo_completion", "exact_match", "all")]["value"] == 0.5


def test_stereoset_answer_is_the_tasks_own_candidate_score():
    doc = {"sentences": ["a much longer stereotype sentence", "anti", "unrelated"], "scoring": "per_byte"}
    lls = [-20.0, -6.0, -5.0]  # raw argmax: unrelated (2); per byte: -0.61, -1.5, -0.56 -> still 2
    assert choose("fare_stereoset_intrasentence", doc, lls) == (2,)
    lls = [-16.0, -6.0, -5.0]  # per byte -0.48 beats -0.56: the stereotype (0), raw argmax would say 2
    assert choose("fare_stereoset_intrasentence", doc, lls) == (0,)
    assert choose("fare_bbq_1k", {}, lls) == (2,)
    assert choose("fare_crows_pairs", {}, [-3.0, -3.0]) == (0, 1)  # a tie is no preference


def test_text_divergence_measures():
    assert token_edit_distance("a b c", "a x c d") == pytest.approx(2 / 4)  # substitute b->x, insert d
    assert token_edit_distance("", "") == 0.0 and token_edit_distance("a", "") == 1.0
    assert chrf("the cat sat", "the cat sat") == 100.0
    assert chrf("the cat sat", "a dog ran") == pytest.approx(sacrebleu.sentence_chrf("the cat sat", ["a dog ran"]).score)


def test_cli_several_runs_writes_csv_md_png(tmp_path, capsys):
    write_run(tmp_path / "base", {"fare_xstest": [xstest_item(i, i % 2 == 0) for i in range(4)]})
    write_run(tmp_path / "r1", {"fare_xstest": [xstest_item(i, True) for i in range(4)]})
    write_run(tmp_path / "r2", {"fare_xstest": [xstest_item(i, i % 2 == 0) for i in range(4)]})
    assert main([str(tmp_path / "base"), str(tmp_path / "r1"), str(tmp_path / "r2"), "--out", str(tmp_path / "o"),
                 "--bootstrap", "50"]) == 0
    with open(tmp_path / "o" / "drift.csv") as fh:
        rows = list(csv.DictReader(fh))
    scores = {(r["run_path"], r["task"]): float(r["value"]) for r in rows if r["measure"] == "drift_score"}
    assert scores[(str(tmp_path / "r1"), "fare_xstest")] == 0.5 and scores[(str(tmp_path / "r2"), "*")] == 0.0
    assert "| run |" in (tmp_path / "o" / "drift.md").read_text()
    for png in ("drift_scores.png", "drift_categories.png"):
        assert (tmp_path / "o" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    before = (tmp_path / "o" / "drift.csv").read_bytes()
    with pytest.raises(FareError, match="already holds drift.csv.*--overwrite"):
        main([str(tmp_path / "base"), str(tmp_path / "r1"), "--out", str(tmp_path / "o")])
    assert (tmp_path / "o" / "drift.csv").read_bytes() == before
    assert main([str(tmp_path / "base"), str(tmp_path / "r1"), "--out", str(tmp_path / "o"), "--overwrite",
                 "--bootstrap", "20"]) == 0


def test_bad_resample_count_or_seed_is_one_line_before_any_output(tmp_path):
    write_run(tmp_path / "base", {"fare_xstest": [xstest_item(0, True)]})
    write_run(tmp_path / "run", {"fare_xstest": [xstest_item(0, False)]})
    with pytest.raises(FareError, match=r"^n_bootstrap=0; allowed: a positive integer$"):
        drift_runs(tmp_path / "base", tmp_path / "run", n_bootstrap=0)
    with pytest.raises(FareError, match=r"^--seed=-2; allowed: a non-negative integer$"):
        main([str(tmp_path / "base"), str(tmp_path / "run"), "--out", str(tmp_path / "o"), "--seed", "-2"])
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("case", ["other_model", "other_tasks", "no_samples"])
def test_fare_drift_bad_runs_one_line_error(tmp_path, case):
    write_run(tmp_path / "base", {"fare_xstest": [xstest_item(0, True)]})
    if case == "other_model":
        write_run(tmp_path / "run", {"fare_xstest": [xstest_item(0, True)]}, model_name="qwen",
                  model_args="pretrained=fare-tiny:qwen3_moe", fare_moe={"model_id": "fare-tiny:qwen3_moe"})
        expected = "compare runs of one model"
    elif case == "other_tasks":
        write_run(tmp_path / "run", {"fare_crows_pairs": [crows_item(0, True)]})
        expected = "share no task"
    else:
        write_run(tmp_path / "run", {"fare_xstest": [xstest_item(0, True)]}, samples=False)
        expected = "--log_samples"
    proc = subprocess.run([sys.executable, "-m", "fare_models.cli", "drift", str(tmp_path / "base"),
                           str(tmp_path / "run"), "--out", str(tmp_path / "o")], capture_output=True, text=True,
                          check=False)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode != 0 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert expected in lines[0] and str(tmp_path / "run") in lines[0]
    assert not (tmp_path / "o").exists()  # nothing half-written
