"""A convolutional network written from scratch, trained on MNIST.

Every layer -- Conv2D, MaxPool2D, ReLU, Flatten, Linear and the fused softmax cross-entropy --
has a hand-written forward and backward pass on PyTorch tensor primitives (matmul, unfold,
max, scatter, exp, log). No autograd and no torch.nn layer trains it: the loop runs under
torch.no_grad() and every gradient is computed by the code in this file, twice: plainly by the
reference layers (im2col and one matmul, argmax and scatter), and by the fast layers the
default run uses, which compute the same numbers in fewer, larger operations
(docs/cnn_layers.md derives both).

    Conv(1->8, 3x3, pad 1) -> ReLU -> MaxPool(2) -> Conv(8->16, 3x3, pad 1) -> ReLU -> MaxPool(2)
    -> Flatten -> Linear(784 -> 10)

Run (the defaults are the reported run: 5 epochs, batch 640, SGD with Nesterov momentum 0.9,
lr 0.1 after 1 epoch of linear warmup, then cosine decay to 0, weight decay 5e-4):

    python cnn_from_scratch.py --data-dir ./data          # downloads MNIST there when missing
    python cnn_from_scratch.py --layers reference         # the same training on the plain layers
    python cnn_from_scratch.py --check-gradients          # every backward vs finite differences
    python cnn_from_scratch.py --resume results/cnn_...   # continue a stopped run
    sbatch run_cnn.sbatch                                 # on a SLURM cluster

Exit codes: 0 done; 1 a file could not be written, or --check-gradients found a gradient
off; 2 bad input (the `error:` line says what to fix); 3 the loss diverged (NaN/inf);
75 stopped by SIGTERM/SIGUSR1 after writing a checkpoint, 130 by Ctrl-C: the last lines print
the command that continues exactly where it stopped.
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import math
import os
import platform
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGUSR1}
if __name__ == "__main__":
    # Hold stop signals while torch imports (seconds): StopSignal takes them when it starts.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)

import torch  # noqa: E402

RUN_PREFIX = "cnn"
CHECKPOINT_NAME = "checkpoint_last.pt"
PROGRESS_FILES = (CHECKPOINT_NAME,)
HISTORY_FILES = ("history.csv",)
# What defines a run: a resume takes these from its config.json, and an explicit different
# value on the command line is refused.
RUN_DEFINING_ARGS = (
    "epochs",
    "batch_size",
    "lr",
    "momentum",
    "weight_decay",
    "warmup_epochs",
    "seed",
    "val_size",
    "layers",
)
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


# --------------------------------------------------------------------------------------------
# CLI and environment
# --------------------------------------------------------------------------------------------


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        description="Train a from-scratch CNN (hand-written forward/backward) on MNIST.",
        formatter_class=HelpFormatter,
    )
    add = parser.add_argument
    add(
        "--data-dir",
        default=os.environ.get("DATA_DIR", "./data"),
        help="folder holding MNIST/raw/ (torchvision's layout), downloaded there when missing "
        "and online. Default: $DATA_DIR, else ./data",
    )
    add(
        "--output-dir",
        default=os.environ.get("RESULTS_DIR", "./results"),
        help="where run folders are made. Default: $RESULTS_DIR, else ./results",
    )
    add("--epochs", type=positive_int, default=5, help="training epochs")
    add("--batch-size", type=positive_int, default=640, help="training batch size")
    add("--lr", type=positive_float, default=0.1, help="peak learning rate")
    momentum = number_type(float, lambda value: 0 < value < 1, "a number between 0 and 1")
    add("--momentum", type=momentum, default=0.9, help="SGD Nesterov momentum")
    add("--weight-decay", type=non_negative_float, default=5e-4, help="L2 weight decay")
    warmup = "epochs of linear warmup, then cosine decay to 0"
    add("--warmup-epochs", type=non_negative_float, default=1.0, help=warmup)
    add("--seed", type=seed_int, default=0, help="seed for init, split and shuffling")
    add(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda", "mps"],
        help="auto: cuda/mps/cpu",
    )
    count = number_type(int, lambda value: value >= 0, "a whole number >= 0")
    add("--val-size", type=count, default=5000, help="training images held out for validation")
    add("--layers", default="fast", choices=LAYER_KINDS, help="fast, or the plain reference ones")
    add(
        "--resume",
        help="a run folder to continue, or 'auto': the newest unfinished run of this SLURM job "
        "(outside SLURM: of --output-dir), else a new run",
    )
    add(
        "--check-gradients",
        action="store_true",
        help="only compare every hand-written backward with finite differences and autograd",
    )
    add("--summarize", nargs="+", metavar="RUN_DIR", help="only summarise finished runs' metrics")
    return parser


def select_device(name: str) -> torch.device:
    """--device as a torch.device: auto is cuda, else mps, else cpu; but in a SLURM job given
    GPUs that torch cannot use (a torch build whose CUDA the driver does not support, say),
    an error that names what torch and nvidia-smi see, never a silent fall back to the CPU."""
    cuda = torch.cuda.is_available()
    mps = hasattr(torch.backends, "mps") and torch.backends.mps.is_available()
    allocated = [
        value.strip()
        for key, value in os.environ.items()
        if key in ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS")
        or key.startswith("SLURM_GPUS")
    ]
    given_gpus = "SLURM_JOB_ID" in os.environ and any(
        v not in ("", "NoDevFiles") for v in allocated
    )
    if name == "auto":
        name = "cuda" if cuda or given_gpus else "mps" if mps else "cpu"
    if name == "cuda" and not cuda:
        query = ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"]
        try:
            smi = subprocess.run(query, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError) as error:
            found = f"nvidia-smi does not run here ({first_line(error)})"
        else:
            lines = [line.strip() for line in (smi.stdout or smi.stderr).splitlines()]
            found = f"nvidia-smi reports {'; '.join(filter(None, lines)) or 'nothing'}"
        built = f"CUDA {torch.version.cuda}" if torch.version.cuda else "the CPU only"
        raise UserError(
            f"this job was given GPUs (or --device cuda), but torch {torch.__version__}, built "
            f"for {built}, cannot use them; {found}. Install a torch whose CUDA build this "
            "driver supports (nvidia-smi's header shows the highest CUDA it runs), or pass "
            "--device cpu to train on the CPU"
        )
    if name == "mps" and not mps:
        raise UserError("--device mps was asked for but MPS is not available; use --device cpu")
    return torch.device(name)


def environment_summary(device: torch.device) -> dict:
    """What ran where: versions, host, device and SLURM job, for the log and config.json."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    summary = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "host": socket.gethostname(),
        "device": str(device),
        "cpu_threads": torch.get_num_threads(),
        "git_commit": commit or None,
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT"),
    }
    if device.type == "cuda":
        summary["gpu"] = torch.cuda.get_device_name(device)
    return summary


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------

MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def missing_mnist_files(raw: Path) -> list[str]:
    """The MNIST files not in raw (a missing folder: all); PermissionError if unreadable."""
    present = set(os.listdir(raw)) if raw.is_dir() else set()
    return [name for name in MNIST_FILES if name not in present]


