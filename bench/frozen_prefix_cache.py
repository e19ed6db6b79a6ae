"""partial_unfreeze with the frozen prefix cached (--cache-frozen on) against recomputing it.

Everything up to layer3 is frozen in eval mode and the images are not augmented, so layer3's
output per image never changes: resnet18.py can compute it once per split (frozen_outputs) and
train layer4 + fc on it. This times one training epoch both ways on resnet18.py's own pieces
(StagesFrom, Job, training_step: the same AdamW, schedule and batches), on synthetic
EMNIST-shaped images (random backbone weights cost the same as ImageNet's):

  uncached   every step preprocesses the batch's uint8 images and runs the whole network
             (the frozen stages without gradients needed, but computed every epoch).
  cached     frozen_outputs() once (timed on its own), then every step runs layer4 + fc on
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
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import resnet18  # noqa: E402

REGIME = "partial_unfreeze"


def make_job(splits: dict, first: int, img_size: int, precision, batch_size: int) -> resnet18.Job:
    """partial_unfreeze as resnet18.py sets it up (same seed, so the same initial weights) on
    `splits` (images, or the frozen stages' output when `first` > 0)."""
    torch.manual_seed(0)
    model = resnet18.build_model(REGIME, None).to(splits["train"][1].device)
    settings = dict(resnet18.REGIME_DEFAULTS[REGIME], batch_size=batch_size)
    stages = resnet18.StagesFrom(model, first, img_size)
    return resnet18.Job(REGIME, settings, stages, splits, precision, resnet18.World(), Path())


def epoch_seconds(job: resnet18.Job, batch_size: int, seed: int) -> float:
    """One epoch of resnet18.training_step, in its training mode (layer4 in train mode)."""
    labels = job.splits["train"][1]
    generator = torch.Generator().manual_seed(seed)
    device = labels.device
    batches = resnet18.iterate_batches(len(labels), batch_size, generator, device)
    resnet18.set_regime_mode(job.model, REGIME, training=True)
    started = time.perf_counter()
    for index in batches:
        resnet18.training_step(job, index)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1024, help="training images per epoch")
    parser.add_argument("--img-size", type=int, default=resnet18.DEFAULT_IMG_SIZE)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs of each path")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
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

    stages = resnet18.FROZEN_STAGES[REGIME]
    uncached = {"train": (images[train], labels[train])}
    jobs = {"uncached": make_job(uncached, 0, args.img_size, precision, args.batch_size)}
    started = time.perf_counter()  # the frozen stages of the same (seeded) weights
    cached = resnet18.frozen_outputs(
        jobs["uncached"].model, images, stages, args.img_size, precision
    )
    cache_seconds = time.perf_counter() - started
    splits = {"train": (cached[train], labels[train])}
    jobs["cached"] = make_job(splits, stages, args.img_size, precision, args.batch_size)
    # The same logits from both paths (before any training step changes the weights).
    logits = {}
    for name, job in jobs.items():
        rows = images[held_out] if name == "uncached" else cached[held_out]
        result = resnet18.evaluate_split(
            job.stages, rows, labels[held_out], precision, keep_scores=True
        )
        logits[name] = result["scores"]
    difference = (logits["cached"] - logits["uncached"]).abs().max().item()
    print(f"max |logit difference| cached vs uncached on 256 images: {difference:.2e}", flush=True)

    seconds = {name: [] for name in jobs}
    for repeat in range(args.repeats + 1):  # repeat 0 warms up (kernel selection, allocator)
        for name, job in jobs.items():
            taken = epoch_seconds(job, args.batch_size, seed=repeat)
            if repeat:
                seconds[name].append(taken)
                print(f"  {name} epoch {repeat}: {taken:.2f}s", flush=True)
    median = {name: statistics.median(values) for name, values in seconds.items()}
    for name, value in median.items():
        rate = args.images / value
        print(f"{name}: {value:.2f}s per epoch (median of {args.repeats}), {rate:,.0f} images/s")
    print(f"caching the frozen prefix once: {cache_seconds:.2f}s for {len(images):,} images")
    epochs = resnet18.REGIME_DEFAULTS[REGIME]["epochs"]
    cache_share = cache_seconds * args.images / len(images)  # the training images' part
    whole = epochs * median["uncached"] / (epochs * median["cached"] + cache_share)
    print(f"over {epochs} epochs, the caching included: {whole:.2f}x")
    ratio = median["uncached"] / median["cached"]
    print(f"speed-up of a partial_unfreeze epoch, uncached / cached: {ratio:.2f}x")


if __name__ == "__main__":
    main()
