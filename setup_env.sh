#!/usr/bin/env bash
# The project's one environment script, for a workstation, a cluster login node and the inside
# of the container on a compute node. Idempotent; works executed (`./setup_env.sh`) or sourced
# (`source setup_env.sh`, which also leaves the venv active and the variables set in your shell).
# `./setup_env.sh --help` explains the options and variables.

_setup_env_usage() {
    cat <<'EOF'
Usage: ./setup_env.sh [--prefetch] [--env-only]      (or: source setup_env.sh [...])

Creates the virtual environment once, installs requirements.txt whenever it changed, activates
the environment and exports the variables the scripts read. Running it again does only what is
missing. Sourced, it leaves the venv active and the variables set in your shell.

Options:
  --prefetch   also download MNIST, EMNIST and the ResNet-18 ImageNet weights into DATA_DIR and
               TORCH_HOME and verify them against their published checksums, so that compute
               nodes never need the network. Run it on a machine with internet (a login node);
               what is already present and valid is not downloaded again. Without internet, or
               with a folder it cannot write, it changes nothing and names each missing file
               with its download address.
  --env-only   only export the variables (no venv, no install); the SLURM wrappers use this on
               the host before entering the container.
  -h, --help   this text.

Variables (a value you set yourself is kept):
  DATA_DIR     data sets (MNIST/raw, EMNIST/raw)         default: <repo>/data
  RESULTS_DIR  run folders                               default: <repo>/results
  TORCH_HOME   PyTorch cache, holds the ResNet weights   default: ${XDG_CACHE_HOME:-~/.cache}/torch
               (torch's own default; on a cluster your home is shared storage, so the weights
               fetched on the login node are seen by every compute node)
  VENV_DIR     the virtual environment                   default: <repo>/.venv, or
               <repo>/.venv-container inside an Apptainer/Singularity container, created with
               --system-site-packages on top of the container's own Python so that it reuses the
               container's CUDA build of PyTorch instead of downloading another one
  TORCH_INDEX_URL  a PyTorch wheel index to install torch and torchvision from, e.g.
               https://download.pytorch.org/whl/cu126 for a driver that supports CUDA 12.6
               (nvidia-smi's "CUDA Version"). Unset: on a node with an NVIDIA driver, a torch
               built for a newer CUDA than the driver supports is replaced by the newest build
               the driver runs (from TORCH_CUDA_BUILDS, default "13.0 12.9 12.8 12.6 12.4 12.1
               11.8"); without a driver, requirements.txt's torch is installed as it comes. The
               container keeps its own CUDA 12.6 build.
  MPLBACKEND=Agg and PYTHONUNBUFFERED=1 are always exported.
EOF
}

# Exports DATA_DIR, RESULTS_DIR, TORCH_HOME (user values kept), MPLBACKEND and PYTHONUNBUFFERED.
_setup_env_exports() {
    local repo=$1
    export DATA_DIR="${DATA_DIR:-$repo/data}"
    export RESULTS_DIR="${RESULTS_DIR:-$repo/results}"
    export TORCH_HOME="${TORCH_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/torch}"
    export MPLBACKEND=Agg PYTHONUNBUFFERED=1
}

# The CUDA version the node's driver supports ("12.4", from nvidia-smi's banner); nothing on a
# machine without an NVIDIA driver.
_setup_env_driver_cuda() {
    command -v nvidia-smi >/dev/null || return 0
    nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p' | head -n 1
}

# True when version $1 <= version $2 (dotted numbers).
_setup_env_version_le() {
    printf '%s\n%s\n' "$1" "$2" | sort -V -C
}

# PyTorch's wheel index for a driver that supports CUDA $1: the newest CUDA build of PyTorch
# not newer than that (TORCH_CUDA_BUILDS, newest first); nothing when the driver is older than
# all of them.
_setup_env_torch_index() {
    local driver=$1 build
    for build in ${TORCH_CUDA_BUILDS:-13.0 12.9 12.8 12.6 12.4 12.1 11.8}; do
        if _setup_env_version_le "$build" "$driver"; then
            echo "https://download.pytorch.org/whl/cu${build//./}"
            return 0
        fi
    done
}

# The CUDA version the venv's torch was built for ("12.6"; "" for a CPU build or no torch),
# remembered in $venv/.torch-cuda so that only the first call imports torch.
_setup_env_torch_cuda() {
    local venv=$1 built
    if [[ ! -f $venv/.torch-cuda ]]; then
        built=$("$venv/bin/python" -c 'import torch; print(torch.version.cuda or "")' 2>/dev/null) ||
            return 0
        echo "$built" >"$venv/.torch-cuda"
    fi
    cat "$venv/.torch-cuda"
}

# A torch whose CUDA build suits this node. TORCH_INDEX_URL (a PyTorch wheel index such as
# https://download.pytorch.org/whl/cu126) chooses it by hand: installed once, remembered in
# $venv/.torch-index. Otherwise, on a node with an NVIDIA driver, a torch built for a newer CUDA
# than the driver supports (which could not use the GPU) is replaced by the newest build the
# driver runs. Without a driver (a login node, a laptop) nothing happens here: requirements.txt
# brings torch as before. Inside the container its own CUDA 12.6 build is used (not called).
_setup_env_torch() {
    local venv=$1 index=${TORCH_INDEX_URL:-} driver built=""
    driver=$(_setup_env_driver_cuda)
    if [[ -n $index ]]; then
        [[ ! -f $venv/.torch-index || $(<"$venv/.torch-index") != "$index" ]] || return 0
    else
        [[ -n $driver ]] || return 0
        built=$(_setup_env_torch_cuda "$venv")
        [[ -n $built ]] && _setup_env_version_le "$built" "$driver" && return 0
        index=$(_setup_env_torch_index "$driver")
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

# Creates the venv when missing and installs requirements.txt when it changed since the last
# successful install. Serialised with flock: several jobs may start at once on a shared repo.
_setup_env_venv() {
    local repo=$1 venv=$2 container=$3 base_python=python3 base_site="" lock_fd=""
    mkdir -p "$venv" || return 1
    if command -v flock >/dev/null; then
        exec {lock_fd}>"$venv/.setup.lock" && flock -w 900 "$lock_fd" ||
            echo "setup_env: warning: could not lock $venv; continuing" >&2
    fi
    local status=0
    if [[ ! -x $venv/bin/python ]]; then
        if [[ -n $container ]]; then
            # Inside the container: a venv on top of the container's Python environment (the
            # venv that container.def made, CONTAINER_VENV=/opt/venv). `python -m venv` always
            # links the *base* interpreter, whose "system site-packages" do not include that
            # venv, so a .pth file adds the container venv's site-packages explicitly. The new
            # venv gets no pip of its own: `python -m pip` then runs the container's pip and
            # installs into this venv only what the container lacks.
            base_python="${CONTAINER_VENV:-/opt/venv}/bin/python3"
            [[ -x $base_python ]] || base_python=python3
            echo "setup_env: creating $venv on top of $base_python (container $container)"
            base_site=$("$base_python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') &&
                "$base_python" -m venv --system-site-packages --without-pip "$venv" &&
                echo "$base_site" >"$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_container_venv.pth" ||
                status=1
        else
            echo "setup_env: creating $venv"
            if python3 -m venv "$venv"; then
                "$venv/bin/python" -m pip install --quiet --upgrade pip ||
                    echo "setup_env: warning: could not upgrade pip; continuing with the bundled one" >&2
            else
                status=1
            fi
        fi
        ((status == 0)) || echo "setup_env: error: could not create the virtual environment $venv" >&2
    fi
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
    if [[ -n $lock_fd ]]; then
        exec {lock_fd}>&-
    fi
    return "$status"
}

# Downloads and verifies the data sets and weights (see --help). Python (from the venv, for
# torchvision's published download URLs and MD5 sums) kept inline so that this stays one file.
_setup_env_prefetch() {
    local python=$1
    echo "setup_env: prefetch into DATA_DIR=$DATA_DIR and TORCH_HOME=$TORCH_HOME"
    "$python" - <<'PREFETCH_PY'
"""setup_env.sh --prefetch: fetch and verify MNIST, EMNIST and the ResNet-18 weights.

Nothing is written unless it can be downloaded: the source is asked first (a HEAD request) and
the target folder checked for write access, so that a machine without internet, or a read-only
shared data folder, is left exactly as it was, with the files and their addresses named.
"""

import hashlib
import os
import socket
import sys
import urllib.error
import urllib.request
from pathlib import Path

socket.setdefaulttimeout(60)  # an unreachable host fails within a minute instead of hanging

# SHA-256 of the four uncompressed MNIST files (torchvision checks the MD5 of the .gz files it
# downloads; these check what is on disk afterwards, and on every later run).
MNIST_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
# EMNIST ByClass sizes from the EMNIST paper (Cohen et al., 2017).
EMNIST_BYCLASS_COUNTS = {"train": 697_932, "test": 116_323}
RESNET18_FILE = "resnet18-f37072fd.pth"  # torch.hub names files <name>-<sha256 prefix>.pth
DOWNLOAD_ERRORS = (urllib.error.URLError, OSError, RuntimeError)


def file_digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def idx_count(path: Path, image: bool) -> int | None:
    """Item count of a complete IDX file (header and size consistent), else None."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            header = handle.read(16 if image else 8)
    except OSError:
        return None
    magic = 2051 if image else 2049
    if len(header) < (16 if image else 8) or int.from_bytes(header[:4], "big") != magic:
        return None
    count = int.from_bytes(header[4:8], "big")
    if image:
        rows, cols = int.from_bytes(header[8:12], "big"), int.from_bytes(header[12:16], "big")
        return count if size == 16 + count * rows * cols else None
    return count if size == 8 + count else None


def one_line(error: Exception) -> str:
    return " ".join(str(getattr(error, "reason", error)).split())


def unreachable(urls: list[str]) -> str | None:
    """None when one of the URLs answers (any HTTP status: the network is there), else why
    none did."""
    reason = "no address to try"
    for url in urls:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="HEAD")):
                return None
        except urllib.error.HTTPError:
            return None
        except (urllib.error.URLError, OSError) as error:
            reason = f"{url}: {one_line(error)}"
    return reason


def unwritable(folder: Path) -> str | None:
    """None when `folder` is, or can be made, a writable folder; else why not (creates
    nothing)."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.is_dir() and os.access(existing, os.W_OK | os.X_OK):
        return None
    return f"{existing} is not a writable folder"


def missing_folders(folder: Path) -> list[Path]:
    """`folder` and its parents that do not exist yet, deepest first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def remove_empty(folders: list[Path]) -> None:
    """Undo the folders a failed download made (deepest first; only while empty)."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def remove_invalid(paths: list[Path]) -> None:
    """torchvision trusts any file that exists, so an invalid one must go before a download."""
    for path in paths:
        if path.exists():
            print(f"  {path} is incomplete or corrupt: removing it to download it again")
            path.unlink()


def report_failure(what: str, reason: str, files: list[tuple[str, str]], invalid) -> None:
    """Why `what` could not be fetched, and each file to fetch by hand: (address, where)."""
    lines = [f"prefetch: {what}: FAILED to download: {reason}"]
    for path in invalid:
        if path.exists():
            lines.append(f"  {path} is incomplete or corrupt: replace it")
    if "writable" in reason:
        lines.append(
            "  Nothing was written. Set DATA_DIR/TORCH_HOME to a folder you can write, or have\n"
            "  the folder's owner run `./setup_env.sh --prefetch` or put these files there:"
        )
    else:
        lines.append(
            "  This machine seems to have no internet access; nothing was written. Run\n"
            "  `./setup_env.sh --prefetch` where there is (the cluster's login node) with the\n"
            "  same DATA_DIR/TORCH_HOME on shared storage, or fetch these files there and put\n"
            "  them here:"
        )
    lines += [f"    {url}\n      -> {where}" for url, where in files]
    print("\n".join(lines), file=sys.stderr)


def download(what: str, folder: Path, probes: list[str], files: list, invalid, fetch) -> bool:
    """fetch() once `folder` is writable and one of the `probes` addresses answers; otherwise,
    and when fetch() fails, the folders it made are removed again and the files are named."""
    reason = unwritable(folder) or unreachable(probes)
    if reason is None:
        made = missing_folders(folder)
        try:
            remove_invalid(invalid)
            fetch()
            return True
        except DOWNLOAD_ERRORS as error:
            remove_empty(made)
            reason = one_line(error)
    report_failure(what, reason, files, invalid)
    return False


def mnist(data_dir: Path) -> bool:
    from torchvision.datasets import MNIST

    raw = data_dir / "MNIST" / "raw"

    def invalid() -> list[Path]:
        return [
            raw / name
            for name, digest in MNIST_SHA256.items()
            if not (raw / name).is_file() or file_digest(raw / name, "sha256") != digest
        ]

    if not invalid():
        print(f"prefetch: MNIST present and verified (SHA-256) in {raw}")
        return True
    files = [(f"{MNIST.mirrors[0]}{name}.gz", f"{raw / name} (gunzipped)") for name in MNIST_SHA256]
    probes = [f"{mirror}{MNIST.resources[0][0]}" for mirror in MNIST.mirrors]

    def fetch() -> None:
        for train in (True, False):
            MNIST(root=str(data_dir), train=train, download=True)

    if not download("MNIST", raw, probes, files, invalid(), fetch):
        return False
    if invalid():
        names = ", ".join(path.name for path in invalid())
        print(f"prefetch: MNIST: {names} do not match the published data", file=sys.stderr)
        return False
    print(f"prefetch: MNIST downloaded and verified (MD5 of the archives, SHA-256) in {raw}")
    return True


def emnist(data_dir: Path) -> bool:
    from torchvision.datasets import EMNIST

    raw = data_dir / "EMNIST" / "raw"
    kinds = {True: "images-idx3", False: "labels-idx1"}
    files = {
        (split, image): raw / f"emnist-byclass-{split}-{kind}-ubyte"
        for split in EMNIST_BYCLASS_COUNTS
        for image, kind in kinds.items()
    }
    archive = raw / "gzip.zip"

    def invalid() -> list[Path]:
        return [
            path
            for (split, image), path in files.items()
            if idx_count(path, image) != EMNIST_BYCLASS_COUNTS[split]
        ]

    stale = invalid()
    if not stale:
        if not archive.is_file():
            print(
                f"prefetch: EMNIST ByClass present in {raw} (IDX headers, sizes and image counts "
                "match; the archive was not kept, so its MD5 cannot be rechecked)"
            )
            return True
        if file_digest(archive, "md5") == EMNIST.md5:
            print(f"prefetch: EMNIST ByClass present and verified (archive MD5, counts) in {raw}")
            return True
        print(f"prefetch: EMNIST: {archive} does not match the published MD5")
        stale = [archive, *files.values()]  # the files extracted from it go too
    inside = "gzip/emnist-byclass-{train,test}-{images-idx3,labels-idx1}-ubyte.gz"
    wanted = [(EMNIST.url, f"{raw}/: unzip it, and gunzip its {inside} there")]

    def fetch() -> None:
        EMNIST(root=str(data_dir), split="byclass", train=True, download=True)

    if not download("EMNIST (536 MB)", raw, [EMNIST.url], wanted, stale, fetch):
        return False
    if invalid():
        names = ", ".join(path.name for path in invalid())
        print(f"prefetch: EMNIST: {names} are incomplete after the download", file=sys.stderr)
        return False
    print(f"prefetch: EMNIST downloaded and verified (archive MD5, counts) in {raw}")
    return True


def resnet18_weights(torch_home: Path) -> bool:
    import torch.hub
    from torchvision.models import ResNet18_Weights

    url = ResNet18_Weights.IMAGENET1K_V1.url
    path = torch_home / "hub" / "checkpoints" / RESNET18_FILE
    prefix = RESNET18_FILE.rsplit("-", 1)[1].split(".")[0]
    if path.is_file():
        if file_digest(path, "sha256").startswith(prefix):
            print(f"prefetch: ResNet-18 ImageNet weights present and verified (SHA-256) at {path}")
            return True
        print(f"  {path} does not match its published SHA-256 prefix {prefix}")

    def fetch() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(path), hash_prefix=prefix, progress=False)

    if not download("ResNet-18 weights", path.parent, [url], [(url, str(path))], [path], fetch):
        return False
    print(f"prefetch: ResNet-18 weights downloaded and verified (SHA-256) at {path}")
    return True


def main() -> int:
    data_dir, torch_home = Path(os.environ["DATA_DIR"]), Path(os.environ["TORCH_HOME"])
    results = [mnist(data_dir), emnist(data_dir), resnet18_weights(torch_home)]
    if all(results):
        print("prefetch: everything present and verified")
        return 0
    print("prefetch: incomplete (see the messages above)", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
PREFETCH_PY
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
        _setup_env_prefetch "$venv/bin/python" || return 1
    fi
    return 0
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    set -euo pipefail
    _setup_env_main "$@"
else
    _setup_env_main "$@"
fi
