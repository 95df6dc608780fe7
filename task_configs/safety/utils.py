"""lm-eval hooks of the fare_safety tasks (logic lives in fare_tasks.safety_tasks)."""

from fare_tasks.safety_tasks import (  # noqa: F401
    RefusalJudgeFilter,
    ToxicityScoreFilter,
    load_advbench,
    load_bold,
    load_harmbench,
    load_stereo_completion,
    load_xstest,
    process_bold,
    process_harmbench,
    process_refusal,
    process_stereo_completion,
    process_xstest,
)
