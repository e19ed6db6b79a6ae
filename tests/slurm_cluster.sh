#!/usr/bin/env bash
# A throw-away SLURM cluster of one or two nodes on this one machine for the tests, built from
# Debian's packages (apt-get install slurmctld slurmd slurm-client), living entirely in one folder.
#
#   tests/slurm_cluster.sh start DIR   write DIR/slurm.conf and DIR/gres.conf, start slurmctld and
#                                      one slurmd per node, wait until every node is idle; prints
#                                      the slurm.conf path on its last line (export it as SLURM_CONF)
#   tests/slurm_cluster.sh stop DIR    cancel the jobs, then end the daemons by the PIDs recorded
#                                      at start (nothing is killed by name)
#
# Two nodes (SLURM_TEST_NODES=1 for one): slurmd runs once per node as `slurmd -N NAME`, each
# with its own Port= and its own spool folder, PID file and log (SlurmdSpoolDir, SlurmdPidFile,
# SlurmdLogFile with %n). The node names are this machine's short host name and `localhost`:
# the wrappers hand the first node's NAME to the processes as MASTER_ADDR, so each name must
# resolve to this machine, as both do (checked at start). Every node looks
# like a GPU server, big enough for several test jobs at once, so that run_cnn.sbatch and
# run_resnet.sbatch are accepted with their own #SBATCH requests: SLURM_TEST_CPUS (32) CPUs,
# SLURM_TEST_MEM_MB (262144) MB and SLURM_TEST_GPUS (4) fake GPUs. SlurmdParameters=
# config_overrides lets slurmd declare more than the machine has; the fake GPUs are character
# devices (mknod c 1 3, i.e. /dev/null's numbers) because gres.conf refuses plain files.
# Needs root (slurmd, mknod).
# Ports: SLURM_TEST_PORT (slurmctld; the nodes take the next ones), else free ones chosen at start.
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

# The first of COUNT consecutive TCP ports on 127.0.0.1 that nothing listens on (a connection
# to each is refused), from a random start.
free_ports() {
    local count=$1 port offset try
    for ((try = 0; try < 200; try++)); do
        port=$((20000 + RANDOM % 40000))
        for ((offset = 0; offset < count; offset++)); do
            (echo >"/dev/tcp/127.0.0.1/$((port + offset))") 2>/dev/null && continue 2
        done
        echo "$port"
        return 0
    done
}

