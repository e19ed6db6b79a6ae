"""Tests for resnet18.py on small EMNIST-layout IDX files and a stand-in weights file.

The data are written in torchvision's raw EMNIST layout (uncompressed, big-endian IDX headers,
images stored transposed as NIST does) and the stand-in ImageNet checkpoint (a random ResNet-18
state dict) goes where torchvision caches the real one, $TORCH_HOME/hub/checkpoints/, so the
real loaders run offline. Everything runs on the CPU at --img-size 32; training runs happen
in-process (one `--regime both` run is shared by the tests that read its outputs), and only the
tests marked slow start a subprocess.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import re
import resource
import signal
import subprocess
import sys
import time
import types
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
import run_management  # noqa: E402

ORIGINAL_LOSS = resnet18.classification_loss

TRAIN_PER_CLASS = 6
TEST_PER_CLASS = 2
TRAIN_IMAGES = 335  # 372 less the 37 held out to validate
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
    "peak_memory_mib",
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
    state = write_standin_weights(torch_home)
    path = torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    return {"torch_home": torch_home, "state": state, "path": path}


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
    for name in [name for name in os.environ if name.startswith("SLURM_")]:
        monkeypatch.delenv(name)
    monkeypatch.delenv(run_management.RUN_FOLDER_FILE_VARIABLE, raising=False)
    monkeypatch.setenv("MPLBACKEND", "Agg")


@pytest.fixture
def no_plots(monkeypatch):
    """Tests that do not look at the plots skip drawing them (the slowest part of a tiny run)."""
    monkeypatch.setattr(resnet18, "plot_training_curves", lambda *args: None)
    monkeypatch.setattr(resnet18, "plot_confusion_matrix", lambda *args: None)
    monkeypatch.setattr(resnet18, "write_comparison", lambda *args: None)


def run_main(argv: list[str]) -> tuple[int, str, str]:
    """resnet18.main in-process; returns (exit code, stdout, stderr)."""
    out = io.StringIO()
    err = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = resnet18.main(argv)
        except SystemExit as exit_:  # argparse's error(): one line, exit 2
            code = exit_.code
    return code, out.getvalue(), err.getvalue()


def subprocess_env(standin_weights) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(TORCH_HOME=str(standin_weights["torch_home"]), MPLBACKEND="Agg", OMP_NUM_THREADS="1")
    return env


def results_folder(stdout: str) -> Path:
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("results: "), last
    return Path(last.removeprefix("results: "))


def stopped_folder(stdout: str) -> Path:
    """A stopped run's last line names its folder; the line before says how to continue."""
    *_, advice, last = stdout.strip().splitlines()
    assert last.startswith("stopped: "), last
    run_dir = Path(last.removeprefix("stopped: "))
    assert advice.endswith(f"resnet18.py --resume {run_management.shell_path(run_dir)}"), advice
    return run_dir


def data_args(emnist, output: Path, *extra: str) -> list[str]:
    return [*BASE_ARGS, "--data-dir", str(emnist["dir"]), "--output-dir", str(output), *extra]


@pytest.fixture(scope="module")
def reference_run(emnist, standin_weights, tmp_path_factory) -> dict:
    """One uninterrupted `--regime both` run, shared by the output/checkpoint/resume tests."""
    output = tmp_path_factory.mktemp("reference")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCH_HOME", str(standin_weights["torch_home"]))
        patch.delenv("SLURM_JOB_ID", raising=False)
        code, stdout, stderr = run_main(data_args(emnist, output))
    assert code == 0, stderr
    return {"dir": results_folder(stdout), "stdout": stdout}


def read_metrics(run_dir: Path, regime: str) -> dict:
    return json.loads((run_dir / regime / "metrics.json").read_text())


def read_csv_rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def folded_standin(state: dict) -> dict:
    """The stand-in weights as build_model holds them: conv1 summed over RGB."""
    folded = dict(state)
    folded["conv1.weight"] = state["conv1.weight"].sum(dim=1, keepdim=True)
    return folded


def stop_at_step(monkeypatch, step: int, signal_number=signal.SIGTERM, times=1):
    """Send this process `signal_number` (`times` times) during training step `step`."""
    calls = {"count": 0}

    def loss_then_signal(logits, labels):
        calls["count"] += 1
        if calls["count"] == step:
            for _ in range(times):
                os.kill(os.getpid(), signal_number)
        return ORIGINAL_LOSS(logits, labels)

    monkeypatch.setattr(resnet18, "classification_loss", loss_then_signal)


def stopped_run(emnist, output: Path, monkeypatch, step: int = 2, *extra: str) -> Path:
    """A linear_probe run stopped by SIGTERM at `step`: the folder a resume continues."""
    stop_at_step(monkeypatch, step)
    code, stdout, stderr = run_main(data_args(emnist, output, "--regime", "linear_probe", *extra))
    assert code == run_management.RESUMABLE_EXIT_CODE, stderr
    monkeypatch.setattr(resnet18, "classification_loss", ORIGINAL_LOSS)
    return stopped_folder(stdout)


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


def test_emnist_file_names_and_address_are_torchvisions():
    from torchvision.datasets import EMNIST

    dataset_paths = []
    for train in (True, False):
        dataset = EMNIST.__new__(EMNIST)
        dataset.root, dataset.split, dataset.train = "ROOT", "byclass", train
        dataset_paths += [Path(dataset.images_file).name, Path(dataset.labels_file).name]
    assert sorted(dataset_paths) == sorted(resnet18.emnist_files("byclass"))
    assert resnet18.EMNIST_URL == EMNIST.url


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
    train_index, val_index = resnet18.stratified_split(labels, 0.1, seed=3)
    assert len(val_index) == 20 and len(train_index) == 180
    assert sorted(torch.cat([train_index, val_index]).tolist()) == list(range(200))
    assert torch.bincount(labels[val_index]).tolist() == [2] * 10


def test_preprocess_normalises_and_resizes_on_the_device():
    images = torch.zeros(3, 28, 28, dtype=torch.uint8)
    images[1] = 255
    x = resnet18.normalise_and_resize(images, 28)
    assert x.shape == (3, 1, 28, 28) and x.dtype == torch.float32
    mean, std = resnet18.GREY_MEAN, resnet18.GREY_STD
    torch.testing.assert_close(x[0], torch.full_like(x[0], -mean / std))
    torch.testing.assert_close(x[1], torch.full_like(x[1], (1 - mean) / std))
    resized = resnet18.normalise_and_resize(images, 48)
    assert resized.shape == (3, 1, 48, 48)
    torch.testing.assert_close(resized[1], torch.full_like(resized[1], (1 - mean) / std))


def test_the_data_fingerprint_names_the_four_files_and_hashes_the_labels(emnist):
    args = resnet18.get_args_parser().parse_args(["--data-dir", str(emnist["dir"])])
    fingerprint = resnet18.data_files(args)
    assert sorted(fingerprint) == sorted(resnet18.emnist_files())
    labels = fingerprint["emnist-byclass-train-labels-idx1-ubyte"]
    assert labels["bytes"] == 8 + len(emnist["train"][1]) and len(labels["sha256"]) == 64
    dry = resnet18.get_args_parser().parse_args(["--dry-run"])
    assert resnet18.data_files(dry) is None


def test_synthetic_data_has_emnists_shapes():
    parts = resnet18.synthetic_emnist(0)
    images, labels = parts["train"]
    assert images.dtype == torch.uint8 and images.shape[1:] == (28, 28)
    assert torch.bincount(labels).tolist() == [6] * 62
    assert len(parts["test"][1]) == 124 and images.float().std() > 10


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


