#!/usr/bin/env bash
# A single-node Slurm cluster on localhost, in a temp dir, for the tests and benchmarks.
#
#   tests/infra/slurm_cluster.sh start DIR   install (as root, if missing), start munged,
#                                            slurmctld and slurmd; prints SLURM_CONF=...
#   tests/infra/slurm_cluster.sh stop DIR    stop the daemons by their pid files
#
# Every wait is bounded with `timeout`. Clients find the cluster through SLURM_CONF.
set -euo pipefail
action=${1:?usage: slurm_cluster.sh start|stop DIR}
dir=${2:?usage: slurm_cluster.sh start|stop DIR}

stop() {
  for daemon in slurmd slurmctld; do
    if [ -f "$dir/$daemon.pid" ]; then
      pid=$(cat "$dir/$daemon.pid")
      kill "$pid" 2>/dev/null || true
      timeout 15 bash -c "while kill -0 $pid 2>/dev/null; do sleep 0.1; done" || kill -9 "$pid" 2>/dev/null || true
      rm -f "$dir/$daemon.pid"
    fi
  done
}

if [ "$action" = stop ]; then
  stop
  exit 0
fi

if ! command -v slurmctld > /dev/null || ! [ -x /usr/sbin/munged ]; then
  [ "$(id -u)" = 0 ] || { echo "slurm-wlm/munge missing and not root" >&2; exit 3; }
  export DEBIAN_FRONTEND=noninteractive
  timeout 300 apt-get update -qq
  timeout 600 apt-get install -y -qq --no-install-recommends slurm-wlm munge > /dev/null
fi

# munged: started directly (the init script leaves nothing running here); checked with a
# real round trip, not pgrep (dead munged processes linger as zombies)
if ! timeout 5 bash -c 'munge -n | unmunge' > /dev/null 2>&1; then
  [ -f /etc/munge/munge.key ] || { timeout 30 mungekey --create 2>/dev/null || timeout 30 create-munge-key -f; }
  install -d -o munge -g munge /run/munge
  runuser -u munge -- /usr/sbin/munged --force
  timeout 15 bash -c 'until munge -n | unmunge > /dev/null 2>&1; do sleep 0.1; done'
fi

mkdir -p "$dir/state" "$dir/spool"
host=$(hostname)
cpus=$(nproc)
cat > "$dir/slurm.conf" <<CONF
ClusterName=calloop
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmctldPort=$(( 20000 + RANDOM % 20000 ))
SlurmdPort=$(( 40000 + RANDOM % 20000 ))
AuthType=auth/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/jobcomp.txt
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
MinJobAge=300
KillWait=5
InactiveLimit=0
SchedulerParameters=sched_interval=1
MessageTimeout=10
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
PartitionName=short Nodes=$host MaxTime=00:05:00 State=UP
CONF
export SLURM_CONF="$dir/slurm.conf"
stop
slurmctld -i -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF"
timeout 60 bash -c 'until sinfo -h -o %t 2>/dev/null | grep -qE "^(idle|mix|alloc)"; do sleep 0.2; done' || {
  echo "slurm node did not become idle; see $dir/slurmctld.log and $dir/slurmd.log" >&2
  sinfo >&2 || true
  exit 4
}
echo "SLURM_CONF=$SLURM_CONF"
