"""The run-management section both scripts share (issue 11): that it is the same code in both,
and what it promises: run folders that never clash, `--resume` that never reopens a finished
run or another script's, explicit options, one-line errors, atomic writes that fail cleanly,
signals held from the first instant, CSV numbers without float noise, help without repeats."""

from __future__ import annotations

import argparse
import ast
import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from datasets import write_emnist, write_standin_weights

import cnn_from_scratch
import resnet18

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = {"cnn": cnn_from_scratch, "resnet": resnet18}
SLURM_VARIABLES = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID")
BLOCK_BANNER = "# Runs: exit codes, errors, signals, atomic outputs, run folders, resume and seed"


@pytest.fixture(params=sorted(SCRIPTS))
def script(request, monkeypatch):
    for name in SLURM_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return SCRIPTS[request.param]


def top_level_definitions(path: Path) -> dict[str, str]:
    source = path.read_text()
    tree = ast.parse(source)
    kinds = (ast.FunctionDef, ast.ClassDef)
    return {
        node.name: ast.get_source_segment(source, node)
        for node in tree.body
        if isinstance(node, kinds)
    }


def shared_section(path: Path) -> str:
    """The lines from the shared section's banner to the next section's banner."""
    lines = path.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(BLOCK_BANNER)) - 1
    end = next(i for i in range(start + 5, len(lines)) if lines[i].startswith("# ----"))
    return "\n".join(lines[start:end])


def test_helpers_of_the_same_name_are_the_same_code_in_both_scripts():
    cnn = top_level_definitions(REPO / "cnn_from_scratch.py")
    resnet = top_level_definitions(REPO / "resnet18.py")
    common = sorted(set(cnn) & set(resnet) - {"get_args_parser", "run"})
    assert len(common) >= 30, common  # the shared section, and more
    drifted = [name for name in common if cnn[name] != resnet[name]]
    assert not drifted, f"same name, different code: {drifted} (rename one, or make them equal)"
    assert shared_section(REPO / "cnn_from_scratch.py") == shared_section(REPO / "resnet18.py")


def test_runs_started_in_the_same_second_get_their_own_folders(script, tmp_path, monkeypatch):
    monkeypatch.setattr(script.time, "strftime", lambda pattern: "20260101-120000")
    with ThreadPoolExecutor(8) as pool:
        folders = list(pool.map(lambda _: script.make_run_dir(tmp_path, "x"), range(16)))
    assert len(set(folders)) == 16 and all(folder.is_dir() for folder in folders)
    assert tmp_path / "x_20260101-120000" in folders


def make_run(script, output_dir: Path, state: str, stamp: str, tag: str | None = None) -> Path:
    name = f"{script.RUN_PREFIX}_{stamp}" + (f"_{tag}" if tag else "")
    run_dir = output_dir / name
    run_dir.mkdir(parents=True)
    record = {"script": script.SCRIPTS[script.RUN_PREFIX], "args": {}}
    (run_dir / "config.json").write_text(json.dumps(record))
    progress = run_dir / script.PROGRESS_FILES[0].replace("*", "linear_probe")
    if state in ("resumable", "finished"):
        progress.parent.mkdir(exist_ok=True)
        progress.write_bytes(b"checkpoint")
    if state == "finished":
        (run_dir / "metrics.json").write_text("{}")
    return run_dir


def test_resume_auto_takes_the_newest_unfinished_run_and_never_a_finished_one(script, tmp_path):
    older = make_run(script, tmp_path, "resumable", "20260101-100000")
    newest = make_run(script, tmp_path, "resumable", "20260101-110000")
    make_run(script, tmp_path, "finished", "20260101-120000")
    make_run(script, tmp_path, "unstarted", "20260101-130000")  # failed before a checkpoint
    assert script.find_resume_run("auto", tmp_path) == newest
    (newest / "metrics.json").write_text("{}")
    assert script.find_resume_run("auto", tmp_path) == older
    (older / "metrics.json").write_text("{}")
    assert script.find_resume_run("auto", tmp_path) is None
    assert script.find_resume_run(None, tmp_path) is None


def test_resume_auto_inside_slurm_sees_only_this_job_or_array_task(script, tmp_path, monkeypatch):
    mine = make_run(script, tmp_path, "resumable", "20260101-100000", "12")
    make_run(script, tmp_path, "resumable", "20260101-110000", "123")  # "12" is its prefix
    task = make_run(script, tmp_path, "resumable", "20260101-120000", "40_2")
    make_run(script, tmp_path, "resumable", "20260101-130000", "40_3")
    monkeypatch.setenv("SLURM_JOB_ID", "12")
    assert script.find_resume_run("auto", tmp_path) == mine
    monkeypatch.setenv("SLURM_JOB_ID", "99")
    assert script.find_resume_run("auto", tmp_path) is None
    monkeypatch.setenv("SLURM_JOB_ID", "42")  # array task 2 of array job 40 has its own job id
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "40")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    assert script.find_resume_run("auto", tmp_path) == task
    assert script.make_run_dir(tmp_path, script.RUN_PREFIX).name.endswith("_40_2")


