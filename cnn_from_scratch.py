"""A convolutional network written from scratch, trained on MNIST.

Each layer (Conv2D, MaxPool2D, ReLU, Flatten, Linear, softmax cross-entropy) has a hand-written
forward and backward pass on torch tensor primitives, with no autograd: once as reference layers
(the textbook rules) and once as the fast layers of the default run (the same numbers in fewer,
larger operations); docs/cnn_layers.md derives both. The network: Conv(1->8, 3x3, pad 1) ->
ReLU -> MaxPool(2) -> Conv(8->16, 3x3, pad 1) -> ReLU -> MaxPool(2) -> Flatten -> Linear(784->10).

    python cnn_from_scratch.py --data-dir ./data          # the reported run; downloads MNIST
    python cnn_from_scratch.py --layers reference         # the same training on the plain layers
    python cnn_from_scratch.py --check-gradients          # every backward vs finite differences
    python cnn_from_scratch.py --resume results/cnn_...   # continue a stopped run
    sbatch run_cnn.sbatch                                 # on a SLURM cluster

Exit codes: 0 done; 1 a file could not be written, or --check-gradients found a gradient off;
2 bad input (the `error:` line says what to fix); 3 the loss diverged (NaN/inf); 75 stopped by
SIGTERM/SIGUSR1 after writing a checkpoint, 130 by Ctrl-C: the last lines print the command
that continues exactly where it stopped.
"""

from __future__ import annotations

import signal

if __name__ == "__main__":
    # Hold Ctrl-C, SIGTERM and SIGUSR1 while the imports run (seconds): StopSignal takes them
    # when it starts, so that even an early signal ends in a clean, resumable exit.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGUSR1})

import argparse  # noqa: E402
import copy  # noqa: E402
import itertools  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from run_management import (  # noqa: E402
    CHECKPOINT_NAME,
    DIVERGED_EXIT_CODE,
    FAILURE_EXIT_CODE,
    FINISHED_RECORD,
    ArgumentParser,
    RunLock,
    RunSpec,
    StopSignal,
    UserError,
    apply_array_seed,
    atomic_write,
    capture_rng_state,
    count_int,
    environment_summary,
    explicit_options,
    find_resume_run,
    first_line,
    ignore_stop_signals,
    log,
    merge_resumed_args,
    new_run,
    non_negative_float,
    open_fraction,
    positive_float,
    positive_int,
    read_run_record,
    remove_stale_temp_files,
    restore_rng_state,
    run_main,
    save_figure,
    seed_int,
    select_device,
    stop_lines,
    summarize_runs,
    write_csv,
)

# What defines a run: a resume takes these from its config.json and refuses other values.
HYPERPARAMETERS = ("epochs", "batch_size", "lr", "momentum", "weight_decay", "warmup_epochs")
RUN = RunSpec(
    prefix="cnn",
    script="cnn_from_scratch.py",
    defining_args=(*HYPERPARAMETERS, "seed", "val_size", "layers"),
    progress_files=(CHECKPOINT_NAME,),
    history_files=("history.csv",),
)
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
LAYER_KINDS = ("fast", "reference")  # --layers: the fast layers, or the textbook ones
GRADIENT_TOLERANCES = {"finite differences": 1e-6, "autograd": 1e-10}  # --check-gradients


