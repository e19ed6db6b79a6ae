"""Tests for resnet18.py on small EMNIST-layout IDX files and a stand-in weights file.

The data are written in torchvision's raw EMNIST layout (uncompressed, big-endian IDX headers,
images stored transposed as NIST does) and the stand-in ImageNet checkpoint (a random ResNet-18
state dict) goes where torchvision caches the real one, $TORCH_HOME/hub/checkpoints/, so the
real loaders run offline. Everything runs on the CPU at --img-size 32.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import signal
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from datasets import (  # noqa: E402
    make_emnist_split,
    write_emnist_split,
    write_standin_weights,
)

import resnet18  # noqa: E402

ORIGINAL_LOSS = resnet18.classification_loss

TRAIN_PER_CLASS, TEST_PER_CLASS = 6, 2
BASE_ARGS = [
    "--img-size",
    "32",
    "--batch-size",
    "32",
    "--epochs",
    "2",
    "--patience",
    "5",
    "--seed",
    "0",
    "--device",
    "cpu",
    "--no-download",
]
TIMING_KEYS = {
    "train_time_s",
    "feature_time_s",
    "images_per_s",
    "step_images_per_s",
    "peak_memory_mb",
    "wall_time_s",
}


# --------------------------------------------------------------------------------------------
# Fixtures: EMNIST-layout IDX files and a stand-in ImageNet checkpoint
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def emnist(tmp_path_factory) -> dict:
    data_dir = tmp_path_factory.mktemp("data")
    raw = data_dir / "EMNIST" / "raw"
    raw.mkdir(parents=True)
    splits = {
        "train": make_emnist_split(TRAIN_PER_CLASS, 1),
        "test": make_emnist_split(TEST_PER_CLASS, 2),
    }
    for part, (images, labels) in splits.items():
        write_emnist_split(raw, part, images, labels)
    return {"dir": data_dir, "raw": raw, **splits}


@pytest.fixture(scope="module")
def standin_weights(tmp_path_factory) -> dict:
    """A random torchvision ResNet-18 state dict at the path torchvision caches ImageNet's."""
    torch_home = tmp_path_factory.mktemp("torch_home")
    return {"torch_home": torch_home, "state": write_standin_weights(torch_home)}


