#!/usr/bin/env bash
# Stop the single-node CI SLURM cluster started by .ci/slurm/start.sh (by the daemons' pid files only).
set -uo pipefail

R=${SLURM_CI_DIR:-/tmp/orpo-slurm}
pids=()
for pidfile in "$R/run/slurmd.pid" "$R/run/slurmctld.pid" /run/munge/munged.pid; do
    if [ -s "$pidfile" ]; then
        pid=$(cat "$pidfile")
        if kill -0 "$pid" 2>/dev/null; then
            kill "$pid" && pids+=("$pid")
        fi
    fi
done
for ((i = 0; i < 20; i++)); do
    alive=0
    for pid in "${pids[@]}"; do
        # A zombie (PID 1 does not reap in some containers) counts as stopped.
        if kill -0 "$pid" 2>/dev/null && [ "$(ps -o stat= -p "$pid" 2>/dev/null | cut -c1)" != Z ]; then
            alive=1
        fi
    done
    [ "$alive" -eq 0 ] && break
    sleep 0.5
done
if [ "$alive" -ne 0 ]; then
    echo "stop.sh: daemons still running after 10 s: ${pids[*]}" >&2
    exit 1
fi
echo "SLURM cluster stopped (${#pids[@]} daemons)."
