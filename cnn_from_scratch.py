"""A convolutional network written from scratch, trained on MNIST.

Every layer -- Conv2D, MaxPool2D, ReLU, Flatten, Linear and the fused softmax cross-entropy --
has a hand-written forward and backward pass on PyTorch tensor primitives (matmul, as_strided,
max, scatter, exp, log). No autograd and no torch.nn layer is used for training: the loop runs
under torch.no_grad() and every gradient below is computed by the code in this file.

    Conv(1->8, 3x3, pad 1) -> ReLU -> MaxPool(2) -> Conv(8->16, 3x3, pad 1) -> ReLU -> MaxPool(2)
    -> Flatten -> Linear(784 -> 10)

The 3x3 kernels with padding 1 keep the spatial size (28 -> 28 -> 14 -> 14 -> 7), so the flat
feature vector is 16 * 7 * 7 = 784, as the architecture requires; 5x5 with padding 2 would too,
at 25/9 = 2.8x the multiply-adds.

Run (defaults are the reported run: 5 epochs, batch 640, SGD with Nesterov momentum 0.9,
lr 0.1 with 1 epoch of linear warmup then cosine decay to 0, weight decay 5e-4):

    python cnn_from_scratch.py --data-dir ./data      # downloads MNIST there when missing
    python cnn_from_scratch.py --resume auto          # continue the newest interrupted run
    sbatch run_cnn.sbatch                             # the same on a SLURM cluster

Measured on a 2-core AMD EPYC VM, CPU only (no GPU run yet), torch 2.14.1, with the default
command and seeds 0, 1, 2: test accuracy 98.71%, 98.72%, 98.54% (median 98.71%), 5 epochs in
9.6-10.0 s of training (about 28,000 images/s). `python bench/cnn_vs_autograd.py` measures
0.97-1.54x (median 1.34x over sixteen runs) the throughput of the same network in torch.nn +
autograd on that CPU, and 1.08-1.11x when glibc keeps freed memory (README, "Speed").

Exit codes: 0 done; 2 bad input (message says what to fix); 3 the loss diverged (NaN/inf; the
last good checkpoint is kept); 75 stopped by SIGTERM/SIGUSR1 after writing a checkpoint:
rerun with `--resume auto` to continue exactly where it stopped.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESUMABLE_EXIT_CODE = 75  # EX_TEMPFAIL: a checkpoint was written; `--resume auto` continues
DIVERGED_EXIT_CODE = 3
USAGE_EXIT_CODE = 2
RUN_PREFIX = "cnn"
CHECKPOINT_NAME = "checkpoint_last.pt"
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
# Hyperparameters that define a run: on resume they come from the checkpoint, and an explicit
# command-line value that contradicts the checkpoint is an error rather than a silent change.
RUN_DEFINING_ARGS = (
    "epochs",
    "batch_size",
    "lr",
    "momentum",
    "weight_decay",
    "warmup_epochs",
    "seed",
    "val_size",
)


# --------------------------------------------------------------------------------------------
# CLI and environment
# --------------------------------------------------------------------------------------------


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train a from-scratch CNN (hand-written forward/backward) on MNIST.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--data-dir",
        default=os.environ.get("DATA_DIR", "./data"),
        help="folder holding MNIST/raw/ (torchvision layout); downloaded there when missing "
        "and online. Default: $DATA_DIR, else ./data",
    )
    parser.add_argument(
        "--output-dir",
        default=os.environ.get("RESULTS_DIR", "./results"),
        help="where the timestamped results folder is made. Default: $RESULTS_DIR, else ./results",
    )
    parser.add_argument("--epochs", type=int, default=5, help="training epochs")
    parser.add_argument("--batch-size", type=int, default=640, help="training batch size")
    parser.add_argument("--lr", type=float, default=0.1, help="peak learning rate")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD Nesterov momentum")
    parser.add_argument("--weight-decay", type=float, default=5e-4, help="L2 weight decay")
    parser.add_argument(
        "--warmup-epochs",
        type=float,
        default=1.0,
        help="linear warmup length (epochs), then cosine decay to 0",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for init, split and shuffling")
    parser.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda", "mps"],
        help="auto picks cuda, then mps, then cpu",
    )
    parser.add_argument(
        "--val-size", type=int, default=5000, help="images held out from train for validation"
    )
    parser.add_argument(
        "--resume",
        default=None,
        help="a checkpoint to continue from, or 'auto': the newest checkpoint of this SLURM job "
        "(or, outside SLURM, of --output-dir); 'auto' with none found starts a new run",
    )
    return parser


class UserError(Exception):
    """A mistake the user can fix: printed as one 'error:' message, exit code 2."""


def log(message: str) -> None:
    print(message, flush=True)


def select_device(name: str) -> torch.device:
    """Resolve --device; 'auto' prefers cuda, then mps, then cpu."""
    mps_available = hasattr(torch.backends, "mps") and torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if mps_available else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu")
    if name == "mps" and not mps_available:
        raise UserError("--device mps was asked for but MPS is not available; use --device cpu")
    return torch.device(name)


def git_commit() -> str | None:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


def environment_summary(device: torch.device) -> dict:
    """What ran where: versions, host, device and SLURM job, for the log and config.json."""
    summary = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "host": socket.gethostname(),
        "device": str(device),
        "cpu_threads": torch.get_num_threads(),
        "git_commit": git_commit(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT"),
    }
    if device.type == "cuda":
        summary["gpu"] = torch.cuda.get_device_name(device)
        summary["cuda"] = torch.version.cuda
    return summary


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def _last_line(error: BaseException) -> str:
    """The most specific line of a (possibly multi-line) exception message."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def load_mnist(
    data_dir: str | Path, train: bool = True, download: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read MNIST through torchvision: uint8 images (N, 28, 28) and int64 labels (N,)."""
    from torchvision.datasets import MNIST

    raw = Path(data_dir) / "MNIST" / "raw"
    missing = [name for name in MNIST_FILES if not (raw / name).is_file()]
    how_to_fetch = (
        f"On a machine with internet run `python cnn_from_scratch.py --data-dir {data_dir}` "
        "(or `./setup_env.sh --prefetch`) and copy the folder here, or pass --data-dir to "
        "a folder that holds MNIST/raw/."
    )
    if missing and download:
        try:
            MNIST(root=str(data_dir), train=train, download=True)
        except Exception as error:  # torchvision raises RuntimeError/URLError/OSError offline
            raise UserError(
                f"MNIST is not in {raw} (missing: {', '.join(missing)}) and downloading it "
                f"failed ({_last_line(error)}). {how_to_fetch}"
            ) from None
        missing = [name for name in MNIST_FILES if not (raw / name).is_file()]
    if missing:
        raise UserError(f"MNIST files missing in {raw}: {', '.join(missing)}. {how_to_fetch}")
    try:
        dataset = MNIST(root=str(data_dir), train=train, download=False)
        images, labels = dataset.data, dataset.targets
    except Exception as error:  # a truncated or corrupt IDX file fails inside torchvision
        split = "train" if train else "t10k"
        raise UserError(
            f"could not read the MNIST {split} files in {raw} ({type(error).__name__}: "
            f"{_last_line(error)}); they are corrupt or truncated. "
            f"Delete them and fetch them again. {how_to_fetch}"
        ) from None
    if (
        images.dtype != torch.uint8
        or images.dim() != 3
        or tuple(images.shape[1:]) != (28, 28)
        or len(labels) != len(images)
        or len(images) == 0
        or int(labels.min()) < 0
        or int(labels.max()) > 9
    ):
        raise UserError(
            f"the MNIST files in {raw} hold {tuple(images.shape)} images and {len(labels)} "
            "labels, not N 28x28 images with labels 0-9; they are corrupt: fetch them again."
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


def preprocess(images_uint8: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (N, 28, 28) on the device -> normalised (N, 1, 28, 28), on the same device."""
    scale = 1.0 / (255.0 * MNIST_STD)
    return (images_uint8.to(dtype) * scale - MNIST_MEAN / MNIST_STD).unsqueeze(1)