def load_mnist(
    data_dir: str | Path, train: bool = True, download: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read MNIST through torchvision: uint8 images (N, 28, 28) and int64 labels (N,)."""
    from torchvision.datasets import MNIST

    raw = Path(data_dir) / "MNIST" / "raw"
    how_to_fetch = (
        f"on a machine with internet run `python cnn_from_scratch.py --data-dir {data_dir}` "
        "(or `./setup_env.sh --prefetch`) and copy the folder here, or pass --data-dir to a "
        "folder that holds MNIST/raw/"
    )
    try:
        missing, failure = missing_mnist_files(raw), "not downloaded"
        if missing and download:
            try:
                MNIST(root=str(data_dir), train=train, download=True)
            except Exception as error:  # offline: RuntimeError/URLError/OSError
                failure = f"downloading them failed ({first_line(error)})"
            missing = missing_mnist_files(raw)
        if missing and all((raw / f"{name}.gz").is_file() for name in missing):
            raise UserError(
                f"only .gz files found in {raw} for {', '.join(missing)}: decompress them "
                "(gunzip -k) or let torchvision extract them (run online once, with write access)"
            )
        if missing:
            raise UserError(
                f"MNIST files missing in {raw}: {', '.join(missing)} ({failure}); {how_to_fetch}"
            )
        dataset = MNIST(root=str(data_dir), train=train, download=False)
        images, labels = dataset.data, dataset.targets
    except PermissionError as error:
        raise UserError(
            f"cannot read {error.filename or raw}: permission denied (unreadable, not missing "
            "or corrupt): make it readable to this user, or pass another --data-dir"
        ) from None
    except UserError:
        raise
    except Exception as error:  # a truncated or corrupt IDX file fails inside torchvision
        split = "train" if train else "t10k"
        raise UserError(
            f"could not read the MNIST {split} files in {raw} ({type(error).__name__}: "
            f"{first_line(error)}); they are corrupt or truncated: delete them and fetch them "
            f"again; {how_to_fetch}"
        ) from None
    if (
        images.dtype != torch.uint8
        or tuple(images.shape[1:]) != (28, 28)
        or len(images) == 0
        or len(labels) != len(images)
        or not 0 <= int(labels.min()) <= int(labels.max()) <= 9
    ):
        raise UserError(
            f"the MNIST files in {raw} hold {tuple(images.shape)} images and {len(labels)} "
            "labels, not N 28x28 images with labels 0-9; they are corrupt: fetch them again"
        )
    return images, labels.long()


def split_train_val(
    images: torch.Tensor, labels: torch.Tensor, val_size: int, seed: int
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Hold out a seeded random `val_size` images from train for the validation curves."""
    if not 0 <= val_size < len(images):
        raise UserError(
            f"--val-size {val_size} must be between 0 and {len(images) - 1} "
            f"(the training set has {len(images)} images)"
        )
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    val_index, train_index = order[:val_size], order[val_size:]
    return (images[train_index], labels[train_index]), (images[val_index], labels[val_index])


def load_data(args: argparse.Namespace, device: torch.device) -> dict[str, tuple]:
    """train, val and test as uint8 images and labels on the device."""
    train_images, train_labels = load_mnist(args.data_dir, train=True)
    test = load_mnist(args.data_dir, train=False)
    train, val = split_train_val(train_images, train_labels, args.val_size, args.seed)
    data = {"train": train, "val": val, "test": test}
    return {name: (x.to(device), y.to(device)) for name, (x, y) in data.items()}


def preprocess(images_uint8: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (N, 28, 28) on the device -> normalised (N, 1, 28, 28), on the same device."""
    scale = 1.0 / (255.0 * MNIST_STD)
    return (images_uint8.to(dtype) * scale - MNIST_MEAN / MNIST_STD).unsqueeze(1)


# --------------------------------------------------------------------------------------------
# Model: the reference layers (the textbook rules), then the fast layers the default run uses
# --------------------------------------------------------------------------------------------
#
# Contract (as in cs231n's layers.py): forward(x) keeps what backward needs in self.cache;
# backward(grad_out) returns the gradient of the forward input and, for a layer with
# parameters, overwrites self.grads (the keys and layouts of self.params, which are torch's:
# conv weight (C_out, C_in, kh, kw), linear weight (out, in)). Images are (N, C, H, W) in any
# memory layout; convolutions return channels-last views (N, H, W, C in memory), the layout
# their matmul produces. `factory` arguments: device, dtype and the generator of the weights.


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _output_size(size: int, kernel: int, stride: int, padding: int, what: str) -> int:
    out = (size + 2 * padding - kernel) // stride + 1
    if out < 1:
        raise ValueError(f"{what}: input size {size} with padding {padding} < kernel {kernel}")
    return out


def _parameters(weight: torch.Tensor, factory: dict) -> dict[str, torch.Tensor]:
    """The weight (drawn on the CPU: the same numbers on any device) and a zero bias."""
    weight = weight.to(factory.get("device"))
    return {"weight": weight, "bias": weight.new_zeros(len(weight))}


def im2col(x: torch.Tensor, kernel, stride, padding) -> torch.Tensor:
    """x (N, C, H, W) -> columns (N * H_out * W_out, C * kh * kw): row (n, y, x) holds the
    padded input window that output position sees, in the weight's (C, kh, kw) order."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    n, c, h, w = x.shape
    padded = x.new_zeros((n, c, h + 2 * ph, w + 2 * pw))
    padded[:, :, ph : ph + h, pw : pw + w] = x
    windows = padded.unfold(2, kh, sh).unfold(3, kw, sw)  # (N, C, H_out, W_out, kh, kw), a view
    return windows.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * kh * kw)


def col2im(grad_windows: torch.Tensor, input_shape, stride, padding) -> torch.Tensor:
    """The adjoint of taking windows: grad_windows (N, C, H_out, W_out, kh, kw) -> (N, C, H, W),
    each window element's gradient added back where forward read it (overlaps add up)."""
    (n, c, h, w), (sh, sw), (ph, pw) = input_shape, stride, padding
    _, _, h_out, w_out, kh, kw = grad_windows.shape
    grad = grad_windows.new_zeros((n, c, h + 2 * ph, w + 2 * pw))
    for i, j in itertools.product(range(kh), range(kw)):
        rows, columns = (
            slice(i, i + sh * (h_out - 1) + 1, sh),
            slice(j, j + sw * (w_out - 1) + 1, sw),
        )
        grad[:, :, rows, columns] += grad_windows[..., i, j]
    return grad[:, :, ph : ph + h, pw : pw + w]


class Conv2D:
    """Reference 2-D convolution (torch's cross-correlation): im2col and one matmul.

    forward:  x (N, C_in, H, W) -> (N, C_out, H_out, W_out), H_out = (H + 2 ph - kh) // sh + 1
              (likewise W_out): rows = columns @ W^T + b, columns = im2col(x) (P, K), with
              P = N * H_out * W_out positions, K = C_in * kh * kw, W the weight as (C_out, K).
    backward: grad_out (N, C_out, H_out, W_out), as grad_rows (P, C_out) -> grad_in = col2im(
              grad_rows @ W) (N, C_in, H, W), or None with needs_input_grad False (a first
              layer: its input is data); grads["weight"] = grad_rows^T @ columns (C_out, K),
              grads["bias"] = grad_rows summed over the positions.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, **factory):
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = map(_pair, (kernel_size, stride, padding))
        fan_in = in_channels * math.prod(self.kernel_size)
        shape = (out_channels, in_channels, *self.kernel_size)
        weight = torch.randn(shape, generator=factory.get("generator"), dtype=factory.get("dtype"))
        # He initialisation: keeps the activation variance constant through ReLU layers.
        self.params = _parameters(weight * math.sqrt(2.0 / fan_in), factory)
        self.grads: dict[str, torch.Tensor] = {}
        self.needs_input_grad, self.cache = True, None

    def output_size(self, x: torch.Tensor) -> tuple[int, int]:
        if x.shape[1] != self.in_channels:
            raise ValueError(f"Conv2D expects {self.in_channels} input channels, got {x.shape[1]}")
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        return (
            _output_size(x.shape[2], kh, sh, ph, "Conv2D height"),
            _output_size(x.shape[3], kw, sw, pw, "Conv2D width"),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h_out, w_out = self.output_size(x)
        columns = im2col(x, self.kernel_size, self.stride, self.padding)
        weight = self.params["weight"].reshape(self.out_channels, -1)
        rows = columns @ weight.t() + self.params["bias"]
        self.cache = (x.shape, columns)
        return rows.view(len(x), h_out, w_out, self.out_channels).permute(0, 3, 1, 2)

    def backward(self, grad_out: torch.Tensor) -> torch.Tensor | None:
        input_shape, columns = self.cache
        n, _, h_out, w_out = grad_out.shape
        grad_rows = grad_out.permute(0, 2, 3, 1).reshape(-1, self.out_channels)
        weight = self.params["weight"]
        self.grads["weight"] = (grad_rows.t() @ columns).view(weight.shape)
        self.grads["bias"] = grad_rows.sum(0)
        if not self.needs_input_grad:
            return None
        grad_columns = grad_rows @ weight.reshape(self.out_channels, -1)
        grad_windows = grad_columns.view(n, h_out, w_out, *weight.shape[1:])
        return col2im(
            grad_windows.permute(0, 3, 1, 2, 4, 5), input_shape, self.stride, self.padding
        )


class MaxPool2D:
    """Reference max pooling: argmax, and scatter to it.

    forward:  x (N, C, H, W) -> (N, C, H_out, W_out), H_out = (H - kh) // sh + 1 (likewise
              W_out), the maximum of each window; stride defaults to kernel_size.
    backward: grad_out (N, C, H_out, W_out) -> grad_in (N, C, H, W): each window's gradient goes
              to the window's first maximum (torch's rule on ties), and col2im adds the
              windows back onto the input grid.
    """

    def __init__(self, kernel_size, stride=None):
        self.kernel_size = _pair(kernel_size)
        self.stride = self.kernel_size if stride is None else _pair(stride)
        self.cache = None

    def output_size(self, x: torch.Tensor) -> tuple[int, int]:
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        return (
            _output_size(x.shape[2], kh, sh, 0, "MaxPool2D height"),
            _output_size(x.shape[3], kw, sw, 0, "MaxPool2D width"),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.output_size(x)
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        windows = x.unfold(2, kh, sh).unfold(3, kw, sw)  # (N, C, H_out, W_out, kh, kw)
        out, argmax = windows.reshape(*windows.shape[:4], kh * kw).max(dim=-1)  # the first one
        self.cache = (x.shape, argmax)
        return out

    def backward(self, grad_out: torch.Tensor) -> torch.Tensor:
        input_shape, argmax = self.cache
        grad_windows = grad_out.new_zeros((*argmax.shape, math.prod(self.kernel_size)))
        grad_windows.scatter_(-1, argmax.unsqueeze(-1), grad_out.unsqueeze(-1))
        grad_windows = grad_windows.view(*argmax.shape, *self.kernel_size)
        return col2im(grad_windows, input_shape, self.stride, (0, 0))


class ReLU:
    """max(x, 0). forward: x (any shape) -> same; backward: grad_in = grad_out * [x > 0] (the
    derivative at 0 taken as 0, as torch does). inplace=True overwrites x, as
    nn.ReLU(inplace=True): right after a convolution, whose output nothing else keeps."""

    def __init__(self, inplace: bool = False):
        self.inplace, self.cache = inplace, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.cache = x.clamp_(min=0) if self.inplace else x.clamp(min=0)
        return self.cache

    def backward(self, grad_out: torch.Tensor) -> torch.Tensor:
        return grad_out * (self.cache > 0)


class Flatten:
    """forward: x (N, C, H, W) -> (N, C * H * W) in torch's (C, H, W) order; backward: inverse."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.cache = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, grad_out: torch.Tensor) -> torch.Tensor:
        return grad_out.reshape(self.cache)


class Linear:
    """y = x W^T + b. forward: x (N, in) -> (N, out); backward: grad_out (N, out) -> grad_in
    = grad_out @ W (N, in); grads["weight"] = grad_out^T @ x (out, in), grads["bias"] (out,)."""

    def __init__(self, in_features: int, out_features: int, **factory):
        self.in_features, self.out_features = in_features, out_features
        drawn = torch.rand(
            out_features,
            in_features,
            generator=factory.get("generator"),
            dtype=factory.get("dtype"),
        )
        bound = 1.0 / math.sqrt(in_features)  # torch.nn.Linear's default range
        self.params = _parameters((drawn * 2 - 1) * bound, factory)
        self.grads: dict[str, torch.Tensor] = {}
        self.needs_input_grad, self.cache = True, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"Linear expects (N, {self.in_features}), got {tuple(x.shape)}")
        self.cache = x
        return torch.addmm(self.params["bias"], x, self.params["weight"].t())

    def backward(self, grad_out: torch.Tensor) -> torch.Tensor | None:
        self.grads["weight"] = grad_out.t() @ self.cache
        self.grads["bias"] = grad_out.sum(0)
        return grad_out @ self.params["weight"] if self.needs_input_grad else None


