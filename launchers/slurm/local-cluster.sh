#!/usr/bin/env bash
# A real SLURM cluster on this one machine: munge, slurmctld and two slurmd daemons ("nodes" n1, n2
# on 127.0.0.1, separate ports and spool dirs), everything under $FAR_SCALE_SLURM_DIR.
#   launchers/slurm/local-cluster.sh install|start|stop|status|env
# `start` installs Debian's slurm-wlm and munge when missing (needs root and apt), then prints the
# line to export: SLURM_CONF=<dir>/slurm.conf. Used by the tests marked `slurm` and for trying
# `far-scale launch slurm` out.
set -euo pipefail

DIR=${FAR_SCALE_SLURM_DIR:-/tmp/far-scale-slurm}
CONF=$DIR/slurm.conf
NODES=(n1 n2)
FIRST_PORT=${FAR_SCALE_SLURMD_PORT:-17101}
CTLD_PORT=${FAR_SCALE_SLURMCTLD_PORT:-17100}
READY_TIMEOUT_S=60

log() { echo "[local-cluster] $*" >&2; }

install_packages() {
  if command -v slurmctld >/dev/null && command -v munged >/dev/null; then return; fi
  if [ "$(id -u)" != 0 ]; then log "slurm-wlm/munge missing and not root: install them first"; exit 1; fi
  log "installing slurm-wlm and munge (apt)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
}

start_munge() {
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return; fi
  mkdir -p /run/munge /var/log/munge /var/lib/munge /etc/munge
  [ -f /etc/munge/munge.key ] || { dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; }
  chown -R munge:munge /run/munge /var/log/munge /var/lib/munge /etc/munge
  chmod 0700 /etc/munge; chmod 0400 /etc/munge/munge.key; chmod 0755 /run/munge
  runuser -u munge -- munged --force
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return; sleep 0.1; done
  log "munged did not come up"; exit 1
}

write_conf() {
  local host; host=$(hostname)
  mkdir -p "$DIR/state" "$DIR/log" "$DIR/spool"
  local last=$((FIRST_PORT + ${#NODES[@]} - 1))
  cat >"$CONF" <<CONF
ClusterName=farscale
SlurmctldHost=$host
SlurmctldPort=$CTLD_PORT
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmUser=root
SlurmdUser=root
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
KillWait=30
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.%n.pid
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.%n.log
NodeName=n[1-${#NODES[@]}] NodeHostname=$host NodeAddr=127.0.0.1 Port=$FIRST_PORT-$last CPUs=1 State=UNKNOWN
PartitionName=debug Nodes=n[1-${#NODES[@]}] Default=YES MaxTime=INFINITE State=UP
CONF
}

is_up() { SLURM_CONF=$CONF timeout 5 sinfo -h -o '%t' 2>/dev/null | grep -qE '^(idle|mix|alloc)'; }

start() {
  install_packages
  start_munge
  if [ -f "$CONF" ] && is_up; then log "already running"; echo "SLURM_CONF=$CONF"; return; fi
  stop_daemons
  write_conf
  export SLURM_CONF=$CONF
  slurmctld
  for node in "${NODES[@]}"; do mkdir -p "$DIR/spool/$node"; slurmd -N "$node"; done
  local deadline=$((SECONDS + READY_TIMEOUT_S))
  until [ "$(sinfo -h -o '%t %D' 2>/dev/null | awk '$1=="idle"{n+=$2} END{print n+0}')" = "${#NODES[@]}" ]; do
    if [ $SECONDS -ge $deadline ]; then log "nodes not idle after ${READY_TIMEOUT_S}s"; sinfo >&2 || true; exit 1; fi
    sleep 0.5
  done
  log "up: $(sinfo -h -o '%P %D %t' | tr '\n' ' ')"
  echo "SLURM_CONF=$CONF"
}

stop_daemons() {
  for pidfile in "$DIR"/slurmd.*.pid "$DIR"/slurmctld.pid; do
    [ -f "$pidfile" ] || continue
    kill "$(cat "$pidfile")" 2>/dev/null || true
    rm -f "$pidfile"
  done
  sleep 0.5
}

case "${1:-}" in
  install) install_packages ;;
  start) start ;;
  stop) stop_daemons; log "stopped" ;;
  status) if [ -f "$CONF" ] && is_up; then SLURM_CONF=$CONF sinfo; else echo "not running"; exit 1; fi ;;
  env) echo "SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 install|start|stop|status|env" >&2; exit 2 ;;
esac