def test_trainable_parameter_counts_per_regime():
    probe = resnet18.build_model("linear_probe", None)
    partial = resnet18.build_model("partial_unfreeze", None)
    assert resnet18.count_trainable(probe) == 31_806  # 512 * 62 + 62
    assert resnet18.count_trainable(partial) == 8_425_534  # layer4 8,393,728 + fc
    assert sum(p.numel() for p in partial.layer4.parameters()) == 8_393_728
    trainable = {n.split(".")[0] for n, p in partial.named_parameters() if p.requires_grad}
    assert trainable == {"layer4", "fc"}
    assert {n.split(".")[0] for n, p in probe.named_parameters() if p.requires_grad} == {"fc"}
    assert probe.fc.out_features == 62 and probe.conv1.in_channels == 1
    # The layers after FIRST_TRAINED hold exactly the trainable parameters.
    for regime, model in (("linear_probe", probe), ("partial_unfreeze", partial)):
        layers = resnet18.as_layers(model, 32)
        trained = layers[resnet18.FIRST_TRAINED[regime] :]
        assert sum(p.numel() for p in trained.parameters()) == resnet18.count_trainable(model)
        assert not any(
            p.requires_grad for p in layers[: resnet18.FIRST_TRAINED[regime]].parameters()
        )


def test_the_layers_are_torchvisions_forward():
    torch.manual_seed(0)
    model = resnet18.build_model("partial_unfreeze", None).eval()
    images = torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8)
    layers = resnet18.as_layers(model, 40)
    with torch.no_grad():
        expected = model(resnet18.normalise_and_resize(images, 40))
        torch.testing.assert_close(layers(images), expected)
        k = resnet18.FIRST_TRAINED["partial_unfreeze"]
        torch.testing.assert_close(layers[k:](layers[:k](images)), expected)


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


def imagenet_model(regime: str) -> torch.nn.Module:
    identity = resnet18.backbone_identity("imagenet", False)
    return resnet18.build_model(regime, resnet18.load_backbone_weights(identity))


def test_build_model_loads_the_cached_imagenet_file(standin_weights):
    model = imagenet_model("partial_unfreeze")
    expected = folded_standin(standin_weights["state"])
    for name, tensor in model.state_dict().items():
        if not name.startswith("fc."):
            assert torch.equal(tensor, expected[name]), name


def test_the_backbone_is_identified_by_its_sha256_and_a_misnamed_file_warned(standin_weights):
    import hashlib

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        identity = resnet18.backbone_identity("imagenet", False)
    digest = hashlib.sha256(standin_weights["path"].read_bytes()).hexdigest()
    assert identity == {
        "weights": "imagenet",
        "file": str(standin_weights["path"]),
        "sha256": digest,
    }
    # The stand-in is not ImageNet's file: its hash does not start with f37072fd.
    assert out.getvalue().startswith("warning: ") and "f37072fd" in out.getvalue()
    assert resnet18.backbone_identity("none", False)["sha256"] is None


@pytest.mark.parametrize("regime", resnet18.REGIMES)
@pytest.mark.parametrize("amp", [False, True], ids=["float32", "bf16"])
def test_cached_frozen_layers_give_the_same_logits_as_the_uncached_path(emnist, regime, amp):
    torch.manual_seed(0)
    model = imagenet_model(regime).eval()
    images, labels = emnist["test"][0][:40], emnist["test"][1][:40]
    precision = resnet18.select_precision(torch.device("cpu"), amp)
    layers = resnet18.as_layers(model, 32)
    k = resnet18.FIRST_TRAINED[regime]
    cached = resnet18.forward_all(layers[:k], images, 32, precision)
    expected_shape = (40, 512) if regime == "linear_probe" else (40, 256, 2, 2)
    assert tuple(cached.shape) == expected_shape
    assert cached.dtype == (torch.bfloat16 if amp else torch.float32)
    on_cache = resnet18.evaluate(layers[k:], cached, labels, precision, 32)
    on_images = resnet18.evaluate(layers, images, labels, precision, 32)
    with torch.no_grad(), precision.autocast():
        direct = model(resnet18.normalise_and_resize(images, 32)).float()
    torch.testing.assert_close(on_images["scores"], direct)  # torchvision's own forward
    torch.testing.assert_close(on_cache["scores"], on_images["scores"])
    assert on_cache["loss"] == pytest.approx(on_images["loss"], rel=1e-6)


def test_amp_is_bf16_autocast_on_cpu_and_trains():
    cpu = torch.device("cpu")
    precision = resnet18.select_precision(cpu, True)
    assert (precision.dtype, precision.enabled, precision.use_scaler) == (
        torch.bfloat16,
        True,
        False,
    )
    assert precision.autocast_dtype == "bfloat16"
    assert not resnet18.select_precision(cpu, False).enabled
    torch.manual_seed(0)
    model = resnet18.build_model("partial_unfreeze", None)
    resnet18.set_regime_mode(model, "partial_unfreeze", training=True)
    x = resnet18.normalise_and_resize(torch.randint(0, 256, (4, 28, 28), dtype=torch.uint8), 32)
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
    model = resnet18.build_model("partial_unfreeze", None)
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


def settings_for(*argv: str, regime: str = "partial_unfreeze") -> dict:
    args = resnet18.get_args_parser().parse_args(list(argv))
    return resnet18.regime_settings(args, regime)


def test_an_explicit_zero_is_the_value_used():
    assert settings_for("--weight-decay", "0")["weight_decay"] == 0.0
    assert settings_for("--warmup-epochs", "0")["warmup_epochs"] == 0.0
    assert settings_for()["weight_decay"] == 0.01 and settings_for()["warmup_epochs"] == 1.0
    assert settings_for("--lr", "0.002")["lr"] == 0.002


def test_the_default_warmup_takes_at_most_a_fifth_of_the_run():
    assert settings_for("--epochs", "1")["warmup_epochs"] == pytest.approx(0.2)
    assert settings_for("--epochs", "4")["warmup_epochs"] == pytest.approx(0.8)
    assert settings_for("--epochs", "20")["warmup_epochs"] == 1.0  # the default run: unchanged
    # A value given is used as given, and refused only when longer than the run.
    assert settings_for("--epochs", "2", "--warmup-epochs", "1.5")["warmup_epochs"] == 1.5
    with pytest.raises(resnet18.UserError, match="--warmup-epochs 3 is longer than its 2"):
        settings_for("--epochs", "2", "--warmup-epochs", "3")


@pytest.mark.parametrize(("items", "batch", "world"), [(335, 334, 1), (335, 32, 1), (65, 32, 2)])
def test_no_batch_leaves_a_process_a_single_image(items, batch, world):
    batches = resnet18.epoch_batches(items, batch, world, torch.Generator().manual_seed(0), "cpu")
    assert sorted(torch.cat(batches).tolist()) == list(range(items))
    for index in batches:
        assert min(len(index[rank::world]) for rank in range(world)) >= 2


