# shellcheck shell=bash
# The body shared by run_cnn.sbatch and run_resnet.sbatch, sourced by both (not run on its own).
# One helper instead of two copies: the requeue/signal logic is the delicate part, and two
# copies of it would drift apart. Each .sbatch file keeps its own #SBATCH header and calls
#     slurm_run_training <run prefix> <script.py> "$@"
# docs/slurm.md describes the whole path (container, prefetch, submit, logs, requeue, arrays,
# several nodes).
#
# What a job does: cd to the repository, `git pull --ff-only` (first start only), log the commit
# and an environment summary, then run the script -- inside the container, or on the host's
# .venv with CONTAINER=none -- in the background, so that the USR1 which SLURM sends ahead of
# the time limit (`--signal=B:USR1@<lead>`) reaches the trap at once. The trap forwards it to
# Python, which checkpoints and exits 75; the job then requeues itself and the restarted job
# (same job id, SLURM_RESTART_COUNT + 1) continues from that checkpoint with `--resume auto`,
# which the script resolves to this job's (or array task's) newest unfinished run. Outside
# SLURM (`bash run_cnn.sbatch ...`) there is no job to resume: the script runs as given.
#
# Knobs (environment variables; sbatch passes your environment to the job):
#   CONTAINER     image to run in (default <repo>/container.sif); `none` runs on the host's .venv
#   GIT_PULL      0 skips the `git pull --ff-only` at the start (default 1)
#   MAX_REQUEUES  how many times a job may requeue itself (default 3); beyond it, it stops
#   REPO_DIR      the repository (default: the submission directory, SLURM_SUBMIT_DIR)
#   DATA_DIR, RESULTS_DIR, TORCH_HOME   see ./setup_env.sh --help; bound into the container
#
# Launch hooks (arrays a .sbatch file may set before slurm_run_training; for several GPUs or
# nodes): TRAIN_LAUNCHER runs in front of everything on the host (e.g. srun ...; default none),
# TRAIN_PYTHON replaces `python` in the environment the script runs in (e.g. torchrun ...).

readonly RESUMABLE_EXIT_CODE=75 # the scripts' "stopped by a signal after a checkpoint" code

slurm_log() { printf '[%s] %s\n' "$(date '+%Y-%m-%d %H:%M:%S')" "$*"; }
# Warnings and errors go to both logs: the .err file, and the .out file where the story is told.
slurm_warn() {
    slurm_log "WARNING: $*"
    slurm_log "WARNING: $*" >&2
}
slurm_error() {
    slurm_log "ERROR: $*"
    slurm_log "ERROR: $*" >&2
}

# git pull --ff-only unless GIT_PULL=0 or this is a restart (a resumed run keeps its code);
# a failed pull warns and goes on with the checked-out code. Then logs the commit that runs.
_slurm_update_code() {
    local restarts=$1 commit dirty=""
    if ! git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
        slurm_warn "$PWD is not a git checkout: no pull, no commit to log"
        return 0
    fi
    if [[ ${GIT_PULL:-1} == 0 ]]; then
        slurm_log "git pull skipped (GIT_PULL=0)"
    elif ((restarts > 0)); then
        slurm_log "git pull skipped: restart $restarts resumes with the code of the first start"
    elif ! GIT_TERMINAL_PROMPT=0 timeout 120 git pull --ff-only --quiet </dev/null; then
        slurm_warn "git pull --ff-only failed (no network on this node, or local changes);" \
            "running the checked-out code"
    fi
    commit=$(git rev-parse HEAD 2>/dev/null || echo unknown)
    [[ -z $(git status --porcelain --untracked-files=no 2>/dev/null) ]] || dirty=" (+ uncommitted changes)"
    slurm_log "code: commit $commit$dirty ($(git log -1 --format='%cd, %s' --date=short 2>/dev/null || true))"
}

# This job's tag in run-folder names, as the scripts make it: "<array job>_<task>" in an array
# task, else the job id; empty outside SLURM.
slurm_job_tag() {
    if [[ -n ${SLURM_ARRAY_TASK_ID:-} && -n ${SLURM_ARRAY_JOB_ID:-} ]]; then
        echo "${SLURM_ARRAY_JOB_ID}_$SLURM_ARRAY_TASK_ID"
    else
        echo "${SLURM_JOB_ID:-}"
    fi
}