# The node names, one a line: this host's short name, then localhost. Each must resolve to a
# loopback address of this machine, since the wrappers use the first node's name as the
# MASTER_ADDR of a multi-node job.
node_names() {
    local count=$1 name address names=()
    for name in "$(hostname -s)" localhost; do
        ((${#names[@]} < count)) || break
        [[ " ${names[*]} " != *" $name "* ]] || continue
        address=$(getent ahostsv4 "$name" 2>/dev/null | awk 'NR == 1 { print $1 }') || true
        if [[ $address != 127.* ]]; then
            echo "slurm_cluster: node name '$name' does not resolve to 127.x (got '${address:-nothing}'):" \
                "not used" >&2
            continue
        fi
        names+=("$name")
    done
    ((${#names[@]} == count)) || die "need $count node names that resolve to this machine," \
        "found ${#names[@]} (${names[*]}); add one to /etc/hosts or set SLURM_TEST_NODES=1"
    printf '%s\n' "${names[@]}"
}

write_config() {
    local dir=$1 count port cpus mem gpus user index node offset
    count=${SLURM_TEST_NODES:-2}
    [[ $count == 1 || $count == 2 ]] || die "SLURM_TEST_NODES must be 1 or 2, got '$count'"
    local nodes=()
    mapfile -t nodes < <(node_names "$count")
    ((${#nodes[@]} == count)) || exit 1
    port=${SLURM_TEST_PORT:-$(free_ports $((count + 1)))}
    [[ -n $port ]] || die "no $((count + 1)) consecutive free TCP ports found"
    cpus=${SLURM_TEST_CPUS:-32}
    mem=${SLURM_TEST_MEM_MB:-262144}
    gpus=${SLURM_TEST_GPUS:-4}
    user=$(id -un)
    mkdir -p "$dir/state"
    : >"$dir/gres.conf"
    printf '%s\n' "${nodes[@]}" >"$dir/nodes"
    for node in "${nodes[@]}"; do
        mkdir -p "$dir/spool/$node" "$dir/dev/$node"
        for ((index = 0; index < gpus; index++)); do
            [[ -c $dir/dev/$node/gpu$index ]] || mknod "$dir/dev/$node/gpu$index" c 1 3
            echo "NodeName=$node Name=gpu File=$dir/dev/$node/gpu$index" >>"$dir/gres.conf"
        done
    done
    cat >"$dir/slurm.conf" <<EOF
# Written by tests/slurm_cluster.sh: a test cluster of ${count} node(s) on one machine (see that script).
ClusterName=testcluster
SlurmctldHost=${nodes[0]}(127.0.0.1)
SlurmctldPort=$port
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
# One slurmd per node on this machine: %n (the node name) keeps their files apart.
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ReturnToService=2
KillWait=10
MinJobAge=600
InactiveLimit=0
GresTypes=gpu
SlurmdParameters=config_overrides
EOF
    offset=1
    for node in "${nodes[@]}"; do
        echo "NodeName=$node NodeAddr=127.0.0.1 Port=$((port + offset)) CPUs=$cpus Boards=1" \
            "SocketsPerBoard=1 CoresPerSocket=$cpus ThreadsPerCore=1 RealMemory=$mem" \
            "Gres=gpu:$gpus State=UNKNOWN" >>"$dir/slurm.conf"
        offset=$((offset + 1))
    done
    echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP" >>"$dir/slurm.conf"
    : >"$dir/plugstack.conf"
}

start() {
    local dir=$1 waited=0 states="" want node pid
    local daemon
    for daemon in slurmctld slurmd sinfo getent; do
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
    local nodes=()
    mapfile -t nodes <"$dir/nodes"
    # -D keeps each daemon in the foreground of its own background job, so $! is its PID;
    # setsid and the redirections detach it from the caller's terminal and pipes.
    setsid slurmctld -D -i -f "$SLURM_CONF" </dev/null >>"$dir/slurmctld.stdout" 2>&1 &
    echo "$!" >"$dir/daemons.pid"
    for node in "${nodes[@]}"; do
        setsid slurmd -D -N "$node" -f "$SLURM_CONF" </dev/null >>"$dir/slurmd-$node.stdout" 2>&1 &
        echo "$!" >>"$dir/daemons.pid"
    done
    # Wait for every node to register and go idle (~1 s here; give up after 60 s).
    want=$(printf 'idle\n%.0s' "${nodes[@]}")
    while ((waited < 600)); do
        states=$(sinfo -h -N -o %t 2>/dev/null) || true
        [[ $states == "${want%$'\n'}" ]] && break
        while read -r pid; do
            alive "$pid" || {
                tail -n 20 "$dir"/*.log "$dir"/*.stdout >&2 || true
                die "a daemon (PID $pid) exited during start; logs above"
            }
        done <"$dir/daemons.pid"
        sleep 0.1
        waited=$((waited + 1))
    done
    if [[ $states != "${want%$'\n'}" ]]; then
        tail -n 20 "$dir"/*.log >&2 || true
        stop "$dir" >/dev/null 2>&1 || true
        die "the nodes did not all become idle within 60 s (states: ${states//$'\n'/ }); logs above"
    fi
    echo "slurm_cluster: ${#nodes[@]} node(s) (${nodes[*]}) idle after $((waited / 10)).$((waited % 10)) s;" \
        "export SLURM_CONF=$SLURM_CONF" >&2
    echo "$SLURM_CONF"
}

stop() {
    local dir=$1 pid waited index
    dir=$(cd "$dir" && pwd)
    [[ -f $dir/daemons.pid ]] || die "no daemons.pid in $dir: nothing to stop"
    export SLURM_CONF=$dir/slurm.conf
    # Cancel what is still queued or running so that no job step outlives the cluster.
    scancel --quiet --user="$(id -un)" 2>/dev/null || true
    for ((waited = 0; waited < 100; waited++)); do
        [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break
        sleep 0.1
    done
    # Daemons in reverse order of start: the slurmds, then slurmctld. SIGTERM, then SIGKILL
    # after 10 s.
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
