#!/usr/bin/env bash
# A throw-away single-node SLURM cluster for the tests, built from Debian's packages
# (apt-get install slurmctld slurmd slurm-client), living entirely in one folder.
#
#   tests/slurm_cluster.sh start DIR   write DIR/slurm.conf and DIR/gres.conf, start slurmctld and
#                                      slurmd, wait until the node is idle; prints the slurm.conf
#                                      path on its last line (export it as SLURM_CONF)
#   tests/slurm_cluster.sh stop DIR    cancel the jobs, then end both daemons by the PIDs recorded
#                                      at start (nothing is killed by name)
#
# The node looks like a small GPU server so that run_cnn.sbatch and run_resnet.sbatch are
# accepted with their own #SBATCH requests: SLURM_TEST_CPUS (16) CPUs, SLURM_TEST_MEM_MB
# (65536) MB and SLURM_TEST_GPUS (4) fake GPUs. SlurmdParameters=config_overrides lets slurmd
# declare more than the machine has; the fake GPUs are character devices (mknod c 1 3, i.e.
# /dev/null's numbers) because gres.conf refuses plain files. Needs root (slurmd, mknod).
# Ports: SLURM_TEST_PORT, else a free pair chosen at start.
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

die() {
    echo "slurm_cluster: $*" >&2
    exit 1
}

# Alive = /proc/PID exists and the process is not a zombie (this machine's PID 1 reaps late,
# so `kill -0` would report an exited daemon as running).
alive() {
    local pid=$1 stat
    [[ -r /proc/$pid/stat ]] || return 1
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [[ ${stat%% *} != Z ]]
}

free_port_pair() {
    python3 - <<'EOF'
import socket

for _ in range(200):
    with socket.socket() as first:
        first.bind(("127.0.0.1", 0))
        port = first.getsockname()[1]
        if port > 65000:
            continue
        with socket.socket() as second:
            try:
                second.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        print(port)
        break
EOF
}

write_config() {
    local dir=$1 host port cpus mem gpus user index
    host=$(hostname -s)
    port=${SLURM_TEST_PORT:-$(free_port_pair)}
    [[ -n $port ]] || die "no free TCP port pair found"
    cpus=${SLURM_TEST_CPUS:-16}
    mem=${SLURM_TEST_MEM_MB:-65536}
    gpus=${SLURM_TEST_GPUS:-4}
    user=$(id -un)
    mkdir -p "$dir/state" "$dir/spool" "$dir/dev"
    : >"$dir/gres.conf"
    for ((index = 0; index < gpus; index++)); do
        [[ -c $dir/dev/gpu$index ]] || mknod "$dir/dev/gpu$index" c 1 3
        echo "NodeName=$host Name=gpu File=$dir/dev/gpu$index" >>"$dir/gres.conf"
    done
    cat >"$dir/slurm.conf" <<EOF
# Written by tests/slurm_cluster.sh: a single-node test cluster (see that script).
ClusterName=testcluster
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=$user
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
# Short credential lifetime and scheduler intervals: a requeued job restarts in ~15 s, not ~150 s.
AuthInfo=cred_expire=10
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5,bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MailProg=/bin/true
PlugStackConfig=$dir/plugstack.conf
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ReturnToService=2
KillWait=10
MinJobAge=600
InactiveLimit=0
GresTypes=gpu
SlurmdParameters=config_overrides
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus Boards=1 SocketsPerBoard=1 CoresPerSocket=$cpus ThreadsPerCore=1 RealMemory=$mem Gres=gpu:$gpus State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    : >"$dir/plugstack.conf"
}

start() {
    local dir=$1 waited=0 state=""
    local daemon
    for daemon in slurmctld slurmd sinfo; do
        command -v "$daemon" >/dev/null || die "$daemon not found: apt-get install slurmctld slurmd slurm-client"
    done
    [[ $(id -u) == 0 ]] || die "must run as root (slurmd launches jobs; mknod makes the fake GPUs)"
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    if [[ -f $dir/daemons.pid ]]; then
        die "$dir already holds a cluster (daemons.pid); stop it first"
    fi
    write_config "$dir"
    export SLURM_CONF=$dir/slurm.conf
    # -D keeps each daemon in the foreground of its own background job, so $! is its PID;
    # setsid and the redirections detach it from the caller's terminal and pipes.
    setsid slurmctld -D -i -f "$SLURM_CONF" </dev/null >>"$dir/slurmctld.stdout" 2>&1 &
    echo "$!" >"$dir/daemons.pid"
    setsid slurmd -D -f "$SLURM_CONF" </dev/null >>"$dir/slurmd.stdout" 2>&1 &
    echo "$!" >>"$dir/daemons.pid"
    # Wait for the node to register and go idle (~0.3 s here; give up after 60 s).
    while ((waited < 600)); do
        state=$(sinfo -h -N -o %t 2>/dev/null | head -n 1) || true
        [[ $state == idle ]] && break
        local pid
        while read -r pid; do
            alive "$pid" || {
                tail -n 20 "$dir"/*.log "$dir"/*.stdout >&2 || true
                die "a daemon (PID $pid) exited during start; logs above"
            }
        done <"$dir/daemons.pid"
        sleep 0.1
        waited=$((waited + 1))
    done
    if [[ $state != idle ]]; then
        tail -n 20 "$dir"/*.log >&2 || true
        stop "$dir" >/dev/null 2>&1 || true
        die "the node did not become idle within 60 s (state '${state:-unknown}'); logs above"
    fi
    echo "slurm_cluster: node idle after $((waited / 10)).$((waited % 10)) s; export SLURM_CONF=$SLURM_CONF" >&2
    echo "$SLURM_CONF"
}

stop() {
    local dir=$1 pid waited
    dir=$(cd "$dir" && pwd)
    [[ -f $dir/daemons.pid ]] || die "no daemons.pid in $dir: nothing to stop"
    export SLURM_CONF=$dir/slurm.conf
    # Cancel what is still queued or running so that no job step outlives the cluster.
    scancel --quiet --user="$(id -un)" 2>/dev/null || true
    for ((waited = 0; waited < 100; waited++)); do
        [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break
        sleep 0.1
    done
    # Daemons in reverse order of start: slurmd, then slurmctld. SIGTERM, then SIGKILL after 10 s.
    local pids=()
    mapfile -t pids <"$dir/daemons.pid"
    for ((index = ${#pids[@]} - 1; index >= 0; index--)); do
        pid=${pids[index]}
        alive "$pid" || continue
        kill -TERM "$pid" 2>/dev/null || true
        for ((waited = 0; waited < 100; waited++)); do
            alive "$pid" || break
            sleep 0.1
        done
        if alive "$pid"; then
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    rm -f "$dir/daemons.pid"
    echo "slurm_cluster: stopped (PIDs ${pids[*]})" >&2
}

case "${1:-}" in
start | stop)
    [[ $# == 2 ]] || {
        usage >&2
        exit 2
    }
    "$1" "$2"
    ;;
-h | --help)
    usage
    ;;
*)
    usage >&2
    exit 2
    ;;
esac
