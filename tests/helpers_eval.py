"""Shared helper for the task tests: run lm-eval on the tiny model with the fare task dir indexed."""

from __future__ import annotations

import lm_eval
from lm_eval.tasks import TaskManager

from task_configs import TASK_DIR


def task_manager(pretrained: str, extra_paths=()) -> TaskManager:
    """TaskManager over task_configs/ (+ extra dirs), with model_args merged into metadata as the CLI does."""
    return TaskManager(include_path=[str(TASK_DIR), *map(str, extra_paths)], metadata={"pretrained": pretrained})


def evaluate(tiny_path, tasks, limit=None, extra_paths=(), **kwargs) -> dict:
    return lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(tiny_path), "device": "cpu"}, tasks=list(tasks),
        task_manager=task_manager(str(tiny_path), extra_paths), limit=limit, batch_size=256,
        bootstrap_iters=0, log_samples=True, **kwargs,
    )
