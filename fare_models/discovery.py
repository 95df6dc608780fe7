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

import contextlib
import functools
import logging
from pathlib import Path

from fare_core.errors import FareError

MODEL_NAME = "fare_moe"
MODEL_TARGET = "fare_models.lm:FareMoeLM"


def task_dir() -> Path:
    """Directory of fare-moe's YAML tasks (installed as fare_tasks/task_configs)."""
    import fare_tasks

    return fare_tasks.TASK_DIR


def register_model(module=None) -> None:
    """Lazily register ``fare_moe`` in lm-eval's model registry (imports nothing heavy).

    Also installs the one-line handler for fare-moe's errors (:func:`fare_core.errors.install_excepthook`).
    """
    from lm_eval.api.registry import model_registry

    from fare_core.errors import install_excepthook

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=MODEL_TARGET)
    install_excepthook()


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
    _fail_fast_offline()
    logging.getLogger("lm_eval.api.task").addFilter(_drop_metadata_hint)


#: Hub datasets of lm-eval's built-in tasks that fare-moe scores from local data, and the fare task.
LOCAL_EQUIVALENTS = {
    "jannalu/crows_pairs_multilingual": "fare_crows_pairs",
    "oskarvanderwal/bbq": "fare_bbq",
}


def _drop_metadata_hint(record: logging.LogRecord) -> bool:
    """Drop lm-eval's "Custom kwargs can be passed to `--metadata`" warning for fare tasks.

    lm-eval 0.4.13 (``ConfigurableTask.download``) prints it for every task with a callable
    ``custom_dataset``, whether or not it reads metadata; fare tasks document their keys instead.
    """
    msg = str(record.msg)
    return not (msg.startswith("fare_") and "can be passed to `--metadata`" in msg)


@functools.cache
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers at all (any HTTP status counts), within ``timeout`` s (asked once)."""
    import urllib.error
    import urllib.request

    from huggingface_hub import constants

    try:
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False
    return True


@contextlib.contextmanager
def _hub_offline():
    """Offline mode for datasets/huggingface_hub while the block runs (cache only, no retries)."""
    import datasets.config
    from huggingface_hub import constants

    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


def _fail_fast_offline() -> None:
    """Built-in ``crows_pairs``/``bbq`` fail in seconds, with one line, when the hub is out of reach.

    lm-eval's tasks are not touched: online they download as before. Offline (``HF_HUB_OFFLINE``)
    or with the hub unreachable they load from the datasets cache only (no 25 s of retries), and a
    dataset that is not cached is a FareError naming the fare task that scores the same items from
    local data.
    """
    from lm_eval.api.task import ConfigurableTask

    if getattr(ConfigurableTask.download, "_fare_moe", False):
        return
    original = ConfigurableTask.download

    def download(self, dataset_kwargs=None, **kwargs):
        ours = LOCAL_EQUIVALENTS.get(self.DATASET_PATH) if not callable(self.config.custom_dataset) else None
        if ours is None:
            return original(self, dataset_kwargs, **kwargs)
        import datasets.config

        offline = datasets.config.HF_HUB_OFFLINE
        if not offline and hub_reachable():
            return original(self, dataset_kwargs, **kwargs)
        try:
            with _hub_offline():
                return original(self, dataset_kwargs, **kwargs)
        except OSError as e:  # datasets' ConnectionError / FileNotFoundError when nothing is cached
            why = "offline mode is set (HF_HUB_OFFLINE)" if offline else "the Hugging Face hub is unreachable"
            raise FareError(
                f"task {self.config.task!r} downloads {self.DATASET_PATH!r} from the hub, but {why} and it is "
                f"not cached; use {ours!r} instead (same scoring, local data from FARE_DATA_DIR)"
            ) from e

    download._fare_moe = True
    download.__wrapped__ = original
    ConfigurableTask.download = download


def register_all() -> None:
    import lm_eval.models  # noqa: F401  (registers the built-ins first)

    register_model()
    register_tasks()
