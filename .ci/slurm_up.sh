#!/usr/bin/env bash
# A real SLURM cluster on this one machine for the launch tests: munge, slurmctld and two slurmd
# (nodes n1, n2 on ports 17001/17002, both at 127.0.0.1), partitions `low` (preemptable, 15 s
# GraceTime) and `high` (higher PriorityTier preempts `low` by REQUEUE), fast requeue.
# Idempotent: a running cluster is left alone. Installs the Debian packages if missing.
# Writes $EVIP_SLURM_DIR/env (SLURM_CONF=...); stop with .ci/slurm_down.sh.
set -euo pipefail
D="${EVIP_SLURM_DIR:-/tmp/evip-slurm}"
NODES="${EVIP_SLURM_NODES:-n1 n2}"
export SLURM_CONF="$D/slurm.conf"

log() { echo "slurm_up: $*" >&2; }

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
   || ! command -v munged >/dev/null; then
  log "installing slurmctld slurmd slurm-client munge (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null 2>&1 || {
    apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null; }
fi

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# ---- munge (authentication) ----
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  [ -f /etc/munge/munge.key ] || { log "creating /etc/munge/munge.key"; mungekey --create 2>/dev/null \
      || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; }
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge /var/log/munge /var/lib/munge && chown munge:munge /run/munge /var/log/munge /var/lib/munge
  runuser -u munge -- /usr/sbin/munged
  mkdir -p "$D" && touch "$D/munged.started-by-us"
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
fi

# ---- slurm.conf ----
HOST="$(hostname -s)"
CPUS="$(nproc)"
mkdir -p "$D/state" "$D/log"
for n in $NODES; do mkdir -p "$D/spool/$n"; done
cat > "$D/slurm.conf.new" <<CONF
ClusterName=evip
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=16817
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=5
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool/%n
SlurmctldPidFile=$D/slurmctld.pid
SlurmdPidFile=$D/slurmd-%n.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=5,batch_sched_delay=0,sched_min_interval=100000,sched_interval=5
JobRequeue=1
KillWait=5
MinJobAge=600
ReturnToService=2
MpiDefault=none
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
CONF
port=17001
for n in $NODES; do
  echo "NodeName=$n NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$port CPUs=$CPUS State=UNKNOWN" >> "$D/slurm.conf.new"
  port=$((port + 1))
done
NODELIST="$(echo $NODES | tr ' ' ',')"
cat >> "$D/slurm.conf.new" <<CONF
PartitionName=low Nodes=$NODELIST Default=YES PriorityTier=1 PreemptMode=REQUEUE GraceTime=15 MaxTime=INFINITE State=UP
PartitionName=high Nodes=$NODELIST PriorityTier=10 PreemptMode=OFF MaxTime=INFINITE State=UP
CONF
mv "$D/slurm.conf.new" "$SLURM_CONF"
echo "SLURM_CONF=$SLURM_CONF" > "$D/env"

# ---- daemons ----
if ! running "$D/slurmctld.pid"; then
  log "starting slurmctld"
  slurmctld -c -f "$SLURM_CONF"
fi
for n in $NODES; do
  if ! running "$D/slurmd-$n.pid"; then
    log "starting slurmd -N $n"
    slurmd -N "$n" -f "$SLURM_CONF"
  fi
done

# ---- wait until every node is up (idle, or running jobs when the cluster was already up) ----
for _ in $(seq 120); do
  states="$(sinfo -h -N -p low -o '%t' 2>/dev/null | sort -u | tr '\n' ' ')"
  if [ -n "$states" ] && [ -z "$(echo $states | tr ' ' '\n' | grep -v -x -E 'idle|alloc|mix|comp')" ]; then
    log "up: nodes $NODELIST $states(SLURM_CONF=$SLURM_CONF)"; exit 0
  fi
  sleep 0.5
done
log "nodes not idle after 60 s (states: ${states:-none}); see $D/log/"
sinfo -N -l >&2 || true
tail -n 20 "$D"/log/*.log >&2 || true
exit 1