class SoftmaxCrossEntropy:
    """Mean cross-entropy of softmax(logits), fused with its gradient.

    forward(logits (N, K), targets (N,) int64) -> scalar mean loss (log-sum-exp, stable).
    backward() -> grad_logits (N, K) = (softmax(logits) - one_hot(targets)) / N.
    """

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        shifted = logits - logits.amax(dim=1, keepdim=True)
        log_probs = shifted - shifted.exp().sum(dim=1, keepdim=True).log()
        self.cache = (log_probs, targets)
        return -log_probs.gather(1, targets.unsqueeze(1)).mean()

    def backward(self) -> torch.Tensor:
        log_probs, targets = self.cache
        grad = log_probs.exp()  # softmax, then minus one_hot:
        grad.scatter_add_(1, targets.unsqueeze(1), torch.full_like(grad[:, :1], -1.0))
        return grad.div_(len(targets))


# Fast layers: each computes what the reference layer it subclasses computes (tests hold them
# equal in float64), in fewer and larger operations; what each trick saves: docs/cnn_layers.md.


class Buffers(dict):
    """Tensors kept from step to step (allocating MBs anew each step costs more in page
    faults than filling them): reused(name, shape, like) is made zero and then reused while
    shape, dtype and device stay. Callers overwrite it, or write only the interior of a zero
    border, which stays zero. Nothing a layer returns lives here."""

    def reused(self, name: str, shape: tuple, like: torch.Tensor) -> torch.Tensor:
        buffer = self.get(name)
        if buffer is None or (buffer.shape, buffer.dtype, buffer.device) != (
            torch.Size(shape),
            like.dtype,
            like.device,
        ):
            buffer = self[name] = like.new_zeros(shape)
        return buffer


def _columns_t(padded: torch.Tensor, window, stride, out_size, out: torch.Tensor) -> torch.Tensor:
    """im2col, transposed: padded (N, C, H_pad, W_pad) -> (C * wh * ww, N * H_out * W_out) in
    `out`, each row copied in runs along W."""
    (wh, ww), (sh, sw), (h_out, w_out) = window, stride, out_size
    (n, c), (stride_n, stride_c, stride_h, stride_w) = padded.shape[:2], padded.stride()
    windows = padded.as_strided(
        (c, wh, ww, n, h_out, w_out),
        (stride_c, stride_h, stride_w, stride_n, stride_h * sh, stride_w * sw),
    )
    out.view(windows.shape).copy_(windows)
    return out


class ColumnsConv2D(Conv2D):
    """Computes Conv2D (the same forward; backward is the reference one, on the same columns),
    plus weight_grad_through_pool: the weight gradient of conv -> ReLU -> max-pool in one go.

    Faster forward: the columns are filled transposed, (K, P), each row copied in long runs
    along W, where (P, K) rows are runs of kw values (4x slower to fill for a one-channel
    image, measured); BLAS multiplies their transpose as it is, into the channels-last
    output. Buffers are reused from step to step.
    """

    def __init__(self, *args, **factory):
        super().__init__(*args, **factory)
        self.buffers = Buffers()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (h_out, w_out), (n, c, h, w), (ph, pw) = self.output_size(x), x.shape, self.padding
        padded = self.buffers.reused("padded", (n, c, h + 2 * ph, w + 2 * pw), x)
        padded[:, :, ph : ph + h, pw : pw + w] = x
        positions = n * h_out * w_out
        columns = self.buffers.reused("columns", (c * math.prod(self.kernel_size), positions), x)
        _columns_t(padded, self.kernel_size, self.stride, (h_out, w_out), columns)
        weight, rows = (
            self.params["weight"].view(self.out_channels, -1),
            x.new_empty((positions, self.out_channels)),
        )
        torch.addmm(self.params["bias"], columns.t(), weight.t(), out=rows)
        self.cache = (x.shape, columns.t())  # the reference's (P, K) columns, as a view
        return rows.view(n, h_out, w_out, self.out_channels).permute(0, 3, 1, 2)

    def weight_grad_through_pool(self, pool: FastMaxPool2D, grad_pooled: torch.Tensor) -> None:
        """Set grads as backward(pool.backward(grad_pooled)) would, grad_pooled (N, C_out,
        H_pool, W_pool) being the gradient of pool's output with the derivative of any layer
        between (a ReLU: pool.relu_mask) applied. Stride-1 convolutions only.

        Each pool window hands its gradient to one tap (dy, dx): the convolution output at
        (py * s + dy, px * s + dx), which saw the padded input at (py * s + dy + i, px * s + dx
        + j). So the weight gradient comes from one batched product over the windows: the
        padded input's span_h x span_w patches (span = pool kernel + conv kernel - 1) at the
        pool's stride, times the gradient each window routes to tap (dy, dx); the (dy + i,
        dx + j) entries of tap (dy, dx)'s product add up to the weight gradient. No full-size
        gradient is formed.
        """
        if self.stride != (1, 1):
            raise ValueError("weight_grad_through_pool needs a stride-1 convolution")
        (kh, kw), (pool_h, pool_w) = self.kernel_size, pool.kernel_size
        (n, c_out, h_pool, w_pool), padded = grad_pooled.shape, self.buffers["padded"]
        span, taps = (pool_h + kh - 1, pool_w + kw - 1), pool_h * pool_w
        # routed[t] (N, H_pool, W_pool, C_out): the gradient tap t takes, in the masks' layout.
        routed = self.buffers.reused("routed", (taps, n, h_pool, w_pool, c_out), grad_pooled)
        pool.route(grad_pooled, [routed[t].permute(0, 3, 1, 2) for t in range(taps)])
        shape = (padded.shape[1] * math.prod(span), n * h_pool * w_pool)
        patches = self.buffers.reused("patches", shape, padded)
        _columns_t(padded, span, pool.stride, (h_pool, w_pool), patches)
        products = torch.matmul(patches, routed.view(taps, -1, c_out))  # (taps, C_in * span, C_out)
        products = products.view(pool_h, pool_w, -1, *span, c_out)
        grad_weight = sum(
            products[dy, dx, :, dy : dy + kh, dx : dx + kw]
            for dy, dx in itertools.product(range(pool_h), range(pool_w))
        )
        self.grads["weight"] = grad_weight.permute(3, 0, 1, 2).contiguous()
        self.grads["bias"] = grad_pooled.sum((0, 2, 3))


