"""cnn_from_scratch.py end to end: the real loader on IDX files written here, every output file,
exact resume, signals, divergence, bad input, plots, and (when present) one epoch on real MNIST."""

from __future__ import annotations

import csv
import gzip
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from datasets import write_idx

import cnn_from_scratch as cnn

REPO = Path(__file__).resolve().parents[1]
OUTPUT_FILES = {
    "config.json",
    "history.csv",
    "metrics.json",
    "training_curves.png",
    "confusion_matrix.png",
    "misclassified.png",
    "checkpoint_last.pt",
}


class Killed(BaseException):
    """Stands for SIGKILL in-process: nothing in the script catches it."""


def synthetic_digits(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Learnable stand-ins for digits: each class lights its own 6x6 block, plus noise."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (count,), generator=generator)
    images = torch.randint(0, 60, (count, 28, 28), generator=generator)
    for index, label in enumerate(labels.tolist()):
        row, column = divmod(label, 4)
        images[index, 2 + 8 * row : 8 + 8 * row, 2 + 6 * column : 8 + 6 * column] += 180
    return images.clamp(max=255).to(torch.uint8), labels


def make_mnist(root: Path, train: int = 600, test: int = 200) -> Path:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, count, seed in (("train", train, 1), ("t10k", test, 2)):
        images, labels = synthetic_digits(count, seed)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return root


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory) -> Path:
    return make_mnist(tmp_path_factory.mktemp("data"))


@pytest.fixture(autouse=True)
def outside_slurm(monkeypatch):
    for name in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(name, raising=False)


def small_run_args(data: Path, out: Path, *extra: str, epochs: int = 3) -> list[str]:
    return [
        "--data-dir",
        str(data),
        "--output-dir",
        str(out),
        "--epochs",
        str(epochs),
        "--batch-size",
        "64",
        "--val-size",
        "100",
        "--device",
        "cpu",
        *extra,
    ]


def exit_code(argv: list[str]) -> int:
    """main's exit code, also when argparse exits (SystemExit) on a bad option."""
    try:
        return cnn.main(argv)
    except SystemExit as exit:
        return exit.code


def only_run_dir(out: Path) -> Path:
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    return run_dir


def final_state(run_dir: Path) -> tuple[dict, dict]:
    checkpoint = torch.load(run_dir / "checkpoint_last.pt", weights_only=False)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return checkpoint["model"], metrics


def history_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "history.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_cli_writes_every_output(mnist_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert cnn.main(small_run_args(mnist_dir, tmp_path)) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    run_dir = only_run_dir(tmp_path)
    assert run_dir.name.startswith("cnn_") and run_dir.name.endswith("_4242")
    assert printed[-1] == f"results: {run_dir}"
    assert OUTPUT_FILES <= {p.name for p in run_dir.iterdir()}
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("test_accuracy", "test_loss", "macro_f1", "per_class", "train_time_s"):
        assert key in metrics
    confusion = torch.tensor(metrics["confusion_matrix"])
    assert confusion.shape == (10, 10) and int(confusion.sum()) == 200  # every test image
    assert metrics["test_accuracy"] == pytest.approx(float(confusion.diagonal().sum()) / 200)
    assert metrics["test_accuracy"] > 0.9  # the synthetic classes are easy to learn
    history = (run_dir / "history.csv").read_text().strip().splitlines()
    assert len(history) == 1 + 3 and history[0].startswith("epoch,train_loss")
    config = json.loads((run_dir / "config.json").read_text())
    assert config["script"] == "cnn_from_scratch.py" and "explicit" not in config["args"]
    assert config["args"]["batch_size"] == 64 and config["environment"]["slurm_job_id"] == "4242"
    epoch_lines = [line for line in printed if line.startswith("epoch ")]
    assert len(epoch_lines) == 3
    assert all("val loss" in line and "img/s" in line for line in epoch_lines)


def test_reference_layers_train_with_the_same_command(mnist_dir, tmp_path):
    assert cnn.main(small_run_args(mnist_dir, tmp_path, "--layers", "reference")) == 0
    metrics = json.loads((only_run_dir(tmp_path) / "metrics.json").read_text())
    assert metrics["layers"] == "reference" and metrics["test_accuracy"] > 0.9