def test_resume_of_a_path_refuses_what_this_script_cannot_continue(script, tmp_path):
    other = next(module for module in SCRIPTS.values() if module is not script)
    cases = {
        make_run(script, tmp_path, "finished", "20260101-100000"): "is finished",
        make_run(script, tmp_path, "unstarted", "20260101-110000"): "before its first checkpoint",
        make_run(other, tmp_path, "resumable", "20260101-120000"): "not made by",
        tmp_path / "missing": "no run folder",
    }
    for path, message in cases.items():
        with pytest.raises(script.UserError, match=message):
            script.find_resume_run(str(path), tmp_path)
    resumable = make_run(script, tmp_path, "resumable", "20260101-130000")
    inside = next(resumable.rglob("*.pt"))
    assert script.find_resume_run(str(inside), tmp_path) == resumable


def test_an_option_given_equal_to_its_default_is_still_explicit(script):
    parser = script.get_args_parser()
    default = parser.get_default("batch_size")
    explicit = script.explicit_options(parser, ["--batch-size", str(default)])
    assert "batch_size" in explicit and "epochs" not in explicit
    args = parser.parse_args(["--batch-size", str(default)])
    with pytest.raises(script.UserError, match="--batch-size .* contradicts"):
        script.merge_resumed_args(args, {"batch_size": default + 1}, explicit)
    args = parser.parse_args([])
    script.merge_resumed_args(args, {"batch_size": default + 1}, set())
    assert args.batch_size == default + 1  # not given: the run's own value is kept


def test_help_shows_each_default_once(script):
    text = script.get_args_parser().format_help()
    assert "(default: None)" not in text
    options = re.split(r"\n  (?=-)", text.split("options:", 1)[1])
    repeated = [o.split()[0] for o in options if o.lower().count("default") > 1]
    assert not repeated, repeated
    assert "(default: " in text


@pytest.mark.parametrize("name", sorted(SCRIPTS))
@pytest.mark.parametrize(
    "argv", [["--seed", str(2**64)], ["--seed", "-1"], ["--epochs", "0"], ["--lr", "nan"]]
)
def test_bad_numbers_are_one_error_line_and_exit_2(name, argv):
    script = SCRIPTS[name]
    result = subprocess.run(
        [sys.executable, script.__file__, *argv], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: argument " + argv[0]), lines


def test_a_failed_write_is_one_error_naming_the_file_and_the_resume(script, tmp_path, monkeypatch):
    run_dir = make_run(script, tmp_path, "resumable", "20260101-100000")
    target = run_dir / "history.csv"

    def disk_full(descriptor):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(script.os, "fsync", disk_full)
    with pytest.raises(script.OutputError) as raised:
        script.write_csv(target, [{"epoch": 1}])
    message = str(raised.value)
    assert str(target) in message and "No space left on device" in message
    assert f"--resume {run_dir}" in message and "\n" not in message
    assert not target.exists() and not list(run_dir.glob(".*.tmp"))
    unstarted = make_run(script, tmp_path, "unstarted", "20260101-110000")
    with pytest.raises(script.OutputError, match="Nothing to resume|nothing to resume"):
        script.write_csv(unstarted / "history.csv", [{"epoch": 1}])


def test_the_next_run_in_a_folder_removes_what_a_killed_write_left(script, tmp_path):
    (tmp_path / "linear_probe").mkdir()
    stale = [tmp_path / ".checkpoint_last.pt.abc123.tmp", tmp_path / "linear_probe/.last.pt.x.tmp"]
    for path in stale:
        path.write_bytes(b"half")
    (tmp_path / "keep.tmp").write_bytes(b"not ours")
    assert script.remove_stale_temp_files(tmp_path) == 2
    assert not any(path.exists() for path in stale) and (tmp_path / "keep.tmp").exists()


def test_csv_numbers_have_no_float_noise(script, tmp_path):
    script.write_csv(tmp_path / "h.csv", [{"epoch": 1, "lr": 0.1 * 3 / 3 - 1e-17, "loss": 1e33}])
    assert (tmp_path / "h.csv").read_text().splitlines() == ["epoch,lr,loss", "1,0.1,1e+33"]


def test_stop_signal_first_one_counts_a_second_ctrl_c_aborts(script):
    before = {number: signal.getsignal(number) for number in script.STOP_SIGNALS}
    with script.StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGUSR1)  # a second stop signal changes nothing
        assert stop.received == "SIGTERM" and stop.exit_code == script.RESUMABLE_EXIT_CODE
    with pytest.raises(KeyboardInterrupt), script.StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.received == "SIGINT" and stop.exit_code == script.INTERRUPTED_EXIT_CODE
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)  # the handler raises here
    os.kill(os.getpid(), signal.SIGINT)  # after a stop, late signals are ignored (not 75 -> 143)
    time.sleep(0.1)
    for number, handler in before.items():
        signal.signal(number, handler)
    with script.StopSignal() as stop:  # no signal: the handlers before it come back
        pass
    assert all(signal.getsignal(number) is handler for number, handler in before.items())


