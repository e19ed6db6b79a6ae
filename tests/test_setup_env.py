"""setup_env.sh: options, exported variables, idempotence, and --prefetch without internet.

--prefetch is exercised offline (a proxy on a closed port makes every download fail at once):
present and valid files are verified and kept, missing or corrupt ones give a clear message and
exit 1, never a stack trace. Its inline Python is also held to the project's ruff rules.
"""

from __future__ import annotations

import os
import re
import shutil
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
    """A stand-in venv whose python records its calls: enough to test install bookkeeping."""
    (folder / "bin").mkdir(parents=True)
    python = folder / "bin" / "python"
    python.write_text(f'#!/bin/sh\necho "$*" >> "{folder}/calls"\n')
    python.chmod(0o755)
    (folder / "bin" / "activate").write_text(f'export VIRTUAL_ENV="{folder}"\n')
    return folder


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


def test_failed_install_says_what_to_do(tmp_path):
    venv = fake_venv(tmp_path / "venv")
    (venv / "bin" / "python").write_text("#!/bin/sh\nexit 1\n")
    result = bash("./setup_env.sh", clean_env(VENV_DIR=venv))
    assert result.returncode == 1
    assert "pip could not install requirements.txt" in result.stderr
    assert "login node" in result.stderr


def mnist_source() -> Path | None:
    for candidate in (os.environ.get("MNIST_ROOT"), REPO.parent / "shared" / "data"):
        if candidate and (Path(candidate) / "MNIST" / "raw" / MNIST_FILES[0]).is_file():
            return Path(candidate) / "MNIST" / "raw"
    return None


def prefetch(data_dir: Path, torch_home: Path) -> subprocess.CompletedProcess:
    env = clean_env(DATA_DIR=data_dir, TORCH_HOME=torch_home, VENV_DIR=sys.prefix, **OFFLINE)
    return bash("./setup_env.sh --prefetch", env, timeout=600)


def test_prefetch_offline_keeps_valid_files_and_explains_the_rest(tmp_path):
    source = mnist_source()
    if source is None:
        pytest.skip("real MNIST not found (MNIST_ROOT or ../shared/data)")
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in MNIST_FILES:
        (raw / name).symlink_to(source / name)
    result = prefetch(tmp_path / "data", tmp_path / "torch")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "MNIST present and verified (SHA-256)" in result.stdout
    for what in ("EMNIST (536 MB): FAILED to download", "ResNet-18 weights: FAILED to download"):
        assert what in result.stderr
    assert "no internet access" in result.stderr and "login node" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_prefetch_replaces_corrupt_files_offline_with_a_clear_message(tmp_path):
    source = mnist_source()
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    if source is not None:
        for name in MNIST_FILES[1:]:
            (raw / name).symlink_to(source / name)
    (raw / MNIST_FILES[0]).write_bytes(b"\x00\x00\x08\x03truncated")
    emnist = tmp_path / "data" / "EMNIST" / "raw"
    emnist.mkdir(parents=True)
    (emnist / "emnist-byclass-train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03short")
    weights = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"not the published weights")
    result = prefetch(tmp_path / "data", tmp_path / "torch")
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert f"{raw / MNIST_FILES[0]} is incomplete or corrupt: removing it" in output
    assert f"{emnist / 'emnist-byclass-train-images-idx3-ubyte'} is incomplete" in output
    assert "does not match its published SHA-256 prefix f37072fd" in output
    for what in ("MNIST", "EMNIST (536 MB)", "ResNet-18 weights"):
        assert f"prefetch: {what}: FAILED to download" in result.stderr
    assert not weights.exists() and not (raw / MNIST_FILES[0]).exists()
    assert "Traceback" not in output


def prefetch_source() -> str:
    text = SETUP_ENV.read_text()
    match = re.search(r"<<'PREFETCH_PY'\n(.*?)\nPREFETCH_PY\n", text, re.S)
    assert match, "the inline prefetch Python was not found in setup_env.sh"
    return match.group(1) + "\n"


def test_prefetch_python_is_ruff_clean():
    source = prefetch_source()
    compile(source, "prefetch.py", "exec")
    ruff = shutil.which("ruff", path=str(Path(sys.prefix) / "bin")) or shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed")
    for command in (["check"], ["format", "--check"]):
        result = subprocess.run(
            [ruff, *command, "--stdin-filename", "setup_env_prefetch.py", "-"],
            input=source,
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, f"ruff {' '.join(command)}:\n{result.stdout}{result.stderr}"