def test_test_metrics_are_scikit_learns():
    import warnings

    from sklearn import metrics as skm

    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 62, (500,), generator=generator)
    labels[labels == 7] = 8  # a class the test set lacks (a --limit-test subset may)
    scores = torch.randn(500, 62, generator=generator)
    scores[torch.arange(300), labels[:300]] += 3  # 60% or so right
    got = resnet18.score_test_set(labels, scores)
    truth, predicted, classes = labels.numpy(), scores.argmax(dim=1).numpy(), list(range(62))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns about the absent class
        expected = {
            "test_accuracy": skm.accuracy_score(truth, predicted),
            "top5_accuracy": skm.top_k_accuracy_score(truth, scores.numpy(), k=5, labels=classes),
            "balanced_accuracy": skm.balanced_accuracy_score(truth, predicted),
            "macro_f1": skm.f1_score(truth, predicted, average="macro", zero_division=0),
            "weighted_f1": skm.f1_score(truth, predicted, average="weighted", zero_division=0),
        }
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    # Counted by hand: the confusion matrix's rows are the true classes.
    confusion = torch.zeros(62, 62, dtype=torch.long)
    confusion.index_put_((labels, scores.argmax(dim=1)), torch.ones(500, dtype=torch.long), True)
    assert got["confusion_matrix"] == confusion.tolist()
    recall = [row["recall"] for row in got["per_class"]]
    support = confusion.sum(dim=1)
    assert recall == pytest.approx((confusion.diag() / support.clamp(min=1)).tolist())
    assert [row["support"] for row in got["per_class"]] == support.tolist()


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


def make_training(emnist, regime: str, *extra: str):
    """A Training as resnet18.py sets one up, on the test files."""
    args = resnet18.get_args_parser().parse_args(data_args(emnist, Path("unused"), *extra))
    args.data_dir = str(emnist["dir"])
    device = torch.device("cpu")
    precision = resnet18.select_precision(device, args.amp)
    stop = types.SimpleNamespace(received=None)  # a StopSignal that no signal reached
    backbone = resnet18.backbone_identity("imagenet", False)
    weights = resnet18.load_backbone_weights(backbone)
    settings = {regime: resnet18.regime_settings(args, regime)}
    world = resnet18.World()
    setup = resnet18.Setup(args, world, device, precision, stop, backbone, weights, settings)
    data = resnet18.prepare_data(args)
    return resnet18.start_training(setup, regime, data, Path("unused")), args


@pytest.mark.parametrize("cache", ["on", "off"])
def test_training_changes_only_the_trainable_tensors(emnist, standin_weights, cache):
    """An epoch of partial_unfreeze: layer4 and fc (weights and layer4's BatchNorm statistics)
    move; every frozen tensor, BatchNorm buffers included, stays bit-identical."""
    training, args = make_training(
        emnist, "partial_unfreeze", "--cache-frozen", cache, "--limit-train", "150"
    )
    assert training.inputs_cached == (cache == "on")
    outcome = resnet18.train_epoch(training, args, types.SimpleNamespace(received=None))
    assert outcome == "done" and training.state["step_in_epoch"] == 5
    expected = folded_standin(standin_weights["state"])
    state = training.model.state_dict()
    changed = {
        key
        for key in state
        if key.startswith("layer") and not torch.equal(state[key], expected[key])
    }
    assert changed and all(key.startswith("layer4.") for key in changed)
    assert "layer4.1.conv2.weight" in changed and "layer4.1.bn2.running_mean" in changed


def test_cache_auto_turns_off_when_memory_is_short(emnist, monkeypatch):
    monkeypatch.setattr(resnet18, "free_memory_bytes", lambda device: 1000)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        training, _ = make_training(emnist, "linear_probe", "--limit-train", "100")
    assert not training.inputs_cached
    assert "output not cached (0.00 GiB does not fit in half the 0.0 GiB free)" in out.getvalue()


def test_a_last_batch_of_one_image_is_trained_with_the_one_before(emnist, tmp_path, no_plots):
    """335 training images in batches of 334: the last would hold one (BatchNorm fails)."""
    argv = data_args(emnist, tmp_path, "--regime", "partial_unfreeze", "--epochs", "1")
    code, stdout, stderr = run_main([*argv, "--batch-size", "334", "--limit-test", "62"])
    assert code == 0, stderr
    history = read_csv_rows(results_folder(stdout) / "partial_unfreeze" / "history.csv")
    assert len(history) == 1 and math.isfinite(float(history[0]["train_loss"]))
    last = load_checkpoint(results_folder(stdout) / "partial_unfreeze" / "last.pt")
    assert len(last["state"]["lr_by_step"]) == 1  # one step of all 335 images


# --------------------------------------------------------------------------------------------
# Precision, devices and processes (the GPU paths, checked through what the CPU can show)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("capability", "dtype", "scaler"),
    [((7, 0), torch.float16, True), ((7, 5), torch.float16, True), ((8, 0), torch.bfloat16, False)],
)
def test_bf16_only_on_gpus_with_native_bf16(monkeypatch, capability, dtype, scaler):
    # is_bf16_supported() says True on a V100 (emulation): the capability decides, not it.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    precision = resnet18.select_precision(torch.device("cuda", 0), True)
    assert (precision.dtype, precision.enabled, precision.use_scaler) == (dtype, True, scaler)
    assert not resnet18.select_precision(torch.device("cuda", 0), False).use_scaler


def test_tf32_is_on_where_torch_compile_reads_it():
    """torch.compile reads the matmul precision back through get_float32_matmul_precision, which
    raises when only the per-backend fp32_precision was set (it failed so on an H200)."""
    precision = torch.get_float32_matmul_precision()
    benchmark = torch.backends.cudnn.benchmark
    conv = torch.backends.cudnn.conv
    new_api = hasattr(conv, "fp32_precision")
    conv_precision = conv.fp32_precision if new_api else None
    try:
        resnet18.use_fast_cuda_kernels()
        assert torch.get_float32_matmul_precision() == "high"
        if new_api:
            assert torch.backends.cuda.matmul.fp32_precision == "tf32"
            assert conv.fp32_precision == "tf32"
        assert torch.backends.cudnn.benchmark
    finally:
        torch.set_float32_matmul_precision(precision)
        torch.backends.cudnn.benchmark = benchmark
        if new_api:
            conv.fp32_precision = conv_precision


def test_the_cache_counts_the_gather_buffer_only_with_several_processes(emnist):
    model = resnet18.build_model("partial_unfreeze", None)
    layers = resnet18.as_layers(model, 32)
    data = {"train": (emnist["train"][0][:10], emnist["train"][1][:10])}
    precision = resnet18.select_precision(torch.device("cpu"), False)
    one = resnet18.frozen_cache_size(layers, 8, data, precision, resnet18.World())
    assert one == 10 * 256 * 2 * 2 * 4  # layer3's float32 output at 32 px, once
    two = resnet18.frozen_cache_size(layers, 8, data, precision, resnet18.World(0, 2))
    assert two == one * 3 // 2


def test_device_auto_refuses_allocated_gpus_that_torch_cannot_use(monkeypatch, tmp_path):
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'NVIDIA H100 80GB HBM3, 535.104.05'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    assert resnet18.select_device("auto") == torch.device("cpu")  # outside SLURM: the CPU
    monkeypatch.setenv("SLURM_JOB_ID", "12")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with pytest.raises(resnet18.UserError) as caught:
        resnet18.select_device("auto")
    message = str(caught.value)
    assert "CUDA 13.0" in message and "NVIDIA H100 80GB HBM3, 535.104.05" in message
    assert "--device cpu" in message and "\n" not in message


def test_two_processes_on_one_gpu_are_refused_before_nccl(monkeypatch):
    """What `sbatch --ntasks=2` on a one-GPU node gives: both processes see the same GPU."""
    uuid = type("Properties", (), {"uuid": "GPU-1234", "name": "fake"})()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: uuid)
    monkeypatch.setattr(resnet18.dist, "init_process_group", lambda *args, **kwargs: None)

    def gather(output, mine):
        output[:] = [mine, mine]  # the other process reports the same host and GPU

    monkeypatch.setattr(resnet18.dist, "all_gather_object", gather)
    world = resnet18.World(0, 2, 0, "srun")
    with pytest.raises(resnet18.UserError, match="2 processes share 1 GPU") as caught:
        resnet18.init_distributed(world, torch.device("cuda"), 60)
    assert "--ntasks-per-node=N --gpus-per-node=N run_resnet.sbatch" in str(caught.value)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(resnet18.UserError, match="needs a GPU of its own"):
        resnet18.init_distributed(resnet18.World(3, 4, 3, "torchrun"), torch.device("cuda"), 60)