# --------------------------------------------------------------------------------------------
# Model: layers with hand-written forward and backward passes
# --------------------------------------------------------------------------------------------
#
# Contract (as in cs231n's layers.py): forward(x) stores what backward needs in self.cache;
# backward(grad_out) returns the gradient with respect to the forward input and, for trainable
# layers, overwrites self.grads (same keys and layouts as self.params, which are torch's own:
# conv weight (out, in, kh, kw), linear weight (out, in)).
#
# Image tensors have torch's (N, C, H, W) shape. Internally the convolution works channels-last
# (N, H, W, C): im2col then lands the output channels in the matmul's last dimension, so its
# result *is* the next activation, returned as an (N, C, H, W)-shaped view with channels-last
# strides. ReLU and pooling keep those strides, so no layer pays for a layout copy.


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _output_size(size: int, kernel: int, stride: int, padding: int, what: str) -> int:
    out = (size + 2 * padding - kernel) // stride + 1
    if out < 1:
        raise ValueError(
            f"{what}: input size {size} with padding {padding} is smaller than kernel {kernel}"
        )
    return out


# Convolution and pooling work a few MB of images at a time: a chunk's columns, or its input
# across a pooling's kh * kw passes, stay in the cache (L3 here) between the operations that
# write and read them, where the whole batch would stream from memory each time (measured).
CACHE_BYTES = 4 << 20