def send_at_step(monkeypatch, step_to_stop: int, signals=(signal.SIGTERM,)) -> None:
    """Deliver real signals to this process right after optimizer step `step_to_stop`."""
    original, calls = cnn.SGD.step, [0]

    def step(self):
        original(self)
        calls[0] += 1
        if calls[0] == step_to_stop:
            for number in signals:
                os.kill(os.getpid(), number)

    monkeypatch.setattr(cnn.SGD, "step", step)


@pytest.mark.parametrize("stop_step", [4, 8])  # 8 steps per epoch: mid-epoch and epoch end
def test_interrupted_and_resumed_run_is_bit_identical(mnist_dir, tmp_path, monkeypatch, stop_step):
    reference_out, interrupted_out = tmp_path / "reference", tmp_path / "interrupted"
    assert cnn.main(small_run_args(mnist_dir, reference_out)) == 0

    with monkeypatch.context() as patch:
        send_at_step(patch, stop_step)
        code = cnn.main(small_run_args(mnist_dir, interrupted_out))
    assert code == cnn.RESUMABLE_EXIT_CODE
    run_dir = only_run_dir(interrupted_out)
    assert (run_dir / "checkpoint_last.pt").is_file() and not (run_dir / "metrics.json").exists()
    saved = torch.load(run_dir / "checkpoint_last.pt", weights_only=False)["state"]
    assert saved["epoch"] * 8 + saved["step_in_epoch"] == stop_step
    assert len(saved["lr_by_step"]) == stop_step

    assert cnn.main(small_run_args(mnist_dir, interrupted_out, "--resume", "auto")) == 0
    assert only_run_dir(interrupted_out) == run_dir  # resumed into the same folder
    weights, metrics = final_state(run_dir)
    reference_weights, reference_metrics = final_state(only_run_dir(reference_out))
    for name, tensor in reference_weights.items():
        assert torch.equal(weights[name], tensor), name
    for key in ("test_accuracy", "test_loss", "confusion_matrix", "macro_f1"):
        assert metrics[key] == reference_metrics[key]
    timing = ("seconds", "images_per_s")
    rows, reference_rows = (
        [{k: v for k, v in row.items() if k not in timing} for row in history_rows(folder)]
        for folder in (run_dir, only_run_dir(reference_out))
    )
    assert len(rows) == 3 and rows == reference_rows


