"""lm-eval hooks of the fare_crows_pairs* tasks (logic lives in fare_tasks.crows)."""

from fare_tasks.crows import doc_to_choice, load, process_results  # noqa: F401
from fare_tasks.metrics import nan_mean, parity_gap  # noqa: F401