def test_a_peer_that_never_comes_is_one_line(monkeypatch):
    def timed_out(*args, **kwargs):
        raise torch.distributed.DistStoreError("Timed out after 61 seconds waiting for clients.\n")

    monkeypatch.setattr(resnet18.dist, "init_process_group", timed_out)
    monkeypatch.setenv("MASTER_ADDR", "node7")
    monkeypatch.setenv("MASTER_PORT", "29500")
    with pytest.raises(resnet18.UserError) as caught:
        resnet18.init_distributed(resnet18.World(1, 2), torch.device("cpu"), 60)
    message = str(caught.value)
    assert "could not join the others at node7:29500 within --dist-timeout 60 s" in message
    assert "Timed out after 61 seconds" in message and "\n" not in message


# --------------------------------------------------------------------------------------------
# One run's outputs
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
RUN_FILES = ("config.json", "comparison.md", "comparison.json", "comparison.png", "metrics.json")


def test_both_run_writes_every_output(reference_run, emnist, standin_weights):
    run_dir = reference_run["dir"]
    assert run_dir.name.startswith("resnet_") and len(run_dir.name) == len("resnet_20250101-000000")
    for name in RUN_FILES:
        assert (run_dir / name).stat().st_size > 0, name
    config = json.loads((run_dir / "config.json").read_text())
    assert config["args"]["regime"] == "both" and config["args"]["img_size"] == 32
    assert config["dry_run"] is False and config["script"] == "resnet18.py"
    assert config["autocast_dtype"] == "bfloat16" and "explicit" not in config["args"]
    assert {"torch", "torchvision", "host", "git_commit", "device"} <= set(config["environment"])
    assert config["backbone"]["file"] == str(standin_weights["path"])
    assert config["data_files"] == resnet18.data_fingerprint(
        [emnist["raw"] / name for name in resnet18.emnist_files()]
    )
    comparison = json.loads((run_dir / "comparison.json").read_text())
    finished = json.loads((run_dir / "metrics.json").read_text())
    assert set(finished) == set(resnet18.REGIMES)
    for regime in resnet18.REGIMES:
        for name in REGIME_FILES:
            assert (run_dir / regime / name).stat().st_size > 0, (regime, name)
        metrics = read_metrics(run_dir, regime)
        assert finished[regime] == metrics
        assert set(resnet18.METRIC_KEYS) <= set(metrics)
        assert metrics["test_images"] == len(emnist["test"][1])
        assert metrics["top5_accuracy"] >= metrics["test_accuracy"]
        assert metrics["epochs_run"] == 2 and metrics["precision"] == "bfloat16 autocast"
        assert metrics["frozen_output_cached"] == [True]
        assert metrics["backbone_sha256"] == config["backbone"]["sha256"]
        assert sum(map(sum, metrics["confusion_matrix"])) == metrics["test_images"]
        history = read_csv_rows(run_dir / regime / "history.csv")
        assert [int(row["epoch"]) for row in history] == [1, 2]
        per_class = read_csv_rows(run_dir / regime / "per_class.csv")
        assert [row["character"] for row in per_class] == list(resnet18.EMNIST_BYCLASS_CHARS)
        assert sum(int(row["support"]) for row in per_class) == metrics["test_images"]
        assert comparison[regime] == {key: metrics[key] for key in resnet18.METRIC_KEYS}
    assert read_metrics(run_dir, "linear_probe")["trainable_params"] == 31_806
    assert read_metrics(run_dir, "partial_unfreeze")["trainable_params"] == 8_425_534
    stdout = reference_run["stdout"]
    assert "environment: " in stdout and "31,806 trainable" in stdout
    assert "warning: " in stdout  # the stand-in's hash is not the one its name says


def test_checkpoints_hold_the_trainable_part_and_the_backbones_identity(reference_run):
    config = json.loads((reference_run["dir"] / "config.json").read_text())
    for regime, prefixes in resnet18.TRAINABLE_PREFIXES.items():
        last = load_checkpoint(reference_run["dir"] / regime / "last.pt")
        best = load_checkpoint(reference_run["dir"] / regime / "best.pt")
        for checkpoint in (last, best):
            assert checkpoint["backbone"] == config["backbone"]
            assert checkpoint["model"] and all(k.startswith(prefixes) for k in checkpoint["model"])
        assert set(last["rng"]) == {"python", "torch"}
        assert last["autocast_dtype"] == "bfloat16" and last["scaler"] == {}
        assert "optimizer" not in best
        assert best["epoch"] == read_metrics(reference_run["dir"], regime)["best_epoch"]
    # The best model, whole again from best.pt and the weights file.
    model = resnet18.load_best(reference_run["dir"] / "partial_unfreeze" / "best.pt")
    saved = load_checkpoint(reference_run["dir"] / "partial_unfreeze" / "best.pt")["model"]
    assert torch.equal(model.layer4[1].conv2.weight, saved["layer4.1.conv2.weight"])


def test_comparison_table_has_units_and_the_difference(reference_run):
    run_dir = reference_run["dir"]
    probe, partial = (read_metrics(run_dir, regime) for regime in resnet18.REGIMES)
    rows = {
        line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
        for line in (run_dir / "comparison.md").read_text().splitlines()
        if line.startswith("| ") and "---" not in line
    }
    assert rows["metric"] == ["unit", "linear_probe", "partial_unfreeze", "difference"]
    for key in resnet18.METRIC_KEYS:
        assert key in rows, key
    accuracy = rows["test_accuracy"]
    assert accuracy[0] == "%" and accuracy[1] == f"{100 * probe['test_accuracy']:.2f}"
    difference = 100 * (partial["test_accuracy"] - probe["test_accuracy"])
    assert accuracy[3] == f"{difference:+.2f}"
    assert rows["trainable_params"] == ["parameters", "31,806", "8,425,534", "+8,393,728"]
    assert rows["peak_memory_mib"][0] == "MiB" and rows["stopped_early"][3] == ""
    assert f"linear_probe: test accuracy {accuracy[1]}%" in reference_run["stdout"]


def test_csv_numbers_carry_no_float_noise(reference_run):
    for regime in resnet18.REGIMES:
        for name in ("history.csv", "per_class.csv", "most_confused.csv"):
            for row in read_csv_rows(reference_run["dir"] / regime / name):
                for value in row.values():
                    if re.fullmatch(r"-?\d+\.\d+(e-?\d+)?", value):
                        mantissa = value.split("e")[0].replace("-", "").replace(".", "")
                        assert len(mantissa.strip("0")) <= 12, (name, value)


def test_history_records_the_capped_warmup_learning_rates(reference_run):
    steps = math.ceil(TRAIN_IMAGES / 32)
    history = read_csv_rows(reference_run["dir"] / "partial_unfreeze" / "history.csv")
    schedule = resnet18.WarmupCosine(2 * steps, round(0.4 * steps))  # a fifth of 2 epochs
    assert float(history[0]["lr"]) == pytest.approx(5e-4 * schedule(steps - 1))
    assert float(history[1]["lr"]) == pytest.approx(5e-4 * schedule(2 * steps - 1))
    state = load_checkpoint(reference_run["dir"] / "partial_unfreeze" / "last.pt")["state"]
    assert state["lr_by_step"] == pytest.approx([5e-4 * schedule(s) for s in range(2 * steps)])


