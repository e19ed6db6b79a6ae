# shellcheck shell=bash
# The body of run_cnn.sbatch and run_resnet.sbatch: `slurm_run_training <prefix> <script> "$@"`.
# docs/slurm.md tells the whole path (container, logs, signals and requeue, nodes) and the knobs.

# Traps first, so that a signal during the wrapper's start-up is seen too.
_SLURM_SIGNALS="" # the signals received, e.g. " USR1"
_SLURM_CHILD=""   # the PID of the training process, once started
TRAIN_LAUNCHER=() # what starts it: srun for several processes (slurm_ddp_launch)
trap '_slurm_on_signal USR1' USR1
trap '_slurm_on_signal TERM' TERM
trap '_slurm_on_signal INT' INT

slurm_log() { printf '[%s] %s\n' "$(date '+%Y-%m-%d %H:%M:%S')" "$*"; }
# Warnings and errors go to both the .out log, where the story is told, and the .err log.
slurm_warn() {
    slurm_log "$*"
    slurm_log "$*" >&2
}

# USR1 and TERM are passed on to the training process, once started. Ctrl-C is not: it reaches
# every process of the terminal's process group at once, and a second SIGINT would abort it.
_slurm_on_signal() {
    _SLURM_SIGNALS+=" $1"
    if [[ -n $_SLURM_CHILD && $1 != INT ]]; then
        slurm_log "received SIG$1: forwarding it to the training process (PID $_SLURM_CHILD)"
        kill -s "$1" "$_SLURM_CHILD" 2>/dev/null || true
    fi
}

# git pull --ff-only (not with GIT_PULL=0, nor in a restart: a run keeps its code), the commit
# and the job (the script logs its device). A job that is not an array logs to
# <name>_<job>_4294967294.out (%A_%a, SLURM's "no array index"): <name>_<job>.out links to it.
_slurm_banner() {
    local restarts=$1 dirty="" array="" fd path
    if [[ ${GIT_PULL:-1} == 0 ]]; then
        slurm_log "git pull skipped (GIT_PULL=0)"
    elif ((restarts > 0)); then
        slurm_log "git pull skipped: restart $restarts resumes with the code of the first start"
    elif ! GIT_TERMINAL_PROMPT=0 timeout 120 git pull --ff-only --quiet </dev/null 2>/dev/null; then
        slurm_warn "WARNING: git pull --ff-only failed (not a checkout, no network on this node," \
            "or local changes); running the checked-out code"
    fi
    [[ -z $(git status --porcelain --untracked-files=no 2>/dev/null) ]] ||
        dirty=" (+ uncommitted changes)"
    slurm_log "code: commit $(git rev-parse HEAD 2>/dev/null)$dirty" \
        "($(git log -1 --format='%cd, %s' --date=short 2>/dev/null))"
    [[ -z ${SLURM_ARRAY_TASK_ID:-} ]] ||
        array=", array task ${SLURM_ARRAY_JOB_ID:-?}_$SLURM_ARRAY_TASK_ID (seed = --seed + $SLURM_ARRAY_TASK_ID)"
    slurm_log "job ${SLURM_JOB_ID:-none}$array (${SLURM_JOB_NAME:-no name}) on $(hostname)," \
        "restart $restarts of at most ${MAX_REQUEUES:-3}, partition ${SLURM_JOB_PARTITION:-none}," \
        "${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-?}} CPUs, GPUs: ${CUDA_VISIBLE_DEVICES:-none}"
    [[ -n ${SLURM_JOB_ID:-} && -z ${SLURM_ARRAY_TASK_ID:-} ]] || return 0
    for fd in 1 2; do
        path=$(readlink "/proc/$$/fd/$fd" 2>/dev/null) || continue
        [[ -f $path && $path == *_4294967294.* ]] || continue
        ln -sfn "$(basename "$path")" "${path/_4294967294./.}" 2>/dev/null || true
    done
}

