#!/usr/bin/env bash
# The demo, end to end on CPU: rendered-scene data -> the four EViP stages on the real
# SmolLM2-135M-Instruct (upcycled) -> held-out accuracy vs chance -> plots and summary table.
#   demo/run.sh [RUN_DIR] [pipeline overrides...]      (default RUN_DIR: runs/demo)
# e.g. demo/run.sh runs/quick stages_all.steps=2
# Rerunning on the same RUN_DIR continues where it stopped (finished stages are not redone).
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_DIR=${1:-runs/demo}
shift || true
PY=${PYTHON:-.venv/bin/python}
export EVIP_DEMO_DATA="$RUN_DIR/data"          # where demo/recipes/*.yaml look for the shards
start=$(date +%s)

if [ ! -f "$EVIP_DEMO_DATA/manifest.json" ]; then
  "$PY" -m evip.cli demo-data "$EVIP_DEMO_DATA" --n-heldout 100
fi
GGUF=$("$PY" -c "from evip.assets import smollm2_gguf; print(smollm2_gguf())")
"$PY" -m evip.cli run demo/pipeline.yaml "base.source=$GGUF" "$@" --run-dir "$RUN_DIR"
"$PY" -m evip.cli report "$RUN_DIR" --heldout "$EVIP_DEMO_DATA/heldout/questions.json"
echo "demo: wall time $(( $(date +%s) - start )) s; plots and summary in $RUN_DIR/report/"
