"""cnn_from_scratch.py end to end: the real loader on IDX files written here, every output file,
exact resume, signals, divergence, bad input, and (when present) one epoch on real MNIST."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
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


def small_run_args(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--data-dir",
        str(data),
        "--output-dir",
        str(out),
        "--epochs",
        "3",
        "--batch-size",
        "64",
        "--val-size",
        "100",
        "--device",
        "cpu",
        *extra,
    ]


def only_run_dir(out: Path) -> Path:
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    return run_dir


def final_state(run_dir: Path) -> tuple[dict, dict]:
    checkpoint = torch.load(run_dir / "checkpoint_last.pt", weights_only=False)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return checkpoint["model"], metrics


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
    assert config["args"]["batch_size"] == 64 and config["environment"]["slurm_job_id"] == "4242"
    epoch_lines = [line for line in printed if line.startswith("epoch ")]
    assert len(epoch_lines) == 3
    assert all("val loss" in line and "img/s" in line for line in epoch_lines)


def interrupt_at_step(monkeypatch, step_to_stop: int) -> None:
    """Deliver a real SIGTERM to this process during optimizer step `step_to_stop`."""
    original, calls = cnn.SGD.step, [0]

    def step(self):
        original(self)
        calls[0] += 1
        if calls[0] == step_to_stop:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(cnn.SGD, "step", step)


@pytest.mark.parametrize("stop_step", [4, 8])  # 8 steps per epoch: mid-epoch and epoch end
def test_interrupted_and_resumed_run_is_bit_identical(mnist_dir, tmp_path, monkeypatch, stop_step):
    reference_out, interrupted_out = tmp_path / "reference", tmp_path / "interrupted"
    assert cnn.main(small_run_args(mnist_dir, reference_out)) == 0

    with monkeypatch.context() as patch:
        interrupt_at_step(patch, stop_step)
        code = cnn.main(small_run_args(mnist_dir, interrupted_out))
    assert code == cnn.RESUMABLE_EXIT_CODE
    run_dir = only_run_dir(interrupted_out)
    assert (run_dir / "checkpoint_last.pt").is_file() and not (run_dir / "metrics.json").exists()
    saved = torch.load(run_dir / "checkpoint_last.pt", weights_only=False)["state"]
    assert saved["epoch"] * 8 + saved["step_in_epoch"] == stop_step

    assert cnn.main(small_run_args(mnist_dir, interrupted_out, "--resume", "auto")) == 0
    assert only_run_dir(interrupted_out) == run_dir  # resumed into the same folder
    weights, metrics = final_state(run_dir)
    reference_weights, reference_metrics = final_state(only_run_dir(reference_out))
    for name, tensor in reference_weights.items():
        assert torch.equal(weights[name], tensor), name
    for key in ("test_accuracy", "test_loss", "confusion_matrix", "macro_f1"):
        assert metrics[key] == reference_metrics[key]


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
    state = torch.load(only_run_dir(tmp_path / "early") / "checkpoint_last.pt", weights_only=False)[
        "state"
    ]
    assert (state["epoch"], state["step_in_epoch"]) == (0, 1)  # one step, then the checkpoint

    def plot_then_signal(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while the outputs are being written
        return original_plot(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(cnn, "plot_training_curves", plot_then_signal)
        assert cnn.main(small_run_args(mnist_dir, tmp_path / "late")) == 0
    assert OUTPUT_FILES <= {p.name for p in only_run_dir(tmp_path / "late").iterdir()}


def test_resume_refuses_contradicting_hyperparameters(mnist_dir, tmp_path, monkeypatch, capsys):
    with monkeypatch.context() as patch:
        interrupt_at_step(patch, 3)
        assert cnn.main(small_run_args(mnist_dir, tmp_path)) == cnn.RESUMABLE_EXIT_CODE
    checkpoint = only_run_dir(tmp_path) / "checkpoint_last.pt"
    args = small_run_args(mnist_dir, tmp_path, "--resume", str(checkpoint), "--lr", "0.05")
    assert cnn.main(args) == cnn.USAGE_EXIT_CODE
    assert "--lr 0.05 contradicts the checkpoint" in capsys.readouterr().err


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(
    mnist_dir, tmp_path, monkeypatch, capsys
):
    original, calls = cnn.SoftmaxCrossEntropy.forward, [0]

    def forward(self, logits, targets):
        calls[0] += 1
        loss = original(self, logits, targets)
        return loss * float("nan") if calls[0] == 11 else loss  # step 3 of epoch 2

    monkeypatch.setattr(cnn.SoftmaxCrossEntropy, "forward", forward)
    assert cnn.main(small_run_args(mnist_dir, tmp_path)) == cnn.DIVERGED_EXIT_CODE
    assert "became NaN/inf in epoch 2" in capsys.readouterr().err
    checkpoint = torch.load(only_run_dir(tmp_path) / "checkpoint_last.pt", weights_only=False)
    assert checkpoint["state"]["epoch"] == 1 and checkpoint["state"]["step_in_epoch"] == 0
    assert all(torch.isfinite(t).all() for t in checkpoint["model"].values())


def test_sigterm_from_outside_checkpoints_and_exits_resumable(tmp_path):
    data = make_mnist(tmp_path / "data", train=6000, test=100)
    out = tmp_path / "out"
    command = [sys.executable, str(REPO / "cnn_from_scratch.py")]
    command += small_run_args(data, out, "--epochs", "30")
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path
    )
    for line in process.stdout:  # wait until training is under way
        if line.startswith("epoch 1/"):
            break
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == cnn.RESUMABLE_EXIT_CODE, stderr
    assert "stopped by SIGTERM" in stdout and "--resume auto" in stdout
    checkpoint = torch.load(only_run_dir(out) / "checkpoint_last.pt", weights_only=False)
    assert 1 <= checkpoint["state"]["epoch"] < 30


def test_missing_data_offline_is_a_clear_error(tmp_path, capsys):
    code = cnn.main(["--data-dir", str(tmp_path / "nowhere"), "--output-dir", str(tmp_path)])
    message = capsys.readouterr().err
    assert code == cnn.USAGE_EXIT_CODE
    assert "train-images-idx3-ubyte" in message and "internet" in message
    assert "Traceback" not in message


def test_truncated_file_is_a_clear_error(tmp_path, capsys):
    data = make_mnist(tmp_path / "data", train=100, test=50)
    images = data / "MNIST" / "raw" / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:5000])
    code = cnn.main(["--data-dir", str(data), "--output-dir", str(tmp_path / "out")])
    message = capsys.readouterr().err
    assert code == cnn.USAGE_EXIT_CODE
    assert "corrupt or truncated" in message and "train" in message


@pytest.mark.parametrize(
    "bad_args,expected",
    [
        (["--epochs", "0"], "--epochs must be at least 1"),
        (["--lr", "-1"], "--lr must be a positive number"),
        (["--resume", "/no/such/checkpoint.pt"], "no checkpoint file there"),
        (["--val-size", "100000"], "--val-size 100000 must be between"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(mnist_dir, tmp_path, capsys, bad_args, expected):
    code = cnn.main(["--data-dir", str(mnist_dir), "--output-dir", str(tmp_path), *bad_args])
    assert code == cnn.USAGE_EXIT_CODE
    assert expected in capsys.readouterr().err


def test_importing_runs_nothing():
    result = subprocess.run(
        [sys.executable, "-c", "import cnn_from_scratch"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and result.stdout == "" and result.stderr == ""


def test_benchmark_reports_ratio_accuracy_and_every_layer(mnist_dir, capsys):
    """bench/cnn_vs_autograd.py end to end on the written IDX files (tiny sizes): its last
    line is the ratio, both accuracies are printed, --layers times every layer and then puts
    the model and module back as they were."""
    from bench import cnn_vs_autograd as bench

    through_pool = cnn.conv_weight_grad_through_pool
    args = ["--data-dir", str(mnist_dir), "--batch-size", "64", "--steps", "2"]
    assert bench.main([*args, "--repeats", "2", "--epochs", "1", "--layers"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    ratio = float(lines[-1].rsplit(" ", 1)[1].rstrip("x"))
    assert lines[-1].startswith("throughput ratio from-scratch / torch.nn:") and ratio > 0
    rows = {line.split()[0]: line for line in lines if line.startswith(("scratch ", "torch.nn "))}
    assert set(rows) == {"scratch", "torch.nn"} and all("%" in row for row in rows.values())
    timed = [line.strip() for line in lines if line.startswith("  ")]
    expected = [
        f"{index} {type(layer).__name__} {method}"
        for method in ("forward", "backward")
        for index, layer in enumerate(cnn.CNN().layers)
        # Backward skips a ReLU before a max-pool (CNN.backward applies its mask to the pooled
        # gradient) and layers 0-2 (the first convolution's gradient goes through the pool).
        if method == "forward" or (index > 2 and not isinstance(layer, cnn.ReLU))
    ]
    milliseconds = {}
    for name in [*expected, "0-2 Conv2D weight gradient through ReLU + MaxPool2D", "whole step"]:
        matching = [line for line in timed if line.startswith(name + " ")]
        assert len(matching) == 1, name
        milliseconds[name] = float(matching[0].rsplit(" ", 1)[1])
    assert len(timed) == len(milliseconds)  # nothing else was timed
    assert (
        0
        < max(v for k, v in milliseconds.items() if k != "whole step")
        < milliseconds["whole step"]
    )
    assert cnn.conv_weight_grad_through_pool is through_pool


def real_mnist_root() -> Path | None:
    for candidate in (os.environ.get("MNIST_ROOT"), REPO.parent / "shared" / "data"):
        if candidate and (Path(candidate) / "MNIST" / "raw" / "t10k-images-idx3-ubyte").is_file():
            return Path(candidate)
    return None


@pytest.mark.skipif(real_mnist_root() is None, reason="real MNIST not found (../shared/data)")
def test_one_epoch_on_real_mnist_reaches_97_percent(tmp_path):
    started = time.perf_counter()
    args = ["--data-dir", str(real_mnist_root()), "--output-dir", str(tmp_path)]
    assert cnn.main([*args, "--epochs", "1", "--device", "cpu"]) == 0
    metrics = json.loads((only_run_dir(tmp_path) / "metrics.json").read_text())
    print(
        f"real MNIST, 1 epoch: {100 * metrics['test_accuracy']:.2f}% "
        f"in {time.perf_counter() - started:.0f}s"
    )
    assert metrics["test_accuracy"] >= 0.97
    assert sum(map(sum, metrics["confusion_matrix"])) == 10_000