@pytest.fixture(scope="module", autouse=True)
def one_cpu_thread():
    """The CPU is shared; one thread avoids oversubscription stalls on these tiny workloads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def offline_environment(monkeypatch, standin_weights):
    monkeypatch.setenv("TORCH_HOME", str(standin_weights["torch_home"]))
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setenv("MPLBACKEND", "Agg")


def run_main(argv: list[str]) -> tuple[int, str, str]:
    """resnet18.main in-process; returns (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = resnet18.main(argv)
    return code, out.getvalue(), err.getvalue()


def results_folder(stdout: str) -> Path:
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("results: "), last
    return Path(last.removeprefix("results: "))


@pytest.fixture(scope="module")
def reference_run(emnist, standin_weights, tmp_path_factory) -> dict:
    """One uninterrupted `--regime both` run, shared by the output/frozen/resume tests."""
    output = tmp_path_factory.mktemp("reference")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCH_HOME", str(standin_weights["torch_home"]))
        patch.delenv("SLURM_JOB_ID", raising=False)
        code, stdout, stderr = run_main(
            [*BASE_ARGS, "--data-dir", str(emnist["dir"]), "--output-dir", str(output)]
        )
    assert code == 0, stderr
    return {"dir": results_folder(stdout), "stdout": stdout}


def read_metrics(run_dir: Path, regime: str) -> dict:
    return json.loads((run_dir / regime / "metrics.json").read_text())


def read_csv_rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def folded_standin(state: dict) -> dict:
    """The stand-in weights as build_model holds them: conv1 summed over RGB."""
    folded = dict(state)
    folded["conv1.weight"] = state["conv1.weight"].sum(dim=1, keepdim=True)
    return folded


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def test_load_emnist_returns_upright_images_and_file_labels(emnist):
    images, labels = resnet18.load_emnist(emnist["dir"], "byclass", train=True, download=False)
    expected_images, expected_labels = emnist["train"]
    assert images.dtype == torch.uint8 and tuple(images.shape) == (len(expected_labels), 28, 28)
    assert labels.dtype == torch.int64
    assert torch.equal(labels, expected_labels)
    assert torch.equal(images, expected_images)
    # The 'F' stored transposed comes back upright: its bars are rows and its stem a column.
    letter = images[0]
    assert letter[4:7, 6:22].eq(255).all() and letter[4:24, 6:9].eq(255).all()
    assert not letter[20:23, 6:22].eq(255).all()  # no bar at the bottom (a flipped F has one)
    assert not torch.equal(letter, letter.t())


def test_label_mapping_is_0_to_9_A_to_Z_a_to_z_as_torchvision():
    from torchvision.datasets import EMNIST

    chars = resnet18.EMNIST_BYCLASS_CHARS
    assert len(chars) == resnet18.NUM_CLASSES == 62
    assert list(chars) == EMNIST.classes_split_dict["byclass"]
    assert (chars[0], chars[9], chars[10], chars[35], chars[36], chars[61]) == tuple("09AZaz")


def test_emnist_file_names_are_torchvisions():
    from torchvision.datasets import EMNIST

    dataset_paths = []
    for train in (True, False):
        dataset = EMNIST.__new__(EMNIST)
        dataset.root, dataset.split, dataset.train = "ROOT", "byclass", train
        dataset_paths += [Path(dataset.images_file).name, Path(dataset.labels_file).name]
    assert sorted(dataset_paths) == sorted(resnet18.emnist_files("byclass"))


def test_stratified_sample_is_proportional_exact_and_seeded():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 15 + [3] * 5)
    chosen = resnet18.stratified_sample(labels, 20, torch.Generator().manual_seed(0))
    assert len(chosen) == 20 and len(set(chosen.tolist())) == 20
    assert torch.bincount(labels[chosen], minlength=4).tolist() == [10, 6, 3, 1]
    again = resnet18.stratified_sample(labels, 20, torch.Generator().manual_seed(0))
    other = resnet18.stratified_sample(labels, 20, torch.Generator().manual_seed(1))
    assert torch.equal(chosen, again) and not torch.equal(chosen, other)
    # Largest remainder: 7 of (50, 30, 15, 5) -> quotas 3.5, 2.1, 1.05, 0.35 -> 4, 2, 1, 0.
    seven = resnet18.stratified_sample(labels, 7, torch.Generator().manual_seed(0))
    assert torch.bincount(labels[seven], minlength=4).tolist() == [4, 2, 1, 0]


def test_train_val_split_is_disjoint_complete_and_stratified():
    labels = torch.arange(10).repeat_interleave(20)
    train_index, val_index = resnet18.split_train_val(labels, 0.1, seed=3)
    assert len(val_index) == 20 and len(train_index) == 180
    assert sorted(torch.cat([train_index, val_index]).tolist()) == list(range(200))
    assert torch.bincount(labels[val_index]).tolist() == [2] * 10


def test_preprocess_normalises_and_resizes_on_the_device():
    images = torch.zeros(3, 28, 28, dtype=torch.uint8)
    images[1] = 255
    x = resnet18.preprocess(images, 28)
    assert x.shape == (3, 1, 28, 28) and x.dtype == torch.float32
    mean, std = resnet18.GREY_MEAN, resnet18.GREY_STD
    torch.testing.assert_close(x[0], torch.full_like(x[0], -mean / std))
    torch.testing.assert_close(x[1], torch.full_like(x[1], (1 - mean) / std))
    resized = resnet18.preprocess(images, 48)
    assert resized.shape == (3, 1, 48, 48)
    torch.testing.assert_close(resized[1], torch.full_like(resized[1], (1 - mean) / std))


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


