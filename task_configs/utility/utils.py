"""lm-eval hooks of fare_truthfulqa and fare_perplexity (logic lives in fare_tasks.utility)."""

from fare_tasks.utility import doc_to_choice, load_perplexity, load_truthfulqa, perplexity_results  # noqa: F401