# Sets TRAIN_COMMAND: how to start python (on the host's .venv, or in the container, which gets
# the repository, DATA_DIR, RESULTS_DIR, TORCH_HOME and any --data-dir/--output-dir bound).
_slurm_prepare_command() {
    local image=${CONTAINER:-$REPO_DIR/container.sif} runtime="" setup=(--) path previous="" spec=""
    if [[ $image != none && ! -f $image ]]; then
        slurm_warn "ERROR: container image $image not found: build it (docs/slurm.md), set" \
            "CONTAINER=/path/to/image.sif, or run on the host's .venv with CONTAINER=none"
        return 1
    elif [[ $image != none ]] && ! runtime=$(command -v apptainer || command -v singularity); then
        slurm_warn "ERROR: neither apptainer nor singularity is on PATH (try 'module load" \
            "apptainer'), or run on the host's .venv with CONTAINER=none"
        return 1
    fi
    [[ $image == none ]] || setup=(--env-only) # the variables to bind; the venv is made inside
    # shellcheck source=setup_env.sh
    if ! source "$REPO_DIR/setup_env.sh" "${setup[@]}"; then
        slurm_warn "ERROR: $REPO_DIR/setup_env.sh failed (see above)"
        return 1
    fi
    if [[ $image == none ]]; then
        TRAIN_COMMAND=(python)
        slurm_log "environment: host (CONTAINER=none), python: $(command -v python), $(python --version 2>&1)"
        return 0
    fi
    local binds=("$REPO_DIR" "$DATA_DIR" "$RESULTS_DIR" "$TORCH_HOME")
    for path in "$@"; do # exact option names: the scripts take no abbreviations either
        case $previous in --data-dir | --output-dir) binds+=("$path") ;; esac
        case $path in --data-dir=* | --output-dir=*) binds+=("${path#*=}") ;; esac
        previous=$path
    done
    for path in "${binds[@]}"; do
        mkdir -p "$path" 2>/dev/null || true
        path=$(cd "$path" 2>/dev/null && pwd -P) || continue
        [[ ,$spec, == *,$path,* ]] || spec+="${spec:+,}$path"
    done
    slurm_log "environment: $("$runtime" --version 2>/dev/null | head -n 1), image $image, binds $spec"
    # setup_env.sh makes .venv-container on the image's PyTorch; exec lets the signals reach Python.
    # shellcheck disable=SC2016 # $1 and $@ are expanded by the inner bash, on purpose
    TRAIN_COMMAND=("${runtime##*/}" exec --nv --bind "$spec" --pwd "$REPO_DIR" "$image"
        bash -c 'repo=$1; shift; source "$repo/setup_env.sh" -- || exit 1; exec "$@"'
        bash "$REPO_DIR" python)
}

