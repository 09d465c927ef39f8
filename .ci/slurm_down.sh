#!/usr/bin/env bash
# Stop the one-machine SLURM cluster started by .ci/slurm_up.sh (by pid files; nothing else).
set -uo pipefail
D="${EVIP_SLURM_DIR:-/tmp/evip-slurm}"
export SLURM_CONF="$D/slurm.conf"
[ -f "$SLURM_CONF" ] && scancel --full "--user=$(id -un)" >/dev/null 2>&1 && sleep 1
stop() {  # pidfile
  [ -f "$1" ] || return 0
  local pid; pid="$(cat "$1")"
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
  fi
  rm -f "$1"
}
for f in "$D"/slurmd-*.pid; do [ -e "$f" ] && stop "$f"; done
stop "$D/slurmctld.pid"
if [ -f "$D/munged.started-by-us" ]; then
  stop /run/munge/munged.pid
  rm -f "$D/munged.started-by-us"
fi
rm -rf "$D/state" "$D/spool"
echo "slurm_down: stopped (logs kept in $D/log)" >&2
