#!/usr/bin/env bash
# The project's one environment script, for a workstation, a cluster login node and the inside
# of the container on a compute node. Idempotent; works executed (`./setup_env.sh`) or sourced
# (`source setup_env.sh`, which also leaves the venv active and the variables set in your shell).

_setup_env_usage() {
    cat <<'EOF'
Usage: ./setup_env.sh [--prefetch] [--env-only]      (or: source setup_env.sh [...])

Creates the virtual environment once, installs requirements.txt whenever it changed, activates
the environment and exports the variables the scripts read. Running it again does only what is
missing. Sourced, it leaves the venv active and the variables set in your shell.

Options:
  --prefetch   also download and verify what the scripts need, so that compute nodes never need
               the network: `python cnn_from_scratch.py --prefetch` (MNIST into DATA_DIR) and
               `python resnet18.py --prefetch` (EMNIST ByClass into DATA_DIR, the ResNet-18
               ImageNet weights into TORCH_HOME). Run it where there is internet (a login node).
               Offline it changes nothing and names each missing file with its address.
  --env-only   only export the variables (no venv, no install); the SLURM wrappers use this on
               the host before entering the container.
  -h, --help   this text.

Variables (a value you set yourself is kept):
  DATA_DIR     data sets (MNIST/raw, EMNIST/raw)         default: <repo>/data
  RESULTS_DIR  run folders                               default: <repo>/results
  TORCH_HOME   PyTorch cache, holds the ResNet weights   default: ${XDG_CACHE_HOME:-~/.cache}/torch
  VENV_DIR     the virtual environment                   default: <repo>/.venv, or
               <repo>/.venv-container inside an Apptainer/Singularity container, created with
               --system-site-packages on top of the container's Python (it reuses its PyTorch)
  TORCH_INDEX_URL  a PyTorch wheel index for torch and torchvision, e.g.
               https://download.pytorch.org/whl/cu126 for a driver that runs CUDA 12.6. Unset:
               on a node with an NVIDIA driver, a torch built for a newer CUDA than the driver
               supports is replaced by the newest build it runs (from TORCH_CUDA_BUILDS, default
               "13.0 12.9 12.8 12.6 12.4 12.1 11.8"); without a driver, requirements.txt's torch.
  MPLBACKEND=Agg and PYTHONUNBUFFERED=1 are always exported.
EOF
}

_setup_env_exports() {
    local repo=$1
    export DATA_DIR="${DATA_DIR:-$repo/data}"
    export RESULTS_DIR="${RESULTS_DIR:-$repo/results}"
    export TORCH_HOME="${TORCH_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/torch}"
    export MPLBACKEND=Agg PYTHONUNBUFFERED=1
}

# True when dotted version $1 <= $2.
_setup_env_version_le() {
    printf '%s\n%s\n' "$1" "$2" | sort -V -C
}

# A torch whose CUDA build suits this node (see --help, TORCH_INDEX_URL). The chosen index is
# remembered in $venv/.torch-index, the venv's torch CUDA version in $venv/.torch-cuda (so that
# only the first call imports torch). Not called inside the container (its own CUDA 12.6 build).
_setup_env_torch() {
    local venv=$1 index=${TORCH_INDEX_URL:-} driver="" built="" build
    if command -v nvidia-smi >/dev/null; then
        driver=$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9]*\.[0-9]*\).*/\1/p' | head -n 1)
    fi
    if [[ -n $index ]]; then
        [[ ! -f $venv/.torch-index || $(<"$venv/.torch-index") != "$index" ]] || return 0
    else
        [[ -n $driver ]] || return 0
        if [[ ! -f $venv/.torch-cuda ]]; then
            "$venv/bin/python" -c 'import torch; print(torch.version.cuda or "")' >"$venv/.torch-cuda" 2>/dev/null ||
                rm -f "$venv/.torch-cuda"
        fi
        [[ -f $venv/.torch-cuda ]] && built=$(<"$venv/.torch-cuda")
        [[ -n $built ]] && _setup_env_version_le "$built" "$driver" && return 0
        for build in ${TORCH_CUDA_BUILDS:-13.0 12.9 12.8 12.6 12.4 12.1 11.8}; do
            if _setup_env_version_le "$build" "$driver"; then
                index="https://download.pytorch.org/whl/cu${build//./}"
                break
            fi
        done
        if [[ -z $index ]]; then
            echo "setup_env: warning: this node's NVIDIA driver supports CUDA $driver, older than" \
                "any PyTorch build; torch will run on the CPU (update the driver, or use the container)" >&2
            return 0
        fi
    fi
    echo "setup_env: installing torch and torchvision from $index" \
        "(driver: CUDA ${driver:-none found}; torch in $venv: CUDA ${built:-none})"
    if ! "$venv/bin/python" -m pip install --quiet torch torchvision --index-url "$index"; then
        echo "setup_env: error: pip could not install torch from $index. Without internet (a" \
            "compute node), run this once where there is internet, on the same shared file" \
            "system: TORCH_INDEX_URL=$index ./setup_env.sh" >&2
        return 1
    fi
    echo "$index" >"$venv/.torch-index"
    rm -f "$venv/.torch-cuda"
}

