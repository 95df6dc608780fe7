#!/usr/bin/env bash
# One compression cell per method family on random-initialised full-size Qwen3-30B-A3B and
# ERNIE-4.5-21B-A3B (no download): wall time and peak GPU memory. `--tiny` runs the same code on CPU.
# All flags go to benchmarks/gpu_study.py (see its --help), e.g.:
#   bash benchmarks/gpu_study.sh --layers 4                # published width, 4 decoder layers, GPU
#   bash benchmarks/gpu_study.sh --tiny                    # CPU smoke run (the tests use it)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
export FARE_DATA_DIR="${FARE_DATA_DIR:-$here/../../shared/data}"
if [[ " $* " == *" --tiny "* ]]; then export CUDA_VISIBLE_DEVICES=""; fi
exec "${PYTHON:-python}" "$here/gpu_study.py" "$@"
