#!/usr/bin/env bash
# The paper's ablations in miniature on CPU: demo/ablations.yaml's variants of the demo's frozen-LLM
# stages, from the real SmolLM2-135M-Instruct, then a table, plots and one JSON line.
#   demo/ablate.sh [RUN_DIR] [overrides for every variant...]      (default RUN_DIR: runs/ablations)
# Rerunning on the same RUN_DIR continues (measured variants are not run again).
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_DIR=${1:-runs/ablations}
shift || true
PY=${PYTHON:-.venv/bin/python}
export EVIP_DEMO_DATA="$RUN_DIR/data"          # where demo/recipes/*.yaml look for the shards
start=$(date +%s)

if [ ! -f "$EVIP_DEMO_DATA/manifest.json" ]; then
  "$PY" -m evip.cli demo-data "$EVIP_DEMO_DATA" --n-heldout 100
fi
GGUF=$("$PY" -c "from evip.assets import smollm2_gguf; print(smollm2_gguf())")
"$PY" -m evip.cli ablate demo/ablations.yaml "base.source=$GGUF" "$@" --run-dir "$RUN_DIR" | tee "$RUN_DIR.log"
echo "ablations: wall time $(( $(date +%s) - start )) s; table, plots and JSON in $RUN_DIR/" >&2
