"""What only a CUDA GPU can show (marked `cuda`, skipped without one; bench/gpu_check.py runs
them on a lent GPU machine; tests/test_gpu_check.py tests that check on the CPU).

On the GPU: the from-scratch CNN's layers against the same on the CPU (float64), its optimiser
state across a resume, and its script end to end; the ResNet's cached vs uncached logits in the
GPU's channels_last layout, a tiny run in both precisions (bf16 where the GPU has it natively,
fp16 + GradScaler as an older GPU gets), resume after an interruption, and two processes over
NCCL when the machine has two GPUs.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import write_emnist, write_standin_weights

import cnn_from_scratch as cnn
import resnet18
from run_management import CHECKPOINT_NAME, RESUMABLE_EXIT_CODE

REPO = Path(__file__).resolve().parents[1]
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TINY = ["--img-size", "32", "--batch-size", "32", "--epochs", "2", "--device", "cuda"]
CNN_LAYERS = [("reference", "kernel-rows"), *(("fast", kernels) for kernels in cnn.CONV_KERNELS)]


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
@pytest.mark.parametrize("layers, conv_kernels", CNN_LAYERS)
def test_from_scratch_cnn_on_cuda_matches_the_cpu(layers, conv_kernels):
    models = {}
    for device in ("cpu", "cuda"):  # the same generator: the same initial weights
        generator = torch.Generator().manual_seed(0)
        models[device] = cnn.CNN(
            layers=layers,
            conv_kernels=conv_kernels,
            dtype=torch.float64,
            device=device,
            generator=generator,
        )
    x = torch.randn(6, 1, 28, 28, dtype=torch.float64)
    y = torch.randint(0, 10, (6,))
    losses = {}
    for device, model in models.items():
        loss_fn = cnn.SoftmaxCrossEntropy()
        losses[device] = loss_fn.forward(model.forward(x.to(device)), y.to(device)).cpu()
        model.backward(loss_fn.backward())
    torch.testing.assert_close(losses["cpu"], losses["cuda"], rtol=1e-10, atol=1e-12)
    on_cuda = models["cuda"].gradients()
    for key, grad in models["cpu"].gradients().items():
        assert on_cuda[key].is_cuda
        torch.testing.assert_close(grad, on_cuda[key].cpu(), rtol=1e-9, atol=1e-12)


@cuda_test
def test_from_scratch_sgd_resumes_on_cuda_from_a_checkpoint_read_to_the_cpu():
    model = cnn.CNN(dtype=torch.float64, device="cuda", generator=torch.Generator().manual_seed(0))
    loss_fn = cnn.SoftmaxCrossEntropy()
    x = torch.randn(6, 1, 28, 28, dtype=torch.float64, device="cuda")
    loss_fn.forward(model.forward(x), torch.randint(0, 10, (6,), device="cuda"))
    model.backward(loss_fn.backward())
    optimizer = cnn.SGD(model, 0.1)
    optimizer.step()
    saved = optimizer.state_dict()
    # A checkpoint is read with map_location="cpu": the buffers come back on the CPU.
    resumed = cnn.SGD(model, 0.1)
    resumed.load_state_dict({**saved, "buffers": {k: v.cpu() for k, v in saved["buffers"].items()}})
    resumed.step()
    optimizer.step()
    assert all(buffer.is_cuda for buffer in resumed.buffers.values())
    for key, buffer in optimizer.buffers.items():
        torch.testing.assert_close(resumed.buffers[key], buffer)


@cuda_test
def test_from_scratch_script_trains_on_cuda(tmp_path, capsys):
    code = cnn.main(["--dry-run", "--device", "cuda", "--output-dir", str(tmp_path)])
    stdout = capsys.readouterr().out
    assert code == 0, stdout[-3000:]
    run_dir = last_folder(stdout, "results: ")
    config = json.loads((run_dir / "config.json").read_text())
    assert config["environment"]["device"] == "cuda"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test_accuracy"] > 0.5  # the dry run's synthetic digits are learnable
    checkpoint = torch.load(run_dir / CHECKPOINT_NAME, map_location="cpu", weights_only=False)
    assert checkpoint["optimizer"]["buffers"]  # the momentum a resume continues with


@cuda_test
def test_precision_follows_the_compute_capability():
    precision = resnet18.select_precision(torch.device("cuda"), True)
    native = torch.cuda.get_device_capability()[0] >= 8
    assert precision.dtype == (torch.bfloat16 if native else torch.float16)
    assert precision.use_scaler == (not native)


@cuda_test
@pytest.mark.parametrize("regime", resnet18.REGIMES)
def test_cached_and_uncached_logits_agree_on_cuda(regime):
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = resnet18.build_model(regime, None).to(device, memory_format=torch.channels_last)
    layers = resnet18.as_layers(model.eval(), 96)
    images = torch.randint(0, 256, (64, 28, 28), dtype=torch.uint8, device=device)
    labels = torch.randint(0, resnet18.NUM_CLASSES, (64,), device=device)
    precision = resnet18.select_precision(device, True)
    first_trained = resnet18.FIRST_TRAINED[regime]
    cached = resnet18.forward_all(layers[:first_trained], images, 96, precision)
    assert cached.is_cuda and cached.dtype == precision.dtype
    on_cache = resnet18.evaluate(layers[first_trained:], cached, labels, precision, 96)
    on_images = resnet18.evaluate(layers, images, labels, precision, 96)
    torch.testing.assert_close(on_cache["scores"], on_images["scores"], rtol=2e-2, atol=2e-2)


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
    assert metrics["frozen_output_cached"] == [True]  # the layer3 cache fits on any GPU here


@cuda_test
@pytest.mark.slow
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
    assert process.returncode == RESUMABLE_EXIT_CODE, stderr[-3000:]
    folder = last_folder("".join(lines) + rest, "stopped: ")
    assert (folder / "partial_unfreeze" / CHECKPOINT_NAME).is_file()
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
@pytest.mark.slow
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