# The #SBATCH --output/--error patterns end in %A_%a so that array tasks log to
# <name>_<array job>_<task>.out; SLURM writes a job that is not an array as
# <name>_<job id>_4294967294.out (4294967294: its "no array index"). Link the plain
# <name>_<job id>.out to that file, so that either name works.
_slurm_link_logs() {
    [[ -n ${SLURM_JOB_ID:-} && -z ${SLURM_ARRAY_TASK_ID:-} ]] || return 0
    local fd path
    for fd in 1 2; do
        path=$(readlink "/proc/$$/fd/$fd" 2>/dev/null) || continue
        [[ -f $path && $path == *_4294967294.* ]] || continue
        ln -sfn "$(basename "$path")" "${path/_4294967294./.}" 2>/dev/null || true
    done
}

_slurm_summary() {
    local restarts=$1 array=""
    [[ -z ${SLURM_ARRAY_TASK_ID:-} ]] ||
        array=", array task ${SLURM_ARRAY_JOB_ID:-?}_$SLURM_ARRAY_TASK_ID (seed = --seed + $SLURM_ARRAY_TASK_ID)"
    slurm_log "job ${SLURM_JOB_ID:-none}$array (${SLURM_JOB_NAME:-no name}) on $(hostname)," \
        "restart $restarts of at most ${MAX_REQUEUES:-3}, partition ${SLURM_JOB_PARTITION:-none}," \
        "${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-?}} CPUs, GPUs: ${CUDA_VISIBLE_DEVICES:-none}"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader 2>&1 |
            while read -r line; do slurm_log "gpu: $line"; done || true
    else
        slurm_log "gpu: nvidia-smi not found on this node"
    fi
    [[ -z $_SLURM_LAUNCH_NOTE ]] || slurm_log "$_SLURM_LAUNCH_NOTE"
}

# Sets the array TRAIN_COMMAND: how to start TRAIN_PYTHON here (in the container, or on the
# host's .venv), without the script and its arguments. The container gets the repository,
# DATA_DIR, RESULTS_DIR, TORCH_HOME and any --data-dir/--output-dir argument bound.
_slurm_prepare_command() {
    local image=${CONTAINER:-$REPO_DIR/container.sif} runtime="" path arg previous=""
    if [[ $image == none ]]; then
        slurm_log "environment: host (CONTAINER=none), $REPO_DIR/setup_env.sh"
        _slurm_source_setup_env || return 1
        TRAIN_COMMAND=("${TRAIN_PYTHON[@]}")
        slurm_log "python: $(command -v python), $(python --version 2>&1)"
        return 0
    fi
    if [[ ! -f $image ]]; then
        slurm_error "container image $image not found: build it (README, 'Running on a SLURM" \
            "cluster'), point CONTAINER=/path/to/image.sif at it, or run on the host's .venv" \
            "with CONTAINER=none"
        return 1
    fi
    if command -v apptainer >/dev/null; then
        runtime=apptainer
    elif command -v singularity >/dev/null; then
        runtime=singularity
    else
        slurm_error "neither apptainer nor singularity is on PATH (try 'module load apptainer')," \
            "or run on the host's .venv with CONTAINER=none"
        return 1
    fi
    _slurm_source_setup_env --env-only || return 1
    local binds=("$REPO_DIR")
    for path in "$DATA_DIR" "$RESULTS_DIR" "$TORCH_HOME"; do
        binds+=("$path")
    done
    for arg in "$@"; do
        case $previous in --data-dir | --output-dir) binds+=("$arg") ;; esac
        case $arg in --data-dir=* | --output-dir=*) binds+=("${arg#*=}") ;; esac
        previous=$arg
    done
    local spec="" real
    for path in "${binds[@]}"; do
        mkdir -p "$path" 2>/dev/null || true
        real=$(cd "$path" 2>/dev/null && pwd -P) || continue
        [[ ,$spec, == *,$real,* ]] || spec+="${spec:+,}$real"
    done
    slurm_log "environment: $runtime $(${runtime} --version 2>/dev/null | head -n 1), image $image, binds $spec"
    # Inside: setup_env.sh makes (once) .venv-container on top of the image's PyTorch and
    # activates it; exec hands the process over to Python, so forwarded signals reach it.
    # (`--` keeps setup_env.sh from seeing the script's arguments as its own.)
    # shellcheck disable=SC2016 # $1 and $@ are expanded by the inner bash, on purpose
    TRAIN_COMMAND=("$runtime" exec --nv --bind "$spec" --pwd "$REPO_DIR" "$image"
        bash -c 'repo=$1; shift; source "$repo/setup_env.sh" -- || exit 1; exec "$@"'
        bash "$REPO_DIR" "${TRAIN_PYTHON[@]}")
}