# Inside the container: a venv on top of the image's venv (CONTAINER_VENV=/opt/venv). `python -m
# venv` links the *base* interpreter, whose system site-packages do not include that venv, so a
# .pth file adds them; without a pip of its own, `python -m pip` runs the image's pip.
_setup_env_container_venv() {
    local venv=$1 base=${CONTAINER_VENV:-/opt/venv}/bin/python3 site
    [[ -x $base ]] || base=python3
    echo "setup_env: creating $venv on top of $base (container)"
    "$base" -m venv --system-site-packages --without-pip "$venv" || return 1
    site=$("$base" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') || return 1
    echo "$site" >"$(echo "$venv"/lib/python3*/site-packages)/_container_venv.pth"
}

# Creates the venv when missing and installs requirements.txt when it changed since the last
# successful install. Serialised with flock: several jobs may start at once on a shared repo.
_setup_env_venv() {
    local repo=$1 venv=$2 container=$3 lock_fd="" status=0
    mkdir -p "$venv" || return 1
    if command -v flock >/dev/null; then
        exec {lock_fd}>"$venv/.setup.lock" && flock -w 900 "$lock_fd" ||
            echo "setup_env: warning: could not lock $venv; continuing" >&2
    fi
    if [[ ! -x $venv/bin/python && -n $container ]]; then
        _setup_env_container_venv "$venv" || status=1
    elif [[ ! -x $venv/bin/python ]]; then
        echo "setup_env: creating $venv"
        python3 -m venv "$venv" || status=1
        if ((status == 0)) && ! "$venv/bin/python" -m pip install --quiet --upgrade pip; then
            echo "setup_env: warning: could not upgrade pip; continuing with the bundled one" >&2
        fi
    fi
    ((status == 0)) || echo "setup_env: error: could not create the virtual environment $venv" >&2
    if ((status == 0)) && [[ -z $container ]]; then
        _setup_env_torch "$venv" || status=1
    fi
    if ((status == 0)) && ! cmp -s "$repo/requirements.txt" "$venv/.requirements.installed"; then
        echo "setup_env: installing requirements.txt into $venv"
        if "$venv/bin/python" -m pip install --quiet -r "$repo/requirements.txt"; then
            cp "$repo/requirements.txt" "$venv/.requirements.installed"
            rm -f "$venv/.torch-cuda"
        else
            status=1
            echo "setup_env: error: pip could not install requirements.txt into $venv. Without" \
                "internet (a compute node), run ./setup_env.sh once where there is internet (the" \
                "login node; inside the container: apptainer exec container.sif ./setup_env.sh)," \
                "on the same shared file system." >&2
        fi
    fi
    [[ -z $lock_fd ]] || exec {lock_fd}>&-
    return "$status"
}

# Each script downloads and verifies its own data (and the ResNet its weights): the same code
# and the same one-line errors as a run. Both are asked, so that one report names everything.
_setup_env_prefetch() {
    local repo=$1 python=$2 script status=0
    echo "setup_env: prefetch into DATA_DIR=$DATA_DIR and TORCH_HOME=$TORCH_HOME"
    for script in cnn_from_scratch.py resnet18.py; do
        "$python" "$repo/$script" --prefetch --data-dir "$DATA_DIR" || status=1
    done
    ((status == 0)) || echo "setup_env: error: prefetch incomplete (see the error lines above)" >&2
    return "$status"
}

_setup_env_main() {
    local repo venv container arg prefetch=0 env_only=0
    repo="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
    for arg in "$@"; do
        case $arg in
        -h | --help)
            _setup_env_usage
            return 0
            ;;
        --prefetch) prefetch=1 ;;
        --env-only) env_only=1 ;;
        --) ;;
        *)
            echo "setup_env: unknown option '$arg' (see ./setup_env.sh --help)" >&2
            return 2
            ;;
        esac
    done
    _setup_env_exports "$repo"
    # SLURM only writes its log when the folder already exists at submission.
    mkdir -p "$repo/logs" 2>/dev/null || true
    ((env_only)) && return 0

    container="${APPTAINER_CONTAINER:-${SINGULARITY_CONTAINER:-}}"
    if [[ -n $container ]]; then
        venv="${VENV_DIR:-$repo/.venv-container}"
    else
        venv="${VENV_DIR:-$repo/.venv}"
    fi
    _setup_env_venv "$repo" "$venv" "$container" || return 1
    # shellcheck disable=SC1091
    source "$venv/bin/activate" || return 1
    if ((prefetch)); then
        _setup_env_prefetch "$repo" "$venv/bin/python" || return 1
    fi
    return 0
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    set -euo pipefail
fi
_setup_env_main "$@"
