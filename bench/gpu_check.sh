#!/usr/bin/env bash
# The one-shot GPU check of evip (issue 15): packed-attention kernels in bf16 against the SDPA
# reference, a real bf16 DeepSpeed stage step with NCCL on one GPU for a 2B-shaped slice (tokens/s,
# MFU, peak memory vs `evip plan`, host syncs per step), routed vs plain step time, generation with
# the KV cache. Under 8 minutes on one H100/H200 (a hard limit of 480 s). Last line: one JSON object.
#
#   bench/gpu_check.sh              # on a machine with one CUDA GPU
#   bench/gpu_check.sh --dry-run    # on CPU: every part that does not need CUDA, tiny sizes (tests)
#   bench/gpu_check.sh --layers 8   # a deeper slice
#
# Python: $PYTHON, else the repository's .venv, else python3.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export WANDB_MODE=disabled
exec timeout 480 "$PY" bench/gpu_check.py "$@"
