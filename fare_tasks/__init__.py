"""fare-moe tasks: benchmark data layer, task helpers and metrics.

``TASK_DIR`` is the directory of the YAML task configs: ``task_configs/`` in a source checkout,
``fare_tasks/task_configs`` in an installed wheel.
"""

from pathlib import Path

_HERE = Path(__file__).resolve().parent
TASK_DIR = _HERE / "task_configs" if (_HERE / "task_configs").is_dir() else _HERE.parent / "task_configs"
