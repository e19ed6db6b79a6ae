"""The from-scratch CNN's fast and reference layers vs the same network in torch.nn + autograd.

All three get the same architecture, initial weights, data (real MNIST, uint8 on the device,
normalised per batch), batch size, SGD (Nesterov momentum, weight decay) and learning rate
schedule. Throughput is measured in one process, interleaved (the order rotates every repeat),
after a warmup repeat; each ratio to torch.nn is the median over the repeats of the ratio
within a repeat, so a busy moment of a shared machine slows both sides of it. Then each
trains for --epochs epochs and is evaluated on the test set.

    python bench/cnn_vs_autograd.py --data-dir ../shared/data
    python bench/cnn_vs_autograd.py --data-dir ../shared/data --epochs 0 --per-layer

It prints each side's time per step over the repeats (min, median, max), with --per-layer
the median time of each method of the fast network's layers, and last the throughput ratio
fast / torch.nn.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cnn_from_scratch as scratch  # noqa: E402

KINDS = ("fast", "reference", "torch.nn")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--batch-size", type=int, default=640)
    parser.add_argument("--steps", type=int, default=10, help="training steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=11, help="interleaved timed repeats")
    parser.add_argument(
        "--epochs", type=int, default=5, help="epochs for the accuracy run (0: skip)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--per-layer",
        action="store_true",
        help="also time each method of the fast network's layers (median per step)",
    )
    return parser


def torch_nn_twin(model: scratch.CNN) -> nn.Sequential:
    """The network a user would write with torch.nn, holding the same weights (same device
    and dtype). tests/test_cnn_layers.py checks it against the from-scratch model."""
    twin = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(784, 10),
    )
    reference = model.layers[0].params["weight"]
    twin.to(device=reference.device, dtype=reference.dtype)
    with torch.no_grad():
        for index, layer in model.trainable_layers():
            twin[index].weight.copy_(layer.params["weight"])
            twin[index].bias.copy_(layer.params["bias"])
    return twin


class Trainer:
    """One training step and test evaluation for any of KINDS, the script's default schedule."""

    def __init__(self, kind: str, args, device: torch.device, steps_per_epoch: int):
        self.kind, self.args, self.device = kind, args, device
        layers = "fast" if kind == "torch.nn" else kind
        generator = torch.Generator().manual_seed(args.seed)
        self.model = scratch.CNN(layers=layers, device=device, generator=generator)
        defaults = scratch.get_args_parser().parse_args([])
        self.total_steps = steps_per_epoch * max(1, args.epochs)
        self.warmup_steps = max(1, round(defaults.warmup_epochs * steps_per_epoch))
        self.step_count, self.peak_lr = 0, defaults.lr
        hyper = {
            "lr": defaults.lr,
            "momentum": defaults.momentum,
            "weight_decay": defaults.weight_decay,
        }
        if kind == "torch.nn":
            self.model = torch_nn_twin(self.model)
            self.optimizer = torch.optim.SGD(self.model.parameters(), nesterov=True, **hyper)
        else:
            self.optimizer = scratch.SGD(self.model, **hyper)
            self.loss_fn = scratch.SoftmaxCrossEntropy()

    def step(self, x_uint8: torch.Tensor, y: torch.Tensor) -> None:
        lr = scratch.learning_rate(
            self.step_count, self.total_steps, self.peak_lr, self.warmup_steps
        )
        self.step_count += 1
        x = scratch.preprocess(x_uint8)
        if self.kind == "torch.nn":
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(self.model(x), y).backward()
            self.optimizer.step()
            return
        with torch.no_grad():
            self.optimizer.lr = lr
            self.loss_fn.forward(self.model.forward(x), y)
            self.model.backward(self.loss_fn.backward())
            self.optimizer.step()

    @torch.no_grad()
    def test_accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        if self.kind != "torch.nn":
            return scratch.evaluate(self.model, images, labels)["accuracy"]
        correct = 0
        for start in range(0, len(images), 2000):
            logits = self.model(scratch.preprocess(images[start : start + 2000]))
            correct += int((logits.argmax(1) == labels[start : start + 2000]).sum())
        return correct / len(images)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Timed:
    """A layer method that records how long each call took (milliseconds)."""

    def __init__(self, function, times: list[float], device: torch.device):
        self.function, self.times, self.device = function, times, device

    def __call__(self, *args, **kwargs):
        synchronize(self.device)
        started = time.perf_counter()
        result = self.function(*args, **kwargs)
        synchronize(self.device)
        self.times.append(1000 * (time.perf_counter() - started))
        return result


