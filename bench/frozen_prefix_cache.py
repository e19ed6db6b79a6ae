"""partial_unfreeze with the frozen prefix cached (--cache-frozen on) against recomputing it.

Everything up to layer3 is frozen in eval mode and the images are not augmented, so layer3's
output per image never changes: resnet18.py can compute it once per split (forward_all) and
train layer4 + fc on it. This times one training epoch both ways on resnet18.py's own pieces
(start_training, train_epoch: the same layers, AdamW, schedule and batches), on synthetic
EMNIST-shaped images (random backbone weights cost the same as ImageNet's):

  uncached   every step preprocesses the batch's uint8 images and runs the whole network
             (the frozen stages without gradients needed, but computed every epoch).
  cached     forward_all() once (timed on its own), then every step runs layer4 + fc on
             rows of the cached (N, 256, s/16, s/16) tensor.

The epochs are interleaved (uncached, cached, uncached, ...) after a warm-up, and the median of
--repeats is reported. Both paths must give the same logits: the largest difference on a
held-out batch is printed. The last line is the speed-up of an epoch, uncached / cached.

    python bench/frozen_prefix_cache.py                    # 1,024 images at 96 px, 1 thread
    python bench/frozen_prefix_cache.py --images 4096 --threads 2
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import resnet18  # noqa: E402

REGIME = "partial_unfreeze"


def make_training(images, labels, args, cache: str) -> resnet18.Training:
    """partial_unfreeze as resnet18.py sets it up (resnet18.start_training, same seed, so the
    same initial weights), the frozen layers' output cached or not (--cache-frozen on/off)."""
    argv = ["--img-size", str(args.img_size), "--batch-size", str(args.batch_size)]
    argv += ["--cache-frozen", cache, "--device", args.device, "--compile", args.compile]
    options = resnet18.get_args_parser().parse_args(argv + ([] if args.amp else ["--no-amp"]))
    device = torch.device(args.device)
    precision = resnet18.select_precision(device, args.amp)
    backbone = resnet18.backbone_identity("none", download=False)
    stop = types.SimpleNamespace(received=None)
    settings = {REGIME: resnet18.regime_settings(options, REGIME)}
    world = resnet18.World()
    setup = resnet18.Setup(options, world, device, precision, stop, backbone, None, settings)
    data = {"train": (images, labels)}
    return resnet18.start_training(setup, REGIME, data, Path())


def epoch_seconds(training: resnet18.Training, args) -> float:
    """One epoch of resnet18.train_epoch (its batches, steps and train modes)."""
    training.state["step_in_epoch"] = 0
    options = types.SimpleNamespace(seed=training.state["epoch"], batch_size=args.batch_size)
    training.state["epoch"] += 1  # a new permutation each time
    started = time.perf_counter()
    resnet18.train_epoch(training, options, types.SimpleNamespace(received=None))
    if args.device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--images", type=int, default=1024, help="training images per epoch")
    parser.add_argument(
        "--img-size", type=int, default=resnet18.DEFAULT_IMG_SIZE, help="image side"
    )
    parser.add_argument("--batch-size", type=int, default=256, help="training batch")
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs of each path")
    parser.add_argument(
        "--amp", action=argparse.BooleanOptionalAction, default=True, help="bf16/fp16 autocast"
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run")
    parser.add_argument(
        "--compile",
        default="off",
        choices=resnet18.COMPILE_MODES,
        help="resnet18.py --compile: torch.compile the trained layers",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads; 1 because on a shared 2-core machine two OpenMP threads on a "
        "busy core stall each other (up to 20x slower measured here)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    precision = resnet18.select_precision(device, args.amp)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(
        0, 256, (args.images + 256, 28, 28), dtype=torch.uint8, generator=generator
    )
    labels = torch.randint(0, resnet18.NUM_CLASSES, (len(images),), generator=generator)
    images, labels = images.to(device), labels.to(device)
    train, held_out = slice(0, args.images), slice(args.images, None)
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print(
        f"{args.images:,} images at {args.img_size} px, batch {args.batch_size}, "
        f"{precision.describe()}, {device} ({machine or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads), torch {torch.__version__}",
        flush=True,
    )

    trainings = {}
    cache_seconds = 0.0
    for cache in ("off", "on"):
        trainings["uncached" if cache == "off" else "cached"] = make_training(
            images[train], labels[train], args, cache
        )
    cache_seconds = trainings["cached"].cache_seconds
    # The same logits from both paths (before any training step changes the weights).
    logits = {}
    for name, training in trainings.items():
        layers = resnet18.as_layers(training.model, args.img_size)
        rows = images[held_out]
        result = resnet18.evaluate(layers, rows, labels[held_out], precision, args.img_size)
        logits[name] = result["scores"]
    difference = (logits["cached"] - logits["uncached"]).abs().max().item()
    print(f"max |logit difference| of the two models on 256 images: {difference:.2e}", flush=True)

    seconds = {name: [] for name in trainings}
    for repeat in range(args.repeats + 1):  # repeat 0 warms up (kernel selection, allocator)
        for name, training in trainings.items():
            taken = epoch_seconds(training, args)
            if repeat:
                seconds[name].append(taken)
                print(f"  {name} epoch {repeat}: {taken:.2f}s", flush=True)
    median = {name: statistics.median(values) for name, values in seconds.items()}
    for name, value in median.items():
        rate = args.images / value
        print(f"{name}: {value:.2f}s per epoch (median of {args.repeats}), {rate:,.0f} images/s")
    print(f"caching the frozen prefix once: {cache_seconds:.2f}s for {args.images:,} images")
    epochs = resnet18.REGIME_DEFAULTS[REGIME]["epochs"]
    whole = epochs * median["uncached"] / (epochs * median["cached"] + cache_seconds)
    print(f"over {epochs} epochs, the caching included: {whole:.2f}x")
    ratio = median["uncached"] / median["cached"]
    print(f"speed-up of a partial_unfreeze epoch, uncached / cached: {ratio:.2f}x")


if __name__ == "__main__":
    main()
