#!/usr/bin/env bash
# Start a single-node SLURM cluster (slurmctld + slurmd + munge, Debian packages) with fake GPUs, for CI.
#
# Usage (as root):  bash .ci/slurm/start.sh        then:  source "$SLURM_CI_DIR/slurm.env"  (default below)
# Knobs (environment): SLURM_CI_DIR (state, config, logs; default /tmp/orpo-slurm), SLURM_CI_GPUS (fake GPUs,
# default 8), SLURM_CI_CPUS (CPUs declared to SLURM, default max(16, nproc): SLURM refuses more tasks per node
# than declared CPUs, and the real count on CI runners is 2).
# Nothing is exported into the caller's shell; `$SLURM_CI_DIR/slurm.env` sets SLURM_CONF for whoever sources it.
# Stop with .ci/slurm/stop.sh.
set -euo pipefail

R=${SLURM_CI_DIR:-/tmp/orpo-slurm}
GPUS=${SLURM_CI_GPUS:-8}
CPUS=${SLURM_CI_CPUS:-$(( $(nproc) > 16 ? $(nproc) : 16 ))}
NODE=$(hostname -s)
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
START_NS=$(date +%s%N)

if [ "$(id -u)" -ne 0 ]; then
    echo "start.sh: must run as root (it installs packages and starts slurmctld/slurmd/munged)" >&2
    exit 1
fi
if [ "$CPUS" -lt 8 ]; then
    echo "start.sh: SLURM_CI_CPUS=$CPUS; at least 8 are needed for 8 tasks per node" >&2
    exit 1
fi

# A previous cluster (same directory) is stopped first, so the state always matches this config.
bash "$HERE/stop.sh" >/dev/null 2>&1 || true

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
        || ! command -v munged >/dev/null; then
    echo "== installing slurmctld slurmd slurm-client munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi

rm -rf "$R"
mkdir -p "$R"/etc "$R"/state "$R"/spool "$R"/run "$R"/log "$R"/fakegpu
# gres/gpu drops GPUs without a File=; symlinks to a character device make fake ones it accepts.
for ((i = 0; i < GPUS; i++)); do ln -s /dev/null "$R/fakegpu/gpu$i"; done

cat > "$R/etc/slurm.conf" <<CONF
ClusterName=ci
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job may start again only after the job credential lifetime (default 120 s): short here, so the
# requeue test does not wait two minutes.
AuthInfo=cred_expire=10
CredType=cred/munge
StateSaveLocation=$R/state
SlurmdSpoolDir=$R/spool
SlurmctldPidFile=$R/run/slurmctld.pid
SlurmdPidFile=$R/run/slurmd.pid
SlurmctldLogFile=$R/log/slurmctld.log
SlurmdLogFile=$R/log/slurmd.log
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
GresTypes=gpu
# Lets the node declare more CPUs than the machine has (tasks per node need CPUs >= tasks).
SlurmdParameters=config_overrides
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=1000 Gres=gpu:$GPUS State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
cat > "$R/etc/gres.conf" <<CONF
AutoDetect=off
NodeName=$NODE Name=gpu File=$R/fakegpu/gpu[0-$((GPUS - 1))]
CONF
echo "export SLURM_CONF=$R/etc/slurm.conf" > "$R/slurm.env"
export SLURM_CONF=$R/etc/slurm.conf

# munge: the package's postinst creates the key; create one if a minimal image skipped that.
if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
fi
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
runuser -u munge -- /usr/sbin/munged
slurmctld -i
slurmd

fail() {
    echo "start.sh: $1" >&2
    for log in "$R/log/slurmctld.log" "$R/log/slurmd.log"; do
        echo "--- last lines of $log" >&2
        tail -n 20 "$log" >&2 || true
    done
    exit 1
}
for ((waited = 0; waited < 60; waited++)); do
    state=$(sinfo -h -N -o %t 2>/dev/null || true)
    [ "$state" = idle ] && break
    case "$state" in inval* | drain* | down*) [ "$waited" -ge 5 ] && fail "node $NODE is '$state'";; esac
    sleep 1
done
[ "$state" = idle ] || fail "node $NODE not idle after 60 s (state '${state:-none}')"

ELAPSED_MS=$(( ($(date +%s%N) - START_NS) / 1000000 ))
ELAPSED=$((ELAPSED_MS / 1000)).$(printf %03d $((ELAPSED_MS % 1000)))
cat <<MSG
SLURM cluster up in ${ELAPSED} s: node $NODE, $CPUS CPUs, $GPUS fake GPUs (gres gpu), partition debug.
  source $R/slurm.env            # sets SLURM_CONF for sinfo / sbatch / srun
  sbatch --wait --ntasks-per-node=4 --gpus-per-node=4 job.sbatch
  bash $HERE/stop.sh             # stop the daemons
Logs: $R/log/
MSG