def test_trainable_parameter_counts_per_regime():
    probe = resnet18.build_model("linear_probe", weights="none")
    partial = resnet18.build_model("partial_unfreeze", weights="none")
    assert resnet18.count_trainable(probe) == 31_806  # 512 * 62 + 62
    assert resnet18.count_trainable(partial) == 8_425_534  # layer4 8,393,728 + fc
    layer4 = sum(p.numel() for p in partial.layer4.parameters())
    assert layer4 == 8_393_728
    trainable = {n.split(".")[0] for n, p in partial.named_parameters() if p.requires_grad}
    assert trainable == {"layer4", "fc"}
    assert {n.split(".")[0] for n, p in probe.named_parameters() if p.requires_grad} == {"fc"}
    assert probe.fc.out_features == 62 and probe.conv1.in_channels == 1


def test_grey_stem_equals_repeating_the_grey_channel():
    from torchvision.models import resnet18 as torchvision_resnet18

    torch.manual_seed(0)
    rgb_model = torchvision_resnet18().eval().double()
    grey_model = torchvision_resnet18().eval().double()
    grey_model.load_state_dict(rgb_model.state_dict())
    resnet18.fold_grey_stem(grey_model)
    grey_model.double()
    x = torch.randn(2, 1, 40, 40, dtype=torch.float64)
    torch.testing.assert_close(grey_model(x), rgb_model(x.repeat(1, 3, 1, 1)))


def test_build_model_loads_the_cached_imagenet_file(standin_weights):
    model = resnet18.build_model("partial_unfreeze", weights="imagenet")
    expected = folded_standin(standin_weights["state"])
    for name, tensor in model.state_dict().items():
        if not name.startswith("fc."):
            assert torch.equal(tensor, expected[name]), name


def test_cached_features_give_the_same_logits_as_the_uncached_path(emnist):
    torch.manual_seed(0)
    model = resnet18.build_model("linear_probe", weights="imagenet").eval()
    images = emnist["test"][0][:40]
    for amp in (False, True):
        precision = resnet18.select_precision(torch.device("cpu"), amp)
        features = resnet18.extract_features(model, images, 32, precision, batch_size=16)
        assert features.shape == (40, 512) and features.dtype == torch.float32
        with torch.no_grad(), precision.autocast():
            cached = model.fc(features)
            uncached = model(resnet18.preprocess(images, 32))
        assert cached.dtype == uncached.dtype
        torch.testing.assert_close(cached, uncached, rtol=1e-5, atol=1e-5)


def test_amp_is_bf16_autocast_on_cpu_and_trains():
    cpu = torch.device("cpu")
    precision = resnet18.select_precision(cpu, True)
    assert (precision.dtype, precision.enabled, precision.use_scaler) == (
        torch.bfloat16,
        True,
        False,
    )
    assert not resnet18.select_precision(cpu, False).enabled
    torch.manual_seed(0)
    model = resnet18.build_model("partial_unfreeze", weights="none")
    resnet18.set_regime_mode(model, "partial_unfreeze", training=True)
    x = resnet18.preprocess(torch.randint(0, 256, (4, 28, 28), dtype=torch.uint8), 32)
    with precision.autocast():
        logits = model(x)
    assert logits.dtype == torch.bfloat16
    loss = resnet18.classification_loss(logits, torch.tensor([0, 1, 2, 3]))
    assert loss.dtype == torch.float32 and math.isfinite(loss.item())
    loss.backward()
    assert model.fc.weight.grad.dtype == torch.float32
    assert model.layer4[1].conv2.weight.grad.abs().sum() > 0
    assert model.layer3[1].conv2.weight.grad is None


def test_regime_modes_keep_frozen_parts_in_eval():
    model = resnet18.build_model("partial_unfreeze", weights="none")
    resnet18.set_regime_mode(model, "partial_unfreeze", training=True)
    assert model.layer4.training and model.fc.training
    assert not model.layer3.training and not model.bn1.training
    resnet18.set_regime_mode(model, "linear_probe", training=True)
    assert model.fc.training and not model.layer4.training


# --------------------------------------------------------------------------------------------
# Training pieces
# --------------------------------------------------------------------------------------------


