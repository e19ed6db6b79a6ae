"""The code style gates of the project run inside the test suite, so CI and the README's one
test command enforce them: ruff lint and ruff format over every Python file."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def ruff() -> list[str]:
    executable = shutil.which("ruff", path=str(Path(sys.executable).parent))
    if executable is None:
        pytest.fail("ruff is not installed in this environment: run ./setup_env.sh")
    return [executable]


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff(command):
    result = subprocess.run(
        [*ruff(), *command, "."], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
