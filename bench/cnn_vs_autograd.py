"""The from-scratch CNN's fast and reference layers vs the same network in torch.nn + autograd.

All three get the same architecture, initial weights, data (real MNIST, uint8 on the device,
normalised per batch), batch size, SGD (Nesterov momentum, weight decay) and learning rate
schedule. Throughput is measured in one process, interleaved (the order rotates every repeat),
after a warmup repeat; each ratio to torch.nn is the median over the repeats of the ratio
within a repeat, so a busy moment of a shared machine slows both sides of it. Then each
trains for --epochs epochs and is evaluated on the test set.

    python bench/cnn_vs_autograd.py --data-dir ../shared/data
    python bench/cnn_vs_autograd.py --data-dir ../shared/data --epochs 0

It prints the machine (CPU model, BLAS, threads), the fast second convolution's formulation
(chosen by the script's own timing unless --conv-kernels fixes it), each layer's forward and
backward time beside torch.nn's, each side's time per step over the repeats, and last the
throughput ratio fast / torch.nn.
"""

from __future__ import annotations

import argparse
import math
import platform
import re
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
    parser.add_argument(
        "--data-dir", default="../shared/data", help="folder of MNIST/raw/ (default: %(default)s)"
    )
    parser.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda", "mps"],
        help="(default: %(default)s)",
    )
    parser.add_argument("--batch-size", type=int, default=640, help="(default: %(default)s)")
    parser.add_argument(
        "--steps",
        type=int,
        default=10,
        help="training steps per timed repeat (default: %(default)s)",
    )
    parser.add_argument(
        "--repeats", type=int, default=11, help="interleaved timed repeats (default: %(default)s)"
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=5,
        help="epochs for the accuracy run, 0: skip it (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    parser.add_argument(
        "--conv-kernels",
        default="auto",
        choices=["auto", *scratch.CONV_KERNELS],
        help="the fast second convolution; auto: the script's own timing (default: %(default)s)",
    )
    return parser


