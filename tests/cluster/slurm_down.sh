#!/usr/bin/env bash
# Stop the test cluster that tests/cluster/slurm_up.sh started under DIR: cancel its jobs, wait
# for the queue to drain, then stop its slurmd(s), its slurmctld and (only if slurm_up started
# it) munged, each by the pid in its pid file. Never kills anything by name.
#
#   tests/cluster/slurm_down.sh DIR
#
# A pid counts as dead once /proc/PID/cmdline is empty: this sandbox's PID 1 does not reap
# orphans, so stopped daemons can linger as zombies.
set -euo pipefail

DIR=${1:-${SLURM_TEST_DIR:-}}
[[ -n $DIR && -d $DIR ]] || {
    echo "usage: slurm_down.sh DIR (the directory given to slurm_up.sh)" >&2
    exit 2
}
DIR=$(cd "$DIR" && pwd)
export SLURM_CONF=$DIR/slurm.conf

alive() { # pid [expected word in its command line]
    local cmd
    cmd=$(tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null || true)
    [[ -n $cmd && (-z ${2:-} || $cmd == *"$2"*) ]]
}

stop_pidfile() { # pidfile expected-name
    local pidfile=$1 name=$2 pid
    [[ -f $pidfile ]] || return 0
    pid=$(<"$pidfile")
    [[ $pid =~ ^[0-9]+$ ]] || return 0
    if alive "$pid" "$name"; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 100); do
            alive "$pid" "$name" || break
            sleep 0.1
        done
        if alive "$pid" "$name"; then
            echo "slurm_down: $name ($pid) ignored SIGTERM for 10 s; sending SIGKILL" >&2
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$pidfile"
}

ctld_pid=$(cat "$DIR/run/slurmctld.pid" 2>/dev/null || true)
if [[ -f $SLURM_CONF && -n $ctld_pid ]] && alive "$ctld_pid" slurmctld; then
    mapfile -t jobs < <(squeue -h -o %i 2>/dev/null || true)
    if ((${#jobs[@]})); then
        scancel "${jobs[@]}" 2>/dev/null || true
        for _ in $(seq 120); do # KillWait is 30 s; give jobs that long and a bit more
            [[ -z $(squeue -h -o %i 2>/dev/null || true) ]] && break
            sleep 0.5
        done
    fi
fi

for pidfile in "$DIR"/run/slurmd-*.pid; do
    [[ -e $pidfile ]] && stop_pidfile "$pidfile" slurmd
done
stop_pidfile "$DIR/run/slurmctld.pid" slurmctld
stop_pidfile "$DIR/run/munged.pid" munged
rm -f "$DIR/run/started"
echo "slurm_down: stopped the cluster under $DIR" >&2