def test_array_tasks_train_their_own_seed(script, monkeypatch):
    args = argparse.Namespace(seed=7)
    assert script.apply_array_seed(args) == 0 and args.seed == 7
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert script.apply_array_seed(args) == 3 and args.seed == 10


def blocked_signals(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigBlk:"):
            return int(line.split()[1], 16)
    return 0


@pytest.fixture(scope="module")
def tiny_inputs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("inputs")
    write_emnist(root / "data")
    write_standin_weights(root / "torch")
    mnist = REPO.parent / "shared" / "data"
    return {"emnist": root / "data", "torch_home": root / "torch", "mnist": mnist}


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc")
@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_a_signal_during_the_imports_stops_the_run_resumably(name, tiny_inputs, tmp_path):
    """SIGTERM sent while the script is still importing torch (once it holds the stop signals,
    which is its first act): the run starts, takes a step, checkpoints and exits 75; more
    SIGTERMs once it has said `stopped:` (while it shuts down) keep the 75."""
    script = SCRIPTS[name]
    if name == "cnn":
        if not (tiny_inputs["mnist"] / "MNIST" / "raw").is_dir():
            pytest.skip("needs MNIST in ../shared/data")
        argv = ["--data-dir", str(tiny_inputs["mnist"]), "--epochs", "1"]
    else:
        argv = ["--data-dir", str(tiny_inputs["emnist"]), "--regime", "partial_unfreeze"]
        argv += ["--img-size", "32", "--batch-size", "32", "--epochs", "1", "--no-download"]
    environment = {k: v for k, v in os.environ.items() if k not in SLURM_VARIABLES}
    environment["TORCH_HOME"] = str(tiny_inputs["torch_home"])
    command = [
        sys.executable,
        script.__file__,
        *argv,
        "--output-dir",
        str(tmp_path),
        "--device",
        "cpu",
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment
    )
    sigterm = 1 << (signal.SIGTERM - 1)
    deadline = time.monotonic() + 60
    while not blocked_signals(process.pid) & sigterm and time.monotonic() < deadline:
        time.sleep(0.001)
    process.send_signal(signal.SIGTERM)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith("stopped: "):
            break
    while process.poll() is None:  # more signals while it exits (every 10 ms) change nothing
        process.send_signal(signal.SIGTERM)
        time.sleep(0.01)
    rest, err = process.communicate(timeout=600)
    out = "".join(lines) + rest
    assert process.returncode == script.RESUMABLE_EXIT_CODE, out + err
    last = out.strip().splitlines()[-1]
    assert last.startswith("stopped: "), out
    run_dir = Path(last.removeprefix("stopped: "))
    assert script.run_state(run_dir) == "resumable"
    assert f"--resume {run_dir}" in out


def test_summary_of_three_real_mnist_runs_equals_a_hand_computation(tmp_path, capsys):
    """Three 1-epoch CNN runs on real MNIST, one unfinished run beside them, then a run made
    with other settings: the summary's numbers are the three metrics.json's, by hand."""
    mnist = REPO.parent / "shared" / "data"
    if not (mnist / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
        pytest.skip("needs the real MNIST in ../shared/data")
    runs = tmp_path / "runs"
    base = ["--data-dir", str(mnist), "--output-dir", str(runs), "--epochs", "1", "--device", "cpu"]
    for seed in ("0", "1", "2"):
        assert cnn_from_scratch.main([*base, "--seed", seed]) == 0
    finished = sorted(runs.iterdir())
    unfinished = make_run(cnn_from_scratch, runs, "resumable", "20200101-000000")
    capsys.readouterr()
    summary_args = ["--summarize", *map(str, finished), str(unfinished), "--output-dir"]
    assert cnn_from_scratch.main([*summary_args, str(tmp_path / "summaries")]) == 0
    folder = Path(capsys.readouterr().out.strip().splitlines()[-1].removeprefix("summary: "))
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["seeds"] == [0, 1, 2] and summary["left_out_unfinished"] == [str(unfinished)]
    for key in ("test_accuracy", "test_loss", "macro_f1"):
        values = [json.loads((d / "metrics.json").read_text())[key] for d in finished]
        mean = sum(values) / 3
        std = (sum((v - mean) ** 2 for v in values) / 2) ** 0.5
        expected = {"mean": mean, "std": std, "min": min(values), "max": max(values), "n": 3}
        assert summary["metrics"][key] == pytest.approx(expected, rel=1e-12), key
    assert (
        f"| test_accuracy (%) | {100 * summary['metrics']['test_accuracy']['mean']:.4g} ±"
        in (folder / "summary.md").read_text()
    )
    assert (folder / "summary.png").stat().st_size > 10_000
    assert cnn_from_scratch.main([*base, "--seed", "3", "--lr", "0.05"]) == 0
    other = max(runs.glob("cnn_*"), key=lambda d: d.stat().st_mtime)
    code = cnn_from_scratch.main(["--summarize", str(finished[0]), str(other)])
    assert code == 2 and "differ in more than the seed (lr)" in capsys.readouterr().err
