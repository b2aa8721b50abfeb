#!/usr/bin/env bash
# Run a command against a real, private, single-node Slurm cluster: munged, slurmctld and
# slurmd from Debian's slurm-wlm, on 127.0.0.1, with every state, spool, log and socket file
# in a fresh temporary folder (a Slurm or munge already running on the machine is left
# alone). The daemons are stopped by pid, and the folder removed, when the command ends.
#
#   bash scripts/with-slurm.sh cargo test --release -p kliko-cli --test cli -- slurm_cli::
#
# The command sees SLURM_CONF (sbatch, squeue, srun, ... read it; it names the private munge
# socket) and KLIKO_TEST_SLURM=1. PID 1 need not be systemd: nothing is started as a service.
set -euo pipefail
for cmd in slurmctld slurmd munged sbatch; do
  command -v "$cmd" >/dev/null || PATH=$PATH:/usr/sbin command -v "$cmd" >/dev/null || {
    echo "error: \`$cmd\` is not installed: run \`bash scripts/setup.sh\` (it installs slurm-wlm)" >&2
    exit 1
  }
done
export PATH=$PATH:/usr/sbin
[ "$(id -u)" -eq 0 ] || { echo "error: scripts/with-slurm.sh starts slurmd, which needs root" >&2; exit 1; }
dir=$(mktemp -d /tmp/kliko-slurm-XXXXXX)
chmod 755 "$dir"
pids=()
stop() {
  local rc=$?
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null || true
  done
  rm -rf "$dir"
  exit $rc
}
trap stop EXIT
host=$(hostname -s)
cpus=$(nproc)
# Memory Slurm may hand out (`--mem`), in MiB: most of the machine's.
mem=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))
mkdir -p "$dir/munge" "$dir/state" "$dir/spool"
chown munge: "$dir/munge"
# A key of our own, readable only by munge.
dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
chown munge: "$dir/munge/munge.key" && chmod 400 "$dir/munge/munge.key"
# munged must not run as root; it daemonizes, and its pid file says whom to stop.
runuser -u munge -- munged --socket="$dir/munge/munge.sock" --key-file="$dir/munge/munge.key" \
  --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" --seed-file="$dir/munge/munged.seed" \
  >"$dir/munged.out" 2>&1
for _ in $(seq 50); do [ -S "$dir/munge/munge.sock" ] && [ -s "$dir/munge/munged.pid" ] && break; sleep 0.1; done
[ -s "$dir/munge/munged.pid" ] || { echo "error: munged did not start:" >&2; cat "$dir/munged.out" "$dir/munge/munged.log" >&2; exit 1; }
pids+=("$(cat "$dir/munge/munged.pid")")
# Ports of our own, so a system Slurm (default 6817/6818) is not disturbed.
ctld_port=${KLIKO_SLURMCTLD_PORT:-16817}
d_port=${KLIKO_SLURMD_PORT:-16818}
cat > "$dir/slurm.conf" <<CONF
ClusterName=kliko-test
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$d_port
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.sock
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
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
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
MinJobAge=300
InactiveLimit=0
KillWait=5
OverTimeLimit=0
MessageTimeout=20
SchedulerType=sched/backfill
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
PartitionName=other Nodes=ALL MaxTime=INFINITE State=UP
CONF
export SLURM_CONF=$dir/slurm.conf
slurmctld -D -f "$SLURM_CONF" >"$dir/slurmctld.out" 2>&1 &
pids+=($!)
slurmd -D -f "$SLURM_CONF" >"$dir/slurmd.out" 2>&1 &
pids+=($!)
ok=
for _ in $(seq 300); do
  if sinfo --noheader --format=%T 2>/dev/null | grep -qx idle; then ok=1; break; fi
  sleep 0.1
done
if [ -z "$ok" ]; then
  echo "error: the private Slurm cluster did not come up in 30 s" >&2
  tail -n 20 "$dir"/slurmctld.log "$dir"/slurmd.log "$dir"/*.out >&2 || true
  exit 1
fi
export KLIKO_TEST_SLURM=1
set +e
"$@"
