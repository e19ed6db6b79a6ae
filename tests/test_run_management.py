"""run_management.py, the module both scripts import: run folders that never clash, a lock that
lets one process train a run, `--resume` that never reopens a finished run or another script's,
explicit options, one-line errors, atomic writes that fail cleanly, signals held from the first
instant, seed summaries that count each run once and refuse damaged files."""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import cnn_from_scratch
import resnet18
import run_management as runs

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = {"cnn": cnn_from_scratch, "resnet": resnet18}
SLURM_VARIABLES = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID")


@pytest.fixture(params=sorted(SCRIPTS))
def script(request, monkeypatch):
    for name in SLURM_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return SCRIPTS[request.param]


def make_run(spec: runs.RunSpec, output_dir: Path, state: str, stamp: str, tag=None) -> Path:
    """A run folder of `spec` in `state`: unstarted, resumable or finished."""
    name = f"{spec.prefix}_{stamp}" + (f"_{tag}" if tag else "")
    run_dir = output_dir / name
    run_dir.mkdir(parents=True)
    record = {"script": spec.script, "args": {"seed": 0}}
    (run_dir / "config.json").write_text(json.dumps(record))
    progress = run_dir / spec.progress_files[0].replace("*", "linear_probe")
    if state in ("resumable", "finished"):
        progress.parent.mkdir(exist_ok=True)
        progress.write_bytes(b"checkpoint")
    if state == "finished":
        (run_dir / "metrics.json").write_text('{"test_accuracy": 0.5}')
    return run_dir