def machine_lines(device: torch.device) -> list[str]:
    """The CPU model, the BLAS torch uses and the thread count (and the GPU, on one)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            names = [
                line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")
            ]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    config = torch.__config__.show()
    blas = re.search(r"BLAS_INFO=(\w+)", config)
    mkl = re.search(r"Math Kernel Library Version ([\w.]+)", config)
    capability = re.search(r"CPU capability usage: (\w+)", config)
    library = f"MKL {mkl[1]}" if mkl else "no MKL version shown"
    lines = [
        f"CPU: {cpu}, {capability[1] if capability else 'CPU capability not shown'}",
        f"BLAS: {blas[1] if blas else 'not shown'} ({library})",
        f"threads: {torch.get_num_threads()}, torch {torch.__version__}, device {device}",
    ]
    if device.type == "cuda":
        lines.append(f"GPU: {torch.cuda.get_device_name(device)}")
    return lines


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
        self.model = scratch.CNN(
            layers=layers, conv_kernels=args.conv_kernels, device=device, generator=generator
        )
        defaults = scratch.get_args_parser().parse_args([])
        self.total_steps = steps_per_epoch * max(1, args.epochs)
        warmup_epochs = scratch.default_warmup_epochs(max(1, args.epochs))
        self.warmup_steps = round(warmup_epochs * steps_per_epoch)
        self.step_count = 0
        self.peak_lr = defaults.lr
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


# The layer groups compared: the fast network applies each ReLU's backward on its pool's
# gradient (relu_mask), and the first convolution's weight gradient goes through its pool.
GROUPS = ("conv1", "relu1+pool1", "conv2", "relu2+pool2", "flatten+linear")
FAST_FORWARD = {"conv1": [0], "relu1+pool1": [1, 2], "conv2": [3], "relu2+pool2": [4, 5]}
FAST_FORWARD["flatten+linear"] = [6, 7]
FAST_BACKWARD = {
    "conv1": [(0, "weight_grad_through_pool")],
    "relu1+pool1": [(2, "relu_mask")],
    "conv2": [(3, "backward")],
    "relu2+pool2": [(5, "relu_mask"), (5, "backward")],
    "flatten+linear": [(6, "backward"), (7, "backward")],
}


def timed(function, times: list[float], device: torch.device):
    """function, recording how long each call took (milliseconds) into times."""

    def call(*args, **kwargs):
        synchronize(device)
        started = time.perf_counter()
        result = function(*args, **kwargs)
        synchronize(device)
        times.append(1000 * (time.perf_counter() - started))
        return result

    return call


def time_fast_layers(model: scratch.CNN, device: torch.device) -> dict:
    """Wrap each layer method that a fast step calls with a timer: {(index, method): [ms]}."""
    methods = [(index, "forward") for index in range(len(model.layers))]
    methods += [method for group in GROUPS for method in FAST_BACKWARD[group]]
    times = {}
    for index, method in methods:
        layer = model.layers[index]
        times[(index, method)] = []
        setattr(layer, method, timed(getattr(layer, method), times[(index, method)], device))
    return times


def time_torch_modules(model: nn.Sequential, device: torch.device) -> dict:
    """Hooks that time each module of the torch.nn network: its forward runs between its
    forward pre-hook and hook; in backward, autograd reaches the modules one after the other
    from the last, so a module's backward runs from the arrival of its output's gradient to
    the arrival of the next one's (for the first module: to its weight's gradient)."""
    times = {"forward": [[] for _ in model], "arrival": [[] for _ in model], "end": []}

    def forward_started(module, inputs):
        synchronize(device)
        module.started = time.perf_counter()

    def forward_ended(module, inputs, output):
        synchronize(device)
        times["forward"][module.index].append(1000 * (time.perf_counter() - module.started))

    def gradient_arrived(module, grad_output):
        synchronize(device)
        times["arrival"][module.index].append(time.perf_counter())

    def last_gradient(parameter):
        synchronize(device)
        times["end"].append(time.perf_counter())

    for index, module in enumerate(model):
        module.index = index
        module.register_forward_pre_hook(forward_started)
        module.register_forward_hook(forward_ended)
        module.register_full_backward_pre_hook(gradient_arrived)
    model[0].weight.register_post_accumulate_grad_hook(last_gradient)
    return times


def layer_times(args, batches, train_x, train_y, device) -> dict[str, dict[str, tuple]]:
    """Median milliseconds per step of each group's forward and backward, fast and torch.nn,
    over steps * repeats steps of each, interleaved, after 3 warmup steps."""
    steps_per_epoch = len(batches)
    fast = Trainer("fast", args, device, steps_per_epoch)
    twin = Trainer("torch.nn", args, device, steps_per_epoch)
    fast_times = time_fast_layers(fast.model, device)
    torch_times = time_torch_modules(twin.model, device)
    count = 3 + args.steps * args.repeats
    for step in range(count):
        index = batches[step % len(batches)]
        fast.step(train_x[index], train_y[index])
        twin.step(train_x[index], train_y[index])
    result = {}
    for group in GROUPS:
        fast_forward = sum(
            median_after_warmup(fast_times[(i, "forward")]) for i in FAST_FORWARD[group]
        )
        fast_backward = sum(median_after_warmup(fast_times[m]) for m in FAST_BACKWARD[group])
        modules = FAST_FORWARD[group]  # the same indices in the torch.nn twin
        torch_forward = sum(median_after_warmup(torch_times["forward"][i]) for i in modules)
        starts = torch_times["arrival"][modules[-1]]
        first = modules[0]
        ends = torch_times["arrival"][first - 1] if first else torch_times["end"]
        spans = [1000 * (end - start) for start, end in zip(starts, ends)]
        result[group] = {
            "fast": (fast_forward, fast_backward),
            "torch.nn": (torch_forward, median_after_warmup(spans)),
        }
    return result


def median_after_warmup(values: list[float], warmup: int = 3) -> float:
    return statistics.median(values[warmup:])


def print_layer_times(times: dict[str, dict[str, tuple]], batch_size: int) -> None:
    print(f"per layer group, median ms per step of {batch_size} images; ratio: torch.nn / fast")
    print(f"{'':<26}forward: fast  torch.nn  ratio    backward: fast  torch.nn  ratio")
    for number, group in enumerate(GROUPS, 1):
        fast = times[group]["fast"]
        twin = times[group]["torch.nn"]
        forward = f"{fast[0]:9.4f} {twin[0]:9.4f} {twin[0] / fast[0]:6.2f}x"
        backward = f"{fast[1]:9.4f} {twin[1]:9.4f} {twin[1] / fast[1]:6.2f}x"
        print(f"  layer {number} {group:<16}fwd {forward}   bwd {backward}", flush=True)


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


def test_accuracies(args, train_x, train_y, test_x, test_y, device) -> dict[str, float]:
    """Each kind trained for args.epochs epochs from the same start, evaluated on the test set."""
    steps_per_epoch = math.ceil(len(train_x) / args.batch_size)
    accuracy = {}
    for kind in KINDS:
        trainer = Trainer(kind, args, device, steps_per_epoch)
        for epoch in range(args.epochs):
            shuffle = torch.Generator().manual_seed(args.seed * 1000 + epoch + 1)
            order = torch.randperm(len(train_x), generator=shuffle).to(device)
            for index in order.split(args.batch_size):
                trainer.step(train_x[index], train_y[index])
        accuracy[kind] = trainer.test_accuracy(test_x, test_y)
    return accuracy


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    device = scratch.select_device(args.device)
    train_x, train_y = scratch.load_mnist(args.data_dir, train=True)
    test_x, test_y = scratch.load_mnist(args.data_dir, train=False)
    train_x = train_x.to(device)
    train_y = train_y.to(device)
    test_x = test_x.to(device)
    test_y = test_y.to(device)
    for line in machine_lines(device):
        print(line, flush=True)
    if args.conv_kernels == "auto":
        milliseconds = scratch.time_conv_kernels(args.batch_size, device)
        args.conv_kernels = min(milliseconds, key=milliseconds.get)
        timings = ", ".join(f"{kind} {value:.2f} ms" for kind, value in milliseconds.items())
        print(f"conv kernels: {args.conv_kernels} (timed at the start: {timings})", flush=True)
    else:
        print(f"conv kernels: {args.conv_kernels} (--conv-kernels)", flush=True)
    steps_per_epoch = math.ceil(len(train_x) / args.batch_size)
    generator = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(train_x), generator=generator).to(device)
    batches = [batch for batch in order.split(args.batch_size) if len(batch) == args.batch_size]
    print_layer_times(layer_times(args, batches, train_x, train_y, device), args.batch_size)
    trainers = {kind: Trainer(kind, args, device, steps_per_epoch) for kind in KINDS}
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
    ratio = {}
    for kind, times in seconds.items():
        ratio[kind] = statistics.median(t / s for s, t in zip(times, seconds["torch.nn"]))
    accuracy = {}
    if args.epochs:
        accuracy = test_accuracies(args, train_x, train_y, test_x, test_y, device)
    print(f"{'implementation':<16}{'train images/s':>16}{'vs torch.nn':>13}{'test accuracy':>15}")
    for kind in KINDS:
        shown = f"{100 * accuracy[kind]:.2f}%" if kind in accuracy else "-"
        print(f"{kind:<16}{rate[kind]:>16,.0f}{ratio[kind]:>12.2f}x{shown:>15}")
    print(f"throughput ratio fast / torch.nn: {ratio['fast']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