def test_signal_during_startup_or_final_outputs_is_not_fatal(mnist_dir, tmp_path, monkeypatch):
    """Handlers are installed before the data load and kept until the outputs are written."""
    original_load, original_plot = cnn.load_mnist, cnn.plot_training_curves

    def load_then_signal(*args, **kwargs):
        result = original_load(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGUSR1)  # arrives before the first training step
        return result

    with monkeypatch.context() as patch:
        patch.setattr(cnn, "load_mnist", load_then_signal)
        code = cnn.main(small_run_args(mnist_dir, tmp_path / "early"))
    assert code == cnn.RESUMABLE_EXIT_CODE
    checkpoint = only_run_dir(tmp_path / "early") / "checkpoint_last.pt"
    state = torch.load(checkpoint, weights_only=False)["state"]
    assert (state["epoch"], state["step_in_epoch"]) == (0, 1)  # one step, then the checkpoint

    def plot_then_signal(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while the outputs are being written
        return original_plot(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(cnn, "plot_training_curves", plot_then_signal)
        assert cnn.main(small_run_args(mnist_dir, tmp_path / "late")) == 0
    assert OUTPUT_FILES <= {p.name for p in only_run_dir(tmp_path / "late").iterdir()}


def test_a_signal_pending_before_the_handlers_exist_is_handled(mnist_dir, tmp_path):
    """A SIGTERM that arrived while it was blocked (as the script blocks it during its imports)
    is taken when the handlers are installed: one step, a checkpoint, exit 75."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        # To this thread: a process-wide SIGTERM could go to a torch thread that does not block it.
        signal.pthread_kill(threading.get_ident(), signal.SIGTERM)
        code = cnn.main(small_run_args(mnist_dir, tmp_path))
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    assert code == cnn.RESUMABLE_EXIT_CODE
    assert (only_run_dir(tmp_path) / "checkpoint_last.pt").is_file()


def blocked_signals(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigBlk:"):
            return int(line.split()[1], 16)
    return 0


def test_sigterm_during_the_imports_is_held_and_handled(mnist_dir, tmp_path):
    """The script blocks its stop signals before importing torch: a SIGTERM in the first
    seconds is not fatal (today: exit 143, no message)."""
    command = [sys.executable, str(REPO / "cnn_from_scratch.py")]
    process = subprocess.Popen(
        command + small_run_args(mnist_dir, tmp_path / "out"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    sigterm_bit = 1 << (signal.SIGTERM - 1)
    while process.poll() is None and not blocked_signals(process.pid) & sigterm_bit:
        time.sleep(0.001)  # until the script has blocked it (a poll, not a timed wait)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == cnn.RESUMABLE_EXIT_CODE, stderr
    run_dir = only_run_dir(tmp_path / "out")
    assert stdout.strip().splitlines()[-1] == f"stopped: {run_dir}"


def test_sigterm_from_outside_checkpoints_and_prints_a_working_resume_command(tmp_path):
    data = make_mnist(tmp_path / "data", train=6000, test=100)
    out = tmp_path / "out"
    command = [sys.executable, str(REPO / "cnn_from_scratch.py")]
    command += small_run_args(data, out, epochs=30)
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path
    )
    for line in process.stdout:  # wait until training is under way
        if line.startswith("epoch 1/"):
            break
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == cnn.RESUMABLE_EXIT_CODE, stderr
    run_dir = only_run_dir(out)
    lines = stdout.strip().splitlines()
    assert lines[-1] == f"stopped: {run_dir}"
    checkpoint = torch.load(run_dir / "checkpoint_last.pt", weights_only=False)
    assert 1 <= checkpoint["state"]["epoch"] < 30
    stopped = re.fullmatch(
        r"stopped by SIGTERM (in epoch (\d+) \(step (\d+)\)|after epoch (\d+)); continue with: "
        + re.escape(f"python cnn_from_scratch.py --resume {run_dir}"),
        lines[-2],
    )
    state = checkpoint["state"]
    assert stopped, lines[-2]
    if stopped[4]:  # at an epoch's end
        assert int(stopped[4]) == state["epoch"] and state["step_in_epoch"] == 0
    else:  # the epoch it was in, and the step the checkpoint continues from
        assert (int(stopped[2]), int(stopped[3])) == (state["epoch"] + 1, state["step_in_epoch"])


def test_ctrl_c_checkpoints_exits_130_and_the_printed_command_resumes(
    mnist_dir, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        send_at_step(patch, 5, signals=(signal.SIGINT,))
        assert cnn.main(small_run_args(mnist_dir, out)) == cnn.INTERRUPTED_EXIT_CODE
    run_dir = only_run_dir(out)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == f"stopped: {run_dir}" and "Traceback" not in "\n".join(lines)
    command = lines[-2].split("continue with: ")[1]
    assert lines[-2].startswith("stopped by SIGINT") and command.startswith("python cnn_")
    # As printed, from another folder and without --data-dir: the run's own settings are used.
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DATA_DIR", raising=False)
    assert cnn.main(shlex.split(command)[2:]) == 0
    assert json.loads((run_dir / "metrics.json").read_text())["epochs"] == 3


def test_second_sigterm_keeps_75_and_second_ctrl_c_aborts_at_once(
    mnist_dir, tmp_path, monkeypatch, capsys
):
    original_save = cnn.save_checkpoint

    def save_with(number):
        def save(*args, **kwargs):
            os.kill(os.getpid(), number)  # the second signal, while the first is handled
            return original_save(*args, **kwargs)

        return save

    with monkeypatch.context() as patch:
        send_at_step(patch, 3)
        patch.setattr(cnn, "save_checkpoint", save_with(signal.SIGTERM))
        assert cnn.main(small_run_args(mnist_dir, tmp_path / "term")) == cnn.RESUMABLE_EXIT_CODE
    with monkeypatch.context() as patch:
        send_at_step(patch, 3, signals=(signal.SIGINT,))
        patch.setattr(cnn, "save_checkpoint", save_with(signal.SIGINT))
        assert cnn.main(small_run_args(mnist_dir, tmp_path / "int")) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: interrupted again: stopped at once; the checkpoints written before are intact"
    ]


def interrupted_run(mnist_dir, out: Path, monkeypatch, *extra: str) -> Path:
    with monkeypatch.context() as patch:
        send_at_step(patch, 3)
        assert cnn.main(small_run_args(mnist_dir, out, *extra)) == cnn.RESUMABLE_EXIT_CODE
    return only_run_dir(out)


def test_resume_refuses_contradicting_hyperparameters(mnist_dir, tmp_path, monkeypatch, capsys):
    run_dir = interrupted_run(mnist_dir, tmp_path, monkeypatch)
    args = small_run_args(mnist_dir, tmp_path, "--resume", str(run_dir), "--lr", "0.05")
    assert cnn.main(args) == cnn.USAGE_EXIT_CODE
    assert "--lr 0.05 contradicts the run being resumed" in capsys.readouterr().err
    args = small_run_args(mnist_dir, tmp_path, "--resume", str(run_dir), "--layers", "reference")
    assert cnn.main(args) == cnn.USAGE_EXIT_CODE


def test_an_explicit_option_equal_to_its_default_is_still_explicit(
    mnist_dir, tmp_path, monkeypatch, capsys
):
    """Made with --batch-size 64; `--batch-size 640` (the default) contradicts it."""
    run_dir = interrupted_run(mnist_dir, tmp_path, monkeypatch)
    args = small_run_args(mnist_dir, tmp_path, "--resume", str(run_dir), "--batch-size", "640")
    assert cnn.main(args) == cnn.USAGE_EXIT_CODE
    assert "--batch-size 640 contradicts the run being resumed" in capsys.readouterr().err


def test_a_finished_run_is_never_reopened(mnist_dir, tmp_path, capsys):
    assert cnn.main(small_run_args(mnist_dir, tmp_path, epochs=1)) == 0
    finished = only_run_dir(tmp_path)
    metrics = (finished / "metrics.json").read_bytes()
    assert cnn.main(small_run_args(mnist_dir, tmp_path, "--resume", str(finished))) == 2
    assert "finished" in capsys.readouterr().err
    assert cnn.main(small_run_args(mnist_dir, tmp_path, "--resume", "auto", epochs=1)) == 0
    assert "no unfinished run found, starting a new run" in capsys.readouterr().out
    assert (
        len(list(tmp_path.iterdir())) == 2 and (finished / "metrics.json").read_bytes() == metrics
    )


def test_history_is_never_short_of_metrics_after_a_kill_and_resume(
    mnist_dir, tmp_path, monkeypatch
):
    """Killed right after the last epoch's checkpoint: the resume writes the outputs from the
    checkpoint, and history.csv has every epoch that metrics.json reports."""
    original_write, checkpoints = cnn.atomic_write, [0]

    def write_then_kill(path, payload):
        original_write(path, payload)
        checkpoints[0] += path.name == cnn.CHECKPOINT_NAME
        if checkpoints[0] == 3:
            raise Killed

    with monkeypatch.context() as patch, pytest.raises(Killed):
        patch.setattr(cnn, "atomic_write", write_then_kill)
        cnn.main(small_run_args(mnist_dir, tmp_path))
    run_dir = only_run_dir(tmp_path)
    assert not (run_dir / "metrics.json").exists()
    assert cnn.main(small_run_args(mnist_dir, tmp_path, "--resume", "auto")) == 0
    assert only_run_dir(tmp_path) == run_dir
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert (
        [int(row["epoch"]) for row in history_rows(run_dir)]
        == [1, 2, 3]
        == [*range(1, metrics["epochs"] + 1)]
    )


def test_metrics_json_is_written_last_and_a_run_killed_before_it_is_completed(
    mnist_dir, tmp_path, monkeypatch
):
    def killed(*args, **kwargs):
        raise Killed

    with monkeypatch.context() as patch, pytest.raises(Killed):
        patch.setattr(cnn, "plot_misclassified", killed)
        cnn.main(small_run_args(mnist_dir, tmp_path, epochs=1))
    run_dir = only_run_dir(tmp_path)
    assert (run_dir / "training_curves.png").is_file() and not (run_dir / "metrics.json").exists()
    (run_dir / ".history.csv.abc123.tmp").write_text("left by a killed write")
    assert cnn.main(small_run_args(mnist_dir, tmp_path, "--resume", "auto", epochs=1)) == 0
    assert OUTPUT_FILES <= {p.name for p in run_dir.iterdir()}
    assert not list(run_dir.glob(".*.tmp"))


def nan_at_call(monkeypatch, call: int) -> None:
    original, calls = cnn.SoftmaxCrossEntropy.forward, [0]

    def forward(self, logits, targets):
        calls[0] += 1
        loss = original(self, logits, targets)
        return loss * float("nan") if calls[0] == call else loss

    monkeypatch.setattr(cnn.SoftmaxCrossEntropy, "forward", forward)


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(
    mnist_dir, tmp_path, monkeypatch, capsys
):
    nan_at_call(monkeypatch, 11)  # step 3 of epoch 2 (after epoch 1's 8 steps)
    assert cnn.main(small_run_args(mnist_dir, tmp_path)) == cnn.DIVERGED_EXIT_CODE
    err = capsys.readouterr().err
    assert "became NaN/inf in epoch 2" in err and "last good checkpoint (epoch 1) is kept" in err
    checkpoint = torch.load(only_run_dir(tmp_path) / "checkpoint_last.pt", weights_only=False)
    assert checkpoint["state"]["epoch"] == 1 and checkpoint["state"]["step_in_epoch"] == 0
    assert all(torch.isfinite(t).all() for t in checkpoint["model"].values())


def test_divergence_in_epoch_one_claims_no_checkpoint(mnist_dir, tmp_path, monkeypatch, capsys):
    with monkeypatch.context() as patch:
        nan_at_call(patch, 3)
        assert cnn.main(small_run_args(mnist_dir, tmp_path)) == cnn.DIVERGED_EXIT_CODE
    err = capsys.readouterr().err
    assert "epoch 1" in err and "no checkpoint was written" in err and "kept" not in err
    assert not (only_run_dir(tmp_path) / "checkpoint_last.pt").exists()
    # --resume auto does not pick that run: it starts a new one.
    assert cnn.main(small_run_args(mnist_dir, tmp_path, "--resume", "auto", epochs=1)) == 0
    assert len(list(tmp_path.iterdir())) == 2


def test_missing_data_offline_is_a_clear_error(tmp_path, capsys):
    code = cnn.main(["--data-dir", str(tmp_path / "nowhere"), "--output-dir", str(tmp_path)])
    message = capsys.readouterr().err
    assert code == cnn.USAGE_EXIT_CODE
    assert "train-images-idx3-ubyte" in message and "internet" in message
    assert "Traceback" not in message and len(message.strip().splitlines()) == 1


def test_truncated_file_is_a_clear_error(tmp_path, capsys):
    data = make_mnist(tmp_path / "data", train=100, test=50)
    images = data / "MNIST" / "raw" / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:5000])
    code = cnn.main(["--data-dir", str(data), "--output-dir", str(tmp_path / "out")])
    message = capsys.readouterr().err
    assert code == cnn.USAGE_EXIT_CODE
    assert "corrupt or truncated" in message and "train" in message
    assert not (tmp_path / "out").exists()  # failed before training: no run folder


def test_gzip_only_data_is_named_as_such(tmp_path, capsys):
    raw = make_mnist(tmp_path / "data", train=100, test=50) / "MNIST" / "raw"
    for path in list(raw.iterdir()):
        (raw / f"{path.name}.gz").write_bytes(gzip.compress(path.read_bytes()))
        path.unlink()
    code = cnn.main(["--data-dir", str(tmp_path / "data"), "--output-dir", str(tmp_path)])
    message = capsys.readouterr().err
    assert code == cnn.USAGE_EXIT_CODE
    assert "only .gz files found" in message and "decompress" in message


@pytest.mark.parametrize("what", ["file", "folder"])
def test_unreadable_data_says_permission_not_corrupt(tmp_path, capsys, monkeypatch, what):
    """Permission denied (simulated: the tests may run as root, who can read anything)."""
    data = make_mnist(tmp_path / "data", train=100, test=50)
    raw = data / "MNIST" / "raw"
    if what == "file":
        target, real_open = raw / "train-labels-idx1-ubyte", open

        def denying_open(path, *args, **kwargs):
            if Path(path) == target:
                raise PermissionError(13, "Permission denied", str(path))
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr("builtins.open", denying_open)
    else:
        real_listdir, target = os.listdir, raw

        def denying_listdir(path="."):
            if Path(path) == target:
                raise PermissionError(13, "Permission denied", str(path))
            return real_listdir(path)

        monkeypatch.setattr(os, "listdir", denying_listdir)
    code = cnn.main(["--data-dir", str(data), "--output-dir", str(tmp_path / "out")])
    message = capsys.readouterr().err
    assert code == cnn.USAGE_EXIT_CODE and len(message.strip().splitlines()) == 1
    assert str(target) in message and "permission denied" in message
    assert "unreadable" in message and "corrupt or truncated" not in message


@pytest.mark.parametrize(
    "bad_args,expected",
    [
        (["--epochs", "0"], "--epochs: expected a whole number of at least 1, got '0'"),
        (["--lr", "-1"], "--lr: expected a finite number above 0"),
        (["--weight-decay", "nan"], "--weight-decay: expected a finite number >= 0, got 'nan'"),
        (["--weight-decay", "inf"], "--weight-decay: expected a finite number >= 0, got 'inf'"),
        (["--warmup-epochs", "nan"], "--warmup-epochs: expected a finite number >= 0"),
        (["--warmup-epochs", "inf"], "--warmup-epochs: expected a finite number >= 0"),
        (["--seed", str(2**64)], "--seed: expected a seed from 0 to 4294967295"),
        (["--momentum", "0"], "--momentum: expected a number between 0 and 1"),
        (["--layers", "quick"], "--layers: invalid choice"),
        (["--resume", "/no/such/run"], "no run folder there"),
        (["--val-size", "100000"], "--val-size 100000 must be between"),
    ],
)
def test_bad_arguments_exit_2_with_one_error_line(mnist_dir, tmp_path, capsys, bad_args, expected):
    code = exit_code(["--data-dir", str(mnist_dir), "--output-dir", str(tmp_path), *bad_args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == cnn.USAGE_EXIT_CODE
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0]
    assert not list(tmp_path.iterdir())  # nothing started


def test_help_shows_each_default_once_and_right(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.delenv("DATA_DIR", raising=False)
    text = cnn.get_args_parser().format_help()
    options = [o for o in re.split(r"\n  (?=-)", text.split("options:")[1]) if o.strip()]
    assert "(default: None)" not in text and "(default: False)" not in text
    for option in options:
        assert option.lower().count("default") <= 1, option
    by_name = {option.split()[0].rstrip(","): " ".join(option.split()) for option in options}
    assert "Default: $DATA_DIR, else ./data" in by_name["--data-dir"]
    assert "(default: 640)" in by_name["--batch-size"] and "(default: fast)" in by_name["--layers"]
    assert "(default: 0.0005)" in by_name["--weight-decay"]


def captured_figures(monkeypatch) -> dict:
    figures = {}

    def keep(figure, path):
        figures[Path(path).name] = figure

    monkeypatch.setattr(cnn, "save_figure", keep)
    return figures


def test_plots_show_lr_per_step_errors_and_most_confident_mistakes(
    mnist_dir, tmp_path, monkeypatch
):
    figures = captured_figures(monkeypatch)
    args = small_run_args(mnist_dir, tmp_path, "--lr", "2.0", "--warmup-epochs", "0.5")
    assert cnn.main(args) == 0  # a high lr: some mistakes to show
    curves = figures["training_curves.png"]
    assert len(curves.axes) == 3
    lr = curves.axes[2].lines[0].get_ydata()
    assert len(lr) == 3 * 8 and lr[0] < lr[3] == max(lr) and lr[-1] < lr[8]  # warmup, decay
    assert [tick for tick in curves.axes[0].get_xticks() if 1 <= tick <= 3] == [1, 2, 3]
    metrics = json.loads((only_run_dir(tmp_path) / "metrics.json").read_text())
    wrong = 200 - sum(metrics["confusion_matrix"][k][k] for k in range(10))
    assert wrong > 0
    grid = figures["misclassified.png"]
    assert grid._suptitle.get_text().startswith(f"{min(36, wrong)} of {wrong} misclassified")
    titles = [axis.get_title() for axis in grid.axes if axis.get_title()]
    probabilities = [float(title.split("p = ")[1]) for title in titles]
    assert len(titles) == min(36, wrong) and probabilities == sorted(probabilities, reverse=True)
    assert all(0 < p <= 1 for p in probabilities)
    confusion = figures["confusion_matrix.png"]
    assert len(confusion.axes) == 2  # the matrix and its colour bar
    assert confusion.axes[0].get_xlabel() and confusion.axes[0].get_ylabel()


def test_a_one_epoch_run_has_integer_epoch_ticks(mnist_dir, tmp_path, monkeypatch):
    figures = captured_figures(monkeypatch)
    assert cnn.main(small_run_args(mnist_dir, tmp_path, epochs=1)) == 0
    for axis in figures["training_curves.png"].axes:
        ticks = [tick for tick in axis.get_xticks() if axis.get_xlim()[0] <= tick <= 1]
        assert ticks == [0, 1], ticks


def test_csv_numbers_have_no_float_noise(mnist_dir, tmp_path):
    assert cnn.main(small_run_args(mnist_dir, tmp_path, "--lr", "0.3", epochs=2)) == 0
    rows = history_rows(only_run_dir(tmp_path))
    for row in rows:
        for key, text in row.items():
            digits = re.sub(r"e.*$", "", text).replace(".", "").replace("-", "").lstrip("0")
            assert len(digits) <= 12, (key, text)
    assert rows[0]["lr"] == "0.3"  # epoch 1 ends at the warmup's peak


def test_summarize_two_seeds(mnist_dir, tmp_path, capsys):
    for seed in ("0", "1"):
        assert cnn.main(small_run_args(mnist_dir, tmp_path / "runs", "--seed", seed, epochs=1)) == 0
    runs = sorted(str(p) for p in (tmp_path / "runs").iterdir())
    assert cnn.main(["--summarize", *runs, "--output-dir", str(tmp_path / "summary")]) == 0
    folder = Path(capsys.readouterr().out.strip().splitlines()[-1].removeprefix("summary: "))
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["seeds"] == [0, 1] and summary["metrics"]["test_accuracy"]["n"] == 2
    assert (folder / "summary.png").is_file() and (folder / "summary.md").is_file()


def test_importing_runs_nothing():
    result = subprocess.run(
        [sys.executable, "-c", "import cnn_from_scratch"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and result.stdout == "" and result.stderr == ""


def test_benchmark_reports_three_columns_and_the_ratio_last(mnist_dir, capsys):
    """bench/cnn_vs_autograd.py end to end on the written IDX files (tiny sizes): one row per
    implementation with its accuracy, ratios to torch.nn, and the fast/torch.nn ratio last."""
    from bench import cnn_vs_autograd as bench

    args = ["--data-dir", str(mnist_dir), "--batch-size", "64", "--steps", "2"]
    assert bench.main([*args, "--repeats", "2", "--epochs", "1", "--per-layer"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    timed = {
        line.split()[1] if line.split()[0].isdigit() else "step": float(line.split()[-1])
        for line in lines
        if line.startswith("  ")
    }
    assert {"ColumnsConv2D.weight_grad_through_pool", "FastMaxPool2D.relu_mask", "step"} <= set(
        timed
    )
    assert "ReLU.backward" not in timed and "ColumnsConv2D.backward" not in timed  # fused away
    assert 0 < max(v for k, v in timed.items() if k != "step") < timed["step"]
    assert lines[-1].startswith("throughput ratio fast / torch.nn: ")
    ratio = float(lines[-1].rsplit(" ", 1)[1].rstrip("x"))
    table = lines[lines.index(next(line for line in lines if line.startswith("implementation"))) :]
    rows = {line.split()[0]: line.split() for line in table if line.startswith(bench.KINDS)}
    assert set(rows) == set(bench.KINDS)
    for row in rows.values():
        assert row[-1].endswith("%") and row[-2].endswith("x")  # accuracy, ratio to torch.nn
    assert rows["torch.nn"][-2] == "1.00x" and float(rows["fast"][-2].rstrip("x")) == ratio > 0


def real_mnist_root() -> Path | None:
    for candidate in (os.environ.get("MNIST_ROOT"), REPO.parent / "shared" / "data"):
        if candidate and (Path(candidate) / "MNIST" / "raw" / "t10k-images-idx3-ubyte").is_file():
            return Path(candidate)
    return None


@pytest.mark.skipif(real_mnist_root() is None, reason="real MNIST not found (../shared/data)")
@pytest.mark.parametrize("layers", cnn.LAYER_KINDS)
def test_one_epoch_on_real_mnist_reaches_97_percent(tmp_path, layers):
    started = time.perf_counter()
    args = ["--data-dir", str(real_mnist_root()), "--output-dir", str(tmp_path)]
    assert cnn.main([*args, "--epochs", "1", "--device", "cpu", "--layers", layers]) == 0
    metrics = json.loads((only_run_dir(tmp_path) / "metrics.json").read_text())
    print(
        f"real MNIST, 1 epoch, {layers} layers: {100 * metrics['test_accuracy']:.2f}% "
        f"in {time.perf_counter() - started:.0f}s"
    )
    assert metrics["test_accuracy"] >= 0.97
    assert sum(map(sum, metrics["confusion_matrix"])) == 10_000