class KernelRowsConv2D(Conv2D):
    """Computes Conv2D, forward and backward, for a vertical stride of 1 (any kernel, padding
    and horizontal stride).

    Faster: where im2col copies kh * kw * C_in values per output position, the row windows
    hold, per (image, padded input row y, output column x), the kw * C_in values one kernel
    row sees there: 1/kh of the copy. Kernel row i adds windows[y + i] @ W_i to output row y;
    in the flattened matrix that shift is a fixed offset of i * W_out rows, so each kernel row
    is one matmul on a view, in forward and in both gradients (and col2im takes kw strided
    additions instead of kh * kw). All H_pad rows of an image are computed, and the kh - 1
    extra ones dropped by a view. Works channels-last; buffers are reused from step to step.
    """

    def __init__(self, *args, **factory):
        super().__init__(*args, **factory)
        self.buffers = Buffers()

    def _kernel_rows(self) -> torch.Tensor:
        """The weight as (kh, kw * C_in, C_out): kernel row i, ordered like a window row."""
        weight = self.params["weight"].permute(2, 3, 1, 0)
        return weight.reshape(self.kernel_size[0], -1, self.out_channels)

    def _shifted(self, windows: torch.Tensor, count: int, w_out: int) -> torch.Tensor:
        """(kh, count, kw * C_in) views of the row windows, [i] starting i input rows down."""
        step = windows.stride(0)
        return windows.as_strided(
            (self.kernel_size[0], count, windows.shape[1]), (w_out * step, step, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride[0] != 1:
            raise ValueError("KernelRowsConv2D needs a vertical stride of 1")
        (h_out, w_out), (n, c, h, w), (ph, pw) = self.output_size(x), x.shape, self.padding
        (kh, kw), sw = self.kernel_size, self.stride[1]
        padded = self.buffers.reused("padded", (n, h + 2 * ph, w + 2 * pw, c), x)
        padded[:, ph : ph + h, pw : pw + w] = x.permute(0, 2, 3, 1)
        count = n * padded.shape[1] * w_out
        # (kh - 1) * W_out zero rows at the end keep every shifted view inside the buffer.
        windows = self.buffers.reused("windows", (count + (kh - 1) * w_out, kw * c), x)
        stride_n, stride_h, stride_w, _ = padded.stride()
        rows_view = padded.as_strided(
            (n, padded.shape[1], w_out, kw * c), (stride_n, stride_h, stride_w * sw, 1)
        )
        windows[:count].view(rows_view.shape).copy_(rows_view)
        weights = self._kernel_rows()
        shifted = self._shifted(windows, count, w_out)
        rows = torch.mm(shifted[0], weights[0])
        for i in range(1, kh):
            rows.addmm_(shifted[i], weights[i])
        rows += self.params["bias"]
        self.cache = (x.shape, windows, count, (h_out, w_out))
        return rows.view(n, -1, w_out, self.out_channels)[:, :h_out].permute(0, 3, 1, 2)

    def backward(self, grad_out: torch.Tensor) -> torch.Tensor | None:
        (n, c, h, w), windows, count, (h_out, w_out) = self.cache
        (kh, kw), (ph, pw), sw = self.kernel_size, self.padding, self.stride[1]
        height = count // (n * w_out)
        # The output gradient on the grid of rows forward computed; the extra rows stay zero.
        grid = self.buffers.reused("grad_grid", (n, height, w_out, self.out_channels), grad_out)
        grid[:, :h_out] = grad_out.permute(0, 2, 3, 1)
        grad_rows = grid.view(count, self.out_channels)
        grad_weights = torch.bmm(  # (kh, kw * C_in, C_out), in one batched product
            self._shifted(windows, count, w_out).transpose(1, 2), grad_rows.expand(kh, -1, -1)
        )
        self.grads["weight"] = grad_weights.view(kh, kw, c, -1).permute(3, 2, 0, 1).contiguous()
        self.grads["bias"] = grad_rows.sum(0)
        if not self.needs_input_grad:
            return None
        weights = self._kernel_rows()
        grad_windows = self.buffers.reused("grad_windows", windows.shape, grad_out)
        shifted = self._shifted(grad_windows, count, w_out)
        torch.mm(grad_rows, weights[0].t(), out=shifted[0])
        grad_windows[count:].zero_()
        for i in range(1, kh):
            shifted[i].addmm_(grad_rows, weights[i].t())
        grad_windows = grad_windows[:count].view(n, height, w_out, kw, c)
        grad_padded = grad_out.new_zeros((n, height, w + 2 * pw, c))
        for j in range(kw):
            grad_padded[:, :, j : j + sw * (w_out - 1) + 1 : sw] += grad_windows[:, :, :, j]
        return grad_padded[:, ph : ph + h, pw : pw + w].permute(0, 3, 1, 2)


class FastMaxPool2D(MaxPool2D):
    """Computes MaxPool2D, forward and backward (first maximum on ties), plus relu_mask: the
    backward of a ReLU in front of it, done on the pooled grid.

    Faster: each of the kh * kw taps of the windows is a strided view of the input, so forward
    is a running elementwise maximum, with no window copy and no index tensor; beside it a
    float 0/1 mask per tap marks where that tap took the window (strictly greater than every
    earlier tap: on ties the first maximum keeps it). backward routes the gradient by those
    masks, two elementwise operations per tap (float: the CPU's fast path).
    """

    def _taps(self, x: torch.Tensor, h_out: int, w_out: int) -> list[torch.Tensor]:
        """kh * kw views (N, C, H_out, W_out): tap (i, j) is x[..., i + s*oh, j + s*ow]."""
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        return [
            x[:, :, i : i + sh * (h_out - 1) + 1 : sh, j : j + sw * (w_out - 1) + 1 : sw]
            for i, j in itertools.product(range(kh), range(kw))
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        taps = self._taps(x, *self.output_size(x))
        out, takes = taps[0].clone(), []
        for tap in taps[1:]:  # takes[t]: tap t + 1 beat every earlier tap
            takes.append(torch.gt(tap, out, out=torch.empty_like(out)))
            torch.maximum(out, tap, out=out)
        self.cache = (x, out, takes)
        return out

    def relu_mask(self, grad_out: torch.Tensor) -> torch.Tensor:
        """ReLU.backward of the ReLU in front of this pool, on the pooled grid (a quarter of
        the size): the pool hands each window's gradient to its maximum, where the ReLU's
        derivative is [maximum > 0] = [pooled output > 0]. The same numbers."""
        pooled = self.cache[1]
        return torch.gt(pooled, 0, out=torch.empty_like(pooled)).mul_(grad_out)

    def route(self, grad_out: torch.Tensor, grad_taps: list[torch.Tensor], add: bool = False):
        """Give each window's gradient to its first maximum: from the last tap back, each tap
        takes what no later tap took. grad_taps[t] (shaped like grad_out) gets tap t's share,
        written over, or with add (windows overlap) added to."""
        _, out, takes = self.cache
        if grad_out.stride() != out.stride():  # the masks' layout: faster loops
            grad_out = torch.empty_like(out).copy_(grad_out)
        remaining = grad_out
        for take, grad_tap in zip(reversed(takes), reversed(grad_taps[1:])):
            taken = torch.mul(remaining, take, out=None if add else grad_tap)
            if add:
                grad_tap += taken
            remaining = remaining - taken
        if add:
            grad_taps[0] += remaining
        else:
            grad_taps[0].copy_(remaining)

    def backward(self, grad_out: torch.Tensor) -> torch.Tensor:
        x, out, _ = self.cache
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        # Windows that tile the input exactly write every element once: no zeroing needed.
        tiles = (kh, kw) == (sh, sw) and (out.shape[2] * kh, out.shape[3] * kw) == x.shape[2:]
        grad_in = torch.empty_like(x) if tiles else torch.zeros_like(x)
        self.route(grad_out, self._taps(grad_in, *out.shape[2:]), add=not tiles)
        return grad_in


LAYER_KINDS = ("fast", "reference")


class CNN:
    """The seed architecture, forward(x (N, 1, 28, 28)) -> logits (N, 10).

    layers="reference" builds it from the reference layers and backpropagates by a plain loop
    over them in reverse; layers="fast" from the fast layers, with the fused backward below.
    Both draw the same initial weights from the same generator.
    """

    def __init__(self, *, layers: str = "fast", **factory):
        if layers not in LAYER_KINDS:
            raise ValueError(f"layers must be one of {LAYER_KINDS}, got {layers!r}")
        self.kind, fast = layers, layers == "fast"
        first_conv, conv = (ColumnsConv2D, KernelRowsConv2D) if fast else (Conv2D, Conv2D)
        pool = FastMaxPool2D if fast else MaxPool2D
        self.layers = [
            first_conv(1, 8, 3, padding=1, **factory),
            ReLU(inplace=fast),
            pool(2),
            conv(8, 16, 3, padding=1, **factory),
            ReLU(inplace=fast),
            pool(2),
            Flatten(),
            Linear(16 * 7 * 7, 10, **factory),
        ]
        self.layers[0].needs_input_grad = False  # its input is the data

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def backward(self, grad_logits: torch.Tensor) -> None:
        if self.kind == "reference":
            grad = grad_logits
            for layer in reversed(self.layers):
                grad = layer.backward(grad)
            return
        first_conv, _, first_pool, conv, _, pool, flatten, linear = self.layers
        grad = flatten.backward(linear.backward(grad_logits))
        # Each ReLU's backward runs on its pool's output (FastMaxPool2D.relu_mask), and the
        # first convolution's weight gradient comes straight from its pool's gradient.
        grad = conv.backward(pool.backward(pool.relu_mask(grad)))
        first_conv.weight_grad_through_pool(first_pool, first_pool.relu_mask(grad))

    def trainable_layers(self) -> list[tuple[int, Conv2D | Linear]]:
        return [(i, layer) for i, layer in enumerate(self.layers) if hasattr(layer, "params")]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            f"layers.{i}.{name}": tensor.clone()
            for i, layer in self.trainable_layers()
            for name, tensor in layer.params.items()
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.state_dict()):
            raise ValueError(f"state dict keys {sorted(state)} do not match this network's")
        for key in self.state_dict():
            _, index, name = key.split(".")
            self.layers[int(index)].params[name].copy_(state[key])

    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.state_dict().values())


class SGD:
    """SGD with (Nesterov) momentum and L2 weight decay, in place, as torch.optim.SGD does it.

    step(): g = grad + weight_decay * p; buf = momentum * buf + g;
            p -= lr * (g + momentum * buf) with nesterov, else p -= lr * buf.
    """

    def __init__(self, model: CNN, lr: float, momentum=0.9, weight_decay=0.0, nesterov=True):
        if nesterov and momentum <= 0:
            raise ValueError("Nesterov momentum needs momentum > 0")
        self.model, self.lr, self.momentum = model, lr, momentum
        self.weight_decay, self.nesterov = weight_decay, nesterov
        self.buffers: dict[str, torch.Tensor] = {}

    def step(self) -> None:
        for i, layer in self.model.trainable_layers():
            for name, param in layer.params.items():
                grad = layer.grads[name]
                if self.weight_decay:
                    grad = grad.add(param, alpha=self.weight_decay)
                if self.momentum:
                    key = f"layers.{i}.{name}"
                    buffer = self.buffers.get(key)
                    if buffer is None:
                        buffer = self.buffers[key] = grad.clone()
                    else:
                        buffer.mul_(self.momentum).add_(grad)
                    grad = grad.add(buffer, alpha=self.momentum) if self.nesterov else buffer
                param.add_(grad, alpha=-self.lr)

    def state_dict(self) -> dict:
        return {"lr": self.lr, "buffers": {k: v.clone() for k, v in self.buffers.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.lr = state["lr"]
        self.buffers = {k: v.clone() for k, v in state["buffers"].items()}


# --------------------------------------------------------------------------------------------
# Training and evaluation
# --------------------------------------------------------------------------------------------


def learning_rate(step: int, total_steps: int, peak_lr: float, warmup_steps: int) -> float:
    """Linear warmup from peak/warmup to peak, then cosine decay to 0 at total_steps."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def evaluate(
    model: CNN, images_uint8: torch.Tensor, labels: torch.Tensor, batch_size: int = 2000
) -> dict:
    """Mean loss, accuracy, predictions and their probabilities over a split (uint8 images on
    the device); the sums stay on the device until the one read at the end."""
    loss_fn, total_loss, predictions, probabilities = SoftmaxCrossEntropy(), 0.0, [], []
    for start in range(0, len(images_uint8), batch_size):
        logits = model.forward(preprocess(images_uint8[start : start + batch_size]))
        y = labels[start : start + batch_size]
        total_loss = total_loss + loss_fn.forward(logits, y) * len(y)
        probability, predicted = loss_fn.cache[0].max(dim=1)
        predictions.append(predicted)
        probabilities.append(probability.exp())
    predicted = torch.cat(predictions) if predictions else labels.new_zeros(0)
    count = max(1, len(labels))
    return {
        "loss": float(total_loss) / count,
        "accuracy": int((predicted == labels).sum()) / count,
        "predictions": predicted,
        "probabilities": torch.cat(probabilities) if probabilities else labels.new_zeros(0),
    }


def new_training_state() -> dict:
    """Where training stands; checkpointed, so a resume continues bit-identically."""
    return {"epoch": 0, "step_in_epoch": 0, "history": [], "lr_by_step": [], "train_time_s": 0.0}


def train_epoch(args, model: CNN, optimizer: SGD, train_data, state: dict, stop) -> None:
    """The rest of the current epoch's steps, or until a stop signal: updates state (step,
    lr_by_step, the epoch's running sums). The loss and correct counts accumulate on the
    device and are read once, at the end, so no step waits for the device."""
    train_x, train_y = train_data
    epoch, steps_per_epoch = state["epoch"], math.ceil(len(train_x) / args.batch_size)
    total_steps, sums = steps_per_epoch * args.epochs, state["sums"]
    warmup_steps = max(1, round(args.warmup_epochs * steps_per_epoch))
    # Each epoch's order comes from its own seeded generator: a resumed epoch draws the same
    # permutation and skips the steps it had already taken.
    shuffle = torch.Generator().manual_seed(args.seed * 1000 + epoch + 1)
    batches = (
        torch.randperm(len(train_x), generator=shuffle).to(train_x.device).split(args.batch_size)
    )
    loss_sum = torch.tensor(sums["loss"], dtype=torch.float64, device=train_x.device)
    correct = torch.tensor(sums["correct"], device=train_x.device)
    from tqdm import tqdm

    loss_fn, started = SoftmaxCrossEntropy(), time.perf_counter()
    progress = tqdm(
        total=len(batches),
        initial=state["step_in_epoch"],
        desc=f"epoch {epoch + 1}/{args.epochs}",
        disable=not sys.stderr.isatty(),
        leave=False,
    )
    for index in batches[state["step_in_epoch"] :]:
        step = epoch * steps_per_epoch + state["step_in_epoch"]
        optimizer.lr = learning_rate(step, total_steps, args.lr, warmup_steps)
        x, y = preprocess(train_x[index]), train_y[index]
        logits = model.forward(x)
        loss = loss_fn.forward(logits, y)
        model.backward(loss_fn.backward())
        optimizer.step()
        loss_sum += loss * len(y)
        correct += (logits.argmax(dim=1) == y).sum()
        sums["seen"] += len(y)
        state["step_in_epoch"] += 1
        state["lr_by_step"].append(optimizer.lr)
        progress.update()
        if stop.received:
            break
    progress.close()
    sums["loss"], sums["correct"] = float(loss_sum), int(correct)  # waits for the device
    sums["seconds"] += time.perf_counter() - started


@torch.no_grad()
def train(args, model: CNN, optimizer: SGD, data: dict, state: dict, stop, run_dir: Path) -> str:
    """Train (or continue) from `state` to args.epochs: "done", "stopped" or "diverged".

    After each epoch: history.csv, then the checkpoint (so history.csv is never short of
    it). A NaN/inf loss is caught once per epoch, on the epoch's summed loss (the one read
    of it), and before a mid-epoch checkpoint: a checkpoint never holds a diverged model.
    """
    steps_per_epoch = math.ceil(len(data["train"][0]) / args.batch_size)
    while state["epoch"] < args.epochs:
        if state["step_in_epoch"] == 0:
            state["sums"] = {"loss": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}
        train_epoch(args, model, optimizer, data["train"], state, stop)
        sums = state["sums"]
        if not math.isfinite(sums["loss"]):
            return "diverged"
        if state["step_in_epoch"] < steps_per_epoch:  # stopped by a signal mid-epoch
            save_checkpoint(run_dir, model, optimizer, state)
            return "stopped"
        val = (
            evaluate(model, *data["val"])
            if len(data["val"][0])
            else {"loss": math.nan, "accuracy": math.nan}
        )
        row = {
            "epoch": state["epoch"] + 1,
            "train_loss": sums["loss"] / sums["seen"],
            "train_accuracy": sums["correct"] / sums["seen"],
            "val_loss": val["loss"],
            "val_accuracy": val["accuracy"],
            "lr": optimizer.lr,
            "seconds": sums["seconds"],
            "images_per_s": sums["seen"] / sums["seconds"],
        }
        state["history"].append(row)
        state["train_time_s"] += sums["seconds"]
        state["epoch"], state["step_in_epoch"] = state["epoch"] + 1, 0
        write_csv(run_dir / "history.csv", state["history"])
        save_checkpoint(run_dir, model, optimizer, state)
        log(
            f"epoch {row['epoch']}/{args.epochs}  train loss {row['train_loss']:.4f} "
            f"acc {100 * row['train_accuracy']:.2f}%  val loss {row['val_loss']:.4f} "
            f"acc {100 * row['val_accuracy']:.2f}%  lr {row['lr']:.4g}  "
            f"{row['seconds']:.1f}s  {row['images_per_s']:,.0f} img/s"
        )
        if stop.received and state["epoch"] < args.epochs:
            return "stopped"
    return "done"


GRADIENT_TOLERANCES = {"finite differences": 1e-6, "autograd": 1e-10}


def torch_function(layer, x: torch.Tensor, params: dict) -> torch.Tensor:
    """The layer's function in torch.nn.functional: what autograd differentiates."""
    import torch.nn.functional as F

    if isinstance(layer, Conv2D):
        return F.conv2d(x, params["weight"], params["bias"], layer.stride, layer.padding)
    if isinstance(layer, MaxPool2D):
        return F.max_pool2d(x, layer.kernel_size, layer.stride)
    if isinstance(layer, Linear):
        return F.linear(x, params["weight"], params["bias"])
    return F.relu(x) if isinstance(layer, ReLU) else x.flatten(1)


def objective(layers: list, target: torch.Tensor, values: dict, by_torch: bool = False):
    """sum(output * target) of `layers` ((index, layer) pairs) for float targets, their
    cross-entropy for labels, at values: "input" and parameters "<index>.<name>"; computed by
    the layers themselves, or with by_torch by torch's functions of them (for autograd)."""
    x, saved = values["input"], {}
    try:
        for index, layer in layers:
            params = getattr(layer, "params", {})
            own = {name: values[f"{index}.{name}"] for name in params}
            if by_torch:
                x = torch_function(layer, x, own)
            else:
                saved[index] = dict(params)
                params.update(own)
                x = layer.forward(x.clone())
    finally:
        for index, layer in layers:
            getattr(layer, "params", {}).update(saved.get(index, {}))
    if target.dtype == torch.int64:
        import torch.nn.functional as F

        return (
            F.cross_entropy(x, target)
            if by_torch
            else float(SoftmaxCrossEntropy().forward(x, target))
        )
    return (x * target).sum() if by_torch else float((x * target).sum())


def gradient_errors(function, values: dict, hand: dict, generator) -> tuple[float, float]:
    """The largest relative differences of the hand-written gradients `hand` of
    function(values) from central finite differences along a random direction per tensor, and
    from autograd's gradients of function(values, by_torch=True)."""
    leaves = {name: tensor.clone().requires_grad_() for name, tensor in values.items()}
    with torch.enable_grad():
        grads = torch.autograd.grad(function(leaves, by_torch=True), [leaves[k] for k in hand])
    autograd = max(relative_difference(hand[k], grad) for k, grad in zip(hand, grads))
    finite, eps = 0.0, 1e-6
    for name in hand:
        direction = torch.randn(values[name].shape, generator=generator, dtype=torch.float64)
        plus, minus = (
            function({**values, name: values[name] + s * direction}) for s in (eps, -eps)
        )
        numeric, analytic = (plus - minus) / (2 * eps), float((hand[name] * direction).sum())
        finite = max(finite, abs(numeric - analytic) / max(abs(numeric), abs(analytic), 1e-30))
    return finite, autograd


def relative_difference(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value - reference).abs().max() / reference.abs().max().clamp(min=1e-30))


def network_gradient_errors(kind: str, seed: int) -> list[tuple[str, tuple[float, float]]]:
    """(name, errors) for each layer of a float64 network of `kind` on its own activations of
    two random images, and for the whole network's loss."""
    generator = torch.Generator().manual_seed(seed)
    model = CNN(layers=kind, dtype=torch.float64, generator=generator)
    for _, layer in model.trainable_layers():
        layer.params["bias"].normal_(std=0.1, generator=generator)
    x = torch.randn(2, 1, 28, 28, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 10, (2,), generator=generator)
    results, h = [], x
    for index, layer in enumerate(model.layers):
        out = layer.forward(h.clone())
        weights = torch.randn(out.shape, generator=generator, dtype=torch.float64)
        grad_in = layer.backward(weights)
        hand = {"input": grad_in} if grad_in is not None else {}
        hand.update({f"{index}.{n}": g for n, g in getattr(layer, "grads", {}).items()})
        values = {
            "input": h,
            **{f"{index}.{n}": p for n, p in getattr(layer, "params", {}).items()},
        }
        function = partial(objective, [(index, layer)], weights)
        results.append(
            (f"{index} {type(layer).__name__}", gradient_errors(function, values, hand, generator))
        )
        h = torch.empty_like(out).normal_(generator=generator)  # distinct values: no ties
    loss_fn = SoftmaxCrossEntropy()
    loss_fn.forward(model.forward(x), y)
    model.backward(loss_fn.backward())
    values, hand = {"input": x}, {}
    for i, layer in model.trainable_layers():
        for name in layer.params:
            values[f"{i}.{name}"], hand[f"{i}.{name}"] = layer.params[name], layer.grads[name]
    function = partial(objective, list(enumerate(model.layers)), y)
    errors = gradient_errors(function, values, hand, generator)
    return [*results, ("whole network", errors)]


def check_gradients(seed: int = 0) -> tuple[list[str], bool]:
    """--check-gradients: the report's lines, and whether every difference is within its
    tolerance (GRADIENT_TOLERANCES)."""
    lines = [
        "largest relative difference of the hand-written gradients (float64):",
        f"{'layers':<11}{'layer':<22}{'vs finite differences':>22}{'vs autograd':>13}",
    ]
    worst = dict.fromkeys(GRADIENT_TOLERANCES, 0.0)
    for kind in ("reference", "fast"):
        for name, errors in network_gradient_errors(kind, seed):
            lines.append(f"{kind:<11}{name:<22}{errors[0]:>22.1e}{errors[1]:>13.1e}")
            worst = {key: max(worst[key], error) for key, error in zip(worst, errors)}
    within = all(worst[key] <= limit for key, limit in GRADIENT_TOLERANCES.items())
    limits = ", ".join(f"{key} {limit:.0e}" for key, limit in GRADIENT_TOLERANCES.items())
    lines.append(
        f"{'all within' if within else 'FAILED: not all within'} the tolerances ({limits})"
    )
    return lines, within


# --------------------------------------------------------------------------------------------
# Runs: exit codes, errors, signals, atomic outputs, run folders, resume and seed summaries.
# The same, line for line, in cnn_from_scratch.py and resnet18.py (a test holds it so); what
# differs is in each script's RUN_PREFIX, RUN_DEFINING_ARGS, PROGRESS_FILES, HISTORY_FILES.
# --------------------------------------------------------------------------------------------

FAILURE_EXIT_CODE = 1  # a write failed (disk full, ...), or another process of the job died
USAGE_EXIT_CODE = 2  # bad input: the one `error:` line says what to fix
DIVERGED_EXIT_CODE = 3  # the loss became NaN/inf or exploded
RESUMABLE_EXIT_CODE = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGUSR1 after a checkpoint; requeue
INTERRUPTED_EXIT_CODE = 130  # stopped by Ctrl-C after a checkpoint, or aborted by a second one
RUN_RECORD = "config.json"  # written when the run folder is made, never rewritten
FINISHED_RECORD = "metrics.json"  # written last: its presence means the run is finished
SCRIPTS = {"cnn": "cnn_from_scratch.py", "resnet": "resnet18.py"}
# Where or how fast a run went, not what it computed: runs differing only in these (and the
# seed) are summarised together.
NOT_SETTINGS = ("seed", "data_dir", "output_dir", "resume", "device", "summarize", "no_download")


class UserError(Exception):
    """A mistake the user can fix: one `error:` line, exit code 2."""


class OutputError(Exception):
    """A file could not be written (disk full, file-size limit, path too long): exit code 1."""


def log(message: str) -> None:
    print(message, flush=True)


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (some run to dozens), at most 200 characters."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[0] if lines else type(error).__name__)[:200]


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr, flush=True)
        sys.exit(USAGE_EXIT_CODE)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows a default once: not when the help already names it, nor when there is none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text, default = action.help or "", action.default
        if "default" in text.lower() or default in (None, argparse.SUPPRESS) or default is False:
            return text
        return f"{text} (default: %(default)s)"


