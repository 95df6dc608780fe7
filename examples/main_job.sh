#!/usr/bin/env bash
# The README's main job: bias benchmarks on a model (default: the built-in tiny MoE), unmodified
# and with ARR from a freshly computed FARE profile, then paired significance tests.
#   MODEL=allenai/OLMoE-1B-7B-0924 OUT=runs/olmoe bash examples/main_job.sh
# Output: $OUT (default ./fare-main-job, git-ignored); its path is printed at the end.
set -euo pipefail
MODEL="${MODEL:-fare-tiny}"
OUT="${OUT:-fare-main-job}"
TASKS="${TASKS:-fare_crows_pairs,fare_bbq_1k}"
LAM="${LAM:-1.0}"
BATCH="${BATCH:-16}"
fare profile --model "$MODEL" --out "$OUT/profile"
fare eval --model fare_moe --model_args "pretrained=$MODEL" \
  --tasks "$TASKS" --batch_size "$BATCH" --log_samples --output_path "$OUT/none"
fare eval --model fare_moe \
  --model_args "pretrained=$MODEL,intervention=arr,profile=$OUT/profile/phi.safetensors,lam=$LAM" \
  --tasks "$TASKS" --batch_size "$BATCH" --log_samples --output_path "$OUT/arr"
fare compare "$OUT/none" "$OUT/arr" --out "$OUT/comparison"
echo "fare main job: results in $(cd "$OUT" && pwd) (paired tests: comparison/, profile: profile/, runs: none/ and arr/)"
