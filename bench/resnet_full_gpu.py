"""Both resnet18.py regimes end to end at full EMNIST ByClass shape, in one command (for a GPU).

    python bench/resnet_full_gpu.py                            # 697,932 train + 116,323 test
    python bench/resnet_full_gpu.py --img-size 112             # any other argument goes to
                                                               # resnet18.py unchanged
    python bench/resnet_full_gpu.py --scale 0.002 --device cpu --img-size 32 --epochs 1
                                                               # a quick check that it runs

Real EMNIST is used when --data-dir holds it (EMNIST/raw/, torchvision's layout) and --scale
is 1; otherwise synthetic uint8 images with random labels, --scale times the real sizes, are
written as torchvision's raw IDX files into a temporary folder, so the real loader runs. On
synthetic data accuracies mean nothing and early stopping is off (--patience 1000, unless given):
every epoch runs, so the time is the worst case. Weights: ImageNet when cached under
$TORCH_HOME, else random init (the same cost). Prints each regime's wall time (from its
metrics.json) and the total; the last line is the summary.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import resnet18  # noqa: E402

FULL_TRAIN, FULL_TEST = 697_932, 116_323  # EMNIST ByClass


def write_synthetic_emnist(root: Path, train: int, test: int, seed: int = 0) -> None:
    raw = root / "EMNIST" / "raw"
    raw.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    for part, count in (("train", train), ("test", test)):
        images = torch.randint(0, 256, (count, 28, 28), dtype=torch.uint8, generator=generator)
        labels = torch.randint(0, resnet18.NUM_CLASSES, (count,), generator=generator)
        prefix = raw / f"emnist-byclass-{part}"
        with open(f"{prefix}-images-idx3-ubyte", "wb") as handle:
            handle.write(struct.pack(">IIII", 2051, count, 28, 28))
            handle.write(images.numpy().tobytes())
        with open(f"{prefix}-labels-idx1-ubyte", "wb") as handle:
            handle.write(struct.pack(">II", 2049, count))
            handle.write(labels.to(torch.uint8).numpy().tobytes())


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Unrecognised arguments are passed to resnet18.py.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of ByClass's sizes")
    parser.add_argument(
        "--data-dir",
        default=os.environ.get("DATA_DIR", "./data"),
        help="real EMNIST/raw/ if there ($DATA_DIR, else ./data)",
    )
    parser.add_argument(
        "--output-dir", default=None, help="results folder parent (default: a temporary one)"
    )
    parser.add_argument("--device", default="auto", help="resnet18.py --device")
    args, passthrough = parser.parse_known_args()

    raw = Path(args.data_dir) / "EMNIST" / "raw"
    real = args.scale == 1.0 and all((raw / f).is_file() for f in resnet18.emnist_files())
    workspace = Path(tempfile.mkdtemp(prefix="resnet_full_"))
    output_dir = Path(args.output_dir) if args.output_dir else workspace / "results"
    try:
        if real:
            data_dir, data_kind = Path(args.data_dir), "EMNIST ByClass"
        else:
            data_dir = workspace / "data"
            train, test = round(FULL_TRAIN * args.scale), round(FULL_TEST * args.scale)
            started = time.perf_counter()
            write_synthetic_emnist(data_dir, train, test)
            data_kind = f"synthetic ({train:,} train + {test:,} test, random labels)"
            print(f"wrote {data_kind} in {time.perf_counter() - started:.1f}s", flush=True)
        weights = "imagenet" if resnet18.imagenet_weights_path().is_file() else "none"
        if weights == "none":
            print("ImageNet weights not cached: random init (timing is the same)", flush=True)
        argv = [
            "--data-dir",
            str(data_dir),
            "--output-dir",
            str(output_dir),
            "--device",
            args.device,
            "--weights",
            weights,
            "--no-download",
            "--regime",
            "both",
        ]
        if not real and "--patience" not in passthrough:
            argv += ["--patience", "1000"]
        argv += passthrough
        print("resnet18.py " + " ".join(argv), flush=True)
        started = time.perf_counter()
        code = resnet18.main(argv)
        total = time.perf_counter() - started
        if code != 0:
            print(f"resnet18.py exited with {code}", file=sys.stderr)
            return code
        run_dir = max(output_dir.glob("resnet_*"), key=lambda p: p.stat().st_mtime)
        device = json.loads((run_dir / "config.json").read_text())["environment"]
        device_name = device.get("gpu") or f"{device['device']} ({device['cpu_threads']} threads)"
        walls = {}
        print(
            f"\n{'regime':<18}{'wall s':>9}{'train s':>9}{'epochs':>8}{'img/s':>10}"
            f"{'peak MiB':>10}{'cached':>8}" + ("  test acc" if real else "")
        )
        for regime in resnet18.REGIMES:
            metrics = json.loads((run_dir / regime / "metrics.json").read_text())
            walls[regime] = metrics["wall_time_s"]
            print(
                f"{regime:<18}{metrics['wall_time_s']:>9.1f}{metrics['train_time_s']:>9.1f}"
                f"{metrics['epochs_run']:>8}{metrics['images_per_s']:>10,.0f}"
                f"{metrics['peak_memory_mib']:>10,.0f}"
                f"{'yes' if metrics['frozen_output_cached'][-1] else 'no':>8}"
                + (f"  {100 * metrics['test_accuracy']:.2f}%" if real else "")
            )
        print(f"setup (data load, splits) and comparison: {total - sum(walls.values()):.1f}s")
        print(f"results: {run_dir}")
        print(
            f"total wall time {total:.0f}s (linear_probe {walls['linear_probe']:.0f}s, "
            f"partial_unfreeze {walls['partial_unfreeze']:.0f}s) on {device_name}; {data_kind}"
        )
        return 0
    finally:
        shutil.rmtree(workspace / "data", ignore_errors=True)
        if args.output_dir is not None:
            shutil.rmtree(workspace, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
