#!/usr/bin/env bash
# Launch `evip run` with torchrun (c10d rendezvous). One node by default.
#
#   launch/torchrun.sh PIPELINE RUN_DIR [OVERRIDES...]
#
# Environment (all optional):
#   NPROC          processes on this node (default: number of GPUs from nvidia-smi, else 1)
#   NNODES         nodes in the job (default 1); run this script once per node
#   RDZV_ENDPOINT  host:port of the rendezvous, the same on every node (required if NNODES > 1;
#                  default 127.0.0.1:<free port>)
#   RDZV_ID        rendezvous id, the same on every node (default: evip-<basename of RUN_DIR>)
#   PYTHON         interpreter (default: the repository's .venv, else python3)
#   EVIP_ENTRY     what each process runs (default `-m evip.cli run`; the tests use a stand-in)
# Exit code: that of `evip run` (0 done, 75 preempted after a checkpoint: run again to continue;
# see launch/README.md). All logic lives in evip; this file only assembles the command.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 PIPELINE RUN_DIR [OVERRIDES...]" >&2
  exit 2
fi
PIPELINE="$1"; RUN_DIR="$2"; shift 2
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$REPO/.venv/bin/python" ]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
if [ -z "${NPROC:-}" ]; then
  NPROC="$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)"
  [ "${NPROC:-0}" -gt 0 ] || NPROC=1
fi
NNODES="${NNODES:-1}"
if [ -z "${RDZV_ENDPOINT:-}" ]; then
  if [ "$NNODES" != 1 ]; then
    echo "$0: NNODES=$NNODES needs RDZV_ENDPOINT=host:port (the first node's address), the same on every node" >&2
    exit 2
  fi
  RDZV_ENDPOINT="127.0.0.1:$("$PYTHON" -c 'from evip.distributed import free_port; print(free_port())')"
fi
RDZV_ID="${RDZV_ID:-evip-$(basename "$RUN_DIR")}"
read -r -a ENTRY <<< "${EVIP_ENTRY:--m evip.cli run}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" PYTHONUNBUFFERED=1

exec "$PYTHON" -m evip.torchrun --nnodes "$NNODES" --nproc-per-node "$NPROC" \
  --rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "$RDZV_ID" --max-restarts 0 \
  "${ENTRY[@]}" "$PIPELINE" "$@" --run-dir "$RUN_DIR"
