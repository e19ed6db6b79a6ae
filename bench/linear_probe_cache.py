"""The linear probe with cached features against running the frozen backbone every epoch.

Same synthetic EMNIST-shaped subset, same epochs (resnet18.py's linear-probe default, 15), same
batches (one seeded permutation per epoch), same fc initialisation and AdamW settings, on
resnet18.py's own functions (build_model, as_layers, forward_all, epoch_batches):

  cached     forward_all() once (the frozen backbone in eval mode), then every epoch
             trains fc on rows of that (N, 512) tensor: what resnet18.py does by default.
  uncached   every step runs the frozen backbone on the batch's images (no gradients), then
             trains fc on its output: the textbook loop (resnet18.py --cache-frozen off).

ImageNet weights are not needed: random backbone weights cost the same. The final fc weights of
the two are compared (they should agree to rounding), and the last line printed is the ratio of
wall times (uncached / cached).

    python bench/linear_probe_cache.py
    python bench/linear_probe_cache.py --images 2048 --img-size 64 --epochs 15
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import resnet18  # noqa: E402

FIRST_TRAINED = resnet18.FIRST_TRAINED["linear_probe"]  # the layers before fc are frozen


def train_fc(model, epochs, batch_size, lr, precision, features_of_batch, labels) -> float:
    """Train model.fc for `epochs`; features_of_batch(index) gives the batch's 512-d inputs."""
    optimizer = torch.optim.AdamW(model.fc.parameters(), lr=lr, weight_decay=0.0)
    started = time.perf_counter()
    for epoch in range(epochs):
        generator = torch.Generator().manual_seed(epoch + 1)
        for index in resnet18.epoch_batches(len(labels), batch_size, 1, generator, labels.device):
            features = features_of_batch(index)
            with precision.autocast():
                logits = model.fc(features)
            loss = resnet18.classification_loss(logits, labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    if labels.device.type == "cuda":
        torch.cuda.synchronize(labels.device)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--images", type=int, default=512, help="training subset size")
    parser.add_argument(
        "--epochs", type=int, default=resnet18.REGIME_DEFAULTS["linear_probe"]["epochs"]
    )
    parser.add_argument(
        "--img-size", type=int, default=resnet18.DEFAULT_IMG_SIZE, help="image side"
    )
    parser.add_argument("--batch-size", type=int, default=256, help="training batch")
    parser.add_argument(
        "--amp", action=argparse.BooleanOptionalAction, default=True, help="bf16/fp16 autocast"
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of this process; 1 because the 2-core machine is shared and two "
        "OpenMP threads on a busy core stall each other (5-50x slower measured here)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    precision = resnet18.select_precision(device, args.amp)
    lr = resnet18.REGIME_DEFAULTS["linear_probe"]["lr"]
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.images, 28, 28), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 62, (args.images,), generator=generator)
    images, labels = images.to(device), labels.to(device)
    print(
        f"{args.images} images at {args.img_size}px, {args.epochs} epochs, batch "
        f"{args.batch_size}, {precision.describe()}, device {device} "
        f"({torch.get_num_threads()} torch threads)"
    )

    # Warm-up outside the timings: the first forward passes at a new shape pay one-off kernel
    # selection (oneDNN/cuDNN), which would otherwise land on whichever path runs first.
    warm = resnet18.build_model("linear_probe", None).to(device).eval()
    frozen = resnet18.as_layers(warm, args.img_size)[:FIRST_TRAINED]
    for batch in (args.batch_size, min(args.images, resnet18.MAX_EVAL_BATCH)):
        resnet18.forward_all(frozen, images[:batch], args.img_size, precision)

    results = {}
    for name in ("cached", "uncached"):
        torch.manual_seed(0)  # the same fc initialisation for both
        model = resnet18.build_model("linear_probe", None).to(device)
        model.eval()  # the frozen backbone; fc has no dropout or BatchNorm either
        frozen = resnet18.as_layers(model, args.img_size)[:FIRST_TRAINED]
        started = time.perf_counter()
        if name == "cached":
            features = resnet18.forward_all(frozen, images, args.img_size, precision)
            feature_seconds = time.perf_counter() - started

            def features_of_batch(index, features=features):
                return features[index]
        else:
            feature_seconds = 0.0

            @torch.no_grad()
            def features_of_batch(index, frozen=frozen):
                with precision.autocast():
                    return frozen(images[index])

        train_seconds = train_fc(
            model, args.epochs, args.batch_size, lr, precision, features_of_batch, labels
        )
        total = time.perf_counter() - started
        results[name] = {"seconds": total, "fc": model.fc.weight.detach().clone()}
        print(
            f"{name}: {total:.2f}s total ({feature_seconds:.2f}s caching features, "
            f"{train_seconds:.2f}s training fc), "
            f"{args.images * args.epochs / total:,.0f} training images/s"
        )
    difference = (results["cached"]["fc"] - results["uncached"]["fc"]).abs().max().item()
    print(f"max |fc weight difference| after training: {difference:.2e}")
    ratio = results["uncached"]["seconds"] / results["cached"]["seconds"]
    print(f"ratio uncached / cached wall time over {args.epochs} epochs: {ratio:.1f}x")


if __name__ == "__main__":
    main()
