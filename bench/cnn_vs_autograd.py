"""From-scratch CNN vs the same network in torch.nn + autograd: training throughput and accuracy.

Both networks get the same architecture, initial weights, data (real MNIST, uint8 on the
device, normalised per batch), batch size, SGD (Nesterov momentum, weight decay) and learning
rate schedule. Throughput is measured in one process, interleaved (the order alternates every
repeat), after a warmup, as the median of the repeats; then each trains for --epochs epochs
and is evaluated on the test set.

    python bench/cnn_vs_autograd.py --data-dir ../shared/data
    python bench/cnn_vs_autograd.py --data-dir ../shared/data --device cuda
    python bench/cnn_vs_autograd.py --data-dir ../shared/data --epochs 0 --layers

It also prints each side's time per step over the repeats (min, median, max) and, with
--layers, the median time of each from-scratch layer's forward and backward.

The last line printed is the throughput ratio, from-scratch / torch.nn.
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


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--batch-size", type=int, default=640)
    parser.add_argument("--steps", type=int, default=10, help="training steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved timed repeats")
    parser.add_argument(
        "--epochs", type=int, default=5, help="epochs for the accuracy run (0: skip)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--layers",
        action="store_true",
        help="also time each from-scratch layer's forward and backward (median per step)",
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
    """One training step and test evaluation for either implementation, same schedule."""

    def __init__(self, kind: str, args, device: torch.device, steps_per_epoch: int):
        self.kind, self.args, self.device = kind, args, device
        self.model = scratch.CNN(device=device, generator=torch.Generator().manual_seed(args.seed))
        # The script's own defaults (the reported run): learning rate, momentum, weight decay,
        # warmup, then cosine decay over --epochs.
        defaults = scratch.get_args_parser().parse_args([])
        self.total_steps = steps_per_epoch * max(1, args.epochs)
        self.warmup_steps = max(1, round(defaults.warmup_epochs * steps_per_epoch))
        self.step_count = 0
        self.peak_lr = defaults.lr
        hyper = {
            "lr": defaults.lr,
            "momentum": defaults.momentum,
            "weight_decay": defaults.weight_decay,
        }
        if kind == "scratch":
            self.optimizer = scratch.SGD(self.model, **hyper)
            self.loss_fn = scratch.SoftmaxCrossEntropy()
        else:
            self.model = torch_nn_twin(self.model)
            self.optimizer = torch.optim.SGD(self.model.parameters(), nesterov=True, **hyper)

    def step(self, x_uint8: torch.Tensor, y: torch.Tensor) -> None:
        lr = scratch.learning_rate(
            self.step_count, self.total_steps, self.peak_lr, self.warmup_steps
        )
        self.step_count += 1
        x = scratch.preprocess(x_uint8)
        if self.kind == "scratch":
            with torch.no_grad():
                self.optimizer.lr = lr
                loss = self.loss_fn.forward(self.model.forward(x), y)
                self.model.backward(self.loss_fn.backward())
                self.optimizer.step()
        else:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(self.model(x), y)
            loss.backward()
            self.optimizer.step()
        return loss

    @torch.no_grad()
    def test_accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        if self.kind == "scratch":
            return scratch.evaluate(self.model, images, labels)["accuracy"]
        correct = 0
        for start in range(0, len(images), 2000):
            logits = self.model(scratch.preprocess(images[start : start + 2000]))
            correct += int((logits.argmax(1) == labels[start : start + 2000]).sum())
        return correct / len(images)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def layer_times(trainer: Trainer, batches, train_x, train_y, device) -> dict[str, float]:
    """Median milliseconds per step of each from-scratch layer's forward and backward (and of
    the first convolution's weight gradient taken through its ReLU and max-pool), measured by
    wrapping the methods of the trainer's model, and of the whole step."""
    times: dict[str, list[float]] = {}

    def timed(name: str, function):
        def wrapper(*args, **kwargs):
            synchronize(device)
            started = time.perf_counter()
            result = function(*args, **kwargs)
            synchronize(device)
            times.setdefault(name, []).append(1000 * (time.perf_counter() - started))
            return result

        return wrapper

    model = trainer.model
    for index, layer in enumerate(model.layers):
        for method in ("forward", "backward"):
            name = f"{index} {type(layer).__name__} {method}"
            setattr(layer, method, timed(name, getattr(layer, method)))
    through_pool = scratch.conv_weight_grad_through_pool
    scratch.conv_weight_grad_through_pool = timed(
        "0-2 Conv2D weight gradient through ReLU + MaxPool2D", through_pool
    )
    step = timed("whole step", trainer.step)
    try:
        for index in batches:
            step(train_x[index], train_y[index])
    finally:
        scratch.conv_weight_grad_through_pool = through_pool
        for layer in model.layers:
            del layer.forward, layer.backward
    warmup = min(5, len(batches) // 2)  # the first steps allocate and warm the caches
    return {name: statistics.median(values[warmup:]) for name, values in times.items()}


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

    # Throughput: fresh trainers, interleaved timed repeats of `steps` steps each.
    trainers = {
        kind: Trainer(kind, args, device, steps_per_epoch) for kind in ("scratch", "torch.nn")
    }
    generator = torch.Generator().manual_seed(args.seed)
    batches = list(
        torch.randperm(len(train_x), generator=generator).to(device).split(args.batch_size)
    )
    batches = [b for b in batches if len(b) == args.batch_size]
    seconds = {kind: [] for kind in trainers}
    for repeat in range(args.repeats + 1):  # repeat 0 is warmup
        order = list(trainers) if repeat % 2 == 0 else list(reversed(trainers))
        for kind in order:
            synchronize(device)
            started = time.perf_counter()
            for step in range(args.steps):
                index = batches[(repeat * args.steps + step) % len(batches)]
                trainers[kind].step(train_x[index], train_y[index])
            synchronize(device)
            if repeat:
                seconds[kind].append(time.perf_counter() - started)
    images = args.steps * args.batch_size
    rate = {kind: images / statistics.median(times) for kind, times in seconds.items()}
    for kind, times in seconds.items():
        per_step = sorted(1000 * t / args.steps for t in times)
        print(
            f"{kind}: ms per step over the {len(times)} repeats: min {per_step[0]:.1f}, "
            f"median {statistics.median(per_step):.1f}, max {per_step[-1]:.1f}",
            flush=True,
        )

    if args.layers:
        trainer = Trainer("scratch", args, device, steps_per_epoch)
        count = args.steps * args.repeats
        medians = layer_times(trainer, batches[:count], train_x, train_y, device)
        print(f"from-scratch step by layer, median of {count} steps (ms):")
        for name, milliseconds in medians.items():
            print(f"  {name:<52}{milliseconds:7.2f}", flush=True)

    accuracy = {}
    if args.epochs:
        for kind in trainers:
            trainer = Trainer(kind, args, device, steps_per_epoch)
            for epoch in range(args.epochs):
                generator = torch.Generator().manual_seed(args.seed * 1000 + epoch + 1)
                for index in scratch.iterate_batches(
                    len(train_x), args.batch_size, generator, device
                ):
                    trainer.step(train_x[index], train_y[index])
            accuracy[kind] = trainer.test_accuracy(test_x, test_y)

    print(f"{'implementation':<16}{'train images/s':>16}{'test accuracy':>16}")
    for kind in trainers:
        shown = f"{100 * accuracy[kind]:.2f}%" if kind in accuracy else "-"
        print(f"{kind:<16}{rate[kind]:>16,.0f}{shown:>16}")
    print(f"throughput ratio from-scratch / torch.nn: {rate['scratch'] / rate['torch.nn']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
