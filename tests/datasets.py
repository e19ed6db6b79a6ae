"""Small data files in the exact layouts the real loaders read, written by the tests (nothing is
downloaded): torchvision's raw MNIST and EMNIST IDX files, and a stand-in for the ImageNet
ResNet-18 checkpoint where torchvision caches it ($TORCH_HOME/hub/checkpoints/)."""

from __future__ import annotations

import struct
from pathlib import Path

import torch

EMNIST_F_LABEL = 15  # "F" in ByClass's 0-9A-Za-z order


def write_idx(path: Path, array: torch.Tensor) -> None:
    """An uncompressed IDX file as (E)MNIST ship it: magic 2051 for images or 2049 for labels,
    big-endian sizes, then the uint8 payload."""
    magic = 2051 if array.dim() == 3 else 2049
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + array.to(torch.uint8).contiguous().numpy().tobytes())


def write_emnist_split(raw: Path, part: str, images: torch.Tensor, labels: torch.Tensor) -> None:
    """torchvision's raw EMNIST ByClass files for `part` ("train" or "test"), the upright
    images stored transposed, as NIST distributes them."""
    write_idx(raw / f"emnist-byclass-{part}-images-idx3-ubyte", images.transpose(1, 2))
    write_idx(raw / f"emnist-byclass-{part}-labels-idx1-ubyte", labels)


def letter_f_glyph() -> torch.Tensor:
    """An upright 'F' (asymmetric under transposition and both flips), uint8 28x28."""
    glyph = torch.zeros(28, 28, dtype=torch.uint8)
    glyph[4:24, 6:9] = 255  # the stem, on the left
    glyph[4:7, 6:22] = 255  # the top bar
    glyph[12:15, 6:18] = 255  # the middle bar
    return glyph


def make_emnist_split(per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Upright images with a learnable pattern per class plus noise, `per_class` of each of the
    62 classes, shuffled; image 0 is the 'F'."""
    generator = torch.Generator().manual_seed(seed)
    templates = (torch.rand(62, 28, 28, generator=torch.Generator().manual_seed(99)) > 0.85) * 110
    labels = torch.arange(62).repeat_interleave(per_class)
    labels = labels[torch.randperm(len(labels), generator=generator)]
    noise = torch.randint(0, 146, (len(labels), 28, 28), generator=generator)
    images = (templates[labels] + noise).clamp(max=255).to(torch.uint8)
    images[0], labels[0] = letter_f_glyph(), EMNIST_F_LABEL
    return images, labels


def write_emnist(data_dir: Path, train_per_class: int = 6, test_per_class: int = 2) -> Path:
    """A small EMNIST ByClass in `data_dir`/EMNIST/raw; returns `data_dir`."""
    raw = data_dir / "EMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    write_emnist_split(raw, "train", *make_emnist_split(train_per_class, 1))
    write_emnist_split(raw, "test", *make_emnist_split(test_per_class, 2))
    return data_dir


def write_standin_weights(torch_home: Path, seed: int = 1234) -> dict:
    """A random torchvision ResNet-18 state dict, with non-trivial BatchNorm statistics (so that
    "unchanged" is a real check on them), saved where torchvision caches ImageNet's."""
    from torchvision.models import resnet18

    checkpoints = torch_home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    state = resnet18().state_dict()
    for name, tensor in state.items():
        if name.endswith("running_mean"):
            tensor.normal_(0, 0.1)
        elif name.endswith("running_var"):
            tensor.uniform_(0.5, 1.5)
    torch.save(state, checkpoints / "resnet18-f37072fd.pth")
    return state
