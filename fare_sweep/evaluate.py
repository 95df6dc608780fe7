"""One lm-eval run of a cell, in-process, saved exactly as ``lm_eval --log_samples --output_path`` saves it.

In-process (``lm_eval.simple_evaluate``) rather than a ``lm_eval`` subprocess per cell: a fresh
process re-imports torch/transformers/lm-eval and re-indexes lm-eval's ~15,000 task configs
(about 13 s on the development machine) for every cell, which dominates small cells. Crash
isolation comes from the executor instead: Ray runs each cell in a worker process and retries a
worker that dies; the local executor catches Python errors per cell, and a hard crash of the whole
sweep loses only the running cell (rerun resumes).
"""

from __future__ import annotations

import json
from pathlib import Path


def task_manager(tasks, metadata: dict | None = None):
    """lm-eval's TaskManager with fare's tasks; only fare's configs are indexed when they cover ``tasks``."""
    from lm_eval.tasks import TaskManager

    from fare_models import discovery

    discovery.register_all()
    fare_dir = str(discovery.task_dir())
    tm = TaskManager(include_defaults=False, include_path=[fare_dir], metadata=metadata)
    if all(t in tm.all_tasks for t in tasks):
        return tm
    return TaskManager(metadata=metadata)  # built-ins + fare's configs (autoload hook)


def run_lm_eval(model_args: dict, ev: dict, out_dir: Path) -> dict:
    """Evaluate ``fare_moe`` with ``model_args`` on ``ev['tasks']``; write results + samples under ``out_dir``.

    Returns lm-eval's results dict (without samples). Files: ``out_dir/<model>/results_<date>.json``
    and ``samples_<task>_<date>.jsonl``, written by lm-eval's own EvaluationTracker.
    """
    import lm_eval
    from lm_eval.loggers import EvaluationTracker

    tracker = EvaluationTracker(output_path=str(out_dir))
    results = lm_eval.simple_evaluate(
        model="fare_moe", model_args=dict(model_args), tasks=list(ev["tasks"]),
        num_fewshot=ev.get("num_fewshot"), batch_size=ev.get("batch_size", 1), limit=ev.get("limit"),
        apply_chat_template=ev.get("apply_chat_template", False), log_samples=True,
        evaluation_tracker=tracker, task_manager=task_manager(ev["tasks"], metadata=dict(model_args)),
    )
    samples = results.pop("samples")
    tracker.save_results_aggregated(results=results, samples=samples)
    for task_name in results["configs"]:
        tracker.save_results_samples(task_name=task_name, samples=samples[task_name])
    return json.loads(json.dumps(results, default=str))


def metric_rows(results: dict) -> list[tuple[str, str, str, float | None, float | None]]:
    """(task, metric, filter, value, stderr) for every numeric metric in lm-eval's results dict."""
    rows = []
    for task, metrics in (results.get("results") or {}).items():
        for name, value in metrics.items():
            if "," not in name or "_stderr," in name:
                continue
            metric, _, filt = name.partition(",")
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            stderr = float(stderr) if isinstance(stderr, (int, float)) and not isinstance(stderr, bool) else None
            rows.append((task, metric, filt, float(value), stderr))
    return rows