# A function of its own so that the sourced script sees only the arguments given here, not the
# job's (sourcing without arguments would hand it the caller's "$@").
_slurm_source_setup_env() {
    # shellcheck source=setup_env.sh
    source "$REPO_DIR/setup_env.sh" "$@" || {
        slurm_error "$REPO_DIR/setup_env.sh failed (see above)"
        return 1
    }
}

_SLURM_CHILD=""
_SLURM_SIGNALS=""  # signals received, e.g. " USR1"
_SLURM_PENDING=0   # a signal arrived while `wait` was waiting
_SLURM_SIGNAL_TIME=""       # when the first signal arrived (seconds since the epoch)
_SLURM_LAUNCH_MODE=single   # single, srun or torchrun (slurm_ddp_launch)
_SLURM_LAUNCH_NOTE=""       # slurm_ddp_launch's line for the log (after the start banner)

_slurm_on_signal() {
    local signal=$1
    _SLURM_SIGNALS+=" $signal"
    _SLURM_PENDING=1
    _SLURM_SIGNAL_TIME=${_SLURM_SIGNAL_TIME:-$(date +%s)}
    if [[ -n $_SLURM_CHILD ]]; then
        slurm_log "received SIG$signal: forwarding it to the training process (PID $_SLURM_CHILD)"
        kill -s "$signal" "$_SLURM_CHILD" 2>/dev/null || true
    else
        slurm_log "received SIG$signal before training started"
    fi
}

