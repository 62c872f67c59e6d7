#!/usr/bin/env bash
# A real single-node Slurm cluster (munged, slurmctld, slurmd) for the launch tests.
#
#   tests/slurm_cluster.sh start DIR   # writes DIR/slurm.conf, starts the daemons, waits for `idle`
#   tests/slurm_cluster.sh stop DIR    # stops the daemons by the PIDs recorded in DIR/*.pid
#
# Clients then need `export SLURM_CONF=DIR/slurm.conf`. Needs root (slurmd runs jobs as their
# user). Installs Debian's slurmctld/slurmd/slurm-client/munge first when they are missing and
# CI or ALFRED_INSTALL_SLURM=1 is set. Facts behind the settings: shared/notes/launch-backends.md
# (munged refuses root; AuthInfo=cred_expire=10 makes a requeued job restart after ~20 s, not 144).
set -euo pipefail

cmd=${1:?usage: slurm_cluster.sh start|stop DIR}
dir=$(realpath -m "${2:?usage: slurm_cluster.sh start|stop DIR}")
ctld_port=${ALFRED_SLURMCTLD_PORT:-16817}
slurmd_port=${ALFRED_SLURMD_PORT:-16818}

install_if_missing() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
     && command -v munged >/dev/null; then
    return 0
  fi
  if [[ -z "${CI:-}" && "${ALFRED_INSTALL_SLURM:-}" != 1 ]]; then
    echo "slurm_cluster.sh: Slurm is not installed (set ALFRED_INSTALL_SLURM=1 to apt-get it)" >&2
    exit 3
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
}

start_munge() {
  # One munged serves every cluster on the machine; reuse it when it is already answering.
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    return 0
  fi
  install -d -o munge -g munge -m 0755 /run/munge
  [[ -f /etc/munge/munge.key ]] || { mungekey --create >/dev/null; chown munge:munge /etc/munge/munge.key; }
  # setpriv execs munged as the munge user, so $! is munged's own PID.
  setpriv --reuid=munge --regid=munge --init-groups munged --foreground >"$dir/log/munged.stdout" 2>&1 &
  echo $! >"$dir/munged.pid.own"
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "slurm_cluster.sh: munged did not start" >&2
  exit 1
}

write_conf() {
  local cpus mem
  cpus=$(slurmd -C | sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' | head -n 1)
  mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -n 1)
  mkdir -p "$dir/state" "$dir/spool" "$dir/log"
  cat >"$dir/slurm.conf" <<EOF
ClusterName=alfredtest
SlurmctldHost=localhost
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
MailProg=/bin/true
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
JobCompType=jobcomp/none
KillWait=30
MinJobAge=600
NodeName=localhost CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
}

start() {
  install_if_missing
  mkdir -p "$dir"
  write_conf
  mkdir -p "$dir/log"
  start_munge
  export SLURM_CONF="$dir/slurm.conf"
  slurmctld -D -i -f "$SLURM_CONF" >"$dir/log/slurmctld.stdout" 2>&1 &
  echo $! >"$dir/slurmctld.pid.own"
  slurmd -D -N localhost -f "$SLURM_CONF" >"$dir/log/slurmd.stdout" 2>&1 &
  echo $! >"$dir/slurmd.pid.own"
  for _ in $(seq 150); do
    if sinfo -h -o %T 2>/dev/null | grep -qx idle; then
      echo "slurm_cluster.sh: cluster up, SLURM_CONF=$SLURM_CONF"
      return 0
    fi
    sleep 0.2
  done
  echo "slurm_cluster.sh: node did not become idle; see $dir/log" >&2
  stop
  exit 1
}

stop() {
  local pid_file pid
  for pid_file in "$dir/slurmd.pid.own" "$dir/slurmctld.pid.own" "$dir/munged.pid.own"; do
    [[ -f "$pid_file" ]] || continue
    pid=$(cat "$pid_file")
    if kill -0 "$pid" 2>/dev/null; then
      kill "$pid"
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    fi
    rm -f "$pid_file"
  done
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: slurm_cluster.sh start|stop DIR" >&2; exit 2 ;;
esac
