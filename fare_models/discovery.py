"""Make lm-eval 0.4.13 find the ``fare_moe`` model and the ``fare_*`` tasks with no extra flag.

lm-eval 0.4.13 scans no plugin entry points, so ``pip install`` puts ``fare_moe.pth`` in
site-packages. Its one line imports ``_fare_moe_autoload`` (stdlib only, microseconds), which
registers a post-import hook: when lm-eval itself imports ``lm_eval.models`` or
``lm_eval.tasks.manager``, :func:`register_model` / :func:`register_tasks` run. Nothing of
lm-eval, torch or fare-moe is imported at interpreter start. ``FARE_MOE_NO_AUTOLOAD=1`` turns it
off. Newer lm-eval releases read the ``lm_eval.models`` / ``lm_eval.tasks`` entry points in
pyproject.toml instead.
"""

from __future__ import annotations

from pathlib import Path

MODEL_NAME = "fare_moe"
MODEL_TARGET = "fare_models.lm:FareMoeLM"


def task_dir() -> Path:
    """Directory of fare-moe's YAML tasks (installed as fare_tasks/task_configs)."""
    import fare_tasks

    return fare_tasks.TASK_DIR


def register_model(module=None) -> None:
    """Lazily register ``fare_moe`` in lm-eval's model registry (imports nothing heavy)."""
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=MODEL_TARGET)


def register_tasks(module=None) -> None:
    """Make every TaskManager built with the default task index also index our task_configs/.

    Our directory goes right after lm-eval's built-ins, before any user ``include_path``, so
    user configs still take precedence.
    """
    import lm_eval.tasks.manager as manager

    cls = manager.TaskManager
    if getattr(cls.__init__, "_fare_moe", False):
        return
    original = cls.__init__

    def __init__(self, verbosity=None, include_path=None, include_defaults=True, metadata=None):
        if include_defaults:
            extra = [] if include_path is None else (
                list(include_path) if isinstance(include_path, (list, tuple)) else [include_path])
            ours = str(task_dir())
            if ours not in map(str, extra):
                include_path = [ours, *extra]
        original(self, verbosity=verbosity, include_path=include_path, include_defaults=include_defaults,
                 metadata=metadata)

    __init__._fare_moe = True
    __init__.__wrapped__ = original
    __init__.__doc__ = original.__doc__
    cls.__init__ = __init__


def register_all() -> None:
    import lm_eval.models  # noqa: F401  (registers the built-ins first)

    register_model()
    register_tasks()