# --------------------------------------------------------------------------------------------
# CLI and environment
# --------------------------------------------------------------------------------------------


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    data = "folder of MNIST/raw/, downloaded there if missing. Default: $DATA_DIR, else ./data"
    add("--data-dir", default=os.environ.get("DATA_DIR", "./data"), help=data)
    output = "where run folders are made. Default: $RESULTS_DIR, else ./results"
    add("--output-dir", default=os.environ.get("RESULTS_DIR", "./results"), help=output)
    add("--epochs", type=positive_int, default=5, help="training epochs")
    add("--batch-size", type=positive_int, default=640, help="training batch size")
    add("--lr", type=positive_float, default=0.1, help="peak learning rate")
    momentum = open_fraction
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
    add("--val-size", type=count_int, default=5000, help="training images held out for validation")
    add("--layers", default="fast", choices=LAYER_KINDS, help="fast, or the plain reference ones")
    resume = "a run folder to continue, or 'auto': the newest unfinished run of this SLURM job"
    add("--resume", help=resume + " (outside SLURM: of --output-dir), else a new run")
    check = "only compare every hand-written backward with finite differences and autograd"
    add("--check-gradients", action="store_true", help=check)
    add("--summarize", nargs="+", metavar="RUN_DIR", help="only summarise finished runs' metrics")
    return parser


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def load_mnist(data_dir, train=True, download=True) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST's train or test split through torchvision: uint8 images (N, 28, 28), int64 labels
    (N,). Each way that fails (missing, gzip only, unreadable, corrupt) is one UserError that
    says what to do."""
    from torchvision.datasets import MNIST

    raw, split = Path(data_dir) / "MNIST" / "raw", "train" if train else "t10k"
    names, failure = [f"{split}-images-idx3-ubyte", f"{split}-labels-idx1-ubyte"], "not downloaded"
    fetch = f"on a machine with internet run `python cnn_from_scratch.py --data-dir {data_dir}`"
    fetch += " (or ./setup_env.sh --prefetch), copy it here, or pass a --data-dir with MNIST/raw/"
    try:
        present = os.listdir(raw) if raw.is_dir() else []  # PermissionError if unreadable
        if download and not set(names) <= set(present):
            try:
                MNIST(root=str(data_dir), train=train, download=True)
            except Exception as error:  # offline: RuntimeError/URLError/OSError
                failure = f"downloading them failed ({first_line(error)})"
            present = os.listdir(raw) if raw.is_dir() else []
        absent = [name for name in names if name not in present]
        if not absent:
            dataset = MNIST(root=str(data_dir), train=train, download=False)
    except PermissionError as error:
        raise UserError(
            f"cannot read {error.filename or raw}: permission denied (unreadable, not missing "
            "or corrupt): make it readable to this user, or pass another --data-dir"
        ) from None
    except Exception as error:  # a truncated or corrupt IDX file fails inside torchvision
        raise UserError(
            f"could not read the MNIST {split} files in {raw} ({type(error).__name__}: "
            f"{first_line(error)}); they are corrupt or truncated: delete them and fetch them "
            f"again; {fetch}"
        ) from None
    if absent and all(f"{name}.gz" in present for name in absent):
        raise UserError(f"only .gz files found in {raw} for {', '.join(absent)}: decompress them")
    if absent:
        raise UserError(f"MNIST files missing in {raw}: {', '.join(absent)} ({failure}); {fetch}")
    images, labels = dataset.data, dataset.targets
    shaped = images.dtype == torch.uint8 and images.shape[1:] == (28, 28)
    if not (shaped and len(images) == len(labels) > 0 and 0 <= labels.min() <= labels.max() <= 9):
        raise UserError(
            f"the MNIST files in {raw} hold {tuple(images.shape)} images and {len(labels)} "
            "labels, not N 28x28 images with labels 0-9; they are corrupt: fetch them again"
        )
    return images, labels.long()


def load_data(args: argparse.Namespace, device: torch.device) -> dict[str, tuple]:
    """train, val (a seeded random --val-size images held out of train, for the validation
    curves) and test, as uint8 images and int64 labels on the device."""
    images, labels = load_mnist(args.data_dir, train=True)
    if not 0 <= args.val_size < len(images):
        raise UserError(f"--val-size {args.val_size} must be between 0 and {len(images) - 1}")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(args.seed))
    val, train = order[: args.val_size], order[args.val_size :]
    data = {"train": (images[train], labels[train]), "val": (images[val], labels[val])}
    data["test"] = load_mnist(args.data_dir, train=False)
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
# backward(grad_out) returns the gradient of the input and, with parameters, sets self.grads
# (keys and layouts of self.params, torch's). Images are (N, C, H, W) in any memory layout;
# convolutions return channels-last views, the layout their matmul produces. `factory`
# arguments: device, dtype and the generator of the weights.


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def _parameters(factory: dict, shape: tuple, scale: float, uniform=False) -> dict:
    """weight: scale * N(0, 1) draws (uniform: scale * U(-1, 1)), drawn on the CPU so that every
    device gets the same numbers; bias: zeros."""
    draw = torch.rand if uniform else torch.randn
    weight = draw(shape, generator=factory.get("generator"), dtype=factory.get("dtype"))
    weight = (weight * 2 - 1 if uniform else weight).mul_(scale).to(factory.get("device"))
    return {"weight": weight, "bias": weight.new_zeros(shape[0])}


def im2col(x: torch.Tensor, kernel, stride, padding) -> torch.Tensor:
    """x (N, C, H, W) -> columns (N, H_out, W_out, C * kh * kw): a (P, K) matrix whose row
    (n, y, x) is the padded input window output (y, x) sees, in the weight's (C, kh, kw) order."""
    (kh, kw), (sh, sw), (ph, pw), (n, c, h, w) = kernel, stride, padding, x.shape
    padded = x.new_zeros((n, c, h + 2 * ph, w + 2 * pw))
    padded[:, :, ph : ph + h, pw : pw + w] = x
    windows = padded.unfold(2, kh, sh).unfold(3, kw, sw)  # (N, C, H_out, W_out, kh, kw), a view
    return windows.permute(0, 2, 3, 1, 4, 5).flatten(3)


def col2im(grad_windows: torch.Tensor, input_shape, stride, padding) -> torch.Tensor:
    """The adjoint of taking windows: grad_windows (N, C, H_out, W_out, kh, kw) -> (N, C, H, W),
    each window element's gradient added back where forward read it (overlaps add up)."""
    (n, c, h, w), (sh, sw), (ph, pw) = input_shape, stride, padding
    h_out, w_out, kh, kw = grad_windows.shape[2:]
    grad = grad_windows.new_zeros((n, c, h + 2 * ph, w + 2 * pw))
    for i, j in itertools.product(range(kh), range(kw)):
        grad[:, :, i : i + sh * h_out : sh, j : j + sw * w_out : sw] += grad_windows[..., i, j]
    return grad[:, :, ph : ph + h, pw : pw + w]


class Conv2D:
    """Reference 2-D convolution (torch's cross-correlation): im2col and one matmul.

    forward:  x (N, C_in, H, W) -> (N, C_out, H_out, W_out), H_out = (H + 2 ph - kh) // sh + 1
              (likewise W_out): rows = columns @ W^T + b, columns = im2col(x) (P, K), with
              P = N * H_out * W_out positions, K = C_in * kh * kw, W the weight as (C_out, K).
    backward: with grad_rows (P, C_out) the output gradient as rows, grads["weight"] =
              grad_rows^T @ columns (C_out, K), grads["bias"] = grad_rows summed over P, and
              grad_in = col2im(grad_rows @ W) (N, C_in, H, W), or None without needs_input_grad.
    """

    needs_input_grad = True  # False for a first layer: its input is data

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, **factory):
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = map(_pair, (kernel_size, stride, padding))
        shape = (out_channels, in_channels, *self.kernel_size)
        # He initialisation: keeps the activation variance constant through ReLU layers.
        self.params = _parameters(factory, shape, math.sqrt(2.0 / math.prod(shape[1:])))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        columns = im2col(x, self.kernel_size, self.stride, self.padding)
        self.cache = (x.shape, columns)
        rows = columns @ self.params["weight"].flatten(1).t() + self.params["bias"]
        return rows.permute(0, 3, 1, 2)  # (N, H_out, W_out, C_out) in memory

    def backward(self, grad_out: torch.Tensor) -> torch.Tensor | None:
        (input_shape, columns), weight = self.cache, self.params["weight"]
        grad_rows = grad_out.permute(0, 2, 3, 1)  # (N, H_out, W_out, C_out): P rows
        grad_weight = grad_rows.flatten(0, 2).t() @ columns.flatten(0, 2)
        self.grads = {"weight": grad_weight.view(weight.shape), "bias": grad_rows.sum((0, 1, 2))}
        if not self.needs_input_grad:
            return None
        grad_windows = (grad_rows @ weight.flatten(1)).unflatten(3, weight.shape[1:])
        grad_windows = grad_windows.permute(0, 3, 1, 2, 4, 5)  # (N, C_in, H_out, W_out, kh, kw)
        return col2im(grad_windows, input_shape, self.stride, self.padding)


