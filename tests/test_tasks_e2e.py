"""Every fare_* task end to end on fare-tiny with the real data (--limit), plus config checks."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers_eval import evaluate
from task_configs import TASK_DIR

BIAS_TYPES = ["race_color", "gender", "socioeconomic", "nationality", "religion", "age",
              "sexual_orientation", "physical_appearance", "disability"]
TASKS = {
    "fare_crows_pairs", "fare_crows_pairs_length_matched", *(f"fare_crows_pairs_{b}" for b in BIAS_TYPES),
    "fare_stereoset_intrasentence", "fare_stereoset_intersentence", "fare_bbq", "fare_bbq_1k",
    "fare_truthfulqa", "fare_perplexity",
}
GROUPS = {"fare_bias", "fare_utility", "fare_suite"}
LIMIT = 4


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def _configs():
    out = {}
    for path in TASK_DIR.rglob("*.yaml"):
        cfg = yaml.load(path.read_text(), Loader=_Loader)
        out[cfg.get("group") or cfg["task"]] = cfg
    return out


def test_task_and_group_names_are_ours_and_complete():
    names = set(_configs())
    assert {n for n in names if n in TASKS or n in GROUPS} == TASKS | GROUPS
    assert all(n.startswith("fare_") for n in names)


@pytest.fixture(scope="module")
def index():
    import lm_eval.tasks

    return lm_eval.tasks.TaskManager(include_path=str(TASK_DIR)).task_index


def test_no_name_shadows_a_builtin_task_or_tag(index):
    import lm_eval.tasks

    lm_eval_dir = Path(lm_eval.tasks.__file__).parent
    builtin_tasks = [
        e for e in index.values()
        if e.yaml_path is not None and lm_eval_dir in Path(e.yaml_path).parents
    ]
    builtin = {e.name for e in builtin_tasks}
    for e in builtin_tasks:
        tags = (e.cfg or {}).get("tag") or []
        builtin |= {tags} if isinstance(tags, str) else set(tags)
    assert len(builtin) > 10000
    ours = set(_configs()) | {"fare_crows_pairs_by_type"}
    assert not ours & builtin


def test_suite_groups_reference_indexed_tasks(index):
    configs = _configs()
    for group in GROUPS:
        for member in configs[group]["task"]:
            assert member in index, (group, member)


def test_lm_eval_validate_finds_every_task():
    names = sorted(TASKS | {"fare_bias", "fare_utility"})
    proc = subprocess.run(
        [sys.executable, "-m", "lm_eval", "validate", "--tasks", ",".join(names), "--include_path", str(TASK_DIR)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "All tasks found and valid" in proc.stdout


@pytest.fixture(scope="module")
def run(tiny_path):
    return evaluate(tiny_path, ["fare_bias", "fare_utility", "fare_crows_pairs_by_type", "fare_bbq_1k"], limit=LIMIT)


def test_every_task_ran_with_all_metrics(run):
    assert set(run["results"]) >= TASKS
    for task in TASKS:
        res = run["results"][task]
        assert res["sample_len"] == LIMIT, task
        metrics = _metrics(run, task)
        for metric in metrics:
            value = res[f"{metric},none"]
            assert isinstance(value, float), (task, metric, value)
        finite = [m for m in metrics if not math.isnan(res[f"{m},none"])]
        assert finite, task


def test_per_doc_values_are_logged_for_paired_tests(run):
    for task in TASKS:
        samples = run["samples"][task]
        assert len(samples) == LIMIT and len({s["doc_hash"] for s in samples}) == LIMIT, task
        for s in samples:
            for metric in _metrics(run, task):
                assert metric in s, (task, metric)


def test_groups_contain_their_tasks(run):
    subtasks = run["group_subtasks"]
    assert set(subtasks["fare_bias"]) == {
        "fare_crows_pairs", "fare_crows_pairs_length_matched", "fare_stereoset_intrasentence",
        "fare_stereoset_intersentence", "fare_bbq",
    }
    assert set(subtasks["fare_utility"]) == {"fare_truthfulqa", "fare_perplexity"}


def _metrics(run, task):
    """Metric names of a task, from the config lm-eval actually ran."""
    return [m["metric"] for m in run["configs"][task]["metric_list"]]
