"""lm-eval hooks of the fare_bbq tasks (logic lives in fare_tasks.bbq)."""

from fare_tasks.bbq import *  # noqa: F401,F403  (load, doc_to_choice, process_results, agg_*)