def number_type(convert, accept, expected: str):
    """An argparse `type=` that also refuses nan, inf and values outside `accept`."""

    def parse(text: str):
        try:
            value = convert(text)
            if accept(value) and math.isfinite(value):
                return value
        except (ValueError, OverflowError):
            pass
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")

    return parse


positive_int = number_type(int, lambda value: value >= 1, "a whole number of at least 1")
seed_int = number_type(int, lambda value: 0 <= value < 2**32, "a seed from 0 to 4294967295")
positive_float = number_type(float, lambda value: value > 0, "a finite number above 0")
non_negative_float = number_type(float, lambda value: value >= 0, "a finite number >= 0")


def explicit_options(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """The options the command line gave itself, one equal to its default included (parsed
    again with every default hidden)."""
    defaults = [(action, action.default) for action in parser._actions]
    try:
        for action, _ in defaults:
            action.default = argparse.SUPPRESS
        return set(vars(parser.parse_args(argv)))
    finally:
        for action, default in defaults:
            action.default = default


def merge_resumed_args(args: argparse.Namespace, recorded: dict, explicit: set[str]) -> None:
    """A resumed run keeps what it was made with: RUN_DEFINING_ARGS come from its config.json,
    and a value given on this command line that differs is refused, never replaced."""
    for name in RUN_DEFINING_ARGS:
        given, made_with = getattr(args, name), recorded.get(name, getattr(args, name))
        if name in explicit and given != made_with:
            flag = "--" + name.replace("_", "-")
            made = f"{flag} {made_with}" if made_with is not None else f"no {flag} (its default)"
            raise UserError(
                f"{flag} {given} contradicts the run being resumed, which was made with {made}: "
                f"drop {flag} to continue it, or start a new run without --resume"
            )
        setattr(args, name, made_with)
    if "data_dir" not in explicit:  # where the data is may change; the default is the run's
        args.data_dir = recorded.get("data_dir", args.data_dir)


def apply_array_seed(args: argparse.Namespace) -> int:
    """In a SLURM job array each task trains its own seed: --seed + SLURM_ARRAY_TASK_ID."""
    task = os.environ.get("SLURM_ARRAY_TASK_ID", "")
    offset = int(task) if task.isdigit() else 0
    args.seed += offset
    return offset


class StopSignal:
    """SIGINT (Ctrl-C), SIGTERM and SIGUSR1 (SLURM's warning before the time limit) become a
    flag that training checks: it finishes the step, writes a checkpoint and exits resumable.
    A second Ctrl-C aborts at once; a second SIGTERM/SIGUSR1 changes nothing."""

    def __enter__(self) -> StopSignal:
        self.received, self.previous, self.exited = None, {}, False
        for number in STOP_SIGNALS:
            self.previous[number] = signal.signal(number, self.handle)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # those held since startup
        return self

    def __exit__(self, *exc) -> None:
        # After a stop the handlers stay and ignore what comes: a late signal while Python shuts
        # down must not kill it (exit 143 where the SLURM wrapper waits for 75).
        self.exited = True
        for number, handler in self.previous.items() if self.received is None else ():
            signal.signal(number, handler)

    def handle(self, number: int, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(number).name
        elif number == signal.SIGINT and not self.exited:
            raise KeyboardInterrupt

    @property
    def exit_code(self) -> int:
        return INTERRUPTED_EXIT_CODE if self.received == "SIGINT" else RESUMABLE_EXIT_CODE


def run_main(run, args: argparse.Namespace, explicit: set[str]) -> int:
    """`run(args, explicit, stop)` with stop signals caught from the start; what a user can act
    on ends as one `error:` line and an exit code, never a traceback."""
    try:
        with StopSignal() as stop:
            return run(args, explicit, stop)
    except (UserError, OutputError) as error:
        code = USAGE_EXIT_CODE if isinstance(error, UserError) else FAILURE_EXIT_CODE
        message = str(error)
    except KeyboardInterrupt:
        message = "interrupted again: stopped at once; the checkpoints written before are intact"
        code = INTERRUPTED_EXIT_CODE
    print(f"error: {message}", file=sys.stderr, flush=True)
    return code


def stop_lines(stop: StopSignal, run_dir: Path, where: str = "") -> list[str]:
    """A stopped run's closing lines (a finished run's last line is `results: <run_dir>`);
    `where`: " during <what> (<position>)"."""
    cause = (stop.received or "a signal to another process of this job") + where
    if run_state(run_dir) != "resumable":
        return [
            f"stopped by {cause} before the first checkpoint: run it again",
            f"stopped: {run_dir}",
        ]
    return [f"stopped by {cause}; continue with: {resume_command(run_dir)}", f"stopped: {run_dir}"]


def resume_command(run_dir: Path) -> str:
    return f"python {SCRIPTS[RUN_PREFIX]} --resume {run_dir}"


def atomic_write_bytes(path: str | Path, payload: bytes) -> None:
    """Write a temporary file in the same folder, fsync, then os.replace: all or nothing. A
    failed write (disk full, file-size limit, path too long) raises OutputError."""
    path, temporary = Path(path), None
    try:
        descriptor, temporary = tempfile.mkstemp(
            dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
        )
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(payload)
            handle.flush()
            # mkstemp makes files private (0600); give the mode open() would, so results on
            # shared storage stay readable by the group as the umask allows.
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(handle.fileno(), 0o666 & ~umask)
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)
        if not isinstance(error, OSError):
            raise
        run_dir = next((p for p in path.parents if (p / RUN_RECORD).is_file()), None)
        after = "nothing to resume yet: make room (or pass another --output-dir), start again"
        if run_dir is not None and run_state(run_dir) == "resumable":
            after = f"the last checkpoint is intact: make room, then {resume_command(run_dir)}"
        raise OutputError(f"cannot write {path}: {error.strerror or error}; {after}") from None


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, payload) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")