class MaxPool2D:
    """Reference max pooling: argmax, and scatter to it.

    forward:  x (N, C, H, W) -> (N, C, H_out, W_out), H_out = (H - kh) // sh + 1 (likewise
              W_out), the maximum of each window; stride defaults to kernel_size.
    backward: grad_out (N, C, H_out, W_out) -> grad_in (N, C, H, W): each window's gradient goes
              to its first maximum (torch's rule on ties), and col2im adds the windows back.
    """

    def __init__(self, kernel_size, stride=None):
        self.kernel_size = _pair(kernel_size)
        self.stride = self.kernel_size if stride is None else _pair(stride)

    def windows(self, x: torch.Tensor) -> torch.Tensor:
        """x's pooling windows, a view (N, C, H_out, W_out, kh, kw)."""
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        return x.unfold(2, kh, sh).unfold(3, kw, sw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, argmax = self.windows(x).flatten(4).max(dim=-1)  # the first maximum on ties
        self.cache = (x.shape, argmax)
        return out

    def backward(self, grad_out: torch.Tensor) -> torch.Tensor:
        input_shape, argmax = self.cache
        grad_windows = grad_out.new_zeros((*argmax.shape, math.prod(self.kernel_size)))
        grad_windows.scatter_(-1, argmax.unsqueeze(-1), grad_out.unsqueeze(-1))
        grad_windows = grad_windows.unflatten(-1, self.kernel_size)  # (N, C, H_out, W_out, kh, kw)
        return col2im(grad_windows, input_shape, self.stride, (0, 0))


class ReLU:
    """max(x, 0). forward: x (any shape) -> same; backward: grad_in = grad_out * [x > 0] (the
    derivative at 0 taken as 0, as torch does). inplace=True overwrites x, as
    nn.ReLU(inplace=True): right after a convolution, whose output nothing else keeps."""

    def __init__(self, inplace: bool = False):
        self.inplace = inplace

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

    needs_input_grad = True

    def __init__(self, in_features: int, out_features: int, **factory):
        bound = 1.0 / math.sqrt(in_features)  # torch.nn.Linear's default range
        self.params = _parameters(factory, (out_features, in_features), bound, uniform=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.cache = x
        return torch.addmm(self.params["bias"], x, self.params["weight"].t())

    def backward(self, grad_out: torch.Tensor) -> torch.Tensor | None:
        self.grads = {"weight": grad_out.t() @ self.cache, "bias": grad_out.sum(0)}
        return grad_out @ self.params["weight"] if self.needs_input_grad else None


class SoftmaxCrossEntropy:
    """Mean cross-entropy of softmax(logits), fused with its gradient: forward(logits (N, K),
    targets (N,) int64) -> the mean loss, by log-sum-exp (stable for large logits); backward()
    -> grad_logits (N, K) = (softmax(logits) - one_hot(targets)) / N."""

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


class BufferedConv2D(Conv2D):
    """Conv2D with tensors kept from step to step: allocating MBs anew each step costs more in
    page faults than filling them. A reused buffer is zero when made; callers overwrite it, or
    only the interior of a zero border. Nothing a layer returns lives there."""

    def reused(self, name: str, shape: tuple, like: torch.Tensor) -> torch.Tensor:
        buffers = vars(self).setdefault("buffers", {})  # made by the first call
        buffer, wanted = buffers.get(name), (tuple(shape), like.dtype, like.device)
        if buffer is None or (tuple(buffer.shape), buffer.dtype, buffer.device) != wanted:
            buffer = buffers[name] = like.new_zeros(shape)
        return buffer

    def transposed_windows(self, name: str, padded: torch.Tensor, window, stride) -> torch.Tensor:
        """im2col transposed, into the buffer `name`: padded (N, C, H_pad, W_pad) -> (C, wh, ww,
        N, H_out, W_out), the (K, P) columns, each row copied in long runs along W (in (P, K)
        order a row is a run of ww values: 4x slower to fill for one channel, measured)."""
        (wh, ww), (sh, sw) = window, stride
        windows = padded.unfold(2, wh, sh).unfold(3, ww, sw).permute(1, 4, 5, 0, 2, 3)
        return self.reused(name, windows.shape, padded).copy_(windows)


class ColumnsConv2D(BufferedConv2D):
    """Computes Conv2D (backward is the reference one, on the same columns), plus
    weight_grad_through_pool: the weight gradient of conv -> ReLU -> max-pool in one product.
    Faster forward: the columns are filled transposed, and BLAS multiplies their transpose as
    it is, straight into the channels-last output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (n, c, h, w), (ph, pw) = x.shape, self.padding
        padded = self.reused("padded", (n, c, h + 2 * ph, w + 2 * pw), x)
        padded[:, :, ph : ph + h, pw : pw + w] = x
        windows = self.transposed_windows("columns", padded, self.kernel_size, self.stride)
        columns, (h_out, w_out) = windows.flatten(0, 2).flatten(1), windows.shape[4:]  # (K, P)
        rows = torch.addmm(self.params["bias"], columns.t(), self.params["weight"].flatten(1).t())
        self.cache = (x.shape, columns.t().view(n, h_out, w_out, -1))  # the reference's columns
        return rows.view(n, h_out, w_out, self.out_channels).permute(0, 3, 1, 2)

    def weight_grad_through_pool(self, pool: FastMaxPool2D, grad_pooled: torch.Tensor) -> None:
        """Set grads as backward(pool.backward(grad_pooled)) would (stride 1 only), grad_pooled
        (N, C_out, H_pool, W_pool) with the layers between differentiated (a ReLU: relu_mask).
        Each pool window hands its gradient to one tap (dy, dx), the output at (py*s + dy, px*s
        + dx), which saw the padded input at (py*s + dy + i, px*s + dx + j); so one batched
        product of the input's (pool + kernel - 1)-wide patches with each tap's routed gradient
        holds every (tap, offset) pair, and entry (dy + i, dx + j) of tap (dy, dx) adds to W."""
        if self.stride != (1, 1):
            raise ValueError("weight_grad_through_pool needs a stride-1 convolution")
        (kh, kw), (pool_h, pool_w) = self.kernel_size, pool.kernel_size
        n, c_out, h_pool, w_pool = grad_pooled.shape
        # routed[t] (N, H_pool, W_pool, C_out): the gradient tap t takes, in the masks' layout.
        routed = self.reused("routed", (pool_h * pool_w, n, h_pool, w_pool, c_out), grad_pooled)
        pool.route(grad_pooled, [tap.permute(0, 3, 1, 2) for tap in routed])
        span = (pool_h + kh - 1, pool_w + kw - 1)
        patches = self.transposed_windows("patches", self.buffers["padded"], span, pool.stride)
        products = patches.view(-1, n * h_pool * w_pool) @ routed.view(len(routed), -1, c_out)
        products = products.view(pool_h, pool_w, *patches.shape[:3], c_out)  # [dy, dx, c, y, x]
        taps = itertools.product(range(pool_h), range(pool_w))
        grad_weight = sum(products[dy, dx, :, dy : dy + kh, dx : dx + kw] for dy, dx in taps)
        grad_weight = grad_weight.permute(3, 0, 1, 2).contiguous()
        self.grads = {"weight": grad_weight, "bias": grad_pooled.sum((0, 2, 3))}


class KernelRowsConv2D(BufferedConv2D):
    """Computes Conv2D, forward and backward, for a vertical stride of 1. Faster: the row windows
    hold, per (image, padded row y, output column), the kw * C_in values one kernel row sees:
    1/kh of im2col's copy. Kernel row i adds windows[y + i] @ W_i to output row y, a shift of
    i * W_out rows in the flattened matrix, so each kernel row is one matmul on a view, in
    forward and both gradients (the kh - 1 extra rows per image are dropped by a view)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride[0] != 1:
            raise ValueError("KernelRowsConv2D needs a vertical stride of 1")
        (n, c, h, w), (ph, pw), (kh, kw) = x.shape, self.padding, self.kernel_size
        padded = self.reused("padded", (n, h + 2 * ph, w + 2 * pw, c), x)
        padded[:, ph : ph + h, pw : pw + w] = x.permute(0, 2, 3, 1)
        # (N, H_pad, W_out, kw, C_in): what each kernel row sees, per padded row and output column
        row_windows = padded.unfold(2, kw, self.stride[1]).transpose(3, 4)
        w_out, count = row_windows.shape[2], math.prod(row_windows.shape[:3])
        # (kh - 1) * W_out zero rows at the end keep every shifted view inside the buffer.
        windows = self.reused("windows", (count + (kh - 1) * w_out, kw * c), x)
        windows[:count].view(row_windows.shape).copy_(row_windows)
        shifted = windows.unfold(0, count, w_out).transpose(1, 2)  # [i]: from i rows down
        weights = self.params["weight"].permute(2, 3, 1, 0).reshape(kh, kw * c, -1)  # W_i
        rows = torch.mm(shifted[0], weights[0])
        for i in range(1, kh):
            rows.addmm_(shifted[i], weights[i])
        rows += self.params["bias"]  # after the products: faster than addmm's bias (measured)
        self.cache = (x.shape, windows, weights)
        rows = rows.view(n, h + 2 * ph, w_out, self.out_channels)[:, : h + 2 * ph - kh + 1]
        return rows.permute(0, 3, 1, 2)

    def backward(self, grad_out: torch.Tensor) -> torch.Tensor | None:
        (n, c, h, w), windows, weights = self.cache
        (kh, kw), (ph, pw), sw = self.kernel_size, self.padding, self.stride[1]
        height, w_out = h + 2 * ph, grad_out.shape[3]
        count = len(windows) - (kh - 1) * w_out
        # The output gradient on the grid of rows forward computed; the extra rows stay zero.
        grid = self.reused("grad_grid", (n, height, w_out, self.out_channels), grad_out)
        grid[:, : height - kh + 1] = grad_out.permute(0, 2, 3, 1)
        grad_rows = grid.view(count, self.out_channels)
        # (kh, kw * C_in, C_out): each kernel row's shifted windows^T @ grad_rows, in one bmm
        grad_weights = torch.bmm(windows.unfold(0, count, w_out), grad_rows.expand(kh, -1, -1))
        grad_weight = grad_weights.view(kh, kw, c, -1).permute(3, 2, 0, 1).contiguous()
        self.grads = {"weight": grad_weight, "bias": grad_rows.sum(0)}
        if not self.needs_input_grad:
            return None
        grad_windows = self.reused("grad_windows", windows.shape, grad_out)
        grad_shifted = grad_windows.unfold(0, count, w_out).transpose(1, 2)
        torch.mm(grad_rows, weights[0].t(), out=grad_shifted[0])
        grad_windows[count:].zero_()
        for i in range(1, kh):
            grad_shifted[i].addmm_(grad_rows, weights[i].t())
        grad_windows = grad_windows[:count].view(n, height, w_out, kw, c)
        grad_padded = grad_out.new_zeros((n, height, w + 2 * pw, c))
        for j in range(kw):
            grad_padded[:, :, j : j + sw * w_out : sw] += grad_windows[:, :, :, j]
        return grad_padded[:, ph : ph + h, pw : pw + w].permute(0, 3, 1, 2)


class FastMaxPool2D(MaxPool2D):
    """Computes MaxPool2D (first maximum on ties), plus relu_mask: the backward of a ReLU in
    front of it, on the pooled grid. Faster: each tap of the windows is a strided view, so
    forward is a running maximum (no window copy, no index tensor) beside a float 0/1 mask per
    tap of where it beat every earlier one; backward routes by those masks, two elementwise
    operations per tap (float: the CPU's fast path)."""

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x's kh * kw views (N, C, H_out, W_out): tap (i, j) holds x[..., i + s*y, j + s*x]."""
        windows = self.windows(x)
        return [windows[..., i, j] for i, j in itertools.product(*map(range, self.kernel_size))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, *others = self.taps(x)
        out, takes = first.clone(), []
        for tap in others:  # takes[t]: tap t + 1 beat every earlier tap
            takes.append(torch.gt(tap, out, out=torch.empty_like(out)))
            torch.maximum(out, tap, out=out)
        self.cache = (x, out, takes)
        return out

    def relu_mask(self, grad_out: torch.Tensor) -> torch.Tensor:
        """The backward of the ReLU in front of this pool, on the pooled grid (a quarter of the
        size): the pool hands each window's gradient to its maximum m, where the ReLU's
        derivative is [m > 0] = [pooled output > 0]. The same numbers."""
        pooled = self.cache[1]
        return torch.gt(pooled, 0, out=torch.empty_like(pooled)).mul_(grad_out)

    def route(self, grad_out: torch.Tensor, grad_taps: list[torch.Tensor]) -> None:
        """Write into grad_taps[t] (shaped like grad_out) what tap t takes of each window's
        gradient: from the last tap back, each takes what no later one took."""
        for take, grad_tap in zip(reversed(self.cache[2]), reversed(grad_taps[1:])):
            grad_out = grad_out - torch.mul(grad_out, take, out=grad_tap)
        grad_taps[0].copy_(grad_out)

    def backward(self, grad_out: torch.Tensor) -> torch.Tensor:
        x, out, takes = self.cache
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        if (kh, kw) == (sh, sw) and (out.shape[2] * kh, out.shape[3] * kw) == x.shape[2:]:
            grad_in = torch.empty_like(x)  # windows that tile x: each element written once
            self.route(grad_out, self.taps(grad_in))
            return grad_in
        shares = [torch.empty_like(out) for _ in range(len(takes) + 1)]
        self.route(grad_out, shares)
        grad_in = torch.zeros_like(x)
        for tap, share in zip(self.taps(grad_in), shares):
            tap += share  # where windows overlap, their shares add up
        return grad_in


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
        block1 = [first_conv(1, 8, 3, padding=1, **factory), ReLU(inplace=fast), pool(2)]
        block2 = [conv(8, 16, 3, padding=1, **factory), ReLU(inplace=fast), pool(2)]
        self.layers = [*block1, *block2, Flatten(), Linear(16 * 7 * 7, 10, **factory)]
        self.layers[0].needs_input_grad = False  # its input is the data

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def backward(self, grad: torch.Tensor) -> None:
        """Every layer's grads, from grad: the loss gradient of the logits (N, 10)."""
        if self.kind == "reference":
            for layer in reversed(self.layers):
                grad = layer.backward(grad)
            return
        first_conv, _, first_pool, conv, _, pool, flatten, linear = self.layers
        grad = flatten.backward(linear.backward(grad))
        # Each ReLU's backward runs on its pool's output (FastMaxPool2D.relu_mask), and the
        # first convolution's weight gradient comes straight from its pool's gradient.
        grad = conv.backward(pool.backward(pool.relu_mask(grad)))
        first_conv.weight_grad_through_pool(first_pool, first_pool.relu_mask(grad))

    def trainable_layers(self) -> list[tuple[int, Conv2D | Linear]]:
        return [(i, layer) for i, layer in enumerate(self.layers) if hasattr(layer, "params")]

    def parameters(self, kind: str = "params") -> dict[str, torch.Tensor]:
        """Every layer's params, or (kind "grads") their gradients, as "layers.<i>.<name>"."""
        tensors = [(f"layers.{i}.", getattr(layer, kind)) for i, layer in self.trainable_layers()]
        return {prefix + name: t for prefix, named in tensors for name, t in named.items()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {key: tensor.clone() for key, tensor in self.parameters().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.parameters()):
            raise ValueError(f"state dict keys {sorted(state)} do not match this network's")
        for key, tensor in self.parameters().items():
            tensor.copy_(state[key])


class SGD:
    """SGD with (Nesterov) momentum and L2 weight decay, in place, as torch.optim.SGD does it:
    g = grad + weight_decay * p; buf = momentum * buf + g (buf from 0);
    p -= lr * (g + momentum * buf) with nesterov, else p -= lr * buf."""

    def __init__(self, model: CNN, lr: float, momentum=0.9, weight_decay=0.0, nesterov=True):
        self.model, self.lr, self.momentum = model, lr, momentum
        self.weight_decay, self.nesterov = weight_decay, nesterov
        self.buffers: dict[str, torch.Tensor] = {}

    def step(self) -> None:
        grads = self.model.parameters("grads")
        for key, param in self.model.parameters().items():
            grad = grads[key]
            if self.weight_decay:
                grad = grad.add(param, alpha=self.weight_decay)
            if self.momentum:
                buffer = self.buffers[key] = self.buffers.get(key, 0) * self.momentum + grad
                grad = grad.add(buffer, alpha=self.momentum) if self.nesterov else buffer
            param.add_(grad, alpha=-self.lr)

    def state_dict(self) -> dict:
        return {"lr": self.lr, "buffers": {k: v.clone() for k, v in self.buffers.items()}}

    def load_state_dict(self, state: dict) -> None:
        params, self.lr = self.model.parameters(), state["lr"]  # buffers onto the params' device
        self.buffers = {k: v.to(params[k].device, copy=True) for k, v in state["buffers"].items()}


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
def evaluate(model: CNN, images_uint8: torch.Tensor, labels: torch.Tensor, batch=2000) -> dict:
    """Mean loss and accuracy (NaN for no images), predictions and their probabilities, of
    uint8 images on the device, forward in batches."""
    if not len(labels):
        return {"loss": math.nan, "accuracy": math.nan}
    chunks = [images_uint8[start : start + batch] for start in range(0, len(labels), batch)]
    loss_fn = SoftmaxCrossEntropy()
    loss = loss_fn.forward(torch.cat([model.forward(preprocess(x)) for x in chunks]), labels)
    log_probability, predicted = loss_fn.cache[0].max(dim=1)
    result = {"loss": float(loss), "accuracy": int((predicted == labels).sum()) / len(labels)}
    return {**result, "predictions": predicted, "probabilities": log_probability.exp()}


@torch.no_grad()
def train(args, model: CNN, optimizer: SGD, data: dict, state: dict, stop, run_dir: Path) -> str:
    """Train (or continue) from `state` to args.epochs: "done", "stopped" or "diverged". The
    loss and correct counts accumulate on the device and are read once per epoch, so no step
    waits for the device; a NaN/inf loss is caught on that read, before a mid-epoch checkpoint
    (a checkpoint never holds a diverged model). After each epoch: history.csv, then the
    checkpoint, so history.csv is never short of it."""
    from tqdm import tqdm

    (train_x, train_y), loss_fn = data["train"], SoftmaxCrossEntropy()
    steps_per_epoch = math.ceil(len(train_x) / args.batch_size)
    warmup_steps = max(1, round(args.warmup_epochs * steps_per_epoch))
    while state["epoch"] < args.epochs:
        epoch, done, started = state["epoch"], state["step_in_epoch"], time.perf_counter()
        if done == 0:
            state["sums"] = {"loss": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}
        sums = state["sums"]
        loss_sum = torch.tensor(sums["loss"], dtype=torch.float64, device=train_x.device)
        correct = torch.tensor(sums["correct"], device=train_x.device)
        # Each epoch's order comes from its own seeded generator: a resumed epoch draws the same
        # permutation and skips the steps it had already taken.
        shuffle = torch.Generator().manual_seed(args.seed * 1000 + epoch + 1)
        batches = torch.randperm(len(train_x), generator=shuffle).to(train_x.device)
        batches = batches.split(args.batch_size)
        shown = {"desc": f"epoch {epoch + 1}/{args.epochs}", "disable": not sys.stderr.isatty()}
        for index in tqdm(batches[done:], total=len(batches), initial=done, leave=False, **shown):
            step = epoch * steps_per_epoch + state["step_in_epoch"]
            optimizer.lr = learning_rate(step, steps_per_epoch * args.epochs, args.lr, warmup_steps)
            logits, y = model.forward(preprocess(train_x[index])), train_y[index]
            loss = loss_fn.forward(logits, y)
            model.backward(loss_fn.backward())
            optimizer.step()
            loss_sum += loss * len(y)
            correct += (logits.argmax(dim=1) == y).sum()
            sums["seen"] += len(y)
            state["step_in_epoch"] += 1
            state["lr_by_step"].append(optimizer.lr)
            if stop.received:
                break
        sums["loss"], sums["correct"] = float(loss_sum), int(correct)  # waits for the device
        sums["seconds"] += time.perf_counter() - started
        if not math.isfinite(sums["loss"]):
            return "diverged"
        if state["step_in_epoch"] < steps_per_epoch:  # stopped by a signal mid-epoch
            save_checkpoint(run_dir, model, optimizer, state)
            return "stopped"
        val, seen, seconds = evaluate(model, *data["val"]), sums["seen"], sums["seconds"]
        row = {"epoch": epoch + 1, "train_loss": sums["loss"] / seen}
        row.update(train_accuracy=sums["correct"] / seen, val_loss=val["loss"])
        row.update(val_accuracy=val["accuracy"], lr=optimizer.lr, seconds=seconds)
        row["images_per_s"] = seen / seconds
        state["history"].append(row)
        state["train_time_s"] += seconds
        state["epoch"], state["step_in_epoch"] = epoch + 1, 0
        write_csv(run_dir / "history.csv", state["history"])
        save_checkpoint(run_dir, model, optimizer, state)
        log(
            f"epoch {epoch + 1}/{args.epochs}  train loss {row['train_loss']:.4f} "
            f"acc {100 * row['train_accuracy']:.2f}%  val loss {row['val_loss']:.4f} "
            f"acc {100 * row['val_accuracy']:.2f}%  lr {row['lr']:.4g}  "
            f"{seconds:.1f}s  {row['images_per_s']:,.0f} img/s"
        )
        if stop.received and state["epoch"] < args.epochs:
            return "stopped"
    return "done"


def objective(layers: list, target: torch.Tensor, values: dict, by_torch=False) -> torch.Tensor:
    """sum(output * target) of the (index, layer) pairs `layers` for a float target, their mean
    cross-entropy for labels, at `values` ("input" and parameters "layers.<index>.<name>"): by
    the layers' own forward, or with by_torch by torch.nn.functional's, for autograd."""
    import torch.nn.functional as F

    x = values["input"]
    for index, layer in layers:
        params = {name: values[f"layers.{index}.{name}"] for name in getattr(layer, "params", {})}
        if not by_torch:
            at_values = copy.copy(layer)  # the same layer at these parameters
            at_values.params = params
            x = at_values.forward(x.clone())  # a clone: an in-place ReLU must keep the values
        elif isinstance(layer, Conv2D):
            x = F.conv2d(x, params["weight"], params["bias"], layer.stride, layer.padding)
        elif isinstance(layer, MaxPool2D):
            x = F.max_pool2d(x, layer.kernel_size, layer.stride)
        elif isinstance(layer, Linear):
            x = F.linear(x, params["weight"], params["bias"])
        else:
            x = F.relu(x) if isinstance(layer, ReLU) else x.flatten(1)
    if target.dtype == torch.int64:
        return F.cross_entropy(x, target) if by_torch else SoftmaxCrossEntropy().forward(x, target)
    return (x * target).sum()


def gradient_errors(layers: list, target, values: dict, hand: dict, generator) -> tuple:
    """The largest relative errors of `hand`, the hand-written gradients of objective(layers,
    target, values): against central finite differences along a random direction per tensor,
    and against autograd's gradients of the objective by torch's functions."""
    leaves = {name: tensor.clone().requires_grad_() for name, tensor in values.items()}
    with torch.enable_grad():
        by_torch = objective(layers, target, leaves, by_torch=True)
        grads = torch.autograd.grad(by_torch, [leaves[name] for name in hand])
    finite = autograd = 0.0
    for (name, grad), by_autograd in zip(hand.items(), grads):
        direction = torch.randn(grad.shape, generator=generator, dtype=torch.float64)
        nudged = ({**values, name: values[name] + step * direction} for step in (1e-6, -1e-6))
        plus, minus = (objective(layers, target, nudged_values) for nudged_values in nudged)
        numeric, analytic = float(plus - minus) / 2e-6, float((grad * direction).sum())
        finite = max(finite, abs(analytic - numeric) / max(abs(numeric), 1e-30))
        error = (grad - by_autograd).abs().max() / by_autograd.abs().max().clamp(min=1e-30)
        autograd = max(autograd, float(error))
    return finite, autograd


def check_gradients(seed: int = 0) -> int:
    """--check-gradients, for each layer kind in float64: every layer on random inputs of the
    shape it sees in the network, then the whole network's loss on two random images. Logs the
    largest relative errors; 0 if each is within GRADIENT_TOLERANCES, else FAILURE_EXIT_CODE."""
    log("largest relative difference of the hand-written gradients (float64):")
    log(f"{'layers':<11}{'layer':<22}{'vs finite differences':>22}{'vs autograd':>13}")
    worst = dict.fromkeys(GRADIENT_TOLERANCES, 0.0)
    for kind in ("reference", "fast"):
        generator = torch.Generator().manual_seed(seed)
        model = CNN(layers=kind, dtype=torch.float64, generator=generator)
        for _, layer in model.trainable_layers():
            layer.params["bias"].normal_(std=0.1, generator=generator)
        x = torch.randn(2, 1, 28, 28, generator=generator, dtype=torch.float64)
        y, h, rows = torch.randint(0, 10, (2,), generator=generator), x, []
        for index, layer in enumerate(model.layers):
            out = layer.forward(h.clone())
            weights = torch.randn(out.shape, generator=generator, dtype=torch.float64)
            grad_in, prefix = layer.backward(weights), f"layers.{index}."
            params = getattr(layer, "params", {})
            values = {"input": h, **{prefix + name: p for name, p in params.items()}}
            hand = {prefix + name: g for name, g in getattr(layer, "grads", {}).items()}
            hand.update({"input": grad_in} if grad_in is not None else {})
            name = f"{index} {type(layer).__name__}"
            rows.append((name, [(index, layer)], weights, values, hand))
            h = torch.empty_like(out).normal_(generator=generator)  # distinct values: no ties
        loss_fn = SoftmaxCrossEntropy()
        loss_fn.forward(model.forward(x), y)
        model.backward(loss_fn.backward())
        values, hand = {"input": x, **model.parameters()}, model.parameters("grads")
        rows.append(("whole network", list(enumerate(model.layers)), y, values, hand))
        for name, *check in rows:
            errors = gradient_errors(*check, generator)
            log(f"{kind:<11}{name:<22}{errors[0]:>22.1e}{errors[1]:>13.1e}")
            worst = {key: max(worst[key], error) for key, error in zip(worst, errors)}
    within = all(worst[key] <= limit for key, limit in GRADIENT_TOLERANCES.items())
    limits = ", ".join(f"{key} {limit:.0e}" for key, limit in GRADIENT_TOLERANCES.items())
    log(f"{'all within' if within else 'FAILED: not all within'} the tolerances ({limits})")
    return 0 if within else FAILURE_EXIT_CODE


# --------------------------------------------------------------------------------------------
# Outputs of this script: checkpoint, metrics, misclassified images
# --------------------------------------------------------------------------------------------


def plot_training_curves(history: list[dict], lr_by_step: list, path: Path, title: str) -> None:
    """Loss and accuracy per epoch (train and validation) and the learning rate of each step."""
    import matplotlib.pyplot as plt

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
        axis.set(ylabel=name, title=name.split(" (")[0].capitalize())
        epoch_axis(axis, max(epochs, default=1))
    axes[0].legend(), axes[1].legend()
    figure.suptitle(title)
    save_figure(figure, path)


def epoch_axis(axis, last_epoch: int) -> None:
    """An x axis of whole epochs from 0 (a one-epoch run gets 0 and 1, not 0.995), and a grid."""
    from matplotlib.ticker import MaxNLocator

    axis.set(xlabel="epoch", xlim=(0, last_epoch + 0.25))
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.grid(alpha=0.3)


def plot_confusion_matrix(confusion: list, class_names: list, path: Path, title: str) -> None:
    """The errors (off the diagonal) on a colour scale of their own, so a handful of mistakes
    shows beside thousands of right answers; counts in the cells for up to 20 classes."""
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    matrix, size = np.array(confusion, dtype=float), len(class_names)
    diagonal = np.eye(size, dtype=bool)
    errors = np.where(diagonal | (matrix == 0), np.nan, matrix)  # nan: a white cell
    most = max(1.0, np.nanmax(errors, initial=0))
    figure, axis = plt.subplots(figsize=(max(6.5, size * 0.2 + 3), max(5.5, size * 0.2 + 2)))
    image = axis.imshow(errors, cmap="Reds", vmin=0, vmax=most)
    axis.imshow(np.where(diagonal, 1.0, np.nan), cmap="Greys", vmin=0, vmax=5)
    counts = MaxNLocator(integer=True)  # no ticks at half an image
    figure.colorbar(image, ax=axis, label="misclassified test images (count)", ticks=counts)
    fontsize, text = 9 if size <= 20 else 6, {"ha": "center", "va": "center", "fontsize": 7}
    axis.set_xticks(range(size), class_names, fontsize=fontsize)
    axis.set_yticks(range(size), class_names, fontsize=fontsize)
    axis.set(xlabel="predicted class", ylabel="true class")
    correct, total = int(np.trace(matrix)), int(matrix.sum())
    axis.set_title(f"{title}\n{correct:,} of {total:,} correct (grey diagonal)")
    for (row, column), value in np.ndenumerate(matrix if size <= 20 else np.zeros((0, 0))):
        if value or row == column:
            color = "white" if row != column and value > most / 2 else "black"
            weight = "bold" if row == column else "normal"
            axis.text(column, row, f"{value:.0f}", color=color, weight=weight, **text)
    save_figure(figure, path)


def save_checkpoint(run_dir: Path, model: CNN, optimizer: SGD, state: dict) -> None:
    payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "state": state}
    atomic_write(run_dir / CHECKPOINT_NAME, {**payload, "rng": capture_rng_state()})


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


def classification_metrics(labels: torch.Tensor, predicted: torch.Tensor, classes=10) -> dict:
    """Confusion matrix (rows true, columns predicted) with per-class precision/recall/F1."""
    pairs = labels.cpu() * classes + predicted.cpu()
    confusion = torch.bincount(pairs, minlength=classes**2).view(classes, classes)
    true_positive = confusion.diagonal().double()
    precision = true_positive / confusion.sum(0).clamp(min=1)
    recall = true_positive / confusion.sum(1).clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    columns = {"precision": precision, "recall": recall, "f1": f1, "support": confusion.sum(1)}
    per_class = {str(k): {name: v[k].item() for name, v in columns.items()} for k in range(classes)}
    matrix = confusion.tolist()
    return {"macro_f1": float(f1.mean()), "per_class": per_class, "confusion_matrix": matrix}


def plot_misclassified(images, labels, predicted, probabilities, path: Path, limit=36) -> None:
    """The most confident mistakes first, each with its true class, the predicted one and the
    probability the network gave it."""
    import matplotlib.pyplot as plt

    labels, predicted, probabilities = labels.cpu(), predicted.cpu(), probabilities.cpu()
    wrong = (predicted != labels).nonzero().flatten()
    shown = wrong[probabilities[wrong].argsort(descending=True, stable=True)][:limit].tolist()
    rows, columns = max(1, math.ceil(len(shown) / 6)), 6
    size = (columns * 1.7, rows * 1.9 + 0.5)
    figure, axes = plt.subplots(rows, columns, figsize=size, squeeze=False, layout="constrained")
    for axis in axes.flat:
        axis.axis("off")
    for axis, index in zip(axes.flat, shown):
        axis.imshow(images[index].cpu().numpy(), cmap="gray")
        true, guess, p = int(labels[index]), int(predicted[index]), float(probabilities[index])
        axis.set_title(f"true {true}, predicted {guess}\np = {p:.2f}", fontsize=8)
    figure.suptitle(
        f"{len(shown)} of {len(wrong)} misclassified test images, most confident first "
        "(p: the predicted class's probability)"
    )
    save_figure(figure, path)


def write_results(args, model: CNN, data: dict, state: dict, run_dir: Path) -> dict:
    """Test-set evaluation, history, plots, then metrics.json: written last, it marks the run
    finished, so a run killed before it is resumed and writes them all again."""
    (test_x, test_y), history, seconds = data["test"], state["history"], state["train_time_s"]
    test = evaluate(model, test_x, test_y)
    metrics = {"test_accuracy": test["accuracy"], "test_loss": test["loss"]}
    metrics.update(classification_metrics(test_y, test["predictions"]))
    images = sum(row["seconds"] * row["images_per_s"] for row in history)
    metrics.update(train_time_s=seconds, images_per_s=images / max(seconds, 1e-9))
    metrics.update(epochs=args.epochs, layers=args.layers, test_images=len(test_y))
    title = f"cnn_from_scratch.py ({args.layers} layers), seed {args.seed}"
    write_csv(run_dir / "history.csv", history)
    plot_training_curves(history, state["lr_by_step"], run_dir / "training_curves.png", title)
    confusion, classes = metrics["confusion_matrix"], [str(k) for k in range(10)]
    heading = f"Test confusion matrix, {title}"
    plot_confusion_matrix(confusion, classes, run_dir / "confusion_matrix.png", heading)
    predicted, probabilities = test["predictions"], test["probabilities"]
    plot_misclassified(test_x, test_y, predicted, probabilities, run_dir / "misclassified.png")
    atomic_write(run_dir / FINISHED_RECORD, metrics)
    return metrics


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    return run_main(run, args, explicit_options(parser, argv))


def open_run(args, explicit: set[str], lock: RunLock) -> tuple[Path | None, dict | None]:
    """The run folder and checkpoint to continue (args then take its settings), or None, None."""
    run_dir = find_resume_run(RUN, args.resume, args.output_dir)
    if run_dir is None:
        if args.resume == "auto":
            log("resume: no unfinished run found, starting a new run")
        return None, None
    lock.acquire(run_dir)
    merge_resumed_args(RUN, args, read_run_record(run_dir)["args"], explicit)
    checkpoint = read_checkpoint(run_dir / CHECKPOINT_NAME)
    removed = remove_stale_temp_files(run_dir)
    if removed:
        log(f"resume: removed {removed} temporary files of an interrupted write")
    return run_dir, checkpoint


def run(args: argparse.Namespace, explicit: set[str], stop: StopSignal, lock: RunLock) -> int:
    if args.check_gradients:
        return check_gradients()
    if args.summarize:
        log(f"summary: {summarize_runs(RUN, args.summarize, args.output_dir)}")
        return 0
    offset = apply_array_seed(args)
    if offset:
        log(f"seed: --seed + SLURM array task {offset} = {args.seed}")
    run_dir, checkpoint = open_run(args, explicit, lock)
    device = select_device(args.device)
    environment = environment_summary(device)
    log("environment: " + ", ".join(f"{k}={v}" for k, v in environment.items() if v is not None))
    data = load_data(args, device)
    sizes = ", ".join(f"{len(x)} {name}" for name, (x, _) in data.items())
    log(f"data: {sizes} images, uint8 on {device}")
    generator = torch.Generator().manual_seed(args.seed)
    model = CNN(layers=args.layers, device=device, generator=generator)
    optimizer = SGD(model, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    parameters = sum(tensor.numel() for tensor in model.parameters().values())
    log(f"model: {parameters:,} parameters, {args.layers} hand-written layers")
    if checkpoint is None:
        random.seed(args.seed)
        torch.manual_seed(args.seed)
        config = {"args": vars(args), "environment": environment, "parameters": parameters}
        run_dir = new_run(RUN, args.output_dir, config, lock)
        # Where training stands; checkpointed, so that a resume continues bit-identically.
        state = {"epoch": 0, "step_in_epoch": 0, "history": [], "lr_by_step": [], "train_time_s": 0}
    else:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        state = checkpoint["state"]
        restore_rng_state(checkpoint["rng"])
        log(f"resumed {run_dir} at epoch {state['epoch']} step {state['step_in_epoch']}")
    log(f"run folder: {run_dir}")
    outcome = train(args, model, optimizer, data, state, stop, run_dir)
    if outcome == "diverged":
        epoch, advice = state["epoch"], f"Lower --lr (now {args.lr}) or raise --warmup-epochs"
        kept = f"the last good checkpoint (epoch {epoch}) is kept in {run_dir}"
        kept = kept if epoch else "no checkpoint was written (that needs a finished epoch)"
        message = f"the training loss became NaN/inf in epoch {epoch + 1}; {kept}. {advice}"
        print(f"error: {message}", file=sys.stderr, flush=True)
        return DIVERGED_EXIT_CODE
    if outcome == "stopped":
        epoch, step = state["epoch"], state["step_in_epoch"]
        where = f" in epoch {epoch + 1} (step {step})" if step else f" after epoch {epoch}"
        log("\n".join(stop_lines(RUN, stop, run_dir, where)))
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
    ignore_stop_signals()
    sys.exit(code)
