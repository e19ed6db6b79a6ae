"""setup_env.sh: options, exported variables, idempotence, the CUDA build of torch it picks for
a node, and --prefetch.

The install bookkeeping, the torch choice and the --prefetch wiring run against a stand-in
nvidia-smi and a stand-in venv whose python records its calls (seconds). One slow test runs the
real --prefetch of both scripts offline: it changes nothing and names each missing file with
its address (each script's own --prefetch is tested with the script).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SETUP_ENV = REPO / "setup_env.sh"
OFFLINE = {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}
MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def clean_env(**variables) -> dict:
    env = dict(os.environ)
    for name in ("DATA_DIR", "RESULTS_DIR", "TORCH_HOME", "VIRTUAL_ENV", "VENV_DIR"):
        env.pop(name, None)
    for name in ("APPTAINER_CONTAINER", "SINGULARITY_CONTAINER", "no_proxy", "NO_PROXY"):
        env.pop(name, None)
    env.update({k: str(v) for k, v in variables.items()})
    return env


def bash(script: str, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_help_and_unknown_option():
    result = bash("./setup_env.sh --help", clean_env())
    assert result.returncode == 0
    for word in ("--prefetch", "DATA_DIR", "RESULTS_DIR", "TORCH_HOME", "--system-site-packages"):
        assert word in result.stdout
    result = bash("./setup_env.sh --bogus", clean_env())
    assert result.returncode == 2 and "unknown option '--bogus'" in result.stderr


def test_exports_defaults_and_keeps_user_values(tmp_path):
    show = "source ./setup_env.sh --env-only && "
    show += 'echo "$DATA_DIR|$RESULTS_DIR|$TORCH_HOME|$MPLBACKEND|$PYTHONUNBUFFERED"'
    result = bash(show, clean_env(HOME=tmp_path, XDG_CACHE_HOME=tmp_path / "cache"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{REPO}/data|{REPO}/results|{tmp_path}/cache/torch|Agg|1"
    mine = clean_env(DATA_DIR="/d", RESULTS_DIR="/r", TORCH_HOME="/t")
    assert bash(show, mine).stdout.strip() == "/d|/r|/t|Agg|1"


def fake_venv(folder: Path) -> Path:
    """A stand-in venv whose python records its calls (enough to test install bookkeeping) and
    answers `-c ...` (the torch CUDA query) with the contents of torch_cuda."""
    (folder / "bin").mkdir(parents=True)
    python = folder / "bin" / "python"
    python.write_text(
        f'#!/bin/sh\necho "$*" >> "{folder}/calls"\n'
        f'if [ "$1" = -c ]; then cat "{folder}/torch_cuda" 2>/dev/null; fi\n'
    )
    python.chmod(0o755)
    (folder / "bin" / "activate").write_text(f'export VIRTUAL_ENV="{folder}"\n')
    return folder


def fake_nvidia_smi(folder: Path, cuda: str) -> str:
    """A folder holding an nvidia-smi that prints the banner line of a driver for `cuda`; a
    PATH with it first."""
    folder.mkdir(parents=True, exist_ok=True)
    smi = folder / "nvidia-smi"
    banner = f"| NVIDIA-SMI 550.54.15    Driver Version: 550.54.15    CUDA Version: {cuda}     |"
    smi.write_text(f"#!/bin/sh\necho '{banner}'\n")
    smi.chmod(0o755)
    return f"{folder}:{os.environ['PATH']}"


def torch_installs(venv: Path) -> list[str]:
    calls = (venv / "calls").read_text().splitlines() if (venv / "calls").exists() else []
    return [call for call in calls if call.startswith("-m pip install --quiet torch torchvision")]


def test_installs_only_when_requirements_change(tmp_path):
    venv = fake_venv(tmp_path / "venv")
    env = clean_env(VENV_DIR=venv)
    first = bash('source ./setup_env.sh && echo "venv=$VIRTUAL_ENV"', env)
    assert first.returncode == 0, first.stderr
    assert f"venv={venv}" in first.stdout
    assert (venv / "calls").read_text().count("-m pip install --quiet -r") == 1
    second = bash("./setup_env.sh", env)
    assert second.returncode == 0 and second.stdout == ""  # nothing to do the second time
    assert (venv / "calls").read_text().count("-m pip install --quiet -r") == 1
    (venv / ".requirements.installed").write_text("torch>=2.4\n")  # requirements.txt changed
    assert "installing requirements.txt" in bash("./setup_env.sh", env).stdout
    assert (venv / "calls").read_text().count("-m pip install --quiet -r") == 2
    assert not torch_installs(venv)  # no NVIDIA driver here: requirements.txt's torch as it is


@pytest.mark.parametrize(
    ("driver", "index"),
    [("12.4", "cu124"), ("12.5", "cu124"), ("12.8", "cu128"), ("13.1", "cu130"), ("11.8", "cu118")],
)
def test_gpu_node_gets_the_newest_torch_build_its_driver_runs(tmp_path, driver, index):
    venv = fake_venv(tmp_path / "venv")
    (venv / "torch_cuda").write_text("13.0\n")  # e.g. PyPI's build, installed on a login node
    env = clean_env(VENV_DIR=venv, PATH=fake_nvidia_smi(tmp_path / "bin", driver))
    result = bash("./setup_env.sh", env)
    assert result.returncode == 0, result.stderr
    if driver == "13.1":  # 13.0 runs on it: nothing to replace
        assert not torch_installs(venv)
        return
    url = f"https://download.pytorch.org/whl/{index}"
    assert torch_installs(venv) == [f"-m pip install --quiet torch torchvision --index-url {url}"]
    assert f"installing torch and torchvision from {url} (driver: CUDA {driver};" in result.stdout
    (venv / "torch_cuda").write_text(f"{driver}\n")  # what that install brought
    assert bash("./setup_env.sh", env).returncode == 0
    assert len(torch_installs(venv)) == 1  # done once


def test_gpu_node_keeps_a_torch_its_driver_runs_and_warns_on_a_driver_too_old(tmp_path):
    venv = fake_venv(tmp_path / "venv")
    (venv / "torch_cuda").write_text("12.1\n")
    env = clean_env(VENV_DIR=venv, PATH=fake_nvidia_smi(tmp_path / "bin", "12.4"))
    assert bash("./setup_env.sh", env).returncode == 0
    assert not torch_installs(venv)
    (venv / ".torch-cuda").unlink(missing_ok=True)  # the remembered answer: ask again
    (venv / "torch_cuda").write_text("12.6\n")
    env = clean_env(VENV_DIR=venv, PATH=fake_nvidia_smi(tmp_path / "old", "11.4"))
    result = bash("./setup_env.sh", env)
    assert result.returncode == 0 and not torch_installs(venv)
    assert "supports CUDA 11.4, older than any PyTorch build" in result.stderr


def test_torch_index_url_chooses_the_build_once(tmp_path):
    venv = fake_venv(tmp_path / "venv")
    url = "https://download.pytorch.org/whl/cu126"
    env = clean_env(VENV_DIR=venv, TORCH_INDEX_URL=url)  # e.g. on a login node, for the GPUs
    assert bash("./setup_env.sh", env).returncode == 0
    assert bash("./setup_env.sh", env).returncode == 0
    assert torch_installs(venv) == [f"-m pip install --quiet torch torchvision --index-url {url}"]
    assert (venv / ".torch-index").read_text().strip() == url


def test_failed_torch_install_says_where_to_run_it(tmp_path):
    venv = fake_venv(tmp_path / "venv")
    (venv / "bin" / "python").write_text('#!/bin/sh\n[ "$1" = -c ] && exit 0\nexit 1\n')
    env = clean_env(VENV_DIR=venv, PATH=fake_nvidia_smi(tmp_path / "bin", "12.6"))
    result = bash("./setup_env.sh", env)
    assert result.returncode == 1
    url = "https://download.pytorch.org/whl/cu126"
    assert f"could not install torch from {url}" in result.stderr
    assert f"TORCH_INDEX_URL={url} ./setup_env.sh" in result.stderr


def test_failed_install_says_what_to_do(tmp_path):
    venv = fake_venv(tmp_path / "venv")
    (venv / "bin" / "python").write_text("#!/bin/sh\nexit 1\n")
    result = bash("./setup_env.sh", clean_env(VENV_DIR=venv))
    assert result.returncode == 1
    assert "pip could not install requirements.txt" in result.stderr
    assert "login node" in result.stderr


def test_prefetch_asks_both_scripts_and_reports_a_failure(tmp_path):
    """--prefetch is the scripts' own: `python <script> --prefetch --data-dir $DATA_DIR` for
    each, both asked even when the first fails, and setup_env fails when either did."""
    venv = fake_venv(tmp_path / "venv")
    env = clean_env(VENV_DIR=venv, DATA_DIR=tmp_path / "data", TORCH_HOME=tmp_path / "torch")
    assert bash("./setup_env.sh", env).returncode == 0  # the install, done once
    ok = bash("./setup_env.sh --prefetch", env)
    assert ok.returncode == 0, ok.stderr
    assert (
        f"prefetch into DATA_DIR={tmp_path / 'data'} and TORCH_HOME={tmp_path / 'torch'}"
        in ok.stdout
    )
    calls = (venv / "calls").read_text().splitlines()
    for script in ("cnn_from_scratch.py", "resnet18.py"):
        assert f"{REPO / script} --prefetch --data-dir {tmp_path / 'data'}" in calls
    (venv / "bin" / "python").write_text('#!/bin/sh\necho "$*" >> "$0.calls"\nexit 2\n')
    failed = bash("./setup_env.sh --prefetch", env)
    assert failed.returncode == 1
    assert "prefetch incomplete" in failed.stderr
    assert len((venv / "bin" / "python.calls").read_text().splitlines()) == 2  # both asked


def tree(folder: Path) -> dict:
    """Every path under `folder` with its size (None for folders): what "unchanged" compares."""
    if not folder.exists():
        return {}
    return {
        str(path.relative_to(folder)): None if path.is_dir() else path.lstat().st_size
        for path in sorted(folder.rglob("*"))
    }


@pytest.mark.slow
def test_prefetch_offline_creates_nothing_and_names_every_file_and_address(tmp_path):
    """Without internet (a proxy on a closed port makes every download fail at once): exit 1,
    nothing on disk changes, and each missing file is named with its address, never a stack
    trace."""
    data_dir = tmp_path / "shared" / "data"
    data_dir.mkdir(parents=True)
    env = clean_env(DATA_DIR=data_dir, TORCH_HOME=tmp_path / "torch", VENV_DIR=sys.prefix)
    result = bash("./setup_env.sh --prefetch", {**env, **OFFLINE}, timeout=600)
    assert result.returncode == 1, result.stdout + result.stderr
    assert tree(tmp_path) == {"shared": None, "shared/data": None}
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2, result.stderr  # one line per script
    for name in MNIST_FILES:
        assert name in errors[0] and f"{name}.gz" in errors[0]
    assert "https://biometrics.nist.gov/cs_links/EMNIST/gzip.zip" in errors[1]
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in errors[1]
    assert "Traceback" not in result.stdout + result.stderr