def dead_pid() -> int:
    """The pid of a process that has ended (and was reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# --------------------------------------------------------------------------------------------
# Run folders, resume and the lock
# --------------------------------------------------------------------------------------------


def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path, monkeypatch):
    monkeypatch.setattr(runs.time, "strftime", lambda pattern: "20260101-120000")
    with ThreadPoolExecutor(8) as pool:
        folders = list(pool.map(lambda _: runs.make_run_dir(tmp_path, "x"), range(16)))
    assert len(set(folders)) == 16 and all(folder.is_dir() for folder in folders)
    assert tmp_path / "x_20260101-120000" in folders


def test_resume_auto_takes_the_newest_unfinished_run_and_never_a_finished_one(script, tmp_path):
    spec = script.RUN
    older = make_run(spec, tmp_path, "resumable", "20260101-100000")
    newest = make_run(spec, tmp_path, "resumable", "20260101-110000")
    make_run(spec, tmp_path, "finished", "20260101-120000")
    make_run(spec, tmp_path, "unstarted", "20260101-130000")  # failed before a checkpoint
    assert runs.find_resume_run(spec, "auto", tmp_path) == newest
    (newest / "metrics.json").write_text("{}")
    assert runs.find_resume_run(spec, "auto", tmp_path) == older
    (older / "metrics.json").write_text("{}")
    assert runs.find_resume_run(spec, "auto", tmp_path) is None
    assert runs.find_resume_run(spec, None, tmp_path) is None


def test_resume_auto_inside_slurm_sees_only_this_job_or_array_task(script, tmp_path, monkeypatch):
    spec = script.RUN
    mine = make_run(spec, tmp_path, "resumable", "20260101-100000", "12")
    make_run(spec, tmp_path, "resumable", "20260101-110000", "123")  # "12" is its prefix
    task = make_run(spec, tmp_path, "resumable", "20260101-120000", "40_2")
    make_run(spec, tmp_path, "resumable", "20260101-130000", "40_3")
    monkeypatch.setenv("SLURM_JOB_ID", "12")
    assert runs.find_resume_run(spec, "auto", tmp_path) == mine
    monkeypatch.setenv("SLURM_JOB_ID", "99")
    assert runs.find_resume_run(spec, "auto", tmp_path) is None
    monkeypatch.setenv("SLURM_JOB_ID", "42")  # array task 2 of array job 40 has its own job id
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "40")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    assert runs.find_resume_run(spec, "auto", tmp_path) == task
    assert runs.make_run_dir(tmp_path, spec.prefix).name.endswith("_40_2")


def test_resume_of_a_path_refuses_what_this_script_cannot_continue(script, tmp_path):
    other = next(module for module in SCRIPTS.values() if module is not script)
    dry = make_run(script.RUN, tmp_path, "resumable", "20260101-140000")
    dry_record = {"script": script.RUN.script, "args": {}, "dry_run": True}
    (dry / "config.json").write_text(json.dumps(dry_record))
    damaged = make_run(script.RUN, tmp_path, "resumable", "20260101-150000")
    (damaged / "config.json").write_text('{"script": "' + script.RUN.script + '", "ar')
    cases = {
        make_run(script.RUN, tmp_path, "finished", "20260101-100000"): "is finished",
        make_run(script.RUN, tmp_path, "unstarted", "20260101-110000"): "before its first",
        make_run(other.RUN, tmp_path, "resumable", "20260101-120000"): "not made by",
        tmp_path / "missing": "no run folder",
        dry: "--dry-run",
        damaged: "is damaged",
    }
    for path, message in cases.items():
        with pytest.raises(runs.UserError, match=message):
            runs.find_resume_run(script.RUN, str(path), tmp_path)
    resumable = make_run(script.RUN, tmp_path, "resumable", "20260101-130000")
    inside = next(resumable.rglob("*.pt"))
    assert runs.find_resume_run(script.RUN, str(inside), tmp_path) == resumable


def test_a_hand_edited_config_is_called_damaged_not_foreign(tmp_path):
    (tmp_path / "config.json").write_text('{"script": "cnn_from_scratch.py"}')
    with pytest.raises(runs.UserError, match=r"damaged \(no \"args\" object\)"):
        runs.read_run_record(tmp_path)
    (tmp_path / "config.json").write_text('{"script": "cnn_from_scr')
    with pytest.raises(runs.UserError, match="damaged .not JSON"):
        runs.read_run_record(tmp_path)


def test_a_second_process_is_refused_a_held_run_and_resume_auto_skips_it(tmp_path):
    spec = cnn_from_scratch.RUN
    held = make_run(spec, tmp_path, "resumable", "20260101-110000")
    older = make_run(spec, tmp_path, "resumable", "20260101-100000")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        record = {"host": runs.socket.gethostname(), "pid": holder.pid, "token": "theirs"}
        (held / runs.LOCK_FILE).write_text(json.dumps(record))
        assert runs.is_held(held)
        with runs.RunLock() as lock, pytest.raises(runs.UserError) as refused:
            lock.acquire(held)
        assert f"process {holder.pid} on {record['host']}" in str(refused.value)
        assert runs.find_resume_run(spec, "auto", tmp_path) == older
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_whose_holder_is_gone_is_taken_over_with_a_log_line(tmp_path, capsys):
    dead = {"host": runs.socket.gethostname(), "pid": dead_pid(), "token": "old"}
    (tmp_path / runs.LOCK_FILE).write_text(json.dumps(dead))
    assert not runs.is_held(tmp_path)
    with runs.RunLock() as lock:
        lock.acquire(tmp_path)
        assert f"process {dead['pid']} has ended" in capsys.readouterr().out
        assert json.loads((tmp_path / runs.LOCK_FILE).read_text())["pid"] == os.getpid()
    assert not (tmp_path / runs.LOCK_FILE).exists()  # released on exit
    elsewhere = {"host": "another-node", "pid": 1, "token": "old"}
    (tmp_path / runs.LOCK_FILE).write_text(json.dumps(elsewhere))
    assert runs.is_held(tmp_path)  # another host's process: only its heartbeat says it is gone
    stale = time.time() - runs.STALE_LOCK_S - 5
    os.utime(tmp_path / runs.LOCK_FILE, (stale, stale))
    with runs.RunLock() as lock:
        lock.acquire(tmp_path)
        assert "no heartbeat for" in capsys.readouterr().out


def test_the_process_that_takes_a_run_names_it_where_the_wrapper_reads(tmp_path, monkeypatch):
    named = tmp_path / "run_folder"
    monkeypatch.setenv(runs.RUN_FOLDER_FILE_VARIABLE, str(named))
    run_dir = tmp_path / "cnn_20260101-100000"
    run_dir.mkdir()
    with runs.RunLock() as lock:
        lock.acquire(run_dir)
    assert named.read_text() == f"{run_dir}\n"


def test_a_requeued_slurm_job_takes_over_the_lock_of_its_earlier_start(tmp_path, monkeypatch):
    earlier = {"host": "dead-node", "pid": 4242, "token": "old", "slurm_job": ["77", "0"]}
    (tmp_path / runs.LOCK_FILE).write_text(json.dumps(earlier))
    monkeypatch.setenv("SLURM_JOB_ID", "78")  # another job: the fresh lock holds
    assert runs.is_held(tmp_path)
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert not runs.is_held(tmp_path)
    with runs.RunLock() as lock:
        lock.acquire(tmp_path)
        held = json.loads((tmp_path / runs.LOCK_FILE).read_text())
        assert held["slurm_job"] == ["77", "1"]


def test_the_holder_keeps_its_lock_alive_with_a_heartbeat(tmp_path, monkeypatch):
    monkeypatch.setattr(runs, "HEARTBEAT_S", 0.05)
    with runs.RunLock() as lock:
        lock.acquire(tmp_path)
        old = time.time() - 100
        os.utime(tmp_path / runs.LOCK_FILE, (old, old))
        deadline = time.monotonic() + 30
        while (tmp_path / runs.LOCK_FILE).stat().st_mtime < old + 50:
            assert time.monotonic() < deadline, "the heartbeat never touched the lock"
            time.sleep(0.05)


def test_cleanup_removes_temp_files_of_unstarted_runs_but_never_of_a_held_one(tmp_path):
    spec = cnn_from_scratch.RUN
    killed = make_run(spec, tmp_path, "unstarted", "20260101-100000")
    held = make_run(spec, tmp_path, "unstarted", "20260101-110000")
    resumable = make_run(spec, tmp_path, "resumable", "20260101-120000")
    for folder in (killed, held, resumable):
        (folder / ".last.pt.123.tmp").write_bytes(b"half a checkpoint")
    with runs.RunLock() as lock:
        lock.acquire(held)
        assert runs.clean_unstarted_runs(spec, tmp_path) == 1
    assert not (killed / ".last.pt.123.tmp").exists()
    assert (held / ".last.pt.123.tmp").exists()  # its process may be writing it now
    assert (resumable / ".last.pt.123.tmp").exists()  # its own resume removes it


def test_the_next_run_in_a_folder_removes_what_a_killed_write_left(tmp_path):
    (tmp_path / "linear_probe").mkdir()
    stale = [tmp_path / ".last.pt.abc123.tmp", tmp_path / "linear_probe/.last.pt.x.tmp"]
    for path in stale:
        path.write_bytes(b"half")
    (tmp_path / "keep.tmp").write_bytes(b"not ours")
    assert runs.remove_stale_temp_files(tmp_path) == 2
    assert not any(path.exists() for path in stale) and (tmp_path / "keep.tmp").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_run_folder_with_a_stale_temp_file_is_no_traceback(tmp_path):
    (tmp_path / ".last.pt.1.tmp").write_bytes(b"half")
    tmp_path.chmod(0o555)
    try:
        assert runs.remove_stale_temp_files(tmp_path) == 0
    finally:
        tmp_path.chmod(0o755)


def test_remove_stale_temp_files_survives_a_file_it_cannot_remove(tmp_path, monkeypatch):
    (tmp_path / ".last.pt.1.tmp").write_bytes(b"half")

    def read_only(self, missing_ok=False):
        raise PermissionError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(Path, "unlink", read_only)
    assert runs.remove_stale_temp_files(tmp_path) == 0


# --------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------


def test_an_option_given_equal_to_its_default_or_zero_is_still_explicit(script):
    parser = script.get_args_parser()
    default = parser.get_default("batch_size")
    explicit = runs.explicit_options(parser, ["--batch-size", str(default), "--seed", "0"])
    assert explicit == {"batch_size", "seed"}
    args = parser.parse_args(["--batch-size", str(default)])
    with pytest.raises(runs.UserError, match="--batch-size .* contradicts"):
        runs.merge_resumed_args(script.RUN, args, {"batch_size": default + 1}, explicit)
    args = parser.parse_args([])
    runs.merge_resumed_args(script.RUN, args, {"batch_size": default + 1}, set())
    assert args.batch_size == default + 1  # not given: the run's own value is kept


def test_help_shows_each_default_once(script):
    parser = script.get_args_parser()
    text = parser.format_help()
    assert "(default: None)" not in text
    options = re.split(r"\n  (?=-)", text.split("options:", 1)[1])
    repeated = [o.split()[0] for o in options if o.lower().count("default") > 1]
    assert not repeated, repeated
    defaults = vars(parser.parse_args([]))
    shown = {o.split()[0].strip("-,").replace("-", "_") for o in options if "default" in o.lower()}
    given = {name for name, value in defaults.items() if value not in (None, False)}
    assert given <= shown, sorted(given - shown)


def numeric_options(parser) -> list[str]:
    """The options that take a number: those that read "--x=5" as the number 5."""
    found = []
    for name in vars(parser.parse_args([])):
        flag = "--" + name.replace("_", "-")
        try:
            value = getattr(parser.parse_args([f"{flag}=5"]), name)
        except SystemExit:  # a choice, a flag, or 5 out of range: tried with 32 below
            try:
                value = getattr(parser.parse_args([f"{flag}=32"]), name)
            except SystemExit:
                continue
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            found.append(flag)
    return found


def parse_error(script, argv: list[str], capsys) -> str:
    """The one error line the parser prints for argv (it must exit 2)."""
    with pytest.raises(SystemExit) as exited:
        script.get_args_parser().parse_args(argv)
    assert exited.value.code == runs.USAGE_EXIT_CODE
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_bad_and_huge_numbers_are_one_error_line_for_every_numeric_option(script, capsys):
    numeric = numeric_options(script.get_args_parser())
    capsys.readouterr()
    assert len(numeric) >= 6 and "--seed" in numeric and "--lr" in numeric
    for flag in numeric:
        for text in ("nan", "inf", "1e400", "1" + "0" * 400, "-1" + "0" * 400, "x"):
            assert parse_error(script, [f"{flag}={text}"], capsys).startswith(
                f"error: argument {flag}"
            )
    for argv in (["--seed", str(2**32)], ["--seed=-1"], ["--epochs", "0"], ["--lr", "0"]):
        assert parse_error(script, argv, capsys).startswith("error: argument " + argv[0][:6])


def test_a_negative_number_is_told_to_use_an_equals_sign(script, capsys):
    line = parse_error(script, ["--weight-decay", "-1e-9"], capsys)
    assert "written with '=': --weight-decay=-1e-9" in line
    assert "written with '=': --lr=-1e-9" in parse_error(script, ["--lr", "-1e-3"], capsys)


def test_abbreviated_options_are_refused(script, capsys):
    assert "unrecognized arguments: --resu" in parse_error(script, ["--resu", "auto"], capsys)
    assert "--output" in parse_error(script, ["--output", "x"], capsys)


@pytest.mark.slow
def test_a_bad_number_is_one_error_line_and_exit_2_in_a_real_process():
    result = subprocess.run(
        [sys.executable, cnn_from_scratch.__file__, "--epochs", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        "error: argument --epochs: expected a whole number from 1 to 2147483647, got '0' "
        "(see cnn_from_scratch.py --help)"
    ]


def test_array_tasks_train_their_own_seed(monkeypatch):
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    args = argparse.Namespace(seed=7)
    assert runs.apply_array_seed(args) == 0 and args.seed == 7
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert runs.apply_array_seed(args) == 3 and args.seed == 10


def test_the_resume_command_pastes_with_this_interpreter_and_quoted_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "my results ü" / "cnn_20260101-100000"
    monkeypatch.setattr(sys, "argv", [str(REPO / "cnn_from_scratch.py")])
    command = runs.resume_command(cnn_from_scratch.RUN, run_dir)
    words = shlex.split(command)
    assert words[0] == sys.executable or (tmp_path / words[0]).resolve() == Path(sys.executable)
    assert Path(words[1]) == REPO / "cnn_from_scratch.py"
    assert words[2:] == ["--resume", "my results ü/cnn_20260101-100000"]


# --------------------------------------------------------------------------------------------
# Outputs and errors
# --------------------------------------------------------------------------------------------


def test_a_failed_write_is_one_error_naming_the_file_and_the_resume(tmp_path, monkeypatch):
    spec = resnet18.RUN
    run_dir = make_run(spec, tmp_path, "resumable", "20260101-100000")
    (run_dir / "linear_probe" / "last.pt").write_bytes(b"checkpoint")
    target = run_dir / "history.csv"

    def disk_full(descriptor):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(runs.os, "fsync", disk_full)
    with pytest.raises(runs.OutputError) as raised:
        runs.write_csv(target, [{"epoch": 1}])
    message = str(raised.value)
    assert str(target) in message and "No space left on device" in message
    assert f"--resume {run_dir}" in message and "\n" not in message
    assert not target.exists() and not list(run_dir.glob(".*.tmp"))
    unstarted = make_run(spec, tmp_path, "unstarted", "20260101-110000")
    with pytest.raises(runs.OutputError, match="nothing to resume yet"):
        runs.write_csv(unstarted / "history.csv", [{"epoch": 1}])


def test_csv_numbers_have_no_float_noise(tmp_path):
    runs.write_csv(tmp_path / "h.csv", [{"epoch": 1, "lr": 0.1 * 3 / 3 - 1e-17, "loss": 1e33}])
    assert (tmp_path / "h.csv").read_text().splitlines() == ["epoch,lr,loss", "1,0.1,1e+33"]


def test_json_keeps_a_matrix_row_on_one_line(tmp_path):
    metrics = {"accuracy": 0.5, "confusion_matrix": [[5, 1], [2, 7]], "per_class": {"0": {}}}
    runs.atomic_write(tmp_path / "m.json", metrics)
    text = (tmp_path / "m.json").read_text()
    assert "    [5, 1],\n    [2, 7]\n" in text
    assert json.loads(text) == metrics


def test_run_main_turns_errors_and_a_second_ctrl_c_into_one_line(capsys):
    def refuse(args, explicit, stop, lock):
        raise runs.UserError("--resume x: no run folder")

    def interrupted(args, explicit, stop, lock):
        raise KeyboardInterrupt

    assert runs.run_main(refuse, argparse.Namespace(), set()) == runs.USAGE_EXIT_CODE
    assert capsys.readouterr().err == "error: --resume x: no run folder\n"
    assert runs.run_main(interrupted, argparse.Namespace(), set()) == 130
    assert (
        capsys.readouterr().err == "error: interrupted again: stopped at once; nothing was saved\n"
    )


def test_an_abort_after_a_checkpoint_names_the_resume(tmp_path, capsys):
    (tmp_path / "last.pt").write_bytes(b"checkpoint")

    def interrupted_in_a_run(args, explicit, stop, lock):
        lock.acquire(tmp_path)
        raise KeyboardInterrupt

    assert runs.run_main(interrupted_in_a_run, argparse.Namespace(), set()) == 130
    err = capsys.readouterr().err
    assert f"the last checkpoint is intact: --resume {tmp_path} continues" in err
    assert not (tmp_path / runs.LOCK_FILE).exists()  # released however the run ends


def test_stop_signal_first_one_counts_a_second_ctrl_c_aborts():
    before = {number: signal.getsignal(number) for number in runs.STOP_SIGNALS}
    with runs.StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGUSR1)  # a second stop signal changes nothing
        assert stop.received == "SIGTERM" and stop.exit_code == runs.RESUMABLE_EXIT_CODE
    with pytest.raises(KeyboardInterrupt), runs.StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.received == "SIGINT" and stop.exit_code == runs.INTERRUPTED_EXIT_CODE
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)  # the handler raises here
    os.kill(os.getpid(), signal.SIGINT)  # after a stop, late signals are ignored (not 75 -> 143)
    time.sleep(0.1)
    for number, handler in before.items():
        signal.signal(number, handler)
    with runs.StopSignal() as stop:  # no signal: the handlers before it come back
        pass
    assert all(signal.getsignal(number) is handler for number, handler in before.items())


def test_a_resume_on_other_data_is_refused_naming_the_file(tmp_path):
    labels = tmp_path / "train-labels-idx1-ubyte"
    labels.write_bytes(b"\x00\x00\x08\x01" + bytes(10))
    recorded = runs.data_fingerprint([labels])
    assert recorded[labels.name]["bytes"] == 14 and len(recorded[labels.name]["sha256"]) == 64
    runs.check_same_data(recorded, runs.data_fingerprint([labels]), tmp_path)
    runs.check_same_data(None, recorded, tmp_path)  # a run made before fingerprints: no check
    labels.write_bytes(b"\x00\x00\x08\x01" + bytes(9) + b"\x01")  # same size, other labels
    with pytest.raises(runs.UserError, match="differ from what this run was trained on .train-"):
        runs.check_same_data(recorded, runs.data_fingerprint([labels]), tmp_path)


# --------------------------------------------------------------------------------------------
# Seed summaries
# --------------------------------------------------------------------------------------------


def finished_run(output_dir: Path, seed: int, accuracy: float, **args) -> Path:
    spec = cnn_from_scratch.RUN
    run_dir = output_dir / f"cnn_20260101-10000{seed}"
    run_dir.mkdir(parents=True)
    record = {"script": spec.script, "args": {"seed": seed, "lr": 0.1, **args}}
    (run_dir / "config.json").write_text(json.dumps(record))
    (run_dir / "last.pt").write_bytes(b"checkpoint")
    metrics = {"test_accuracy": accuracy, "test_loss": 0.1, "macro_f1": accuracy - 0.01}
    (run_dir / "metrics.json").write_text(json.dumps({**metrics, "train_time_s": 10.0 + seed}))
    rows = ["epoch,val_accuracy", "1,0.9", f"2,{accuracy}"]
    (run_dir / "history.csv").write_text("\n".join(rows) + "\n")
    return run_dir


def test_a_summary_counts_a_run_given_twice_once(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    first = finished_run(tmp_path / "runs", 0, 0.98)
    second = finished_run(tmp_path / "runs", 1, 0.96)
    relative = str(first.relative_to(tmp_path))
    folder = runs.summarize_runs(cnn_from_scratch.RUN, [relative, str(first), str(second)], "s")
    assert "are the same run: counted once" in capsys.readouterr().out
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["seeds"] == [0, 1]
    assert summary["metrics"]["test_accuracy"]["mean"] == pytest.approx(0.97)
    markdown = (folder / "summary.md").read_text()
    assert "| 0 | 98.00 | 97.00 | 0.1000 | 10.0 |" in markdown  # one row per seed, percent
    assert "| test_accuracy (%) | 97.00 ± 1.41 | 96.00 | 98.00 | 2 |" in markdown
    assert "Settings of every run: lr 0.1." in markdown


def test_a_summary_of_one_run_shows_no_spread(tmp_path):
    only = finished_run(tmp_path / "runs", 0, 0.98)
    folder = runs.summarize_runs(cnn_from_scratch.RUN, [str(only)], tmp_path / "s")
    markdown = (folder / "summary.md").read_text()
    assert "1 run" in markdown and "±" not in markdown
    assert "| test_accuracy (%) | 98.00 |" in markdown


@pytest.mark.parametrize(
    "damage, message",
    [
        (("metrics.json", '{"test_acc'), "metrics.json is damaged"),
        (("metrics.json", '{"something": 1}'), "has no test_accuracy"),
        (("history.csv", ""), "history.csv is damaged"),
        (("history.csv", "epoch,val_accuracy\n1\n"), "history.csv is damaged"),
        (("config.json", '{"script": "cnn_from_scratch.py", "args": {}}'), "no seed"),
        (
            (
                "config.json",
                '{"script": "cnn_from_scratch.py", "args": {"seed": 0}, "dry_run": true}',
            ),
            "--dry-run",
        ),
    ],
)
def test_a_summary_over_damaged_runs_is_one_error_line(tmp_path, damage, message, capsys):
    good = finished_run(tmp_path / "runs", 0, 0.98)
    bad = finished_run(tmp_path / "runs", 1, 0.97)
    (bad / damage[0]).write_text(damage[1])
    argv = ["--summarize", str(good), str(bad), "--output-dir", str(tmp_path / "s")]
    assert cnn_from_scratch.main(argv) == runs.USAGE_EXIT_CODE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --summarize") and message in err[0], err


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc")
@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_the_imports_stops_the_run_cleanly(number, tmp_path):
    """A signal sent while the script is still importing (once it holds the stop signals, its
    first act): the dry run starts, stops at its first step and exits 75 (SIGTERM) or 130
    (Ctrl-C) with its closing lines, never a traceback; more signals while it shuts down
    change nothing."""
    command = [
        sys.executable,
        cnn_from_scratch.__file__,
        "--dry-run",
        "--output-dir",
        str(tmp_path),
    ]
    environment = {k: v for k, v in os.environ.items() if k not in SLURM_VARIABLES}
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment
    )
    bit = 1 << (number - 1)
    deadline = time.monotonic() + 60
    while not blocked_signals(process.pid) & bit and time.monotonic() < deadline:
        time.sleep(0.001)
    process.send_signal(number)
    out, err = process.communicate(timeout=300)
    expected = runs.RESUMABLE_EXIT_CODE if number == signal.SIGTERM else 130
    assert process.returncode == expected, out + err
    assert "Traceback" not in err
    assert out.strip().splitlines()[-1].startswith("stopped: "), out


def blocked_signals(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigBlk:"):
            return int(line.split()[1], 16)
    return 0
