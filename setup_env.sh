#!/usr/bin/env bash
# Create (once) and activate the project's virtual environment, installing requirements.txt.
# Idempotent; works executed (`./setup_env.sh`) or sourced (`source setup_env.sh`, which also
# leaves the venv active in your shell).
_setup_env_main() {
    local repo venv
    repo="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
    venv="${VENV_DIR:-$repo/.venv}"
    if [ ! -x "$venv/bin/python" ]; then
        echo "setup_env: creating $venv"
        python3 -m venv "$venv" || return 1
    fi
    # Reinstall only when requirements.txt changed since the last successful install.
    if ! cmp -s "$repo/requirements.txt" "$venv/.requirements.installed"; then
        echo "setup_env: installing requirements.txt into $venv"
        "$venv/bin/python" -m pip install --quiet --upgrade pip || return 1
        "$venv/bin/python" -m pip install --quiet -r "$repo/requirements.txt" || return 1
        cp "$repo/requirements.txt" "$venv/.requirements.installed"
    fi
    # shellcheck disable=SC1091
    source "$venv/bin/activate"
    export MPLBACKEND=Agg PYTHONUNBUFFERED=1
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    set -euo pipefail
    _setup_env_main "$@"
else
    _setup_env_main "$@"
fi