def atomic_torch_save(payload, path: str | Path) -> None:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def save_figure(figure, path: str | Path) -> None:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())


def write_csv(path: str | Path, rows: list[dict]) -> None:
    """Floats to 12 significant digits: a learning rate of 0.1 reads 0.1, not 0.0999..."""
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: round_float(v) for k, v in row.items()})
    atomic_write_text(path, buffer.getvalue())


def round_float(value):
    return float(f"{value:.12g}") if isinstance(value, float) else value


def remove_stale_temp_files(run_dir: Path) -> int:
    """Delete the `.<name>.<random>.tmp` files that killed writes left in a run folder."""
    stale = list(run_dir.rglob(".*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def job_tag() -> str | None:
    """This SLURM job's part of a run folder's name: <array job>_<task>, or the job id."""
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array_job}_{task}" if array_job and task else os.environ.get("SLURM_JOB_ID")


RUN_NAME = r"_(?P<stamp>\d{8}-\d{6})(?:_(?P<tag>\d+(?:_\d+)?))?(?:-(?P<clash>\d+))?"


def make_run_dir(output_dir: str | Path, prefix: str) -> Path:
    """A new <output_dir>/<prefix>_<YYYYmmdd-HHMMSS>[_<job tag>], or -2, -3, ... after it:
    mkdir creates a folder or fails, so two runs started in the same second never share one."""
    tag = job_tag()
    name = f"{prefix}_{time.strftime('%Y%m%d-%H%M%S')}" + (f"_{tag}" if tag else "")
    for attempt in range(1, 1000):
        run_dir = Path(output_dir) / (name if attempt == 1 else f"{name}-{attempt}")
        try:
            run_dir.mkdir(parents=True)
            return run_dir
        except FileExistsError:
            continue
        except OSError as error:
            message = f"cannot create {run_dir}: {error.strerror}; pass a writable --output-dir"
            raise UserError(message) from None
    raise UserError(f"{output_dir} already holds 999 folders named {name}-*")


def new_run(output_dir: str | Path, config: dict) -> Path:
    run_dir = make_run_dir(output_dir, RUN_PREFIX)
    atomic_write_json(run_dir / RUN_RECORD, {"script": SCRIPTS[RUN_PREFIX], **config})
    return run_dir


def read_run_record(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / RUN_RECORD).read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read {run_dir / RUN_RECORD}: {first_line(error)}") from None


def run_state(run_dir: Path) -> str:
    """'finished', 'resumable' (has a checkpoint), 'unstarted' (stopped or failed before its
    first checkpoint) or 'foreign' (no run folder of this script)."""
    try:
        record = json.loads((run_dir / RUN_RECORD).read_text())
    except (OSError, ValueError):
        return "foreign"
    if not isinstance(record, dict) or record.get("script") != SCRIPTS[RUN_PREFIX]:
        return "foreign"
    if (run_dir / FINISHED_RECORD).is_file():
        return "finished"
    if any(next(run_dir.glob(pattern), None) for pattern in PROGRESS_FILES):
        return "resumable"
    return "unstarted"


def find_resume_run(resume: str | None, output_dir: str | Path) -> Path | None:
    """--resume auto: the newest unfinished run with a checkpoint, of this SLURM job (or array
    task) inside SLURM, of output_dir outside it; None if there is none. --resume PATH: that
    run folder (or the one holding PATH), refused unless this script can continue it."""
    if resume != "auto":
        return None if resume is None else check_resumable(Path(resume))
    found, tag = [], job_tag()
    for folder in Path(output_dir).glob(f"{RUN_PREFIX}_*"):
        match = re.fullmatch(RUN_PREFIX + RUN_NAME, folder.name)
        if match and (tag is None or match["tag"] == tag) and run_state(folder) == "resumable":
            found.append((match["stamp"], int(match["clash"] or 1), folder))
    return max(found)[2] if found else None


def check_resumable(path: Path) -> Path:
    run_dir = next((p for p in (path, *path.parents[:2]) if (p / RUN_RECORD).is_file()), None)
    state = "missing" if run_dir is None else run_state(run_dir)
    problems = {
        "missing": f"no run folder there (no {RUN_RECORD})",
        "foreign": f"that run was not made by {SCRIPTS[RUN_PREFIX]}; resume it with its own script",
        "finished": "that run is finished (metrics.json) and is never reopened: start a new run",
        "unstarted": "that run stopped before its first checkpoint: start a new run",
    }
    if state in problems:
        raise UserError(f"--resume {path}: {problems[state]}")
    return run_dir


def capture_rng_state() -> dict:
    """The CPU generators only: every shuffle and initialisation draws from them, none from a
    GPU's, so a checkpoint resumes on any number and kind of GPU."""
    return {"python": random.getstate(), "torch": torch.get_rng_state()}


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])