def test_warmup_then_cosine_schedule_values():
    schedule = resnet18.WarmupCosine(total_steps=10, warmup_steps=4)
    factors = [schedule(step) for step in range(11)]
    assert factors[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert factors[4] == pytest.approx(1.0)
    assert factors[7] == pytest.approx(0.5 * (1 + math.cos(math.pi * 3 / 6)))
    assert factors[10] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(factors[3:], factors[4:], strict=False))
    no_warmup = resnet18.WarmupCosine(total_steps=4, warmup_steps=0)
    assert no_warmup(0) == pytest.approx(1.0)
    # Through the real scheduler: the learning rate each optimizer step uses.
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([parameter], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    used = []
    for _ in range(6):
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert used == pytest.approx([0.1 * f for f in factors[:6]])


def test_early_stopping_rule():
    early = resnet18.new_regime_state()["early_stopping"]
    history = [0.50, 0.60, 0.6004, 0.59, 0.61, 0.605, 0.60]
    outcomes = [
        resnet18.update_early_stopping(early, accuracy, epoch, patience=2, min_delta=0.001)
        for epoch, accuracy in enumerate(history, start=1)
        if not early["stopped_early"]
    ]
    # 0.6004 does not beat 0.60 by more than 0.001; 0.61 resets the count; two misses stop.
    assert outcomes == [True, True, False, False]
    assert early["stopped_early"] and early["best_epoch"] == 2
    assert early["best_val_accuracy"] == 0.60


# --------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------

REGIME_FILES = (
    "metrics.json",
    "history.csv",
    "training_curves.png",
    "confusion_matrix.png",
    "per_class.csv",
    "most_confused.csv",
    "best.pt",
    "last.pt",
)
RUN_FILES = ("config.json", "comparison.md", "comparison.json", "comparison.png")


def test_both_run_writes_every_output(reference_run, emnist):
    run_dir = reference_run["dir"]
    assert run_dir.name.startswith("resnet_") and len(run_dir.name) == len("resnet_20250101-000000")
    for name in RUN_FILES:
        assert (run_dir / name).stat().st_size > 0, name
    config = json.loads((run_dir / "config.json").read_text())
    assert config["args"]["regime"] == "both" and config["args"]["img_size"] == 32
    assert {"torch", "torchvision", "host", "git_commit", "device"} <= set(config["environment"])
    comparison = json.loads((run_dir / "comparison.json").read_text())
    markdown = (run_dir / "comparison.md").read_text()
    for regime in resnet18.REGIMES:
        for name in REGIME_FILES:
            assert (run_dir / regime / name).stat().st_size > 0, (regime, name)
        metrics = read_metrics(run_dir, regime)
        assert set(resnet18.METRIC_KEYS) <= set(metrics)
        assert metrics["test_images"] == len(emnist["test"][1])
        assert 0 <= metrics["balanced_accuracy"] <= 1 and 0 <= metrics["test_accuracy"] <= 1
        assert metrics["top5_accuracy"] >= metrics["test_accuracy"]
        assert metrics["epochs_run"] == 2 and metrics["precision"] == "bfloat16 autocast"
        history = read_csv_rows(run_dir / regime / "history.csv")
        assert [int(row["epoch"]) for row in history] == [1, 2]
        per_class = read_csv_rows(run_dir / regime / "per_class.csv")
        assert [row["character"] for row in per_class] == list(resnet18.EMNIST_BYCLASS_CHARS)
        assert sum(int(row["support"]) for row in per_class) == metrics["test_images"]
        assert comparison[regime] == {key: metrics[key] for key in resnet18.METRIC_KEYS}
        assert f"| {regime} " in markdown or f" {regime} |" in markdown
    assert read_metrics(run_dir, "linear_probe")["trainable_params"] == 31_806
    assert read_metrics(run_dir, "partial_unfreeze")["trainable_params"] == 8_425_534
    for key in resnet18.METRIC_KEYS:
        assert f"| {key} |" in markdown
    stdout = reference_run["stdout"]
    assert "environment: " in stdout and "31,806 trainable" in stdout
    assert "8,425,534 trainable" in stdout


def test_test_metrics_match_the_predictions(reference_run):
    """most_confused.csv and per_class.csv agree with each other and with the accuracy."""
    run_dir = reference_run["dir"]
    metrics = read_metrics(run_dir, "partial_unfreeze")
    per_class = read_csv_rows(run_dir / "partial_unfreeze" / "per_class.csv")
    correct = sum(float(row["recall"]) * int(row["support"]) for row in per_class)
    assert correct / metrics["test_images"] == pytest.approx(metrics["test_accuracy"])
    confused = read_csv_rows(run_dir / "partial_unfreeze" / "most_confused.csv")
    assert (
        sum(int(r["count"]) for r in confused)
        <= metrics["test_images"] * (1 - metrics["test_accuracy"]) + 1e-9
    )
    assert all(r["true_char"] != r["predicted_char"] for r in confused)


def test_frozen_weights_and_batchnorm_buffers_stay_bit_identical(reference_run, standin_weights):
    expected = folded_standin(standin_weights["state"])
    for regime, trainable in (("linear_probe", ("fc.",)), ("partial_unfreeze", ("layer4.", "fc."))):
        for name in ("best.pt", "last.pt"):
            state = load_checkpoint(reference_run["dir"] / regime / name)["model"]
            assert set(state) == set(expected)
            for key, tensor in state.items():
                if key.startswith(trainable):
                    continue
                assert torch.equal(tensor, expected[key]), (regime, name, key)
        changed = [
            key
            for key, tensor in state.items()
            if key.startswith("layer4.") and not torch.equal(tensor, expected[key])
        ]
        if regime == "partial_unfreeze":
            # layer4's weights and its BatchNorm statistics (train mode) both moved.
            assert "layer4.1.conv2.weight" in changed and "layer4.1.bn2.running_mean" in changed
        else:
            assert changed == []


def test_history_records_the_warmup_learning_rates(reference_run):
    metrics = read_metrics(reference_run["dir"], "partial_unfreeze")
    steps = math.ceil(metrics["train_images"] / 32)
    history = read_csv_rows(reference_run["dir"] / "partial_unfreeze" / "history.csv")
    schedule = resnet18.WarmupCosine(2 * steps, steps)  # 1 warmup epoch of 2
    assert float(history[0]["lr"]) == pytest.approx(5e-4 * schedule(steps - 1))  # = 5e-4
    assert float(history[1]["lr"]) == pytest.approx(5e-4 * schedule(2 * steps - 1))


def test_early_stopping_triggers_and_restores_the_best_epoch(emnist, tmp_path):
    argv = [
        *BASE_ARGS,
        "--data-dir",
        str(emnist["dir"]),
        "--output-dir",
        str(tmp_path),
        "--regime",
        "linear_probe",
        "--epochs",
        "6",
        "--patience",
        "1",
        "--min-delta",
        "1.0",  # no epoch can beat the first by a whole 100 points
        "--lr",
        "0.05",
    ]
    code, stdout, stderr = run_main(argv)
    assert code == 0, stderr
    run_dir = results_folder(stdout)
    metrics = read_metrics(run_dir, "linear_probe")
    assert (metrics["epochs_run"], metrics["best_epoch"], metrics["stopped_early"]) == (2, 1, True)
    best = load_checkpoint(run_dir / "linear_probe" / "best.pt")
    last = load_checkpoint(run_dir / "linear_probe" / "last.pt")
    assert (best["epoch"], last["epoch"]) == (1, 2)
    assert not torch.equal(best["model"]["fc.weight"], last["model"]["fc.weight"])

    # Re-score the test set with each checkpoint through the uncached path.
    args = resnet18.get_args_parser().parse_args(argv)
    data = resnet18.prepare_data(args, torch.device("cpu"))
    precision = resnet18.select_precision(torch.device("cpu"), True)
    losses = {}
    for name, checkpoint in (("best", best), ("last", last)):
        model = resnet18.build_model("linear_probe", weights="imagenet")
        model.load_state_dict(checkpoint["model"])
        inputs = resnet18.RegimeInputs(model, data, False, 32, False)
        losses[name] = resnet18.evaluate(inputs, "test", precision)["loss"]
    assert metrics["test_loss"] == pytest.approx(losses["best"], rel=1e-5)
    assert abs(losses["best"] - losses["last"]) > 1e-4


def arm_signal_at_training_step(monkeypatch, step: int, signal_number=signal.SIGTERM):
    """Send this process `signal_number` during training step `step` (1-based, this call)."""
    calls = {"count": 0}
    original = ORIGINAL_LOSS

    def loss_then_signal(logits, labels):
        calls["count"] += 1
        if calls["count"] == step:
            os.kill(os.getpid(), signal_number)
        return original(logits, labels)

    monkeypatch.setattr(resnet18, "classification_loss", loss_then_signal)


def test_resume_after_interruptions_is_bit_identical(reference_run, emnist, tmp_path, monkeypatch):
    reference = reference_run["dir"]
    steps = math.ceil(read_metrics(reference, "linear_probe")["train_images"] / 32)
    argv = [*BASE_ARGS, "--data-dir", str(emnist["dir"]), "--output-dir", str(tmp_path)]

    # 1. SIGTERM in linear_probe's first epoch, step 3.
    arm_signal_at_training_step(monkeypatch, 3)
    code, stdout, _ = run_main(argv)
    assert code == resnet18.RESUMABLE_EXIT_CODE
    assert "stopped by SIGTERM during linear_probe" in stdout
    run_dir = results_folder(stdout)
    assert load_checkpoint(run_dir / "linear_probe" / "last.pt")["state"]["step_in_epoch"] == 3

    # 2. Resume; SIGUSR1 in partial_unfreeze's second epoch, step 2.
    arm_signal_at_training_step(monkeypatch, (2 * steps - 3) + steps + 2, signal.SIGUSR1)
    code, stdout, _ = run_main([*argv, "--resume", "auto"])
    assert code == resnet18.RESUMABLE_EXIT_CODE
    assert results_folder(stdout) == run_dir
    assert "stopped by SIGUSR1 during partial_unfreeze" in stdout
    state = load_checkpoint(run_dir / "partial_unfreeze" / "last.pt")["state"]
    assert (state["epoch"], state["step_in_epoch"]) == (1, 2)
    probe_metrics = (run_dir / "linear_probe" / "metrics.json").read_bytes()

    # 3. Resume to the end: the finished linear probe is not redone.
    monkeypatch.setattr(resnet18, "classification_loss", ORIGINAL_LOSS)
    code, stdout, stderr = run_main([*argv, "--resume", "auto"])
    assert code == 0, stderr
    assert "linear_probe: already finished" in stdout
    assert (run_dir / "linear_probe" / "metrics.json").read_bytes() == probe_metrics

    for regime in resnet18.REGIMES:
        got, want = read_metrics(run_dir, regime), read_metrics(reference, regime)
        assert {k: v for k, v in got.items() if k not in TIMING_KEYS} == {
            k: v for k, v in want.items() if k not in TIMING_KEYS
        }
        for name in ("best.pt", "last.pt"):
            got_model = load_checkpoint(run_dir / regime / name)["model"]
            want_model = load_checkpoint(reference / regime / name)["model"]
            for key in want_model:
                assert torch.equal(got_model[key], want_model[key]), (regime, name, key)
        columns = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr")
        got_rows = read_csv_rows(run_dir / regime / "history.csv")
        want_rows = read_csv_rows(reference / regime / "history.csv")
        assert [[r[c] for c in columns] for r in got_rows] == [
            [r[c] for c in columns] for r in want_rows
        ]
    assert (run_dir / "comparison.md").is_file()


def test_real_sigterm_checkpoints_and_exits_resumable(emnist, tmp_path, standin_weights):
    env = {
        **os.environ,
        "TORCH_HOME": str(standin_weights["torch_home"]),
        "MPLBACKEND": "Agg",
        "OMP_NUM_THREADS": "1",
    }
    env.pop("SLURM_JOB_ID", None)
    command = [
        sys.executable,
        str(REPO / "resnet18.py"),
        *BASE_ARGS,
        "--data-dir",
        str(emnist["dir"]),
        "--output-dir",
        str(tmp_path),
        "--regime",
        "partial_unfreeze",
        "--epochs",
        "200",
        "--patience",
        "200",
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        lines = []
        for line in process.stdout:
            lines.append(line)
            if line.startswith("partial_unfreeze epoch 1/"):
                process.send_signal(signal.SIGTERM)
                break
        remaining, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    stdout = "".join(lines) + remaining
    assert process.returncode == resnet18.RESUMABLE_EXIT_CODE, stderr
    assert "stopped by SIGTERM" in stdout
    run_dir = results_folder(stdout)
    checkpoint = load_checkpoint(run_dir / "partial_unfreeze" / "last.pt")
    assert 1 <= checkpoint["state"]["epoch"] < 200
    assert not (run_dir / "partial_unfreeze" / "metrics.json").exists()
    assert not list(run_dir.rglob("*.tmp"))


def test_signal_during_the_data_load_exits_resumable(emnist, tmp_path, monkeypatch):
    original = resnet18.prepare_data

    def prepare_then_signal(args, device):
        os.kill(os.getpid(), signal.SIGUSR1)
        return original(args, device)

    monkeypatch.setattr(resnet18, "prepare_data", prepare_then_signal)
    argv = [*BASE_ARGS, "--data-dir", str(emnist["dir"]), "--output-dir", str(tmp_path)]
    code, stdout, _ = run_main(argv)
    assert code == resnet18.RESUMABLE_EXIT_CODE and "stopped by SIGUSR1" in stdout
    run_dir = results_folder(stdout)
    assert (run_dir / "config.json").is_file() and not (run_dir / "linear_probe").exists()


def test_nan_loss_exits_3_and_keeps_the_last_good_checkpoint(emnist, tmp_path, monkeypatch):
    steps = math.ceil(round(0.9 * 62 * TRAIN_PER_CLASS) / 32)
    calls = {"count": 0}
    original = ORIGINAL_LOSS

    def loss_turning_nan(logits, labels):
        calls["count"] += 1
        loss = original(logits, labels)
        return loss * float("nan") if calls["count"] > steps + 1 else loss

    monkeypatch.setattr(resnet18, "classification_loss", loss_turning_nan)
    argv = [
        *BASE_ARGS,
        "--data-dir",
        str(emnist["dir"]),
        "--output-dir",
        str(tmp_path),
        "--regime",
        "linear_probe",
    ]
    code, stdout, stderr = run_main(argv)
    assert code == resnet18.DIVERGED_EXIT_CODE
    assert "NaN/inf" in stderr and "Traceback" not in stderr
    run_dir = next(tmp_path.glob("resnet_*"))
    checkpoint = load_checkpoint(run_dir / "linear_probe" / "last.pt")
    assert checkpoint["state"]["epoch"] == 1
    assert all(
        torch.isfinite(t).all() for t in checkpoint["model"].values() if t.is_floating_point()
    )
    assert not (run_dir / "linear_probe" / "metrics.json").exists()


# --------------------------------------------------------------------------------------------
# Errors the user can fix: a clear message and exit code 2, never a traceback
# --------------------------------------------------------------------------------------------


def test_missing_data_offline_names_the_files_and_how_to_fetch(tmp_path, monkeypatch):
    code, _, stderr = run_main([*BASE_ARGS, "--data-dir", str(tmp_path / "empty")])
    assert code == 2 and stderr.startswith("error: ")
    assert "emnist-byclass-train-images-idx3-ubyte" in stderr and "--prefetch" in stderr
    # Downloads allowed but the network is down: the same clear error.
    import torchvision.datasets.mnist

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets.mnist, "download_and_extract_archive", offline)
    argv = [a for a in BASE_ARGS if a != "--no-download"]
    code, _, stderr = run_main([*argv, "--data-dir", str(tmp_path / "empty2")])
    assert code == 2 and "downloading them failed" in stderr and "URLError" in stderr
    assert "EMNIST/raw" in stderr
    assert not list(tmp_path.glob("resnet_*"))


@pytest.mark.parametrize("damage", ["truncated_images", "label_out_of_range"])
def test_corrupt_data_is_a_clear_error(emnist, tmp_path, damage):
    raw = tmp_path / "EMNIST" / "raw"
    raw.mkdir(parents=True)
    for path in emnist["raw"].iterdir():
        (raw / path.name).write_bytes(path.read_bytes())
    if damage == "truncated_images":
        images = raw / "emnist-byclass-train-images-idx3-ubyte"
        images.write_bytes(images.read_bytes()[:5000])
    else:
        labels = raw / "emnist-byclass-test-labels-idx1-ubyte"
        payload = bytearray(labels.read_bytes())
        payload[-1] = 99
        labels.write_bytes(bytes(payload))
    code, _, stderr = run_main([*BASE_ARGS, "--data-dir", str(tmp_path)])
    assert code == 2 and "corrupt" in stderr and "Traceback" not in stderr


def test_missing_weights_offline_says_where_to_put_them(emnist, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    argv = [*BASE_ARGS, "--data-dir", str(emnist["dir"]), "--output-dir", str(tmp_path / "out")]
    code, _, stderr = run_main(argv)
    expected_path = str(
        tmp_path / "empty_torch_home" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    )
    assert code == 2 and expected_path in stderr and "--prefetch" in stderr

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    code, _, stderr = run_main([a for a in argv if a != "--no-download"])
    assert code == 2 and "downloading the ImageNet weights failed" in stderr
    assert expected_path in stderr
    assert not (tmp_path / "out").exists()


def test_corrupt_weights_file_is_a_clear_error(emnist, tmp_path):
    bad = tmp_path / "weights.pt"
    bad.write_bytes(b"not a checkpoint")
    argv = [*BASE_ARGS, "--data-dir", str(emnist["dir"]), "--output-dir", str(tmp_path)]
    code, _, stderr = run_main([*argv, "--weights", str(bad), "--regime", "linear_probe"])
    assert code == 2 and "corrupt" in stderr and "Traceback" not in stderr


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--img-size", "16"], "--img-size"),
        (["--epochs", "0"], "--epochs"),
        (["--batch-size", "-3"], "--batch-size"),
        (["--lr", "-1"], "--lr"),
        (["--lr", "nan"], "--lr"),
        (["--val-fraction", "1.5"], "--val-fraction"),
        (["--patience", "0"], "--patience"),
        (["--limit-train", "0"], "--limit-train"),
        (["--warmup-epochs", "3"], "--warmup-epochs"),
        (["--weights", "/no/such/weights.pt"], "--weights"),
        (["--limit-train", "4"], "--val-fraction"),
        (["--resume", "/no/such/run"], "--resume"),
    ],
)
def test_bad_arguments_are_clear_errors(emnist, tmp_path, extra, message):
    argv = [*BASE_ARGS, "--data-dir", str(emnist["dir"]), "--output-dir", str(tmp_path)]
    code, _, stderr = run_main([*argv, *extra])
    assert code == 2 and stderr.startswith("error: ") and message in stderr
    assert "Traceback" not in stderr


