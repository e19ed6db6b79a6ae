"""bench/gpu_check.py, the check a lent GPU machine runs once: its dry run on the CPU keeps to
what such a machine sends back (at most 8 files, 16 MiB each, at most one folder down, plain
names) with every row of the table, and a step past its time-out is ended with its children
while the next step still runs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import gpu_check  # noqa: E402


def running(pid: int) -> bool:
    """Whether process pid still runs (a zombie, ended but not yet reaped, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def wait_until_ended(pids: list[int], seconds: float = 10) -> list[int]:
    """The pids still running after up to `seconds` (init reaps orphans in its own time)."""
    deadline = time.monotonic() + seconds
    while any(running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [pid for pid in pids if running(pid)]


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc to see the processes")
def test_a_step_past_its_time_out_is_ended_with_its_children_and_the_next_step_runs(
    tmp_path, monkeypatch
):
    pids = tmp_path / "pids"
    # A shell that starts a child and waits: both in the step's process group.
    stuck = gpu_check.Step("tests", ["sh", "-c", f"sleep 60 & echo $$ $! > {pids}; wait"], 1)
    after = gpu_check.Step("cnn_gpu", [sys.executable, "-c", "print('the next step ran')"], 2)
    monkeypatch.setattr(gpu_check, "plan_steps", lambda args, scratch, cuda: [stuck, after])
    monkeypatch.setattr(gpu_check, "STARTED", time.monotonic())
    out = tmp_path / "out"
    out.mkdir()
    # The stuck step gets a third of what is left after the kill grace: about 5.7 s.
    argv = ["--dry-run", "--out", str(out), "--budget-s", "22"]
    args = gpu_check.get_args_parser().parse_args(argv)
    code = gpu_check.run_check(args, out, tmp_path / "scratch", cuda=False)
    assert code == 1
    shell, child = (int(pid) for pid in pids.read_text().split())
    assert wait_until_ended([shell, child]) == []
    summary = (out / "summary.md").read_text()
    assert re.search(
        r"^\| tests \| timed out after \d+ s: its process group was ended", summary, re.M
    )
    assert "| cnn_gpu | ok |" in summary
    assert (out / "cnn_gpu.log").read_text() == "the next step ran\n"
    steps = json.loads((out / "metrics.json").read_text())["steps"]
    assert [row["step"] for row in steps] == ["tests", "cnn_gpu"]
    assert steps[0]["seconds"] < 60


def test_steps_runs_only_the_steps_named(tmp_path, monkeypatch):
    steps = [
        gpu_check.Step(name, [sys.executable, "-c", f"print('{name} ran')"], 1)
        for name in ("tests", "cnn_gpu", "cnn_host_cpu")
    ]
    monkeypatch.setattr(gpu_check, "plan_steps", lambda args, scratch, cuda: steps)
    monkeypatch.setattr(gpu_check, "STARTED", time.monotonic())
    out = tmp_path / "out"
    out.mkdir()
    argv = ["--dry-run", "--out", str(out), "--steps", "cnn_host_cpu", "tests"]
    args = gpu_check.get_args_parser().parse_args(argv)
    assert gpu_check.run_check(args, out, tmp_path / "scratch", cuda=False) == 0
    ran = [row["step"] for row in json.loads((out / "metrics.json").read_text())["steps"]]
    assert ran == ["tests", "cnn_host_cpu"]  # in the check's order
    assert sorted(path.name for path in out.glob("*.log")) == ["cnn_host_cpu.log", "tests.log"]


def test_figures_that_cannot_be_read_fail_their_step_and_the_check_goes_on(tmp_path, monkeypatch):
    scratch = tmp_path / "scratch"
    metrics = scratch / "runs" / "resnet_linear_probe" / "run" / "linear_probe" / "metrics.json"
    write = f"import pathlib; p = pathlib.Path({str(metrics)!r}); p.parent.mkdir(parents=True)"
    write += "; p.write_text('{not json')"
    steps = [gpu_check.Step("resnet_linear_probe", [sys.executable, "-c", write], 1)]
    steps.append(gpu_check.Step("cnn_gpu", [sys.executable, "-c", "print('next')"], 1))
    monkeypatch.setattr(gpu_check, "plan_steps", lambda args, scratch, cuda: steps)
    monkeypatch.setattr(gpu_check, "STARTED", time.monotonic())
    out = tmp_path / "out"
    out.mkdir()
    args = gpu_check.get_args_parser().parse_args(["--dry-run", "--out", str(out)])
    assert gpu_check.run_check(args, out, scratch, cuda=False) == 1
    summary = (out / "summary.md").read_text()
    assert "| resnet_linear_probe | ok; its figures could not be read (JSONDecodeError" in summary
    assert "| cnn_gpu | ok |" in summary


def test_each_cuda_test_result_is_read_from_the_log_a_time_out_cut_short():
    log = """collecting ... collected 5 items

tests/test_cuda.py::test_a PASSED                                  [ 20%]
tests/test_cuda.py::test_b[fast-columns] FAILED                    [ 40%]
tests/test_cuda.py::test_c SKIPPED (needs two GPUs)                [ 60%]
tests/test_cuda.py::test_d ERROR                                   [ 80%]
tests/test_cuda.py::test_e
FAILED tests/test_cuda.py::test_b[fast-columns] - AssertionError: 1 | 2
ERROR tests/test_cuda.py::test_d - RuntimeError: no device
"""
    results = {row["test"]: row for row in gpu_check.cuda_test_results(log)}
    assert {name: row["result"] for name, row in results.items()} == {
        "test_a": "passed",
        "test_b[fast-columns]": "failed",
        "test_c": "skipped",
        "test_d": "error",
        "test_e": "did not finish",
    }
    assert results["test_b[fast-columns]"]["reason"] == "AssertionError: 1 | 2"
    assert results["test_c"]["reason"] == "needs two GPUs"
    report = {"cuda_tests": list(results.values())}
    assert "| test_b[fast-columns] | failed (AssertionError: 1 / 2) |" in gpu_check.test_lines(
        report
    )


def test_out_must_be_new_or_empty(tmp_path, capsys):
    (tmp_path / "old.log").write_text("from an earlier check")
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: --out ") and len(error.splitlines()) == 1


def test_help_is_whole_and_shows_the_defaults():
    text = gpu_check.get_args_parser().format_help()
    assert gpu_check.__doc__.strip().splitlines()[-1] in text  # the description's last line
    words = " ".join(text.split())  # argparse wraps the options' help
    assert "(default: 420)" in words and "(default: results/gpu_check_<date>-<time>)" in words


def lent_machine_problems(out: Path) -> list[str]:
    """What a lent machine would not send back from `out`."""
    files = [path for path in out.rglob("*") if path.is_file()]
    problems = [f"{len(files)} files (at most 8)"] if len(files) > 8 else []
    for path in files:
        parts = path.relative_to(out).parts
        if len(parts) > 2:
            problems.append(f"{path} is more than one folder down")
        if not all(re.fullmatch(r"[A-Za-z0-9._-]+", part) for part in parts):
            problems.append(f"{path} has a character other than letters, digits, '.', '_', '-'")
        if path.stat().st_size > 16 * 2**20:
            problems.append(f"{path} is over 16 MiB")
    return problems


@pytest.mark.slow
def test_dry_run_keeps_to_what_a_lent_machine_sends_back_with_every_row(tmp_path):
    out = tmp_path / "out"
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    env = {**os.environ, "TMPDIR": str(temporary), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--dry-run", "--out", str(out)]
    command += ["--budget-s", "1200"]  # a busy machine may take minutes; a quiet one takes one
    result = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500
    )
    logs = "".join(f"{path.name}: {path.read_text()[-1500:]}" for path in out.glob("*.log"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:] + logs
    assert lent_machine_problems(out) == []
    assert list(temporary.iterdir()) == []  # the runs and the data went with the scratch folder
    steps = ["tests", "cnn_gpu", "cnn_host_cpu", "resnet_linear_probe", "resnet_partial_unfreeze"]
    if gpu_check.resnet18_has_compile():
        steps.append("resnet_partial_unfreeze_compile")
    names = {path.name for path in out.iterdir()}
    assert names == {"summary.md", "metrics.json", *(f"{step}.log" for step in steps)}
    summary = (out / "summary.md").read_text()
    assert summary in result.stdout  # the table is printed too
    for step in steps:
        assert f"| {step} | ok |" in summary
    # Every test of tests/test_cuda.py has its row (skipped here, without CUDA).
    tests = re.findall(r"^def (test_\w+)", (REPO / "tests" / "test_cuda.py").read_text(), re.M)
    for test in tests:
        assert re.search(rf"^\| {test}(\[[^]]+\])? \| skipped", summary, re.M), test
    rate = r"[\d,]+"
    for step in ("cnn_gpu", "cnn_host_cpu"):
        row = rf"^\| {step} \| [^|]+ \| {rate} \| {rate} \| {rate} \| [\d.]+x \| [\w-]+ \|$"
        assert re.search(row, summary, re.M), summary
    for step in steps[3:]:
        run = step.removeprefix("resnet_").replace("_compile", " --compile")
        row = (
            rf"^\| {run} \| 1 \| [\d.]+ \| [\d.]+ \| {rate} \| {rate} \| {rate} \| yes \| [^|]+ \|$"
        )
        assert re.search(row, summary, re.M), summary
    metrics = json.loads((out / "metrics.json").read_text())
    assert [row["step"] for row in metrics["steps"]] == steps
    assert set(metrics["cnn"]["cnn_host_cpu"]["images_per_s"]) == set(gpu_check.CNN_KINDS)
    assert metrics["resnet"]["resnet_linear_probe"]["frozen_output_cached"] == [True]
