#!/usr/bin/env bash
# The paper's ablations in miniature on CPU: demo/ablations.yaml's variants of the demo's frozen-LLM
# stages, from the real SmolLM2-135M-Instruct, then a table, plots and one JSON line.
#   demo/ablate.sh [RUN_DIR] [overrides for every variant...]      (default RUN_DIR: runs/ablations)
# Rerunning on the same RUN_DIR continues (measured variants are not run again).
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_DIR=${1:-runs/ablations}
shift || true
. demo/prepare.sh                                # PY, EVIP_DEMO_DATA (data made once), start
"$PY" -m evip.cli ablate demo/ablations.yaml "$@" --run-dir "$RUN_DIR" | tee "$RUN_DIR.log"
echo "ablations: wall time $(( $(date +%s) - start )) s; table, plots and JSON in $RUN_DIR/" >&2