def test_early_stopping_triggers_and_restores_the_best_epoch(emnist, tmp_path, no_plots):
    argv = data_args(emnist, tmp_path, "--regime", "linear_probe", "--epochs", "6")
    # No epoch can beat the first by a whole 100 points.
    argv += ["--patience", "1", "--min-delta", "1.0", "--lr", "0.05"]
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
    data = resnet18.prepare_data(args)
    precision = resnet18.select_precision(torch.device("cpu"), True)
    losses = {}
    for name, checkpoint in (("best", best), ("last", last)):
        model = imagenet_model("linear_probe")
        model.load_state_dict(checkpoint["model"], strict=False)
        layers = resnet18.as_layers(model, 32)
        losses[name] = resnet18.evaluate(layers, *data["test"], precision, 32)["loss"]
    assert metrics["test_loss"] == pytest.approx(losses["best"], rel=1e-5)
    assert abs(losses["best"] - losses["last"]) > 1e-4


def test_an_explicit_zero_is_recorded_and_trained_with(emnist, tmp_path, no_plots):
    argv = data_args(emnist, tmp_path, "--regime", "partial_unfreeze", "--epochs", "1")
    argv += ["--weight-decay", "0", "--warmup-epochs", "0", "--limit-train", "100"]
    code, stdout, stderr = run_main(argv)
    assert code == 0, stderr
    assert "warmup_epochs 0, weight_decay 0," in stdout
    config = json.loads((results_folder(stdout) / "config.json").read_text())
    settings = config["regime_settings"]["partial_unfreeze"]
    assert settings["weight_decay"] == 0 and settings["warmup_epochs"] == 0
    last = load_checkpoint(results_folder(stdout) / "partial_unfreeze" / "last.pt")
    assert last["optimizer"]["param_groups"][0]["weight_decay"] == 0
    assert last["state"]["lr_by_step"][0] == 5e-4  # no ramp: the first step at the peak


# --------------------------------------------------------------------------------------------
# Stop and resume
# --------------------------------------------------------------------------------------------


def test_resume_after_interruptions_is_bit_identical(reference_run, emnist, tmp_path, monkeypatch):
    reference = reference_run["dir"]
    steps = math.ceil(TRAIN_IMAGES / 32)
    argv = data_args(emnist, tmp_path)

    # 1. SIGTERM in linear_probe's first epoch, step 3: stop and resume count epochs alike.
    stop_at_step(monkeypatch, 3)
    code, stdout, _ = run_main(argv)
    assert code == run_management.RESUMABLE_EXIT_CODE
    assert "stopped by SIGTERM during linear_probe in epoch 1 (step 3)" in stdout
    run_dir = stopped_folder(stdout)
    assert load_checkpoint(run_dir / "linear_probe" / "last.pt")["state"]["step_in_epoch"] == 3

    # 2. Resume; SIGUSR1 in partial_unfreeze's second epoch, step 2.
    stop_at_step(monkeypatch, (2 * steps - 3) + steps + 2, signal.SIGUSR1)
    code, stdout, _ = run_main([*argv, "--resume", "auto"])
    assert code == run_management.RESUMABLE_EXIT_CODE
    assert "linear_probe: resumed" in stdout and "in epoch 1 at step 3" in stdout
    assert stopped_folder(stdout) == run_dir
    assert "stopped by SIGUSR1 during partial_unfreeze in epoch 2 (step 2)" in stdout
    state = load_checkpoint(run_dir / "partial_unfreeze" / "last.pt")["state"]
    assert (state["epoch"], state["step_in_epoch"]) == (1, 2)
    probe_metrics = (run_dir / "linear_probe" / "metrics.json").read_bytes()

    # 3. Resume to the end, with the command the stop message printed: the finished linear
    # probe is not redone.
    monkeypatch.setattr(resnet18, "classification_loss", ORIGINAL_LOSS)
    code, stdout, stderr = run_main(["--resume", str(run_dir)])
    assert code == 0, stderr
    assert "partial_unfreeze: resumed" in stdout and "in epoch 2 at step 2" in stdout
    assert "linear_probe: already finished" in stdout
    assert (run_dir / "linear_probe" / "metrics.json").read_bytes() == probe_metrics
    for regime in resnet18.REGIMES:
        got, want = read_metrics(run_dir, regime), read_metrics(reference, regime)
        assert {k: v for k, v in got.items() if k not in TIMING_KEYS} == {
            k: v for k, v in want.items() if k not in TIMING_KEYS | {"frozen_output_cached"}
        } | {"frozen_output_cached": [True, True]}  # started, then resumed
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


def test_a_resume_records_what_it_did(reference_run, emnist, tmp_path, monkeypatch, no_plots):
    """Made with the frozen output cached, resumed with --cache-frozen off: metrics.json says
    what each invocation did, and the model is the same up to the rounding of another batching."""
    run_dir = stopped_run(emnist, tmp_path, monkeypatch, 3)
    code, stdout, stderr = run_main(["--resume", str(run_dir), "--cache-frozen", "off"])
    assert code == 0, stderr
    assert "output not cached (--cache-frozen off)" in stdout
    got = read_metrics(run_dir, "linear_probe")
    assert got["frozen_output_cached"] == [True, False]
    want = read_metrics(reference_run["dir"], "linear_probe")
    assert got["test_loss"] == pytest.approx(want["test_loss"], rel=0.02)


def test_a_finished_run_is_never_reopened(reference_run):
    before = (reference_run["dir"] / "metrics.json").read_bytes()
    code, _, stderr = run_main([*BASE_ARGS, "--resume", str(reference_run["dir"])])
    assert code == 2 and "is finished" in stderr and stderr.count("\n") == 1
    assert (reference_run["dir"] / "metrics.json").read_bytes() == before


def test_ctrl_c_checkpoints_and_exits_130_a_second_aborts(emnist, tmp_path, monkeypatch):
    argv = data_args(emnist, tmp_path, "--regime", "linear_probe")
    stop_at_step(monkeypatch, 4, signal.SIGINT)
    code, stdout, stderr = run_main(argv)
    assert code == run_management.INTERRUPTED_EXIT_CODE and "Traceback" not in stderr
    assert "stopped by SIGINT during linear_probe" in stdout
    run_dir = stopped_folder(stdout)
    assert load_checkpoint(run_dir / "linear_probe" / "last.pt")["state"]["step_in_epoch"] == 4
    stop_at_step(monkeypatch, 2, signal.SIGINT, times=2)
    code, stdout, stderr = run_main([*argv, "--resume", str(run_dir)])
    assert code == run_management.INTERRUPTED_EXIT_CODE
    assert stderr.startswith("error: interrupted again") and stderr.count("\n") == 1


def test_a_second_sigterm_keeps_exit_code_75(emnist, tmp_path, monkeypatch):
    stop_at_step(monkeypatch, 2, signal.SIGTERM, times=2)
    code, stdout, _ = run_main(data_args(emnist, tmp_path, "--regime", "linear_probe"))
    assert code == run_management.RESUMABLE_EXIT_CODE
    stopped_folder(stdout)


def test_a_missing_best_checkpoint_is_refused_on_resume(emnist, tmp_path, monkeypatch):
    steps = math.ceil(TRAIN_IMAGES / 32)
    run_dir = stopped_run(emnist, tmp_path, monkeypatch, steps + 2)  # epoch 2
    (run_dir / "linear_probe" / "best.pt").unlink()
    code, _, stderr = run_main(["--resume", str(run_dir)])
    assert code == 2 and stderr.count("\n") == 1
    assert "best.pt is missing: it alone holds the best epoch's weights" in stderr


