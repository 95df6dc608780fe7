"""lm-eval YAML task configs of fare-moe (``fare_*`` tasks). ``TASK_DIR`` is what lm-eval indexes."""

from pathlib import Path

TASK_DIR = Path(__file__).resolve().parent