METHODS = ("forward", "backward", "relu_mask", "weight_grad_through_pool")


def layer_times(trainer: Trainer, batches, train_x, train_y, device) -> dict[str, float]:
    """Median milliseconds per step of each method of the fast network's layers that a step
    calls, and of the whole step."""
    times: dict[str, list[float]] = {}
    for index, layer in enumerate(trainer.model.layers):
        for method in [m for m in METHODS if hasattr(layer, m)]:
            name = f"{index} {type(layer).__name__}.{method}"
            setattr(
                layer, method, Timed(getattr(layer, method), times.setdefault(name, []), device)
            )
    step = Timed(trainer.step, times.setdefault("whole step", []), device)
    for index in batches:
        step(train_x[index], train_y[index])
    warmup = min(5, len(batches) // 2)  # the first steps allocate and warm the caches
    return {name: statistics.median(v[warmup:]) for name, v in times.items() if v[warmup:]}


def throughput(args, trainers: dict, batches, train_x, train_y, device) -> dict[str, list]:
    """Seconds of each repeat of `steps` steps, per kind, interleaved in rotating order."""
    seconds = {kind: [] for kind in trainers}
    for repeat in range(args.repeats + 1):  # repeat 0 is warmup
        shift = repeat % len(trainers)
        for kind in [*trainers][shift:] + [*trainers][:shift]:
            synchronize(device)
            started = time.perf_counter()
            for step in range(args.steps):
                index = batches[(repeat * args.steps + step) % len(batches)]
                trainers[kind].step(train_x[index], train_y[index])
            synchronize(device)
            if repeat:
                seconds[kind].append(time.perf_counter() - started)
    return seconds


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    device = scratch.select_device(args.device)
    train_x, train_y = scratch.load_mnist(args.data_dir, train=True, download=False)
    test_x, test_y = scratch.load_mnist(args.data_dir, train=False, download=False)
    train_x, train_y = train_x.to(device), train_y.to(device)
    test_x, test_y = test_x.to(device), test_y.to(device)
    steps_per_epoch = math.ceil(len(train_x) / args.batch_size)
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print(
        f"device {device} ({machine or platform.machine()}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} CPU threads, batch {args.batch_size}",
        flush=True,
    )
    trainers = {kind: Trainer(kind, args, device, steps_per_epoch) for kind in KINDS}
    generator = torch.Generator().manual_seed(args.seed)
    batches = list(
        torch.randperm(len(train_x), generator=generator).to(device).split(args.batch_size)
    )
    batches = [b for b in batches if len(b) == args.batch_size]
    seconds = throughput(args, trainers, batches, train_x, train_y, device)
    for kind, times in seconds.items():
        per_step = sorted(1000 * t / args.steps for t in times)
        print(
            f"{kind}: ms per step over the {len(times)} repeats: min {per_step[0]:.1f}, "
            f"median {statistics.median(per_step):.1f}, max {per_step[-1]:.1f}",
            flush=True,
        )
    images = args.steps * args.batch_size
    rate = {kind: images / statistics.median(times) for kind, times in seconds.items()}
    ratio = {
        kind: statistics.median(t / s for s, t in zip(times, seconds["torch.nn"]))
        for kind, times in seconds.items()
    }
    if args.per_layer:
        trainer = Trainer("fast", args, device, steps_per_epoch)
        count = args.steps * args.repeats
        medians = layer_times(trainer, batches[:count], train_x, train_y, device)
        print(f"fast step by layer, median of {count} steps (ms):")
        for name, milliseconds in medians.items():
            print(f"  {name:<46}{milliseconds:7.2f}", flush=True)
    accuracy = {}
    for kind in KINDS if args.epochs else ():
        trainer = Trainer(kind, args, device, steps_per_epoch)
        for epoch in range(args.epochs):
            shuffle = torch.Generator().manual_seed(args.seed * 1000 + epoch + 1)
            order = torch.randperm(len(train_x), generator=shuffle).to(device)
            for index in order.split(args.batch_size):
                trainer.step(train_x[index], train_y[index])
        accuracy[kind] = trainer.test_accuracy(test_x, test_y)
    print(f"{'implementation':<16}{'train images/s':>16}{'vs torch.nn':>13}{'test accuracy':>15}")
    for kind in KINDS:
        shown = f"{100 * accuracy[kind]:.2f}%" if kind in accuracy else "-"
        print(f"{kind:<16}{rate[kind]:>16,.0f}{ratio[kind]:>12.2f}x{shown:>15}")
    print(f"throughput ratio fast / torch.nn: {ratio['fast']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