# slurm_ddp_launch: for a job that asks for several processes, sets the launch hooks
# (TRAIN_LAUNCHER, TRAIN_PYTHON) to start them; one process otherwise, exactly as before.
# run_resnet.sbatch calls it (its script is DistributedDataParallel-aware; run_cnn.sbatch's is
# not). Two forms, chosen from the allocation:
#   more tasks than nodes (sbatch --ntasks-per-node=G --gpus-per-node=G [--nodes=M]): srun
#       starts one process per task; MASTER_ADDR/MASTER_PORT (exported) = the first node and
#       DIST_PORT, and the script reads SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID
#   one task per node and several GPUs or nodes (sbatch --nodes=M --gpus-per-node=G): srun
#       starts one task per node, each `python -m torch.distributed.run` (torchrun) with G
#       processes and a c10d rendezvous at <first node>:DIST_PORT (the first node's name as
#       `scontrol show hostnames` gives it, which must resolve on every node, as SLURM's node
#       names do when they are the hosts' names)
# Failures: srun --kill-on-bad-exit=1 ends the whole step as soon as one task (a process, or a
# node's torchrun) exits with an error or is killed, so a node that dies ends the job within
# KillWait seconds, with srun's "error: <node>: task <n>: ..." line in the .err log, instead of
# leaving the other nodes waiting at their next collective until --dist-timeout; torchrun's
# --max-restarts=0 ends a torchrun whose worker failed instead of restarting the group, and a
# torchrun that is killed takes its workers with it (--pdeathsig).
# Knobs: NPROC_PER_NODE (torchrun's processes per node instead of the GPUs per node, e.g. on
# CPU nodes), DIST_PORT (default 20000 + job id % 20000).
slurm_ddp_launch() {
    [[ -n ${SLURM_JOB_ID:-} ]] || return 0
    local nodes=${SLURM_NNODES:-1} tasks gpus per_node first port
    tasks=${SLURM_NTASKS:-$nodes}
    gpus=${SLURM_GPUS_PER_NODE:-0}
    gpus=${gpus##*:} # "4", "a100:4" or "gpu:a100:4"
    [[ $gpus =~ ^[0-9]+$ ]] || gpus=0
    per_node=${NPROC_PER_NODE:-$gpus}
    if ((tasks > nodes)); then
        _SLURM_LAUNCH_MODE=srun
    elif ((nodes > 1 || per_node > 1)); then
        _SLURM_LAUNCH_MODE=torchrun
        ((per_node >= 1)) || per_node=1
    else
        return 0
    fi
    first=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-$(hostname)}" | head -n 1)
    port=${DIST_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
    if [[ $_SLURM_LAUNCH_MODE == srun ]]; then
        export MASTER_ADDR=$first MASTER_PORT=$port
        TRAIN_LAUNCHER=(srun --kill-on-bad-exit=1 --ntasks="$tasks")
        _SLURM_LAUNCH_NOTE="distributed: srun starts $tasks processes (one per task) on $nodes"
        _SLURM_LAUNCH_NOTE+=" node(s); rank 0 at $first:$port"
    else
        # srun hands the forwarded USR1 to torchrun, which passes it on to its workers and
        # waits for their checkpoint (--signals-to-handle, --shutdown-timeout, read from PET_*
        # variables; a torchrun without these options ignores them, USR1 ends it, and the
        # requeued job resumes from the last epoch's checkpoint).
        export PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 PET_SHUTDOWN_TIMEOUT=120
        TRAIN_LAUNCHER=(srun --kill-on-bad-exit=1 --ntasks="$nodes" --ntasks-per-node=1)
        # Each worker dies with its torchrun (setpriv --pdeathsig, util-linux): without it the
        # workers of a killed torchrun train on, holding srun's step open until they end.
        local worker=(python)
        command -v setpriv >/dev/null && worker=(setpriv --pdeathsig KILL -- python)
        TRAIN_PYTHON=(python -m torch.distributed.run --nnodes="$nodes"
            --nproc-per-node="$per_node" --rdzv-backend=c10d --rdzv-endpoint="$first:$port"
            --rdzv-id="$SLURM_JOB_ID" --max-restarts=0 --no-python "${worker[@]}")
        _SLURM_LAUNCH_NOTE="distributed: srun starts torchrun on each of $nodes node(s), $per_node"
        _SLURM_LAUNCH_NOTE+=" processes each ($((nodes * per_node)) in all); rendezvous at $first:$port"
    fi
}

# slurm_run_dir PREFIX STARTED [ARGS...]: the run folder this job's script used, or nothing.
# An explicit `--resume DIR` names it (DIR, or the run folder above a file in it). Otherwise it
# is the newest <output dir>/<PREFIX>_<stamp>... folder of this job: inside SLURM, the one whose
# name ends in this job's tag ("_<tag>" or "_<tag>-<n>", as the scripts name them); outside
# SLURM, one whose stamp is not older than STARTED (YYYYmmdd-HHMMSS, when the script started).
# The output dir is the last --output-dir in ARGS, else RESULTS_DIR, else ./results.
slurm_run_dir() {
    local prefix=$1 started=$2 previous="" arg resume="" output=${RESULTS_DIR:-results} tag
    shift 2
    for arg in "$@"; do
        case $previous in --output-dir) output=$arg ;; --resume) resume=$arg ;; esac
        case $arg in --output-dir=*) output=${arg#*=} ;; --resume=*) resume=${arg#*=} ;; esac
        previous=$arg
    done
    if [[ -n $resume && $resume != auto ]]; then
        [[ -d $resume ]] || resume=$(dirname "$resume")
        while [[ ! -f $resume/config.json && $resume != / && $resume != . ]]; do
            resume=$(dirname "$resume")
        done
        [[ -f $resume/config.json ]] && echo "$resume"
        return 0
    fi
    tag=$(slurm_job_tag)
    local folder name newest="" pattern="^${prefix}_([0-9]{8}-[0-9]{6})"
    if [[ -n $tag ]]; then
        pattern+="_${tag}(-[0-9]+)?\$"
    else
        pattern+="(-[0-9]+)?\$"
    fi
    for folder in "$output/${prefix}"_*; do
        name=${folder##*/}
        [[ -d $folder && $name =~ $pattern ]] || continue
        [[ -n $tag || ! ${BASH_REMATCH[1]} < $started ]] || continue
        newest=$folder # the glob sorts by name, and so by stamp
    done
    [[ -z $newest ]] || echo "$newest"
}

# torchrun exits 1 whatever its workers' codes (75 included), and srun then ends the other
# nodes' torchrun (143): after a signal, a torchrun job stopped resumably when a checkpoint of
# its run was written after the signal arrived.
_slurm_torchrun_checkpointed() {
    local run_dir=$1
    [[ $_SLURM_LAUNCH_MODE == torchrun && -n $_SLURM_SIGNAL_TIME && -d $run_dir ]] || return 1
    [[ -n $(find "$run_dir" \( -name last.pt -o -name checkpoint_last.pt \) \
        -newermt "@$_SLURM_SIGNAL_TIME" -print -quit 2>/dev/null) ]]
}

# How to continue a stopped run by hand: its folder, or (none found) how to find it.
_slurm_continue_hint() {
    local run_dir=$1
    if [[ -z ${SLURM_JOB_ID:-} ]]; then
        echo "bash $JOB_SCRIPT_NAME --resume ${run_dir:-<its run folder>} (with the same options)"
    else
        echo "sbatch $JOB_SCRIPT_NAME --resume ${run_dir:-<its run folder>}"
    fi
}

# Requeue this job when allowed (at most MAX_REQUEUES times); returns 1 when it was not.
_slurm_requeue() {
    local restarts=$1 run_dir=$2 max=${MAX_REQUEUES:-3} name
    if [[ -z ${SLURM_JOB_ID:-} ]]; then
        slurm_log "not under SLURM, so no requeue: continue with $(_slurm_continue_hint "$run_dir")"
        return 1
    fi
    if ((restarts >= max)); then
        slurm_warn "not requeueing: this job has already been requeued $restarts times" \
            "(MAX_REQUEUES=$max). Continue it with a new job: $(_slurm_continue_hint "$run_dir")"
        return 1
    fi
    name=$SLURM_JOB_ID
    [[ -z ${SLURM_ARRAY_TASK_ID:-} ]] || name+=" (array task $(slurm_job_tag))"
    slurm_log "requeueing job $name (restart $((restarts + 1)) of at most $max);" \
        "it will continue ${run_dir:-the run} from its checkpoint with --resume auto"
    trap - USR1 TERM
    if ! scontrol requeue "$SLURM_JOB_ID"; then
        slurm_error "scontrol requeue $SLURM_JOB_ID failed; continue with a new job:" \
            "$(_slurm_continue_hint "$run_dir")"
        return 1
    fi
    return 0
}

# slurm_run_training PREFIX SCRIPT [ARGS...]: the whole job. PREFIX names the script's run
# folders (<output dir>/<PREFIX>_<stamp>_<job tag>). Exits with the script's code (0 done; a
# requeued job ends with 0 here and carries on in its next start).
slurm_run_training() {
    local prefix=$1 script=$2
    shift 2
    local restarts=${SLURM_RESTART_COUNT:-0}
    JOB_SCRIPT_NAME=${JOB_SCRIPT_NAME:-run_${prefix}.sbatch}
    slurm_log "=== $JOB_SCRIPT_NAME: start $((restarts + 1)) (SLURM_RESTART_COUNT=$restarts) ==="
    if [[ ! -f $REPO_DIR/$script ]]; then
        slurm_error "$REPO_DIR has no $script: submit from the repository root, or set REPO_DIR"
        exit 1
    fi
    cd "$REPO_DIR" || exit 1
    _slurm_link_logs
    _slurm_update_code "$restarts"
    _slurm_summary "$restarts"

    # Inside SLURM, --resume auto continues this job's (array task's) newest unfinished run
    # (none yet: a new run). An explicit --resume from the user is kept as is: its run folder is
    # the one being continued. Outside SLURM the script runs exactly as given.
    local args=("$@") arg resume=()
    [[ -z ${SLURM_JOB_ID:-} ]] || resume=(--resume auto)
    for arg in "${args[@]}"; do
        [[ $arg == --resume || $arg == --resume=* ]] && resume=()
    done

    trap '_slurm_on_signal USR1' USR1
    trap '_slurm_on_signal TERM' TERM
    TRAIN_COMMAND=()
    [[ -v TRAIN_LAUNCHER[@] ]] || TRAIN_LAUNCHER=()
    [[ -v TRAIN_PYTHON[@] ]] || TRAIN_PYTHON=(python)
    _slurm_prepare_command "${args[@]}" || exit 1
    TRAIN_COMMAND=("${TRAIN_LAUNCHER[@]}" "${TRAIN_COMMAND[@]}")
    local started run_dir
    started=$(date +%Y%m%d-%H%M%S)
    if [[ -n $_SLURM_SIGNALS ]]; then
        # Signalled during the set-up: starting the script now would only lose the time.
        slurm_warn "signalled (${_SLURM_SIGNALS# }) before $script started: not starting it"
        run_dir=$(slurm_run_dir "$prefix" "$started" "${args[@]}")
        if [[ $_SLURM_SIGNALS != *TERM* ]] && _slurm_requeue "$restarts" "$run_dir"; then
            exit 0
        fi
        exit "$RESUMABLE_EXIT_CODE"
    fi
    slurm_log "running: ${TRAIN_COMMAND[*]} $script ${args[*]} ${resume[*]}"
    "${TRAIN_COMMAND[@]}" "$script" "${args[@]}" "${resume[@]}" &
    _SLURM_CHILD=$!
    # `wait` returns early (status > 128) when a trapped signal arrives; the trap has forwarded
    # it, so wait again until the process has really exited.
    local rc
    while :; do
        _SLURM_PENDING=0
        rc=0
        wait "$_SLURM_CHILD" || rc=$?
        ((rc > 128 && _SLURM_PENDING)) || break
    done
    _SLURM_CHILD=""
    _slurm_finish "$script" "$rc" "$restarts" \
        "$(slurm_run_dir "$prefix" "$started" "${args[@]}" "${resume[@]}")"
}

# The end of a job, from the script's exit code RC: done, requeued, or failed (and why).
_slurm_finish() {
    local script=$1 rc=$2 restarts=$3 run_dir=$4
    if ((rc != 0 && rc != RESUMABLE_EXIT_CODE)) && _slurm_torchrun_checkpointed "$run_dir"; then
        slurm_log "torchrun exited $rc after the signal and a checkpoint was written since:" \
            "its workers stopped resumably (torchrun reports a worker's 75 as 1, and srun then" \
            "ends the other nodes' torchrun)"
        rc=$RESUMABLE_EXIT_CODE
    fi
    if ((rc == 0)); then
        slurm_log "=== $script finished (exit 0) === results: ${run_dir:-(no run folder found)}"
        exit 0
    fi
    # Resumable: exit 75 after a checkpoint, or (USR1 before Python had set its handlers up)
    # killed by the forwarded signal itself. Requeue only when the stop came from USR1 (time
    # limit ahead, or `scancel --batch --signal=USR1`); SIGTERM means scancel, the hard time
    # limit or preemption, and the job must end (its checkpoint is kept).
    if [[ $_SLURM_SIGNALS == *USR1* && $_SLURM_SIGNALS != *TERM* ]] &&
        ((rc == RESUMABLE_EXIT_CODE || rc == 128 + 10)); then
        if ((rc == RESUMABLE_EXIT_CODE)); then
            slurm_log "$script stopped after SIGUSR1 (exit $rc): checkpoint written"
        else
            slurm_log "$script was ended by SIGUSR1 outside its training loop (while starting" \
                "or finishing), so without a new checkpoint; the restart continues from the" \
                "last checkpoint, if any"
        fi
        if _slurm_requeue "$restarts" "$run_dir"; then
            exit 0
        fi
        slurm_log "=== $script stopped (exit $RESUMABLE_EXIT_CODE) === run: ${run_dir:-(none found)}"
        exit "$RESUMABLE_EXIT_CODE"
    fi
    if ((rc == RESUMABLE_EXIT_CODE)); then
        slurm_warn "$script stopped by${_SLURM_SIGNALS:- a signal} (exit 75) after writing a" \
            "checkpoint; not requeued. Continue with: $(_slurm_continue_hint "$run_dir")"
        slurm_log "=== $script stopped (exit $rc) === run: ${run_dir:-(none found)}"
        exit "$rc"
    fi
    slurm_error "$script FAILED with exit code $rc${_SLURM_SIGNALS:+ (signals:$_SLURM_SIGNALS)};" \
        "not requeued; its error message is in the job's .err log."
    if [[ $_SLURM_LAUNCH_MODE != single ]]; then
        slurm_error "one of the job's $_SLURM_LAUNCH_MODE-launched processes failed, or its node" \
            "died, and srun ended the others: srun's 'error: <node>: task <n>' line in the" \
            ".err log names the first; checkpoints written before are kept (--resume auto)"
    fi
    exit "$rc"
}