def test_a_resume_on_other_data_is_refused(emnist, tmp_path, monkeypatch):
    run_dir = stopped_run(emnist, tmp_path / "runs", monkeypatch)
    other = tmp_path / "other"
    raw = other / "EMNIST" / "raw"
    raw.mkdir(parents=True)
    for path in emnist["raw"].iterdir():
        (raw / path.name).write_bytes(path.read_bytes())
    labels = raw / "emnist-byclass-train-labels-idx1-ubyte"
    payload = bytearray(labels.read_bytes())
    payload[-1] = (payload[-1] + 1) % 62
    labels.write_bytes(bytes(payload))
    code, _, stderr = run_main(["--resume", str(run_dir), "--data-dir", str(other)])
    assert code == 2 and stderr.count("\n") == 1
    assert "differ from what this run was trained on" in stderr
    assert "emnist-byclass-train-labels-idx1-ubyte" in stderr


def test_a_moved_data_folder_is_accepted_on_resume(emnist, tmp_path, monkeypatch, no_plots):
    """--data-dir says where the data is, not what the run computes: a resume may name another
    folder holding the same files."""
    run_dir = stopped_run(emnist, tmp_path / "runs", monkeypatch)
    moved = tmp_path / "moved"
    (moved / "EMNIST").mkdir(parents=True)
    os.symlink(emnist["raw"], moved / "EMNIST" / "raw")
    code, stdout, stderr = run_main(["--resume", str(run_dir), "--data-dir", str(moved)])
    assert code == 0, stderr
    assert results_folder(stdout) == run_dir
    recorded = json.loads((run_dir / "config.json").read_text())["args"]["data_dir"]
    assert recorded == str(emnist["dir"].resolve())  # config.json is never rewritten


def test_a_resume_on_another_backbone_file_is_refused(emnist, tmp_path, monkeypatch):
    run_dir = stopped_run(emnist, tmp_path / "runs", monkeypatch)
    other_home = tmp_path / "other_torch_home"
    write_standin_weights(other_home, seed=99)
    monkeypatch.setenv("TORCH_HOME", str(other_home))
    code, _, stderr = run_main(["--resume", str(run_dir)])
    assert code == 2 and stderr.count("\n") == 1
    assert "was trained on the backbone" in stderr and "put that weights file back" in stderr


def test_an_explicit_option_equal_to_its_default_is_a_contradiction(emnist, tmp_path, monkeypatch):
    run_dir = stopped_run(emnist, tmp_path, monkeypatch)
    code, _, stderr = run_main(["--resume", str(run_dir), "--batch-size", "512"])
    assert code == 2 and "--batch-size 512 contradicts the run being resumed" in stderr
    assert "made with --batch-size 32" in stderr
    code, _, stderr = run_main(["--resume", str(run_dir), "--weight-decay", "0"])
    assert code == 2 and "made with no --weight-decay (its default)" in stderr


def test_a_checkpoint_that_does_not_fit_is_named(emnist, tmp_path, monkeypatch):
    run_dir = stopped_run(emnist, tmp_path, monkeypatch)
    last = run_dir / "linear_probe" / "last.pt"
    checkpoint = load_checkpoint(last)
    cases = {
        "no optimizer": ({k: v for k, v in checkpoint.items() if k != "optimizer"}, "it has no"),
        "wrong shape": (
            {**checkpoint, "model": {**checkpoint["model"], "fc.weight": torch.zeros(10, 512)}},
            "size mismatch",
        ),
        "other script": ({"model": {}, "optimizer": {}, "epoch": 1}, "not a checkpoint of"),
        "damaged": (b"PK\x03\x04 half a zip", "it is damaged"),
    }
    for name, (content, message) in cases.items():
        if isinstance(content, bytes):
            last.write_bytes(content)
        else:
            torch.save(content, last)
        code, _, stderr = run_main(["--resume", str(run_dir)])
        assert code == 2 and stderr.count("\n") == 1, (name, stderr)
        assert str(last) in stderr and message in stderr, (name, stderr)


