"""What only a CUDA GPU can show (marked `cuda`, skipped without one; bench/gpu_check.py runs
them on a lent GPU machine), and the GPU check's dry run, which runs everywhere.

On the GPU: the from-scratch CNN's layers against the same on the CPU (float64), a tiny ResNet
run in both precisions (bf16 where the GPU has it natively, fp16 + GradScaler as an older GPU
gets), resume after an interruption, cached vs uncached logits, and two processes over NCCL
when the machine has two GPUs.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import write_emnist, write_standin_weights

import resnet18

REPO = Path(__file__).resolve().parents[1]
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TINY = ["--img-size", "32", "--batch-size", "32", "--epochs", "2", "--device", "cuda"]


def cuda_test(function):
    return pytest.mark.cuda(gpu(function))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("cuda")
    write_standin_weights(root / "torch_home")
    return {"data": write_emnist(root / "data"), "torch_home": root / "torch_home"}


def environment(inputs) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(TORCH_HOME=str(inputs["torch_home"]), MPLBACKEND="Agg", OMP_NUM_THREADS="1")
    return env


def last_folder(stdout: str, prefix: str) -> Path:
    last = stdout.strip().splitlines()[-1]
    assert last.startswith(prefix), stdout[-2000:]
    return Path(last.removeprefix(prefix))


@cuda_test
def test_from_scratch_cnn_on_cuda_matches_the_cpu():
    import cnn_from_scratch as cnn

    cpu_model = cnn.CNN(dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    cuda_model = cnn.CNN(dtype=torch.float64, device="cuda")
    cuda_model.load_state_dict({k: v.cuda() for k, v in cpu_model.state_dict().items()})
    x = torch.randn(6, 1, 28, 28, dtype=torch.float64)
    y = torch.randint(0, 10, (6,))
    losses = []
    for model, device in ((cpu_model, "cpu"), (cuda_model, "cuda")):
        loss_fn = cnn.SoftmaxCrossEntropy()
        losses.append(loss_fn.forward(model.forward(x.to(device)), y.to(device)).cpu())
        model.backward(loss_fn.backward())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-10, atol=1e-12)
    for (_, cpu_layer), (_, cuda_layer) in zip(
        cpu_model.trainable_layers(), cuda_model.trainable_layers()
    ):
        for name, grad in cpu_layer.grads.items():
            torch.testing.assert_close(grad, cuda_layer.grads[name].cpu(), rtol=1e-9, atol=1e-12)
    # A resume loads the optimizer's momentum to the CPU (map_location="cpu"): it must step on.
    optimizer = cnn.SGD(cuda_model, 0.1)
    optimizer.step()
    saved = optimizer.state_dict()
    resumed = cnn.SGD(cuda_model, 0.1)
    resumed.load_state_dict({**saved, "buffers": {k: v.cpu() for k, v in saved["buffers"].items()}})
    resumed.step()
    assert all(buffer.is_cuda for buffer in resumed.buffers.values())


@cuda_test
def test_precision_follows_the_compute_capability():
    precision = resnet18.select_precision(torch.device("cuda"), True)
    native = torch.cuda.get_device_capability()[0] >= 8
    assert precision.dtype == (torch.bfloat16 if native else torch.float16)
    assert precision.use_scaler == (not native)


@cuda_test
def test_cached_and_uncached_logits_agree_on_cuda():
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = resnet18.build_model("partial_unfreeze", None).to(
        device, memory_format=torch.channels_last
    )
    images = torch.randint(0, 256, (64, 28, 28), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 62, (64,), device=device)
    precision = resnet18.select_precision(device, True)
    cached = resnet18.frozen_outputs(model, images, 4, 96, precision)
    scores = []
    for rows, first in ((images, 0), (cached, 4)):
        module = resnet18.StagesFrom(model, first, 96)  # channels_last on CUDA
        scores.append(
            resnet18.evaluate_split(module, rows, labels, precision, keep_scores=True)["scores"]
        )
    torch.testing.assert_close(scores[0], scores[1], rtol=2e-2, atol=2e-2)


@cuda_test
@pytest.mark.parametrize("capability", [None, (7, 0)], ids=["this_gpu", "as_a_v100"])
def test_tiny_run_trains_in_each_precision(inputs, tmp_path, monkeypatch, capsys, capability):
    monkeypatch.setenv("TORCH_HOME", str(inputs["torch_home"]))
    if capability:  # fp16 autocast and a GradScaler, as a V100 or T4 gets
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    expected = resnet18.select_precision(torch.device("cuda"), True).describe()
    argv = [*TINY, "--no-download", "--data-dir", str(inputs["data"])]
    code = resnet18.main([*argv, "--output-dir", str(tmp_path), "--regime", "partial_unfreeze"])
    stdout = capsys.readouterr().out
    assert code == 0, stdout[-3000:]
    folder = last_folder(stdout, "results: ")
    metrics = json.loads((folder / "partial_unfreeze" / "metrics.json").read_text())
    assert metrics["precision"] == expected and math.isfinite(metrics["test_loss"])
    assert metrics["cached_frozen_stages"] == 4  # the layer3 cache fits on any GPU here


@cuda_test
def test_resume_after_an_interruption_on_cuda(inputs, tmp_path):
    env = environment(inputs)
    command = [sys.executable, str(REPO / "resnet18.py"), *TINY, "--no-download"]
    command += ["--data-dir", str(inputs["data"]), "--output-dir", str(tmp_path)]
    command += ["--regime", "partial_unfreeze", "--epochs", "30", "--patience", "30"]
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith("partial_unfreeze epoch 2/"):
            process.send_signal(signal.SIGTERM)
            break
    rest, stderr = process.communicate(timeout=300)
    assert process.returncode == resnet18.RESUMABLE_EXIT_CODE, stderr[-3000:]
    folder = last_folder("".join(lines) + rest, "stopped: ")
    resumed = subprocess.run(
        [sys.executable, str(REPO / "resnet18.py"), "--resume", str(folder), "--epochs", "30"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = json.loads((folder / "partial_unfreeze" / "metrics.json").read_text())
    history = (folder / "partial_unfreeze" / "history.csv").read_text().splitlines()
    assert len(history) - 1 == metrics["epochs_run"] == 30


@cuda_test
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_processes_over_nccl(inputs, tmp_path):
    env = environment(inputs)
    torchrun = Path(sys.executable).with_name("torchrun")
    launcher = (
        [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
    )
    command = [*launcher, "--standalone", "--nproc-per-node=2", str(REPO / "resnet18.py"), *TINY]
    command += ["--no-download", "--data-dir", str(inputs["data"]), "--output-dir", str(tmp_path)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    folder = last_folder(result.stdout, "results: ")
    config = json.loads((folder / "config.json").read_text())
    assert config["distributed"]["world_size"] == 2
    assert "nccl" in config["distributed"]["backend"]
    assert config["distributed"]["batchnorm"].startswith("SyncBatchNorm")


def test_gpu_check_dry_run_exercises_every_step(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--dry-run", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    logs = "".join(path.read_text()[-1500:] for path in tmp_path.glob("*.log"))
    assert result.returncode == 0, result.stdout[-3000:] + logs
    summary = (tmp_path / "summary.md").read_text()
    for step in ("tests", "cnn", "resnet"):
        assert f"| {step} | ok |" in summary, summary
    assert "| linear_probe |" in summary and "| partial_unfreeze |" in summary
    assert re.search(r"From-scratch CNN, training throughput ratio .+ / torch.nn: [\d.]+x", summary)
    assert "n/a" not in summary