# slurm_ddp_launch: for several GPUs or nodes, TRAIN_LAUNCHER = srun, one task per GPU (docs/
# slurm.md, 7): srun's tasks are the workers, so a worker's exit code (75) is srun's. --wait=60
# ends the other tasks a minute after one ends (a dead node, a failed rank).
slurm_ddp_launch() {
    [[ -n ${SLURM_JOB_ID:-} ]] || return 0
    local nodes=${SLURM_NNODES:-1} tasks=${SLURM_NTASKS:-1} gpus=${SLURM_GPUS_PER_NODE:-0} per_node cpus
    gpus=${gpus##*:} # "4", "a100:4" or "gpu:a100:4"
    [[ $gpus =~ ^[0-9]+$ ]] || gpus=0
    per_node=${NPROC_PER_NODE:-$gpus}
    ((per_node >= 1)) || per_node=1
    if ((tasks > nodes)); then
        TRAIN_LAUNCHER=(srun --kill-on-bad-exit=0 --wait=60 --ntasks="$tasks")
    elif ((nodes * per_node > 1)); then
        tasks=$((nodes * per_node))
        cpus=$((${SLURM_CPUS_ON_NODE:-1} / per_node))
        ((cpus >= 1)) || cpus=1
        TRAIN_LAUNCHER=(srun --kill-on-bad-exit=0 --wait=60 --ntasks="$tasks"
            --ntasks-per-node="$per_node" --cpus-per-task="$cpus")
    else
        return 0
    fi
    MASTER_ADDR=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-$(hostname)}" | head -n 1)
    export MASTER_ADDR MASTER_PORT=${DIST_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
    slurm_log "distributed: srun starts $tasks processes (one per task) on $nodes node(s);" \
        "rank 0 at $MASTER_ADDR:$MASTER_PORT"
}

# slurm_run_training PREFIX SCRIPT [ARGS...]: the whole job. Exits with the script's code (0
# done, 75 or 130 stopped; a requeued job ends with 0 here and carries on in its next start).
slurm_run_training() {
    local prefix=$1 script=$2 restarts=${SLURM_RESTART_COUNT:-0} resume=() arg ready=1 rc run_dir
    shift 2
    JOB_SCRIPT_NAME=${JOB_SCRIPT_NAME:-run_${prefix}.sbatch}
    CONTINUE_WITH="sbatch $JOB_SCRIPT_NAME --resume " # the run's options come with it
    [[ -n ${SLURM_JOB_ID:-} ]] || CONTINUE_WITH="bash $JOB_SCRIPT_NAME --resume "
    slurm_log "=== $JOB_SCRIPT_NAME: start $((restarts + 1)) (SLURM_RESTART_COUNT=$restarts) ==="
    cd "$REPO_DIR" || exit 1
    _slurm_banner "$restarts"
    # Inside SLURM, --resume auto (this job's newest unfinished run, or a new one), unless the
    # user gave --resume, or --dry-run (always a new run).
    [[ -z ${SLURM_JOB_ID:-} ]] || resume=(--resume auto)
    for arg in "$@"; do
        [[ $arg == --resume || $arg == --resume=* || $arg == --dry-run ]] && resume=()
    done
    _slurm_prepare_command "$@" || ready=0
    if [[ -n $_SLURM_SIGNALS ]]; then # starting the script now would only lose the time
        slurm_warn "WARNING: signalled (${_SLURM_SIGNALS# }) before $script started: not starting it"
        _slurm_finish "$script" "" "$restarts" ""
    fi
    ((ready)) || exit 1
    # run_management.announce_run_folder writes here; logs/ is seen by all nodes and the container.
    RUN_FOLDER_FILE=$(mktemp "$REPO_DIR/logs/.run_folder.XXXXXX" 2>/dev/null || mktemp)
    export RUN_FOLDER_FILE
    slurm_log "running: ${TRAIN_LAUNCHER[*]} ${TRAIN_COMMAND[*]} $script $* ${resume[*]}"
    # In the background, so that a signal reaches the trap at once; `wait` then returns early,
    # and waits again until the process is gone.
    "${TRAIN_LAUNCHER[@]}" "${TRAIN_COMMAND[@]}" "$script" "$@" "${resume[@]}" &
    _SLURM_CHILD=$!
    for arg in $_SLURM_SIGNALS; do # arrived while it was being started: pass them on now
        [[ $arg == INT ]] || kill -s "$arg" "$_SLURM_CHILD" 2>/dev/null || true
    done
    while :; do
        rc=0
        wait "$_SLURM_CHILD" || rc=$?
        kill -0 "$_SLURM_CHILD" 2>/dev/null || break
    done
    run_dir=$(<"$RUN_FOLDER_FILE")
    rm -f "$RUN_FOLDER_FILE"
    _slurm_finish "$script" "$rc" "$restarts" "$run_dir"
}

# _slurm_finish SCRIPT RC RESTARTS RUN_DIR: the end of a job, from the script's exit code RC
# (empty: not started): done, stopped (and requeued), or failed.
_slurm_finish() {
    local script=$1 rc=$2 restarts=$3 run_dir=$4 died="" stop=75
    [[ $_SLURM_SIGNALS != *INT* ]] || stop=130
    if [[ -z $rc ]]; then # signalled during the wrapper's start-up: the script never ran
        rc=$stop
    elif ((rc > 128)); then # ended by a forwarded signal itself: Python was still starting
        died=$(kill -l "$((rc - 128))" 2>/dev/null) || died=""
    fi
    if [[ -n $died && $_SLURM_SIGNALS == *"$died"* ]]; then
        slurm_log "$script was ended by SIG$died while starting, before it could checkpoint"
        rc=$stop
    fi
    if ((rc == 0)); then
        slurm_log "=== $script finished (exit 0) === results: ${run_dir:-(no run folder)}"
        exit 0
    elif ((rc != 75 && rc != 130)); then
        slurm_warn "ERROR: $script FAILED with exit code $rc${_SLURM_SIGNALS:+ (signals:$_SLURM_SIGNALS)};" \
            "not requeued; its error message is in the job's .err log."
        ((${#TRAIN_LAUNCHER[@]} == 0)) || slurm_warn "ERROR: a process failed or its node died," \
            "and srun ended the others: srun's 'error: <node>: task <n>' line in the .err log" \
            "says which"
        exit "$rc"
    fi
    # Requeue only after USR1 (time limit ahead, or `scancel --batch --signal=USR1`); SIGTERM
    # (scancel, the hard limit, preemption) and Ctrl-C end the job, its checkpoint kept.
    local name=${SLURM_JOB_ID:-} max=${MAX_REQUEUES:-3} hint="$CONTINUE_WITH${run_dir:-<its run folder>}"
    if [[ -z $name || $rc != 75 || $_SLURM_SIGNALS != *USR1* || $_SLURM_SIGNALS == *TERM* ]]; then
        slurm_warn "WARNING: $script stopped by${_SLURM_SIGNALS:- a signal} (exit $rc);" \
            "not requeued. Continue with: $hint"
    elif ((restarts >= max)); then
        slurm_warn "WARNING: $script stopped after SIGUSR1 (exit 75); not requeueing: this job" \
            "has already been requeued $restarts times (MAX_REQUEUES=$max). Continue it with a" \
            "new job: $hint"
    else
        [[ -z ${SLURM_ARRAY_TASK_ID:-} ]] || name+=" (array task ${SLURM_ARRAY_JOB_ID:-?}_$SLURM_ARRAY_TASK_ID)"
        slurm_log "$script stopped after SIGUSR1 (exit 75)"
        slurm_log "requeueing job $name (restart $((restarts + 1)) of at most $max);" \
            "it will continue ${run_dir:-the run} from its checkpoint with --resume auto"
        trap - USR1 TERM
        scontrol requeue "$SLURM_JOB_ID" && exit 0
        slurm_warn "ERROR: scontrol requeue $SLURM_JOB_ID failed; continue with $hint"
    fi
    slurm_log "=== $script stopped (exit $rc) === run: ${run_dir:-(no run folder)}"
    exit "$rc"
}