def test_history_is_rewritten_from_the_checkpoint_before_metrics(emnist, tmp_path, no_plots):
    """A kill between last.pt and history.csv (simulated: the file cut back a row, metrics
    not yet written): the resumed run's history.csv holds every epoch of metrics.json."""
    argv = data_args(emnist, tmp_path, "--regime", "linear_probe")
    code, stdout, stderr = run_main(argv)
    run_dir = results_folder(stdout)
    for name in ("metrics.json", "linear_probe/metrics.json"):
        (run_dir / name).unlink()
    history = run_dir / "linear_probe" / "history.csv"
    history.write_text("".join(history.read_text().splitlines(keepends=True)[:2]))
    (run_dir / "linear_probe" / ".last.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    code, stdout, stderr = run_main([*argv, "--resume", "auto"])
    assert code == 0, stderr
    assert results_folder(stdout) == run_dir and "(1 temporary files removed)" in stdout
    rows = read_csv_rows(history)
    assert len(rows) == read_metrics(run_dir, "linear_probe")["epochs_run"] == 2
    assert not list(run_dir.rglob("*.tmp"))


def test_a_new_run_cleans_what_killed_unstarted_runs_left(emnist, tmp_path, no_plots):
    unstarted = tmp_path / "resnet_20250101-000000"
    (unstarted / "linear_probe").mkdir(parents=True)
    (unstarted / "config.json").write_text(json.dumps({"script": "resnet18.py", "args": {}}))
    half = unstarted / "linear_probe" / ".last.pt.123.tmp"
    half.write_bytes(b"half a first checkpoint")
    argv = data_args(emnist, tmp_path, "--regime", "linear_probe", "--epochs", "1")
    code, stdout, stderr = run_main([*argv, "--limit-train", "80"])
    assert code == 0, stderr
    assert not half.exists() and "removed 1 temporary files" in stdout


def test_signal_during_the_data_load_stops_after_the_first_step(emnist, tmp_path, monkeypatch):
    original = resnet18.prepare_data

    def prepare_then_signal(args):
        os.kill(os.getpid(), signal.SIGUSR1)
        return original(args)

    monkeypatch.setattr(resnet18, "prepare_data", prepare_then_signal)
    code, stdout, _ = run_main(data_args(emnist, tmp_path))
    assert code == run_management.RESUMABLE_EXIT_CODE
    assert "stopped by SIGUSR1 during linear_probe in epoch 1 (step 1)" in stdout
    assert run_management.run_state(resnet18.RUN, stopped_folder(stdout)) == "resumable"


def test_nan_loss_exits_3_and_keeps_the_last_good_checkpoint(emnist, tmp_path, monkeypatch):
    steps = math.ceil(TRAIN_IMAGES / 32)
    calls = {"count": 0}

    def loss_turning_nan(logits, labels):
        calls["count"] += 1
        loss = ORIGINAL_LOSS(logits, labels)
        return loss * float("nan") if calls["count"] > steps + 1 else loss

    monkeypatch.setattr(resnet18, "classification_loss", loss_turning_nan)
    code, stdout, stderr = run_main(data_args(emnist, tmp_path, "--regime", "linear_probe"))
    assert code == run_management.DIVERGED_EXIT_CODE
    assert "NaN/inf" in stderr and "Traceback" not in stderr and "in epoch 2" in stderr
    run_dir = next(tmp_path.glob("resnet_*"))
    assert f"the last good checkpoint is {run_dir / 'linear_probe' / 'last.pt'}" in stderr
    checkpoint = load_checkpoint(run_dir / "linear_probe" / "last.pt")
    assert checkpoint["state"]["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in checkpoint["model"].values())
    assert not (run_dir / "linear_probe" / "metrics.json").exists()


def test_a_learning_rate_that_explodes_the_loss_exits_3(emnist, tmp_path):
    argv = data_args(emnist, tmp_path, "--regime", "linear_probe", "--lr", "1e6")
    code, stdout, stderr = run_main(argv)
    assert code == run_management.DIVERGED_EXIT_CODE and stderr.count("\n") == 1
    assert "diverged" in stderr and "no checkpoint was written" in stderr
    # The folder it leaves has no checkpoint: --resume auto starts a new run instead.
    assert run_management.find_resume_run(resnet18.RUN, "auto", tmp_path) is None


# --------------------------------------------------------------------------------------------
# --dry-run and --prefetch
# --------------------------------------------------------------------------------------------


def test_dry_run_makes_every_output_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    argv = ["--dry-run", "--img-size", "32", "--device", "cpu", "--output-dir", str(tmp_path)]
    code, stdout, stderr = run_main([*argv, "--data-dir", str(tmp_path / "no_data")])
    assert code == 0, stderr
    run_dir = results_folder(stdout)
    assert run_dir.name.startswith("resnet-dryrun_")
    config = json.loads((run_dir / "config.json").read_text())
    assert config["dry_run"] is True and config["data_files"] is None
    assert config["backbone"]["weights"] == "none"
    assert config["data"] == {"train": 335, "test": 124, "val": 37}
    for name in RUN_FILES:
        assert (run_dir / name).stat().st_size > 0, name
    for regime in resnet18.REGIMES:
        for name in REGIME_FILES:
            assert (run_dir / regime / name).stat().st_size > 0, (regime, name)
        assert read_metrics(run_dir, regime)["epochs_run"] == resnet18.DRY_RUN_EPOCHS
    assert not (tmp_path / "no_data").exists() and not (tmp_path / "empty_torch_home").exists()
    code, _, stderr = run_main(["--summarize", str(run_dir), "--output-dir", str(tmp_path)])
    assert code == 2 and "is a --dry-run" in stderr


def test_prefetch_offline_changes_nothing_and_names_every_missing_file(tmp_path, monkeypatch):
    import torchvision.datasets.utils

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", offline)
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    code, stdout, stderr = run_main(["--prefetch", "--data-dir", str(tmp_path / "data")])
    assert code == 2 and stderr.startswith("error: ") and stderr.count("\n") == 1
    assert resnet18.EMNIST_URL in stderr and resnet18.IMAGENET_URL in stderr
    assert "URLError" in stderr and "resnet18-f37072fd.pth" in stderr
    assert all(name in stderr for name in resnet18.emnist_files())
    assert sorted(tmp_path.iterdir()) == []  # no data folder, no torch home, no lock file
    code, _, stderr = run_main(["--prefetch", "--no-download", "--data-dir", str(tmp_path)])
    assert code == 2 and all(name in stderr for name in resnet18.emnist_files())


def test_prefetch_verifies_what_is_there(emnist, standin_weights, monkeypatch):
    # The stand-in is not ImageNet's file: its hash does not match its name.
    code, stdout, stderr = run_main(["--prefetch", "--data-dir", str(emnist["dir"])])
    assert code == 2 and "not f37072fd as its name says" in stderr
    assert f"prefetch: EMNIST ByClass in {emnist['raw']}" in stdout
    # Named after its own hash, it passes.
    import hashlib

    digest = hashlib.sha256(standin_weights["path"].read_bytes()).hexdigest()[:8]
    renamed = standin_weights["path"].with_name(f"resnet18-{digest}.pth")
    renamed.write_bytes(standin_weights["path"].read_bytes())
    monkeypatch.setattr(resnet18, "IMAGENET_URL", f"https://example.org/{renamed.name}")
    code, stdout, stderr = run_main(["--prefetch", "--data-dir", str(emnist["dir"])])
    assert code == 0, stderr
    assert f"prefetch: ImageNet weights {renamed} (sha256 {digest}...)" in stdout
    renamed.unlink()


# --------------------------------------------------------------------------------------------
# Errors the user can fix: a clear message and exit code 2, never a traceback
# --------------------------------------------------------------------------------------------


def test_missing_data_names_every_file_and_a_failed_download_leaves_nothing(tmp_path, monkeypatch):
    code, _, stderr = run_main([*BASE_ARGS, "--data-dir", str(tmp_path / "empty")])
    assert code == 2 and stderr.startswith("error: ") and "--prefetch" in stderr
    assert all(name in stderr for name in resnet18.emnist_files())
    import torchvision.datasets.utils

    def half_then_offline(url, download_root, **kwargs):
        (Path(download_root) / "gzip.zip").write_bytes(b"the first bytes")
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(
        torchvision.datasets.utils, "download_and_extract_archive", half_then_offline
    )
    argv = [a for a in BASE_ARGS if a != "--no-download"]
    (tmp_path / "shared").mkdir()
    code, _, stderr = run_main([*argv, "--data-dir", str(tmp_path / "shared" / "data")])
    assert code == 2 and "downloading them from" in stderr and "URLError" in stderr
    assert "EMNIST/raw" in stderr and stderr.count("\n") == 1
    assert list((tmp_path / "shared").iterdir()) == []  # no EMNIST/raw/, no lock, no zip
    assert not list(tmp_path.glob("resnet_*"))


def test_gzip_only_data_is_named_as_such(emnist, tmp_path):
    raw = tmp_path / "EMNIST" / "raw"
    raw.mkdir(parents=True)
    for path in emnist["raw"].iterdir():
        (raw / f"{path.name}.gz").write_bytes(b"compressed")
    code, _, stderr = run_main([*BASE_ARGS, "--data-dir", str(tmp_path)])
    assert code == 2 and "only gzip-compressed copies" in stderr and "gunzip -k" in stderr


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
    argv = data_args(emnist, tmp_path / "out")
    code, _, stderr = run_main(argv)
    expected_path = str(
        tmp_path / "empty_torch_home" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    )
    assert code == 2 and expected_path in stderr and "--prefetch" in stderr

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    code, _, stderr = run_main([a for a in argv if a != "--no-download"])
    assert code == 2 and "URLError" in stderr and expected_path in stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "empty_torch_home").exists()


@pytest.mark.parametrize("weights", ["garbage", "resnet50"])
def test_bad_weights_file_is_one_line_and_leaves_no_run_folder(emnist, tmp_path, weights):
    from torchvision.models import resnet50

    bad = tmp_path / "weights.pt"
    if weights == "garbage":
        bad.write_bytes(b"not a checkpoint")
    else:
        torch.save(resnet50().state_dict(), bad)
    argv = data_args(emnist, tmp_path / "out", "--weights", str(bad), "--regime", "linear_probe")
    code, _, stderr = run_main(argv)
    assert code == 2 and stderr.startswith("error: ") and stderr.count("\n") == 1
    if weights == "garbage":
        assert "is not a file torch.load can read" in stderr and "weights_only" not in stderr
    else:  # one line with the counts, not the 24 lines of load_state_dict's report
        assert "is not a ResNet-18 state dict" in stderr and "of ResNet-18's 120" in stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--img-size", "16"], "--img-size"),
        (["--epochs", "0"], "--epochs"),
        (["--batch-size", "-3"], "--batch-size"),
        (["--lr", "-1"], "--lr"),
        (["--lr", "nan"], "--lr"),
        (["--weight-decay", "inf"], "--weight-decay"),
        (["--weight-decay", "-1e-9"], "--weight-decay=-1e-9"),
        (["--val-fraction", "1.5"], "--val-fraction"),
        (["--patience", "0"], "--patience"),
        (["--limit-train", "0"], "--limit-train"),
        (["--seed", str(2**64)], "--seed"),
        (["--epochs", str(10**30)], "--epochs"),
        (["--warmup-epochs", "3"], "--warmup-epochs"),
        (["--weights", "/no/such/weights.pt"], "--weights"),
        (["--limit-train", "4"], "--val-fraction"),
        (["--resume", "/no/such/run"], "--resume"),
        (["--compile", "fast"], "--compile"),
        (["--resu", "auto"], "--resu"),
        (["--dist-timeout", "1e30"], "--dist-timeout"),
        (["--dry-run", "--resume", "auto"], "--dry-run"),
    ],
)
def test_bad_arguments_are_clear_errors(emnist, tmp_path, extra, message):
    code, _, stderr = run_main(data_args(emnist, tmp_path, *extra))
    assert code == 2 and stderr.startswith("error: ") and message in stderr
    assert stderr.count("\n") == 1 and not list(tmp_path.glob("resnet_*"))


