"""resnet18.py's on-device input pipeline against the usual torchvision one.

Both deliver one epoch of shuffled, normalised training batches at the same image size from the
same synthetic EMNIST-shaped uint8 images (28x28, 62 classes; the pixel values do not change
the cost):

  on-device    resnet18.py's path: the uint8 tensor is on the device; epoch_batches draws a
               randperm, normalise_and_resize() normalises and resizes (bilinear,
               F.interpolate) per batch. Its batches are 1-channel, because resnet18.py
               sums conv1 over RGB.
  torchvision  DataLoader(num_workers=2, persistent workers, shuffle) over a Dataset that, like
               torchvision.datasets.EMNIST, makes a PIL image per item, then Resize,
               Grayscale(3), ToTensor, Normalize.

Repeats are interleaved (on-device, torchvision, on-device, ...) after one warm-up epoch each,
and the medians compared. The last line printed is the ratio (on-device throughput divided by
torchvision's). The 3-channel variant of the on-device path (the grey channel repeated, as an
unfolded stem would need) is printed too, so the share of the stem folding is visible.

    python bench/resnet_pipeline.py                       # default image size of resnet18.py
    python bench/resnet_pipeline.py --img-size 112 --images 20000
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


class PILImageDataset(torch.utils.data.Dataset):
    """What torchvision.datasets.EMNIST.__getitem__ does: a PIL 'L' image per item."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        from PIL import Image

        image = Image.fromarray(self.images[index].numpy(), mode="L")
        return self.transform(image), int(self.labels[index])


def torchvision_loader(images, labels, img_size: int, batch_size: int, workers: int):
    from torchvision import transforms

    mean, std = resnet18.GREY_MEAN, resnet18.GREY_STD
    transform = transforms.Compose(
        [
            transforms.Resize(img_size),
            transforms.Grayscale(3),
            transforms.ToTensor(),
            transforms.Normalize([mean] * 3, [std] * 3),
        ]
    )
    return torch.utils.data.DataLoader(
        PILImageDataset(images, labels, transform),
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(0),
    )


def time_torchvision_epoch(loader) -> tuple[float, int]:
    started, count = time.perf_counter(), 0
    for x, y in loader:
        count += len(y)
        assert x.shape[1] == 3  # Grayscale(3): what an unmodified RGB stem takes
    return time.perf_counter() - started, count


def time_on_device_epoch(
    images, labels, img_size: int, batch_size: int, epoch: int, three_channels: bool = False
) -> tuple[float, int]:
    started, count = time.perf_counter(), 0
    generator = torch.Generator().manual_seed(epoch)
    for index in resnet18.epoch_batches(len(labels), batch_size, 1, generator, images.device):
        x, y = resnet18.normalise_and_resize(images[index], img_size), labels[index]
        if three_channels:
            x = x.expand(-1, 3, -1, -1).contiguous()
        count += len(y)
    if images.device.type == "cuda":
        torch.cuda.synchronize(images.device)
    return time.perf_counter() - started, count


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {torch.get_num_threads()} torch threads"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--img-size", type=int, default=resnet18.DEFAULT_IMG_SIZE, help="image side"
    )
    parser.add_argument("--images", type=int, default=16384, help="images per epoch")
    parser.add_argument("--batch-size", type=int, default=512, help="batch")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs of each")
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
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.images, 28, 28), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 62, (args.images,), generator=generator)
    on_device = (images.to(device), labels.to(device))
    loader = torchvision_loader(images, labels, args.img_size, args.batch_size, args.workers)

    # The two paths deliver the same normalised values (up to the resize implementations).
    sample = resnet18.normalise_and_resize(images[:4], args.img_size)
    reference = torch.stack([loader.dataset[i][0] for i in range(4)])
    difference = (sample.expand(-1, 3, -1, -1) - reference).abs().max().item()

    print(
        f"machine: {machine()}; device {device}; {args.images} images of 28x28 -> "
        f"{args.img_size}x{args.img_size}, batch {args.batch_size}, {args.workers} workers"
    )
    print(f"max |on-device - torchvision| per pixel (normalised units): {difference:.3f}")
    times = {"on-device": [], "on-device 3-channel": [], "torchvision": []}
    time_on_device_epoch(*on_device, args.img_size, args.batch_size, epoch=0)  # warm-up
    time_torchvision_epoch(loader)  # warm-up: starts the persistent workers
    for repeat in range(1, args.repeats + 1):
        seconds, count = time_on_device_epoch(*on_device, args.img_size, args.batch_size, repeat)
        times["on-device"].append(count / seconds)
        seconds, count = time_torchvision_epoch(loader)
        times["torchvision"].append(count / seconds)
        seconds, count = time_on_device_epoch(
            *on_device, args.img_size, args.batch_size, repeat, three_channels=True
        )
        times["on-device 3-channel"].append(count / seconds)
        print(
            f"repeat {repeat}: "
            + ", ".join(f"{name} {rates[-1]:,.0f} img/s" for name, rates in times.items())
        )
    medians = {name: statistics.median(rates) for name, rates in times.items()}
    for name, rate in medians.items():
        print(f"median {name}: {rate:,.0f} img/s")
    three = medians["on-device 3-channel"] / medians["torchvision"]
    print(f"3-channel on-device / torchvision: {three:.1f}x")
    ratio = medians["on-device"] / medians["torchvision"]
    print(f"ratio on-device / torchvision DataLoader at {args.img_size}px: {ratio:.1f}x")


if __name__ == "__main__":
    main()