def _image_chunks(num_images: int, bytes_per_image: int) -> list[slice]:
    """Consecutive slices of the batch of about CACHE_BYTES each, at least one image each."""
    step = max(1, CACHE_BYTES // max(1, bytes_per_image))
    return [slice(start, min(start + step, num_images)) for start in range(0, num_images, step)]


class Conv2D:
    """2-D cross-correlation (torch's convolution) as matrix products.

    forward:  x (N, C_in, H, W) -> (N, C_out, H_out, W_out),
              H_out = (H + 2 * padding - kernel_h) // stride + 1 (likewise W_out).
    backward: grad_out (N, C_out, H_out, W_out) -> grad_in (N, C_in, H, W); sets
              grads["weight"] (C_out, C_in, kh, kw) and grads["bias"] (C_out,).
              With needs_input_grad False (a first layer, whose input is data) grad_in is
              not computed and None is returned: it is the costliest part of backward.

    Two formulations, each following the input's memory (both measured on this CPU):
    - Kernel rows, for channels-last input with vertical stride 1 (the second layer): a
      matrix with one row per (image, padded input row y, output column x) holds the
      kw * C_in values one kernel row sees there, a third of im2col's copy. Kernel row i then
      adds rows[y + i] @ W_i to output row y; in the flattened matrix that shift is a fixed
      row offset, so each kernel row is one matmul on a view. The output is computed on the
      padded input's rows and the kh - 1 extra rows per image are dropped by a view.
    - im2col otherwise: (positions, kh * kw * C_in) copied in runs of kw * C_in values for
      channels-last input, or (C_in * kh * kw, positions) in runs along W (a one-channel
      image, say), then one matmul.
    Either way the matmul yields (positions, C_out), the channels-last output itself, and
    the work goes a few MB of images at a time so each chunk's copies stay in the cache.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        generator: torch.Generator | None = None,
    ):
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        kh, kw = self.kernel_size
        fan_in = in_channels * kh * kw
        # He initialisation: keeps the activation variance constant through ReLU layers.
        weight = torch.randn(out_channels, in_channels, kh, kw, generator=generator, dtype=dtype)
        self.params = {
            "weight": (weight * math.sqrt(2.0 / fan_in)).to(device),
            "bias": torch.zeros(out_channels, dtype=dtype, device=device),
        }
        self.grads: dict[str, torch.Tensor] = {}
        self.needs_input_grad = True
        self.cache = None
        self._buffers: dict[str, torch.Tensor] = {}

    def _weight_matrix(self, channels_last: bool) -> torch.Tensor:
        """(C_out, K), K ordered (kh, kw, C_in) for channels-last columns, else (C_in, kh, kw)."""
        weight = self.params["weight"]
        if channels_last:
            weight = weight.permute(0, 2, 3, 1)
        return weight.reshape(self.out_channels, -1)

    def _workspace(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A buffer of exactly `shape` kept between calls (the zero-bordered padded input:
        only its interior is ever written, so the border stays zero while it is reused)."""
        buffer = self._buffers.get(name)
        if (
            buffer is None
            or buffer.shape != shape
            or buffer.dtype != like.dtype
            or buffer.device != like.device
        ):
            buffer = self._buffers[name] = like.new_zeros(shape)
        return buffer

    def _scratch(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A contiguous `shape` view of a buffer kept between calls, grown when too small; its
        contents are always overwritten before use. Allocating MB-sized buffers anew every
        step costs more in page faults than filling them (measured 6x on the 2-core CPU).
        Only internal buffers live here, never a tensor this layer returns."""
        size = math.prod(shape)
        buffer = self._buffers.get(name)
        if (
            buffer is None
            or buffer.numel() < size
            or buffer.dtype != like.dtype
            or buffer.device != like.device
        ):
            buffer = self._buffers[name] = like.new_empty(size)
        return buffer[:size].view(shape)

    def _columns(
        self,
        padded: torch.Tensor,
        h_out: int,
        w_out: int,
        channels_last: bool,
        window: tuple[int, int] | None = None,
        stride: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """im2col of (some images of) the padded input: (positions, K) rows, in a reused
        buffer. Channels-last input gives (positions, K) copied in runs of kw * C_in values;
        otherwise (C_in * K, positions) is filled in runs along W and returned as a transposed
        view, which BLAS reads as is. K is ordered as in _weight_matrix. window and stride
        default to the layer's kernel and stride (conv_weight_grad_through_pool takes wider
        windows at the pool's stride)."""
        (kh, kw), (sh, sw) = window or self.kernel_size, stride or self.stride
        count, c = len(padded), self.in_channels
        if channels_last:
            stride_n, stride_h, stride_w, stride_c = padded.stride()
            windows = padded.as_strided(
                (count, h_out, w_out, kh, kw, c),
                (stride_n, stride_h * sh, stride_w * sw, stride_h, stride_w, stride_c),
            )
            rows = self._scratch("columns", (count * h_out * w_out, kh * kw * c), padded)
            rows.view(windows.shape).copy_(windows)
            return rows
        stride_n, stride_c, stride_h, stride_w = padded.stride()
        windows = padded.as_strided(
            (c, kh, kw, count, h_out, w_out),
            (stride_c, stride_h, stride_w, stride_n, stride_h * sh, stride_w * sw),
        )
        columns = self._scratch("columns", (c * kh * kw, count * h_out * w_out), padded)
        columns.view(windows.shape).copy_(windows)
        return columns.t()

    def _kernel_row_weights(self) -> torch.Tensor:
        """(kh, kw * C_in, C_out): kernel row i's weights, ordered like a row of _row_windows."""
        kh, kw = self.kernel_size
        weight = self.params["weight"].permute(2, 3, 1, 0)
        return weight.reshape(kh, kw * self.in_channels, self.out_channels)

    def _uses_kernel_rows(self, padded: torch.Tensor, channels_last: bool) -> bool:
        """Kernel rows need channels-last input whose (W, C) values are contiguous (always
        true of the padded buffer) and a vertical stride of 1, the row shift being exact."""
        if not channels_last or self.stride[0] != 1:
            return False
        _, _, stride_w, stride_c = padded.stride()
        return stride_c == 1 and stride_w == padded.shape[3]

    def _row_windows(self, padded: torch.Tensor, w_out: int) -> torch.Tensor:
        """For some images of the channels-last padded input (count, H_pad, W_pad, C_in):
        (count * H_pad * W_out + (kh - 1) * W_out, kw * C_in) in a reused buffer, row
        (image, y, x) holding the kw * C_in contiguous values that start at
        padded[image, y, x * stride_w]. The (kh - 1) * W_out zero rows at the end keep every
        row-shifted view inside the buffer; they only ever meet output rows that are dropped."""
        (kh, kw), (_, sw) = self.kernel_size, self.stride
        count, height, _, c = padded.shape
        stride_n, stride_h, stride_w, _ = padded.stride()
        windows = padded.as_strided(
            (count, height, w_out, kw * c), (stride_n, stride_h, stride_w * sw, 1)
        )
        rows = count * height * w_out
        buffer = self._scratch("row_windows", (rows + (kh - 1) * w_out, kw * c), padded)
        buffer[:rows].view(windows.shape).copy_(windows)
        buffer[rows:].zero_()
        return buffer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        if c != self.in_channels:
            raise ValueError(f"Conv2D expects {self.in_channels} input channels, got {c}")
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        h_out = _output_size(h, kh, sh, ph, "Conv2D height")
        w_out = _output_size(w, kw, sw, pw, "Conv2D width")
        channels_last = c > 1 and x.stride(1) == 1
        # Work in a padded buffer laid out like the input: NHWC if channels-last, else NCHW.
        source = x.permute(0, 2, 3, 1) if channels_last else x
        if ph or pw:
            if channels_last:
                padded = self._workspace("padded", (n, h + 2 * ph, w + 2 * pw, c), x)
                padded[:, ph : ph + h, pw : pw + w] = source
            else:
                padded = self._workspace("padded", (n, c, h + 2 * ph, w + 2 * pw), x)
                padded[:, :, ph : ph + h, pw : pw + w] = source
        else:
            padded = source
        kernel_rows = self._uses_kernel_rows(padded, channels_last)
        self.cache = (x.shape, padded, (h_out, w_out, channels_last, kernel_rows))
        bias = self.params["bias"]
        if kernel_rows:
            weights, height = self._kernel_row_weights(), padded.shape[1]
            per_image = height * w_out
            out = x.new_empty((n * per_image, self.out_channels))
            for images in _image_chunks(n, per_image * kw * c * x.element_size()):
                windows = self._row_windows(padded[images], w_out)
                rows = (images.stop - images.start) * per_image
                out_rows = out[images.start * per_image : images.start * per_image + rows]
                torch.mm(windows[:rows], weights[0], out=out_rows)
                for i in range(1, kh):
                    out_rows.addmm_(windows[i * w_out : i * w_out + rows], weights[i])
                out_rows += bias  # while in the cache; cheaper than addmm's broadcast
            out = out.view(n, height, w_out, self.out_channels)[:, :h_out]
            return out.permute(0, 3, 1, 2)
        # im2col: a few images at a time, each chunk's columns copied and multiplied while
        # they are in the cache.
        per_image = h_out * w_out
        out = x.new_empty((n * per_image, self.out_channels))
        weight = self._weight_matrix(channels_last)
        for images in _image_chunks(n, per_image * c * kh * kw * x.element_size()):
            rows = self._columns(padded[images], h_out, w_out, channels_last)
            out_rows = out[images.start * per_image : images.stop * per_image]
            if channels_last:
                torch.mm(rows, weight.t(), out=out_rows)
                out_rows += bias
            else:
                # rows is a view of a (K, positions) buffer: BLAS multiplies (C_out, K) @
                # (K, positions) about twice as fast as the transposed product on such skinny
                # shapes (measured), and the transposing store adds the bias on the way.
                product = self._scratch("product", (self.out_channels, len(rows)), x)
                torch.mm(weight, rows.t(), out=product)
                torch.add(product.t(), bias, out=out_rows)
        return out.view(n, h_out, w_out, self.out_channels).permute(0, 3, 1, 2)

    def backward(self, grad_out: torch.Tensor) -> torch.Tensor | None:
        _, _, (_, _, _, kernel_rows) = self.cache
        if kernel_rows:
            return self._backward_kernel_rows(grad_out)
        return self._backward_im2col(grad_out)

    def _backward_kernel_rows(self, grad_out: torch.Tensor) -> torch.Tensor | None:
        (n, c, h, w), padded, (h_out, w_out, _, _) = self.cache
        (kh, kw), (_, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        height, width = padded.shape[1:3]
        per_image = height * w_out
        # The output gradient on the same grid as the forward's output rows; the kh - 1
        # extra rows per image stay zero, so whatever they meet adds nothing.
        grad_grid = self._workspace("grad_grid", (n, height, w_out, self.out_channels), grad_out)
        grad_grid[:, :h_out] = grad_out.permute(0, 2, 3, 1)
        weights = self._kernel_row_weights()
        grad_weights = grad_out.new_zeros(weights.shape)
        grad_padded = grad_out.new_zeros((n, height, width, c)) if self.needs_input_grad else None
        for images in _image_chunks(n, per_image * kw * c * grad_out.element_size()):
            count = images.stop - images.start
            rows = count * per_image
            windows = self._row_windows(padded[images], w_out)
            grad_rows = grad_grid[images].view(rows, self.out_channels)
            for i in range(kh):
                grad_weights[i].addmm_(windows[i * w_out : i * w_out + rows].t(), grad_rows)
            if grad_padded is None:
                continue
            # The gradient of the row windows: each kernel row's product lands shifted by the
            # same row offset as in forward; then each of the kw column offsets is added into
            # the padded input gradient.
            grad_windows = self._scratch("grad_row_windows", windows.shape, grad_out)
            torch.mm(grad_rows, weights[0].t(), out=grad_windows[:rows])
            grad_windows[rows:].zero_()
            for i in range(1, kh):
                grad_windows[i * w_out : i * w_out + rows].addmm_(grad_rows, weights[i].t())
            grad_windows = grad_windows[:rows].view(count, height, w_out, kw, c)
            target = grad_padded[images]
            for j in range(kw):
                target[:, :, j : j + sw * (w_out - 1) + 1 : sw] += grad_windows[:, :, :, j]
        grad_weight = grad_weights.view(kh, kw, c, self.out_channels).permute(3, 2, 0, 1)
        self.grads["weight"] = grad_weight.contiguous()
        self.grads["bias"] = grad_grid.view(-1, self.out_channels).sum(0)
        if grad_padded is None:
            return None
        return grad_padded[:, ph : ph + h, pw : pw + w].permute(0, 3, 1, 2)

    def _backward_im2col(self, grad_out: torch.Tensor) -> torch.Tensor | None:
        (n, c, h, w), padded, (h_out, w_out, channels_last, _) = self.cache
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        per_image, taps = h_out * w_out, c * kh * kw
        grad_rows = grad_out.permute(0, 2, 3, 1).reshape(n * per_image, self.out_channels)
        chunks = _image_chunks(n, per_image * taps * grad_out.element_size())
        # The weight gradient, chunk by chunk from columns copied again (cheaper than keeping
        # the whole column matrix between forward and backward, measured).
        grad_weight_t = grad_out.new_zeros((taps, self.out_channels))
        for images in chunks:
            rows = self._columns(padded[images], h_out, w_out, channels_last)
            grad_weight_t.addmm_(
                rows.t(), grad_rows[images.start * per_image : images.stop * per_image]
            )
        grad_weight = grad_weight_t.t()
        if channels_last:
            grad_weight = grad_weight.reshape(self.out_channels, kh, kw, c).permute(0, 3, 1, 2)
        self.grads["weight"] = grad_weight.reshape(self.params["weight"].shape).contiguous()
        self.grads["bias"] = grad_rows.sum(0)
        if not self.needs_input_grad:
            return None
        # Gradient of the columns, laid out (C_in, kh, kw, images, H_out, W_out): each tap's
        # slice is then a block whose rows run along W, like the (C, N, H, W) buffer it is
        # added to; again a few images at a time, so that block is in the cache when added.
        weight = self._weight_matrix(channels_last=False)
        grad_padded = grad_out.new_zeros((c, n, h + 2 * ph, w + 2 * pw))
        for images in chunks:
            count = images.stop - images.start
            grad_cols = self._scratch("grad_columns", (taps, count * per_image), grad_out)
            rows = grad_rows[images.start * per_image : images.stop * per_image]
            torch.mm(weight.t(), rows.t(), out=grad_cols)
            grad_cols = grad_cols.view(c, kh, kw, count, h_out, w_out)
            target = grad_padded[:, images]
            for i in range(kh):
                for j in range(kw):
                    target[
                        :, :, i : i + sh * (h_out - 1) + 1 : sh, j : j + sw * (w_out - 1) + 1 : sw
                    ] += grad_cols[:, i, j]
        return grad_padded[:, :, ph : ph + h, pw : pw + w].permute(1, 0, 2, 3)


class MaxPool2D:
    """Max pooling; the gradient goes to the first maximum of each window, as in torch.

    forward:  x (N, C, H, W) -> (N, C, H_out, W_out), H_out = (H - kernel_h) // stride + 1.
    backward: grad_out (N, C, H_out, W_out) -> grad_in (N, C, H, W).
    stride defaults to kernel_size.

    Each kernel tap is a strided view of the input, so the forward pass is a running
    elementwise maximum over kh * kw taps, with no copy and no index tensor; beside it, one 0/1
    float mask per tap records where that tap took the window (strictly greater than every
    earlier tap, so the first maximum keeps it, as in torch). Backward routes the gradient
    with those masks, two elementwise operations per tap; float masks because float
    arithmetic is the fast path on the CPU.
    """

    def __init__(
        self, kernel_size: int | tuple[int, int], stride: int | tuple[int, int] | None = None
    ):
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride) if stride is not None else self.kernel_size
        self.cache = None

    def _taps(self, x: torch.Tensor, h_out: int, w_out: int) -> list[torch.Tensor]:
        """kh * kw views (N, C, H_out, W_out): tap (i, j) is x[..., i + s*oh, j + s*ow]."""
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        return [
            x[:, :, i : i + sh * (h_out - 1) + 1 : sh, j : j + sw * (w_out - 1) + 1 : sw]
            for i in range(kh)
            for j in range(kw)
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, h, w = x.shape
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        h_out = _output_size(h, kh, sh, 0, "MaxPool2D height")
        w_out = _output_size(w, kw, sw, 0, "MaxPool2D width")
        taps = self._taps(x, h_out, w_out)
        out = taps[0].clone()
        # A running maximum over the taps in window order. takes[t] marks where tap t + 1 is
        # strictly greater than every earlier tap, so on ties the earlier tap keeps the window
        # (the first maximum, as in torch); backward needs nothing else.
        takes = []
        for tap in taps[1:]:
            takes.append(torch.gt(tap, out, out=torch.empty_like(out)))
            torch.maximum(out, tap, out=out)
        self.cache = (x, out, takes)
        return out

    def backward(self, grad_out: torch.Tensor) -> torch.Tensor:
        x, out, takes = self.cache
        _, _, h_out, w_out = out.shape
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        # When the windows tile the input exactly, every input element is written once below,
        # so the buffer needs no zeroing; otherwise overlaps add up and gaps stay zero.
        tiles_exactly = (kh, kw) == (sh, sw) and (h_out * kh, w_out * kw) == tuple(x.shape[2:])
        grad_in = torch.empty_like(x) if tiles_exactly else torch.zeros_like(x)
        if grad_out.stride() != out.stride():  # match the layout of `out`: faster loops below
            grad_out = torch.empty_like(out).copy_(grad_out)
        for rows in _image_chunks(len(x), x[0].numel() * x.element_size()):
            self._route_gradient(
                grad_out[rows],
                [take[rows] for take in takes],
                self._taps(grad_in[rows], h_out, w_out),
                accumulate=not tiles_exactly,
            )
        return grad_in

    def _route_gradient(
        self,
        grad_out: torch.Tensor,
        takes: list[torch.Tensor],
        grad_taps: list[torch.Tensor],
        accumulate: bool,
    ) -> None:
        """Give each window's gradient to the tap that took the window last, i.e. its first
        maximum: from the last tap back, each takes what no later tap took. grad_taps[t]
        (shaped like grad_out) receives tap t's share: written over, or with accumulate
        (overlapping windows) added to."""
        remaining = grad_out
        for take, grad_tap in zip(reversed(takes), reversed(grad_taps[1:])):
            if accumulate:
                taken = remaining * take
                grad_tap += taken
                remaining = remaining - taken
            else:
                torch.mul(remaining, take, out=grad_tap)
                remaining = remaining - grad_tap
        if accumulate:
            grad_taps[0] += remaining
        else:
            grad_taps[0].copy_(remaining)


def conv_weight_grad_through_pool(conv: Conv2D, pool: MaxPool2D, grad_pooled: torch.Tensor) -> None:
    """Set conv.grads from the gradient of the max-pool its output feeds (directly, or through
    a layer whose derivative grad_pooled already includes, such as a ReLU), without forming
    the gradient of the convolution's full-size output. For a first layer, which needs no
    input gradient; stride-1 convolutions only.

    grad_pooled: (N, C_out, H_pool, W_pool), the gradient of pool's output.

    Each pool window hands its gradient to one tap (dy, dx), the convolution output at
    (py * s + dy, px * s + dx), which saw the padded input at (py * s + dy + i, px * s + dx + j).
    So the weight gradient is one product of two matrices over window positions: the padded
    input's (span_h * span_w * C_in) windows, span = pool kernel + conv kernel - 1, taken with
    the pool's stride, and the (taps * C_out) gradient each window routes to each tap; the
    (dy + i, dx + j) diagonals of that product sum to the (C_out, C_in, kh, kw) gradient.
    For the first layer (1 -> 8 channels, 2x2 pool) the product is 16 x 32 over a quarter of
    the positions where the plain one is 9 x 8 over all of them: BLAS runs it several times
    faster, and the pool's full-size backward pass is not needed (measured).
    """
    if conv.stride != (1, 1):
        raise ValueError("conv_weight_grad_through_pool needs a stride-1 convolution")
    (n, c, _, _), padded, (_, _, channels_last, _) = conv.cache
    _, out, takes = pool.cache
    (kh, kw), (pool_h, pool_w), (sh, sw) = conv.kernel_size, pool.kernel_size, pool.stride
    _, c_out, h_pool, w_pool = out.shape
    span_h, span_w, taps = pool_h + kh - 1, pool_w + kw - 1, pool_h * pool_w
    if grad_pooled.stride() != out.stride():  # the layout of the masks: faster loops
        grad_pooled = torch.empty_like(out).copy_(grad_pooled)
    per_image, width = h_pool * w_pool, span_h * span_w * c
    products = grad_pooled.new_zeros((width, taps * c_out))
    bytes_per_image = per_image * (width + taps * c_out) * grad_pooled.element_size()
    for images in _image_chunks(n, bytes_per_image):
        count = images.stop - images.start
        routed = conv._scratch("routed", (count, h_pool, w_pool, taps, c_out), grad_pooled)
        pool._route_gradient(
            grad_pooled[images],
            [take[images] for take in takes],
            [routed[:, :, :, tap].permute(0, 3, 1, 2) for tap in range(taps)],
            accumulate=False,
        )
        routed = routed.view(count * per_image, taps * c_out)
        windows = conv._columns(
            padded[images], h_pool, w_pool, channels_last, (span_h, span_w), (sh, sw)
        )
        products.addmm_(windows.t(), routed)
    if channels_last:
        products = products.view(span_h, span_w, c, pool_h, pool_w, c_out)
    else:
        products = products.view(c, span_h, span_w, pool_h, pool_w, c_out).permute(1, 2, 0, 3, 4, 5)
    grad_weight = grad_pooled.new_zeros((kh, kw, c, c_out))
    for dy in range(pool_h):
        for dx in range(pool_w):
            grad_weight += products[dy : dy + kh, dx : dx + kw, :, dy, dx]
    conv.grads["weight"] = grad_weight.permute(3, 2, 0, 1).contiguous()
    conv.grads["bias"] = grad_pooled.sum((0, 2, 3))


class ReLU:
    """max(x, 0) elementwise. forward: x (any shape) -> same; backward: grad_out -> grad_in.

    inplace=True overwrites the input (as torch.nn.ReLU(inplace=True)): right after a
    convolution, whose output nothing else keeps, that saves a full activation write.
    """

    def __init__(self, inplace: bool = False):
        self.inplace = inplace
        self.cache = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x.clamp_(min=0) if self.inplace else x.clamp(min=0)
        self.cache = out
        return out

    def backward(self, grad_out: torch.Tensor) -> torch.Tensor:
        # The derivative at 0 is taken as 0, as torch does. A float 0/1 mask multiplies much
        # faster than a bool one on the CPU.
        mask = torch.gt(self.cache, 0, out=torch.empty_like(self.cache))
        return mask.mul_(grad_out)


class Flatten:
    """forward: x (N, C, H, W) -> (N, C * H * W) in torch's (C, H, W) order; backward: inverse."""

    def __init__(self):
        self.cache = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.cache = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, grad_out: torch.Tensor) -> torch.Tensor:
        return grad_out.reshape(self.cache)


class Linear:
    """y = x W^T + b.

    forward:  x (N, in_features) -> (N, out_features).
    backward: grad_out (N, out_features) -> grad_in (N, in_features); sets
              grads["weight"] (out_features, in_features) and grads["bias"] (out_features,).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        generator: torch.Generator | None = None,
    ):
        self.in_features, self.out_features = in_features, out_features
        bound = 1.0 / math.sqrt(in_features)  # torch.nn.Linear's default range
        weight = torch.rand(out_features, in_features, generator=generator, dtype=dtype)
        self.params = {
            "weight": ((weight * 2 - 1) * bound).to(device),
            "bias": torch.zeros(out_features, dtype=dtype, device=device),
        }
        self.grads: dict[str, torch.Tensor] = {}
        self.needs_input_grad = True
        self.cache = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"Linear expects (N, {self.in_features}), got {tuple(x.shape)}")
        self.cache = x
        return torch.addmm(self.params["bias"], x, self.params["weight"].t())

    def backward(self, grad_out: torch.Tensor) -> torch.Tensor | None:
        x = self.cache
        self.grads["weight"] = grad_out.t() @ x
        self.grads["bias"] = grad_out.sum(0)
        return grad_out @ self.params["weight"] if self.needs_input_grad else None


class SoftmaxCrossEntropy:
    """Mean cross-entropy of softmax(logits), fused with its gradient.

    forward(logits (N, K), targets (N,) int64) -> scalar mean loss (log-sum-exp, stable).
    backward() -> grad_logits (N, K) = (softmax(logits) - one_hot(targets)) / N.
    """

    def __init__(self):
        self.cache = None

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        shifted = logits - logits.amax(dim=1, keepdim=True)
        log_probs = shifted - shifted.exp().sum(dim=1, keepdim=True).log()
        self.cache = (log_probs, targets)
        return -log_probs.gather(1, targets.unsqueeze(1)).mean()

    def backward(self) -> torch.Tensor:
        log_probs, targets = self.cache
        grad = log_probs.exp()
        grad.scatter_add_(
            1, targets.unsqueeze(1), torch.full_like(grad[:, :1], -1.0)
        )  # softmax - one_hot
        return grad.div_(len(targets))


class CNN:
    """The seed architecture; forward(x (N, 1, 28, 28)) -> logits (N, 10)."""

    def __init__(
        self,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        generator: torch.Generator | None = None,
    ):
        factory = {"device": device, "dtype": dtype, "generator": generator}
        self.layers = [
            Conv2D(1, 8, 3, padding=1, **factory),
            ReLU(inplace=True),
            MaxPool2D(2),
            Conv2D(8, 16, 3, padding=1, **factory),
            ReLU(inplace=True),
            MaxPool2D(2),
            Flatten(),
            Linear(16 * 7 * 7, 10, **factory),
        ]
        self.layers[0].needs_input_grad = False  # its input is the data

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def backward(self, grad_logits: torch.Tensor) -> None:
        grad, index = grad_logits, len(self.layers) - 1
        while index >= 0:
            layer = self.layers[index]
            if isinstance(layer, MaxPool2D) and index and isinstance(self.layers[index - 1], ReLU):
                # A max-pool hands each window's gradient to the window's maximum, where the
                # ReLU before it has derivative [maximum > 0] = [pooled output > 0]. So the
                # ReLU's mask is applied to the pooled gradient (a quarter of the size) and
                # the ReLU's own full-size backward pass is skipped: the same numbers.
                pooled = layer.cache[1]
                grad = torch.gt(pooled, 0, out=torch.empty_like(pooled)).mul_(grad)
                conv = self.layers[index - 2] if index >= 2 else None
                if isinstance(conv, Conv2D) and not conv.needs_input_grad and conv.stride == (1, 1):
                    # The first convolution's weight gradient straight from the pooled one:
                    # neither the pool's nor the convolution's full-size gradient is formed.
                    conv_weight_grad_through_pool(conv, layer, grad)
                    index -= 3
                    continue
                grad = layer.backward(grad)
                index -= 2
            else:
                grad = layer.backward(grad)
                index -= 1

    def trainable_layers(self) -> list[tuple[int, Conv2D | Linear]]:
        return [(i, layer) for i, layer in enumerate(self.layers) if hasattr(layer, "params")]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            f"layers.{i}.{name}": tensor.clone()
            for i, layer in self.trainable_layers()
            for name, tensor in layer.params.items()
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.state_dict())
        if set(state) != expected:
            raise ValueError(f"state dict keys {sorted(state)} do not match {sorted(expected)}")
        for i, layer in self.trainable_layers():
            for name, tensor in layer.params.items():
                tensor.copy_(state[f"layers.{i}.{name}"])

    def num_parameters(self) -> int:
        return sum(t.numel() for _, layer in self.trainable_layers() for t in layer.params.values())


class SGD:
    """SGD with (Nesterov) momentum and L2 weight decay, in place, as torch.optim.SGD does it.

    step(): g = grad + weight_decay * p; buf = momentum * buf + g;
            p -= lr * (g + momentum * buf) with nesterov, else p -= lr * buf.
    """

    def __init__(
        self,
        model: CNN,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        nesterov: bool = True,
    ):
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


class StopSignal:
    """Turns SIGTERM/SIGUSR1 into a flag the training loop checks after every step."""

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self):
        self.received: str | None = None
        self._previous = {}

    def __enter__(self) -> StopSignal:
        for name in self.SIGNALS:
            if hasattr(signal, name):
                number = getattr(signal, name)
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def _handle(self, number, frame) -> None:
        self.received = signal.Signals(number).name


def learning_rate(step: int, total_steps: int, peak_lr: float, warmup_steps: int) -> float:
    """Linear warmup from peak/warmup to peak, then cosine decay to 0 at total_steps."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def iterate_batches(
    num_items: int, batch_size: int, generator: torch.Generator, device: torch.device
) -> list[torch.Tensor]:
    """One epoch's shuffled index batches (the last one may be short), moved to the device."""
    order = torch.randperm(num_items, generator=generator).to(device)
    return list(order.split(batch_size))


@torch.no_grad()
def evaluate(
    model: CNN, images_uint8: torch.Tensor, labels: torch.Tensor, batch_size: int = 2000
) -> dict:
    """Loss, accuracy and predictions over a whole split (uint8 images on the device)."""
    loss_fn = SoftmaxCrossEntropy()
    total_loss, predictions = 0.0, []
    for start in range(0, len(images_uint8), batch_size):
        x = preprocess(images_uint8[start : start + batch_size])
        y = labels[start : start + batch_size]
        logits = model.forward(x)
        total_loss += float(loss_fn.forward(logits, y)) * len(y)
        predictions.append(logits.argmax(dim=1))
    predicted = torch.cat(predictions) if predictions else labels.new_zeros(0)
    count = max(1, len(labels))
    return {
        "loss": total_loss / count,
        "accuracy": float((predicted == labels).sum()) / count,
        "predictions": predicted,
    }


@torch.no_grad()
def train(
    args: argparse.Namespace,
    model: CNN,
    optimizer: SGD,
    data: dict,
    state: dict,
    save_checkpoint,
    stop: StopSignal,
    on_epoch_end,
) -> str:
    """Run (or continue) training from `state`; returns "done", "stopped" or "diverged".

    `state` holds the epoch, the step within it and the epoch's running sums, so a checkpoint
    written mid-epoch resumes bit-identically: the same permutation is drawn again and the
    finished steps are skipped.
    """
    from tqdm import tqdm

    train_x, train_y = data["train"]
    steps_per_epoch = math.ceil(len(train_x) / args.batch_size)
    total_steps = steps_per_epoch * args.epochs
    warmup_steps = max(1, round(args.warmup_epochs * steps_per_epoch))
    loss_fn = SoftmaxCrossEntropy()
    while state["epoch"] < args.epochs:
        epoch = state["epoch"]
        if state["step_in_epoch"] == 0:
            state["sums"] = {"loss": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}
        # Each epoch's order comes from its own seeded generator, so a resumed epoch draws
        # exactly the same permutation and skips the steps it had already taken.
        shuffle = torch.Generator().manual_seed(args.seed * 1000 + epoch + 1)
        batches = iterate_batches(len(train_x), args.batch_size, shuffle, train_x.device)
        sums = state["sums"]
        progress = tqdm(
            total=len(batches),
            initial=state["step_in_epoch"],
            desc=f"epoch {epoch + 1}/{args.epochs}",
            disable=not sys.stderr.isatty(),
            leave=False,
        )
        started = time.perf_counter()
        for index in batches[state["step_in_epoch"] :]:
            optimizer.lr = learning_rate(
                epoch * steps_per_epoch + state["step_in_epoch"], total_steps, args.lr, warmup_steps
            )
            x, y = preprocess(train_x[index]), train_y[index]
            logits = model.forward(x)
            loss = loss_fn.forward(logits, y)
            model.backward(loss_fn.backward())
            optimizer.step()
            loss_value = float(loss)
            if not math.isfinite(loss_value):
                progress.close()
                return "diverged"
            sums["loss"] += loss_value * len(y)
            sums["correct"] += int((logits.argmax(dim=1) == y).sum())
            sums["seen"] += len(y)
            state["step_in_epoch"] += 1
            progress.update()
            if stop.received:
                break
        if train_x.device.type == "cuda":
            torch.cuda.synchronize()
        sums["seconds"] += time.perf_counter() - started
        progress.close()
        if stop.received and state["step_in_epoch"] < len(batches):
            save_checkpoint()
            return "stopped"
        val = (
            evaluate(model, *data["val"])
            if len(data["val"][0])
            else {"loss": math.nan, "accuracy": math.nan}
        )
        row = {
            "epoch": epoch + 1,
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
        state["epoch"], state["step_in_epoch"] = epoch + 1, 0
        save_checkpoint()
        on_epoch_end(row)
        if stop.received:
            return "stopped" if state["epoch"] < args.epochs else "done"
    return "done"


# --------------------------------------------------------------------------------------------
# Outputs: metrics, plots, checkpoints (every file written atomically)
# --------------------------------------------------------------------------------------------


def atomic_write_bytes(path: str | Path, payload: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then os.replace: all or nothing."""
    path = Path(path)
    descriptor, temporary = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
    )
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(payload)
            handle.flush()
            # mkstemp creates the file private (0600); give it the mode a plain open() would,
            # so results on shared storage stay readable by the group as the umask allows.
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(handle.fileno(), 0o666 & ~umask)
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, payload) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=False) + "\n")


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
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def make_run_dir(output_dir: str | Path, prefix: str) -> Path:
    """<output_dir>/<prefix>_<YYYYmmdd-HHMMSS>[_<SLURM_JOB_ID>], created (never reused)."""
    job = os.environ.get("SLURM_JOB_ID")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(output_dir) / (f"{prefix}_{stamp}" + (f"_{job}" if job else ""))
    run_dir, suffix = base, 1
    while run_dir.exists():
        suffix += 1
        run_dir = base.with_name(f"{base.name}-{suffix}")
    try:
        run_dir.mkdir(parents=True)
    except OSError as error:
        raise UserError(
            f"cannot create the results folder {run_dir}: {error.strerror}; "
            "pass a writable --output-dir"
        ) from None
    return run_dir


def find_resume_checkpoint(
    resume: str | None, output_dir: str | Path, prefix: str, checkpoint_name: str
) -> Path | None:
    """--resume PATH -> PATH; 'auto' -> the newest <prefix>_* checkpoint of this SLURM job (or,
    outside SLURM, of output_dir), None when there is none; no --resume -> None."""
    if resume is None:
        return None
    if resume != "auto":
        path = Path(resume)
        if path.is_dir():
            path = path / checkpoint_name
        if not path.is_file():
            raise UserError(
                f"--resume {resume}: no checkpoint file there; "
                f"pass a {checkpoint_name} path or 'auto'"
            )
        return path
    job = os.environ.get("SLURM_JOB_ID")
    candidates = Path(output_dir).glob(f"{prefix}_*/{checkpoint_name}")
    if job:
        # make_run_dir names this job's folders "<prefix>_<stamp>_<job>", or "..._<job>-<n>" on
        # a name clash; a glob "_<job>*" would also match other jobs (job 12 matching 123).
        candidates = [
            path
            for path in candidates
            if path.parent.name.endswith(f"_{job}")
            or path.parent.name.rpartition("-")[0].endswith(f"_{job}")
        ]
    return max(candidates, key=lambda p: p.stat().st_mtime, default=None)


def capture_rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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


def plot_training_curves(history: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for split in ("train", "val"):
        loss_axis.plot(epochs, [row[f"{split}_loss"] for row in history], marker="o", label=split)
        accuracy_axis.plot(
            epochs, [100 * row[f"{split}_accuracy"] for row in history], marker="o", label=split
        )
    loss_axis.set(xlabel="epoch", ylabel="cross-entropy", title="Loss")
    accuracy_axis.set(xlabel="epoch", ylabel="accuracy (%)", title="Accuracy")
    for axis in (loss_axis, accuracy_axis):
        axis.set_xticks(epochs)
        axis.grid(alpha=0.3)
        axis.legend()
    save_figure(figure, path)


def plot_confusion_matrix(confusion: list[list[int]], class_names: list[str], path: Path) -> None:
    import matplotlib.pyplot as plt

    matrix = torch.tensor(confusion, dtype=torch.float64)
    figure, axis = plt.subplots(figsize=(7, 6))
    image = axis.imshow(matrix.numpy(), cmap="Blues")
    figure.colorbar(image, ax=axis)
    ticks = range(len(class_names))
    axis.set(xticks=ticks, yticks=ticks, xticklabels=class_names, yticklabels=class_names)
    axis.set(xlabel="predicted", ylabel="true", title="Test confusion matrix (counts)")
    threshold = matrix.max().item() / 2
    for row in ticks:
        for column in ticks:
            value = int(matrix[row, column])
            if value:
                color = "white" if value > threshold else "black"
                axis.text(
                    column, row, str(value), ha="center", va="center", fontsize=7, color=color
                )
    save_figure(figure, path)


def plot_misclassified(
    images: torch.Tensor, labels: torch.Tensor, predicted: torch.Tensor, path: Path, limit: int = 36
) -> None:
    import matplotlib.pyplot as plt

    wrong = (predicted != labels).nonzero().flatten()[:limit].cpu()
    columns = 6
    rows = max(1, math.ceil(len(wrong) / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(columns * 1.6, rows * 1.8), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, index in zip(axes.flat, wrong.tolist()):
        axis.imshow(images[index].cpu().numpy(), cmap="gray")
        axis.set_title(f"true {int(labels[index])} / pred {int(predicted[index])}", fontsize=8)
    if not len(wrong):
        axes[0, 0].set_title("no misclassified test images")
    figure.suptitle(f"Misclassified test images (first {len(wrong)})")
    save_figure(figure, path)


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def validate_args(args: argparse.Namespace) -> None:
    for name in ("epochs", "batch_size"):
        if getattr(args, name) < 1:
            raise UserError(
                f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}"
            )
    if not args.lr > 0 or not math.isfinite(args.lr):
        raise UserError(f"--lr must be a positive number, got {args.lr}")
    if not 0 <= args.momentum < 1:
        raise UserError(f"--momentum must be in [0, 1), got {args.momentum}")
    if args.weight_decay < 0 or args.warmup_epochs < 0:
        raise UserError("--weight-decay and --warmup-epochs must not be negative")


def merge_resumed_args(
    args: argparse.Namespace, saved: dict, parser: argparse.ArgumentParser
) -> None:
    """Take the run-defining hyperparameters from the checkpoint; refuse explicit contradictions."""
    for name in RUN_DEFINING_ARGS:
        given, default, recorded = getattr(args, name), parser.get_default(name), saved[name]
        if given != default and given != recorded:
            flag = "--" + name.replace("_", "-")
            raise UserError(
                f"{flag} {given} contradicts the checkpoint being resumed, which was made with "
                f"{flag} {recorded}; resume with the same arguments, or start a new run "
                "without --resume"
            )
        setattr(args, name, recorded)


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    try:
        return run(args, parser)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return USAGE_EXIT_CODE


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    # Signals are caught from the start: one that arrives during the data load does not kill
    # the job (training then stops after its first step, resumable), and one that arrives
    # during the final evaluation lets it finish.
    with StopSignal() as stop:
        return train_and_report(args, parser, stop)


def train_and_report(
    args: argparse.Namespace, parser: argparse.ArgumentParser, stop: StopSignal
) -> int:
    validate_args(args)
    device = select_device(args.device)
    resume_path = find_resume_checkpoint(args.resume, args.output_dir, RUN_PREFIX, CHECKPOINT_NAME)
    checkpoint = None
    if resume_path is not None:
        try:
            checkpoint = torch.load(resume_path, map_location="cpu", weights_only=False)
            merge_resumed_args(args, checkpoint["config"]["args"], parser)
        except UserError:
            raise
        except Exception as error:
            raise UserError(f"cannot read checkpoint {resume_path}: {error}") from None
    environment = environment_summary(device)
    log("environment: " + ", ".join(f"{k}={v}" for k, v in environment.items() if v is not None))

    seed_everything(args.seed)
    train_images, train_labels = load_mnist(args.data_dir, train=True)
    test_images, test_labels = load_mnist(args.data_dir, train=False)
    (train_x, train_y), (val_x, val_y) = split_train_val(
        train_images, train_labels, args.val_size, args.seed
    )
    data = {
        "train": (train_x.to(device), train_y.to(device)),
        "val": (val_x.to(device), val_y.to(device)),
        "test": (test_images.to(device), test_labels.to(device)),
    }
    log(
        f"data: {len(train_x)} train, {len(val_x)} val, {len(test_images)} test images, "
        f"uint8 on {device}"
    )

    model = CNN(device=device, generator=torch.Generator().manual_seed(args.seed))
    optimizer = SGD(model, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    log(f"model: {model.num_parameters():,} parameters; {len(model.layers)} hand-written layers")
    state = {"epoch": 0, "step_in_epoch": 0, "history": [], "train_time_s": 0.0}
    config = {"args": vars(args), "environment": environment, "parameters": model.num_parameters()}
    if checkpoint is not None:
        run_dir = resume_path.parent
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        state = checkpoint["state"]
        restore_rng_state(checkpoint["rng"])
        log(f"resumed {resume_path} at epoch {state['epoch']} step {state['step_in_epoch']}")
    else:
        if args.resume == "auto":
            log("resume: no checkpoint found, starting a new run")
        run_dir = make_run_dir(args.output_dir, RUN_PREFIX)
        atomic_write_json(run_dir / "config.json", config)
    checkpoint_path = run_dir / CHECKPOINT_NAME
    log(f"run folder: {run_dir}")

    def save_checkpoint() -> None:
        atomic_torch_save(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "state": state,
                "rng": capture_rng_state(),
                "config": config,
            },
            checkpoint_path,
        )

    def on_epoch_end(row: dict) -> None:
        write_csv(run_dir / "history.csv", state["history"])
        log(
            f"epoch {row['epoch']}/{args.epochs}  train loss {row['train_loss']:.4f} "
            f"acc {100 * row['train_accuracy']:.2f}%  val loss {row['val_loss']:.4f} "
            f"acc {100 * row['val_accuracy']:.2f}%  lr {row['lr']:.4g}  "
            f"{row['seconds']:.1f}s  {row['images_per_s']:,.0f} img/s"
        )

    outcome = train(args, model, optimizer, data, state, save_checkpoint, stop, on_epoch_end)
    if outcome == "diverged":
        print(
            f"error: the training loss became NaN/inf in epoch {state['epoch'] + 1}; "
            f"the last good checkpoint is kept at {checkpoint_path}. Lower --lr "
            f"(now {args.lr}) or raise --warmup-epochs.",
            file=sys.stderr,
            flush=True,
        )
        return DIVERGED_EXIT_CODE
    if outcome == "stopped":
        log(
            f"stopped by {stop.received}: checkpoint written to {checkpoint_path}; "
            "continue with --resume auto"
        )
        log(f"results: {run_dir}")
        return RESUMABLE_EXIT_CODE

    test = evaluate(model, *data["test"])
    metrics = {
        "test_accuracy": test["accuracy"],
        "test_loss": test["loss"],
        **classification_metrics(data["test"][1], test["predictions"], 10),
        "train_time_s": state["train_time_s"],
        "images_per_s": sum(row["seconds"] * row["images_per_s"] for row in state["history"])
        / max(state["train_time_s"], 1e-9),
        "epochs": args.epochs,
        "test_images": len(test_labels),
    }
    atomic_write_json(run_dir / "metrics.json", metrics)
    plot_training_curves(state["history"], run_dir / "training_curves.png")
    plot_confusion_matrix(
        metrics["confusion_matrix"], [str(k) for k in range(10)], run_dir / "confusion_matrix.png"
    )
    plot_misclassified(
        test_images, test_labels, test["predictions"].cpu(), run_dir / "misclassified.png"
    )
    log(
        f"test accuracy {100 * metrics['test_accuracy']:.2f}%  loss {metrics['test_loss']:.4f}  "
        f"macro F1 {metrics['macro_f1']:.4f}  train time {metrics['train_time_s']:.1f}s "
        f"({metrics['images_per_s']:,.0f} img/s)"
    )
    log(f"results: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
