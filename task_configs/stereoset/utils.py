"""lm-eval hooks of the fare_stereoset_* tasks (logic lives in fare_tasks.stereoset)."""

from fare_tasks.stereoset import *  # noqa: F401,F403  (load, doc_to_choice, process_results, agg_*)