def test_help_states_each_default_once():
    raw = resnet18.get_args_parser().format_help()
    options = [" ".join(chunk.split()) for chunk in re.split(r"\n(?=  -)", raw)[1:]]
    text = " ".join(options)
    assert len(options) == 28 and "(default: None)" not in text
    for option in options:
        assert option.lower().count("default") <= 1, option
    assert "(default: $DATA_DIR, else ./data)" in text
    for regime, defaults in resnet18.REGIME_DEFAULTS.items():
        assert f"{defaults['epochs']} {regime}" in text
    assert "(default: 512)" in text and "(default: 96)" in text and "(default: off)" in text


def test_resume_of_a_cnn_run_folder_is_refused(tmp_path):
    folder = tmp_path / "cnn_20250101-000000"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"script": "cnn_from_scratch.py", "args": {}}))
    (folder / "last.pt").write_bytes(b"x")
    code, _, stderr = run_main([*BASE_ARGS, "--resume", str(folder)])
    assert code == 2 and "not made by resnet18.py" in stderr
    assert not list(folder.glob("linear_probe*"))


def test_resume_auto_only_picks_this_slurm_jobs_runs(tmp_path, monkeypatch):
    folders = {}
    for name in ("20250101-000000_12", "20250101-000000_12-2", "20250101-000001_123"):
        folder = folders[name] = tmp_path / f"resnet_{name}"
        (folder / "linear_probe").mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps({"script": "resnet18.py", "args": {}}))
        (folder / "linear_probe" / "last.pt").write_bytes(b"x")
    find = run_management.find_resume_run
    monkeypatch.setenv("SLURM_JOB_ID", "12")
    assert find(resnet18.RUN, "auto", tmp_path) == folders["20250101-000000_12-2"]
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    assert find(resnet18.RUN, "auto", tmp_path) is None
    monkeypatch.delenv("SLURM_JOB_ID")
    assert find(resnet18.RUN, "auto", tmp_path) == folders["20250101-000001_123"]


def test_summarize_seeds(emnist, tmp_path, no_plots):
    """One tiny run, and a copy of it relabelled as seed 1 with another accuracy (what makes
    the summary is run_management's, tested there; this checks resnet18.py's side of it)."""
    import shutil

    argv = data_args(emnist, tmp_path, "--regime", "linear_probe", "--epochs", "1")
    code, stdout, stderr = run_main([*argv, "--limit-train", "100"])
    assert code == 0, stderr
    first = results_folder(stdout)
    second = first.with_name(first.name + "-2")
    shutil.copytree(first, second)
    config = json.loads((second / "config.json").read_text())
    config["args"]["seed"] = 1
    (second / "config.json").write_text(json.dumps(config))
    metrics = json.loads((second / "metrics.json").read_text())
    metrics["linear_probe"]["test_accuracy"] = 0.5
    (second / "metrics.json").write_text(json.dumps(metrics))
    code, stdout, stderr = run_main(
        ["--summarize", str(first), str(second), "--output-dir", str(tmp_path)]
    )
    assert code == 0, stderr
    folder = Path(stdout.strip().splitlines()[-1].removeprefix("summary: "))
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["seeds"] == [0, 1]
    accuracy = summary["metrics"]["linear_probe.test_accuracy"]
    assert accuracy["n"] == 2 and accuracy["max"] >= 0.5


def test_importing_runs_nothing():
    result = subprocess.run(
        [sys.executable, "-c", "import resnet18"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and result.stdout == "" and result.stderr == ""


# --------------------------------------------------------------------------------------------
# Subprocesses: real signals, a real file-size limit
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_sigterm_checkpoints_and_exits_resumable(emnist, tmp_path, standin_weights):
    command = [sys.executable, str(REPO / "resnet18.py"), *data_args(emnist, tmp_path)]
    command += ["--regime", "partial_unfreeze", "--epochs", "200", "--patience", "200"]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(standin_weights),
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
    assert process.returncode == run_management.RESUMABLE_EXIT_CODE, stderr
    assert "stopped by SIGTERM" in stdout
    run_dir = stopped_folder(stdout)
    checkpoint = load_checkpoint(run_dir / "partial_unfreeze" / "last.pt")
    assert 1 <= checkpoint["state"]["epoch"] < 200
    assert not (run_dir / "partial_unfreeze" / "metrics.json").exists()
    assert not list(run_dir.rglob("*.tmp"))


def signal_mask(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigBlk:"):
            return int(line.split()[1], 16)
    return 0


@pytest.mark.slow
def test_a_signal_during_startup_is_held_then_stops_after_the_first_step(
    emnist, tmp_path, standin_weights
):
    """SIGTERM while torch still imports: held until StopSignal takes it, then handled as
    always (one step, a checkpoint, exit 75), not a death by signal (143)."""
    command = [sys.executable, str(REPO / "resnet18.py"), *data_args(emnist, tmp_path)]
    process = subprocess.Popen(
        [*command, "--regime", "linear_probe"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(standin_weights),
    )
    try:
        deadline = time.monotonic() + 60
        while not signal_mask(process.pid) & (1 << (signal.SIGTERM - 1)):
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.005)
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == run_management.RESUMABLE_EXIT_CODE, stderr
    assert "stopped by SIGTERM during linear_probe in epoch 1 (step 1)" in stdout
    run_dir = stopped_folder(stdout)
    assert load_checkpoint(run_dir / "linear_probe" / "last.pt")["state"]["step_in_epoch"] == 1


@pytest.mark.slow
def test_a_failed_write_is_one_line_and_exit_1(emnist, tmp_path, standin_weights):
    """A file-size limit (as a full disk would) while writing the first checkpoint."""

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20 * 2**20, 20 * 2**20))

    command = [sys.executable, str(REPO / "resnet18.py"), *data_args(emnist, tmp_path)]
    result = subprocess.run(
        [*command, "--regime", "partial_unfreeze", "--epochs", "1"],
        capture_output=True,
        text=True,
        env=subprocess_env(standin_weights),
        preexec_fn=limit_file_size,
        timeout=300,
    )
    assert result.returncode == run_management.FAILURE_EXIT_CODE, result.stderr
    assert result.stderr.startswith("error: cannot write ") and result.stderr.count("\n") == 1
    assert ".pt: File too large; nothing to resume yet" in result.stderr