def test_resume_contradicting_the_run_is_refused(reference_run):
    code, _, stderr = run_main([*BASE_ARGS, "--resume", str(reference_run["dir"]), "--lr", "0.3"])
    assert code == 2 and "contradicts" in stderr


def test_resume_auto_only_picks_this_slurm_jobs_runs(tmp_path, monkeypatch):
    ours = tmp_path / "resnet_20250101-000000_12"
    clash = tmp_path / "resnet_20250101-000000_12-2"
    other = tmp_path / "resnet_20250101-000001_123"
    for folder in (ours, clash, other):
        folder.mkdir()
        (folder / "config.json").write_text("{}")
    os.utime(ours / "config.json", (1, 1))
    os.utime(clash / "config.json", (2, 2))
    monkeypatch.setenv("SLURM_JOB_ID", "12")
    found = resnet18.find_resume_checkpoint("auto", tmp_path, "resnet", "config.json")
    assert found == clash / "config.json"  # not job 123's newer folder
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    assert resnet18.find_resume_checkpoint("auto", tmp_path, "resnet", "config.json") is None
    monkeypatch.delenv("SLURM_JOB_ID")
    found = resnet18.find_resume_checkpoint("auto", tmp_path, "resnet", "config.json")
    assert found == other / "config.json"


def test_importing_runs_nothing():
    result = subprocess.run(
        [sys.executable, "-c", "import resnet18"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and result.stdout == "" and result.stderr == ""