def plot_training_curves(history: list[dict], lr_by_step: list, path: Path, title: str) -> None:
    """Loss and accuracy per epoch (train and validation) and the learning rate of each step."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [row["epoch"] for row in history]
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2), layout="constrained")
    for split, style in (("train", "o-"), ("val", "s--")):
        axes[0].plot(epochs, [row[f"{split}_loss"] for row in history], style, label=split)
        accuracy = [100 * row[f"{split}_accuracy"] for row in history]
        axes[1].plot(epochs, accuracy, style, label=split)
    steps_per_epoch = len(lr_by_step) / max(1, len(history))
    axes[2].plot([(step + 1) / steps_per_epoch for step in range(len(lr_by_step))], lr_by_step)
    names = ("cross-entropy loss", "accuracy (%)", "learning rate (per step)")
    for axis, name in zip(axes, names):
        axis.set(xlabel="epoch", ylabel=name, title=name.split(" (")[0].capitalize())
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
    axes[0].legend(), axes[1].legend()
    for axis in axes:  # from 0: a one-epoch run gets integer ticks too (0 and 1, not 0.995)
        axis.set_xlim(0, max(epochs, default=1) + 0.25)
    figure.suptitle(title)
    save_figure(figure, path)


def plot_confusion_matrix(confusion: list, class_names: list, path: Path, title: str) -> None:
    """The errors (off the diagonal) on a colour scale of their own, so a handful of mistakes
    shows beside thousands of right answers; counts in the cells for up to 20 classes."""
    import matplotlib.pyplot as plt
    import numpy as np

    matrix, size = np.array(confusion, dtype=float), len(class_names)
    errors = np.where(np.eye(size, dtype=bool) | (matrix == 0), np.nan, matrix)  # 0: white
    most = max(1.0, np.nanmax(errors, initial=0))
    figure, axis = plt.subplots(figsize=(max(6.5, size * 0.2 + 3), max(5.5, size * 0.2 + 2)))
    image = axis.imshow(errors, cmap="Reds", vmin=0, vmax=most)
    axis.imshow(np.where(np.eye(size, dtype=bool), 1.0, np.nan), cmap="Greys", vmin=0, vmax=5)
    figure.colorbar(image, ax=axis, label="misclassified test images (count)")
    fontsize = 9 if size <= 20 else 6
    axis.set_xticks(range(size), class_names, fontsize=fontsize)
    axis.set_yticks(range(size), class_names, fontsize=fontsize)
    correct, total = int(np.trace(matrix)), int(matrix.sum())
    axis.set(xlabel="predicted class", ylabel="true class")
    axis.set_title(f"{title}\n{correct:,} of {total:,} correct (grey diagonal)")
    for (row, column), value in np.ndenumerate(matrix if size <= 20 else np.zeros((0, 0))):
        if value or row == column:
            dark = row != column and value > most / 2
            style = {
                "color": "white" if dark else "black",
                "weight": "bold" if row == column else "normal",
            }
            axis.text(column, row, f"{value:.0f}", ha="center", va="center", fontsize=7, **style)
    save_figure(figure, path)


def summarize_runs(run_dirs: list[str], output_dir: str | Path) -> Path:
    """Mean, std (n - 1), min, max and n of each number in the finished runs' metrics.json,
    written to a new <prefix>_summary_<stamp> folder; the runs may differ only in the seed."""
    states = {Path(name): run_state(Path(name)) for name in run_dirs}
    if "foreign" in states.values():
        foreign = [str(d) for d, state in states.items() if state == "foreign"]
        raise UserError(f"--summarize: not runs of {SCRIPTS[RUN_PREFIX]}: {', '.join(foreign)}")
    finished = [d for d, state in states.items() if state == "finished"]
    if not finished:
        raise UserError("--summarize: none of these runs is finished (no metrics.json yet)")
    records = [read_run_record(d) for d in finished]
    settings = [{k: v for k, v in r["args"].items() if k not in NOT_SETTINGS} for r in records]
    differing = sorted({k for s in settings for k in s if s.get(k) != settings[0].get(k)})
    if differing:
        raise UserError(
            f"--summarize: these runs differ in more than the seed ({', '.join(differing)}); "
            "summarise runs made with the same settings"
        )
    values = [flat_numbers(json.loads((d / FINISHED_RECORD).read_text())) for d in finished]
    metrics = {}
    for key in [key for key in values[0] if all(key in v for v in values)]:
        column = [v[key] for v in values]
        spread = statistics.stdev(column) if len(column) > 1 else 0.0
        metrics[key] = {"mean": statistics.fmean(column), "std": spread, "n": len(column)}
        metrics[key].update(min=min(column), max=max(column))
    summary = {
        "script": SCRIPTS[RUN_PREFIX],
        "runs": [str(d) for d in finished],
        "seeds": [r["args"]["seed"] for r in records],
        "left_out_unfinished": [str(d) for d, state in states.items() if state != "finished"],
        "settings": settings[0],
        "metrics": metrics,
    }
    for run_dir in summary["left_out_unfinished"]:
        log(f"--summarize: left out {run_dir}: not finished (no {FINISHED_RECORD})")
    folder = make_run_dir(output_dir, f"{RUN_PREFIX}_summary")
    atomic_write_json(folder / "summary.json", summary)
    atomic_write_text(folder / "summary.md", summary_markdown(summary))
    plot_seed_curves(finished, summary["seeds"], folder / "summary.png")
    return folder


def flat_numbers(metrics: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of a metrics.json, nested keys joined by '.' (no tables, no flags)."""
    found = {}
    for key, value in metrics.items():
        if isinstance(value, dict) and key != "per_class":
            found.update(flat_numbers(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            found[prefix + key] = float(value)
    return found


def summary_markdown(summary: dict) -> str:
    title = f"# {summary['script']}: {len(summary['runs'])} runs, seeds {summary['seeds']}"
    lines = [title, "", "| metric | mean ± std | min | max | n |", "|---|---|---|---|---|"]
    for key, s in summary["metrics"].items():
        scale, unit = (100, " (%)") if key.endswith("accuracy") else (1, "")
        mean, std, low, high = (readable(scale * s[k]) for k in ("mean", "std", "min", "max"))
        lines.append(f"| {key}{unit} | {mean} ± {std} | {low} | {high} | {s['n']} |")
    if summary["left_out_unfinished"]:
        lines += ["", "Left out (unfinished): " + ", ".join(summary["left_out_unfinished"])]
    return "\n".join(lines) + "\n"


def readable(value: float) -> str:
    """4 significant digits, thousands grouped: 98.71, 0.0431, 14,338 (not 1.434e+04)."""
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def plot_seed_curves(run_dirs: list[Path], seeds: list, path: Path) -> None:
    """Every run's validation accuracy per epoch, overlaid, one panel per history file."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    count = len(HISTORY_FILES)
    figure, axes = plt.subplots(
        1, count, figsize=(6 * count, 4), squeeze=False, layout="constrained"
    )
    for axis, name in zip(axes[0], HISTORY_FILES):
        for run_dir, seed in [(d, s) for d, s in zip(run_dirs, seeds) if (d / name).is_file()]:
            with open(run_dir / name, newline="") as handle:
                rows = list(csv.DictReader(handle))
            accuracy = [100 * float(row["val_accuracy"]) for row in rows]
            axis.plot([int(row["epoch"]) for row in rows], accuracy, "o-", label=f"seed {seed}")
        axis.set(xlabel="epoch", ylabel="validation accuracy (%)", title=name)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
        if axis.lines:  # none when no run has this file (linear_probe-only ResNet runs)
            axis.legend()
            last = max(max(line.get_xdata()) for line in axis.lines)
            axis.set_xlim(0, last + 0.25)  # from 0: integer ticks for one epoch too
    figure.suptitle(f"{SCRIPTS[RUN_PREFIX]}: validation accuracy of {len(run_dirs)} seeds")
    save_figure(figure, path)


# --------------------------------------------------------------------------------------------
# Outputs of this script: checkpoint, metrics, misclassified images
# --------------------------------------------------------------------------------------------


def save_checkpoint(run_dir: Path, model: CNN, optimizer: SGD, state: dict) -> None:
    payload = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "state": state,
        "rng": capture_rng_state(),
    }
    atomic_torch_save(payload, run_dir / CHECKPOINT_NAME)


def read_checkpoint(path: Path) -> dict:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        missing = {"model", "optimizer", "state", "rng"} - set(checkpoint)
    except Exception as error:  # unreadable, truncated, not a torch file
        raise UserError(
            f"cannot read the checkpoint {path} ({type(error).__name__}: {first_line(error)}); "
            "start a new run without --resume"
        ) from None
    if missing:
        raise UserError(f"{path} is not a checkpoint of this script (no {', '.join(missing)})")
    return checkpoint


def classification_metrics(labels: torch.Tensor, predicted: torch.Tensor, num_classes: int) -> dict:
    """Confusion matrix (rows true, columns predicted) with per-class precision/recall/F1."""
    confusion = torch.bincount(
        labels.cpu() * num_classes + predicted.cpu(), minlength=num_classes**2
    )
    confusion = confusion.view(num_classes, num_classes).double()
    true_positive = confusion.diagonal()
    precision = true_positive / confusion.sum(0).clamp(min=1)
    recall = true_positive / confusion.sum(1).clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    return {
        "macro_f1": float(f1.mean()),
        "per_class": {
            str(k): {
                "precision": float(precision[k]),
                "recall": float(recall[k]),
                "f1": float(f1[k]),
                "support": int(confusion[k].sum()),
            }
            for k in range(num_classes)
        },
        "confusion_matrix": confusion.long().tolist(),
    }


def plot_misclassified(
    images: torch.Tensor,
    labels: torch.Tensor,
    predicted: torch.Tensor,
    probabilities: torch.Tensor,
    path: Path,
    limit: int = 36,
) -> None:
    """The most confident mistakes first, each with its true class, the predicted one and the
    probability the network gave it."""
    import matplotlib.pyplot as plt

    labels, predicted, probabilities = labels.cpu(), predicted.cpu(), probabilities.cpu()
    wrong = (predicted != labels).nonzero().flatten()
    shown = wrong[probabilities[wrong].argsort(descending=True, stable=True)][:limit]
    columns = 6
    rows = max(1, math.ceil(len(shown) / columns))
    figure, axes = plt.subplots(
        rows,
        columns,
        figsize=(columns * 1.7, rows * 1.9 + 0.5),
        squeeze=False,
        layout="constrained",
    )
    for axis in axes.flat:
        axis.axis("off")
    for axis, index in zip(axes.flat, shown.tolist()):
        axis.imshow(images[index].cpu().numpy(), cmap="gray")
        axis.set_title(
            f"true {int(labels[index])}, predicted {int(predicted[index])}\n"
            f"p = {float(probabilities[index]):.2f}",
            fontsize=8,
        )
    figure.suptitle(
        f"{len(shown)} of {len(wrong)} misclassified test images, most confident first "
        "(p: the predicted class's probability)"
    )
    save_figure(figure, path)


def write_results(args, model: CNN, data: dict, state: dict, run_dir: Path) -> dict:
    """Test-set evaluation, history, plots, then metrics.json: written last, it marks the run
    finished, so a run killed before it is resumed and writes them all again."""
    test_x, test_y = data["test"]
    test = evaluate(model, test_x, test_y)
    metrics = {
        "test_accuracy": test["accuracy"],
        "test_loss": test["loss"],
        **classification_metrics(test_y, test["predictions"], 10),
        "train_time_s": state["train_time_s"],
        "images_per_s": sum(row["seconds"] * row["images_per_s"] for row in state["history"])
        / max(state["train_time_s"], 1e-9),
        "epochs": args.epochs,
        "layers": args.layers,
        "test_images": len(test_y),
    }
    title = f"cnn_from_scratch.py ({args.layers} layers), seed {args.seed}"
    write_csv(run_dir / "history.csv", state["history"])
    plot_training_curves(
        state["history"], state["lr_by_step"], run_dir / "training_curves.png", title
    )
    plot_confusion_matrix(
        metrics["confusion_matrix"],
        [str(k) for k in range(10)],
        run_dir / "confusion_matrix.png",
        f"Test confusion matrix, {title}",
    )
    plot_misclassified(
        test_x, test_y, test["predictions"], test["probabilities"], run_dir / "misclassified.png"
    )
    atomic_write_json(run_dir / FINISHED_RECORD, metrics)
    return metrics


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    return run_main(run, args, explicit_options(parser, argv))


def open_run(args: argparse.Namespace, explicit: set[str]) -> tuple[Path | None, dict | None]:
    """The run folder and checkpoint to continue (args then take its settings), or None, None."""
    run_dir = find_resume_run(args.resume, args.output_dir)
    if run_dir is None:
        if args.resume == "auto":
            log("resume: no unfinished run found, starting a new run")
        return None, None
    recorded = read_run_record(run_dir)["args"]
    merge_resumed_args(args, recorded, explicit)
    checkpoint = read_checkpoint(run_dir / CHECKPOINT_NAME)
    removed = remove_stale_temp_files(run_dir)
    if removed:
        log(f"resume: removed {removed} temporary files of an interrupted write")
    return run_dir, checkpoint


def run(args: argparse.Namespace, explicit: set[str], stop: StopSignal) -> int:
    if args.check_gradients:
        lines, within = check_gradients()
        for line in lines:
            log(line)
        return 0 if within else FAILURE_EXIT_CODE
    if args.summarize:
        log(f"summary: {summarize_runs(args.summarize, args.output_dir)}")
        return 0
    offset = apply_array_seed(args)
    if offset:
        log(f"seed: --seed + SLURM array task {offset} = {args.seed}")
    run_dir, checkpoint = open_run(args, explicit)
    device = select_device(args.device)
    environment = environment_summary(device)
    log("environment: " + ", ".join(f"{k}={v}" for k, v in environment.items() if v is not None))
    data = load_data(args, device)
    sizes = ", ".join(f"{len(x)} {name}" for name, (x, _) in data.items())
    log(f"data: {sizes} images, uint8 on {device}")
    model = CNN(
        layers=args.layers, device=device, generator=torch.Generator().manual_seed(args.seed)
    )
    optimizer = SGD(model, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    log(f"model: {model.num_parameters():,} parameters, {args.layers} hand-written layers")
    state = new_training_state()
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        state = checkpoint["state"]
        restore_rng_state(checkpoint["rng"])
        log(f"resumed {run_dir} at epoch {state['epoch']} step {state['step_in_epoch']}")
    else:
        random.seed(args.seed)
        torch.manual_seed(args.seed)
        config = {
            "args": vars(args),
            "environment": environment,
            "parameters": model.num_parameters(),
        }
        run_dir = new_run(args.output_dir, config)
    log(f"run folder: {run_dir}")
    outcome = train(args, model, optimizer, data, state, stop, run_dir)
    if outcome == "diverged":
        kept = (
            f"the last good checkpoint (epoch {state['epoch']}) is kept in {run_dir}"
            if state["epoch"]
            else "no checkpoint was written (that needs a finished epoch)"
        )
        print(
            f"error: the training loss became NaN/inf in epoch {state['epoch'] + 1}; {kept}. "
            f"Lower --lr (now {args.lr}) or raise --warmup-epochs",
            file=sys.stderr,
            flush=True,
        )
        return DIVERGED_EXIT_CODE
    if outcome == "stopped":
        for line in stop_lines(stop, run_dir, f" in epoch {state['epoch'] + 1}"):
            log(line)
        return stop.exit_code
    metrics = write_results(args, model, data, state, run_dir)
    log(
        f"test accuracy {100 * metrics['test_accuracy']:.2f}%  loss {metrics['test_loss']:.4f}  "
        f"macro F1 {metrics['macro_f1']:.4f}  train time {metrics['train_time_s']:.1f}s "
        f"({metrics['images_per_s']:,.0f} img/s)"
    )
    log(f"results: {run_dir}")
    return 0


if __name__ == "__main__":
    code = main()
    # Python's shutdown resets handled signals to their defaults: ignore stop signals from
    # here on, so that a late one cannot kill the exiting process (143 where 75 was meant).
    for number in STOP_SIGNALS:
        signal.signal(number, signal.SIG_IGN)
    sys.exit(code)
