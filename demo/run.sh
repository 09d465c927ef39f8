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
. demo/prepare.sh                                # PY, EVIP_DEMO_DATA (data made once), start
"$PY" -m evip.cli run demo/pipeline.yaml "$@" --run-dir "$RUN_DIR"
"$PY" -m evip.cli report "$RUN_DIR" --heldout "$EVIP_DEMO_DATA/heldout/questions.json"
echo "demo: wall time $(( $(date +%s) - start )) s; plots and summary in $RUN_DIR/report/"
