#!/usr/bin/env bash
# A single-node Slurm cluster on localhost for tests: munged, slurmctld and slurmd with
# this machine's CPUs and memory, all state under $DIR (default /tmp/augpro-slurm).
#   cluster.sh start   writes the config, starts the daemons, waits for the node
#   cluster.sh stop    cancels jobs, stops the daemons, removes $DIR
#   cluster.sh env     prints the exports a shell needs to use the cluster
set -euo pipefail
DIR=${AUGPRO_SLURM_DIR:-/tmp/augpro-slurm}
export SLURM_CONF=$DIR/slurm.conf

start() {
  for b in munged slurmctld slurmd sbatch; do
    command -v $b >/dev/null || { echo "cluster.sh: $b not found (install slurm-wlm and munge: make slurm-deps)" >&2; exit 1; }
  done
  stop_daemons 2>/dev/null || true
  rm -rf "$DIR"; mkdir -p "$DIR"/{state,spool,log}
  chmod 755 "$DIR"
  # munged with its own key and socket, so a system munge (if any) is left alone.
  dd if=/dev/urandom of="$DIR/munge.key" bs=1024 count=1 status=none
  chmod 600 "$DIR/munge.key"
  munged --force --key-file="$DIR/munge.key" --socket="$DIR/munge.sock" \
    --pid-file="$DIR/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge.seed"
  local node; node=$(slurmd -C | head -1 | sed -e "s/^NodeName=[^ ]*/NodeName=localhost/")
  cat > "$SLURM_CONF" <<CONF
ClusterName=augpro-test
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=$(id -un)
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge.sock
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldPort=16817
SlurmdPort=16818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MinJobAge=600
KillWait=5
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
  slurmctld -f "$SLURM_CONF"
  slurmd -f "$SLURM_CONF" -N localhost
  for _ in $(seq 60); do
    if sinfo -h -o %T 2>/dev/null | grep -q idle; then echo "slurm: node localhost idle ($SLURM_CONF)"; return 0; fi
    sleep 1
  done
  echo "cluster.sh: the node did not come up; logs:" >&2
  tail -20 "$DIR"/log/*.log >&2
  exit 1
}

stop_daemons() {
  if [ -f "$SLURM_CONF" ]; then scancel --user="$(id -un)" 2>/dev/null || true; fi
  for p in slurmd slurmctld munged; do
    if [ -f "$DIR/$p.pid" ]; then kill "$(cat "$DIR/$p.pid")" 2>/dev/null || true; fi
  done
  sleep 1
  for p in slurmd slurmctld munged; do
    if [ -f "$DIR/$p.pid" ]; then kill -9 "$(cat "$DIR/$p.pid")" 2>/dev/null || true; fi
  done
}

case "${1:-}" in
  start) start ;;
  stop) stop_daemons; rm -rf "$DIR" ;;
  env) echo "export SLURM_CONF=$SLURM_CONF" ;;
  *) echo "usage: cluster.sh start|stop|env" >&2; exit 2 ;;
esac
