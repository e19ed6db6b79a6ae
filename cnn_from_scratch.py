"""A convolutional network written from scratch, trained on MNIST.

Each layer (Conv2D, MaxPool2D, ReLU, Flatten, Linear, softmax cross-entropy) has a hand-written
forward and backward pass on torch tensor primitives, with no autograd: once as reference layers
(the textbook rules) and once as the fast layers of the default run (the same numbers in fewer,
larger operations); docs/cnn_layers.md derives both. The network: Conv(1->8, 3x3, pad 1) ->
ReLU -> MaxPool(2) -> Conv(8->16, 3x3, pad 1) -> ReLU -> MaxPool(2) -> Flatten -> Linear(784->10).

    python cnn_from_scratch.py --dry-run                  # the whole pipeline in seconds, offline
    python cnn_from_scratch.py --data-dir ./data          # the reported run; downloads MNIST
    python cnn_from_scratch.py --prefetch --data-dir ./data   # only download and verify MNIST
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
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
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
    check_same_data,
    clean_unstarted_runs,
    count_int,
    data_fingerprint,
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

# What defines a run: a resume takes these from its config.json and refuses other values (its
# --conv-kernels is the formulation it chose: the continuation stays bit-identical).
HYPERPARAMETERS = ("epochs", "batch_size", "lr", "momentum", "weight_decay", "warmup_epochs")
RUN = RunSpec(
    prefix="cnn",
    script="cnn_from_scratch.py",
    defining_args=(*HYPERPARAMETERS, "seed", "val_size", "layers", "conv_kernels"),
    progress_files=(CHECKPOINT_NAME,),
    history_files=("history.csv",),
)
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
LAYER_KINDS = ("fast", "reference")  # --layers: the fast layers, or the textbook ones
CONV_KERNELS = ("columns", "kernel-rows")  # --conv-kernels: ColumnsConv2D or KernelRowsConv2D
GRADIENT_TOLERANCES = {"finite differences": 1e-6, "autograd": 1e-10}  # --check-gradients
DRY_RUN_IMAGES = {"train": 600, "test": 200}  # --dry-run's synthetic data set
PREFETCH_HINT = (
    "on a machine with internet run `python cnn_from_scratch.py --prefetch --data-dir DIR` (or "
    "./setup_env.sh --prefetch) and copy DIR/MNIST/raw/ here, or pass a --data-dir that holds it"
)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    add_data_options(parser.add_argument_group("data, device and outputs"))
    add_training_options(parser.add_argument_group("training"))
    add_mode_options(parser.add_argument_group("other modes (each only does what it says)"))
    return parser


def add_data_options(group) -> None:
    group.add_argument(
        "--data-dir",
        default=os.environ.get("DATA_DIR", "./data"),
        help="folder of MNIST/raw/, downloaded there if missing. Default: $DATA_DIR, else ./data",
    )
    group.add_argument(
        "--output-dir",
        default=os.environ.get("RESULTS_DIR", "./results"),
        help="where run folders are made. Default: $RESULTS_DIR, else ./results",
    )
    group.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda", "mps"],
        help="auto: cuda, else mps, else cpu (default: %(default)s)",
    )
    group.add_argument(
        "--resume",
        help="a run folder to continue, or 'auto': the newest unfinished run of this SLURM job "
        "(outside SLURM: of --output-dir); without it, a new run",
    )
    group.add_argument(
        "--dry-run",
        action="store_true",
        help="the whole pipeline on a few hundred synthetic images, offline, in seconds; its "
        "run folder is named cnn-dryrun_<time>",
    )


def add_training_options(group) -> None:
    group.add_argument(
        "--epochs", type=positive_int, default=5, help="training epochs (default: %(default)s)"
    )
    group.add_argument(
        "--batch-size",
        type=positive_int,
        default=640,
        help="images per step (default: %(default)s)",
    )
    group.add_argument(
        "--lr", type=positive_float, default=0.1, help="peak learning rate (default: %(default)s)"
    )
    group.add_argument(
        "--momentum",
        type=open_fraction,
        default=0.9,
        help="SGD's Nesterov momentum (default: %(default)s)",
    )
    group.add_argument(
        "--weight-decay",
        type=non_negative_float,
        default=5e-4,
        help="L2 weight decay (default: %(default)s)",
    )
    group.add_argument(
        "--warmup-epochs",
        type=non_negative_float,
        help="epochs of linear warmup, then cosine decay to 0 (default: min(1, epochs / 5))",
    )
    group.add_argument(
        "--seed",
        type=seed_int,
        default=0,
        help="seed of init, split, shuffling (default: %(default)s)",
    )
    group.add_argument(
        "--val-size",
        type=count_int,
        default=5000,
        help="training images held out for validation (default: %(default)s)",
    )
    group.add_argument(
        "--layers",
        default="fast",
        choices=LAYER_KINDS,
        help="the fast layers, or the plain reference ones (default: %(default)s)",
    )
    group.add_argument(
        "--conv-kernels",
        default="auto",
        choices=["auto", *CONV_KERNELS],
        help="the fast second convolution's formulation; auto: the faster of the two in a short "
        "timing at the start, recorded in config.json (default: %(default)s)",
    )


def add_mode_options(group) -> None:
    group.add_argument(
        "--prefetch",
        action="store_true",
        help="download (if missing) and verify MNIST in --data-dir, then exit",
    )
    group.add_argument(
        "--check-gradients",
        action="store_true",
        help="compare every hand-written backward with finite differences and autograd",
    )
    group.add_argument(
        "--summarize", nargs="+", metavar="RUN_DIR", help="summarise finished runs' metrics"
    )


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def mnist_sources() -> dict[str, tuple[list[str], str]]:
    """Each raw MNIST file -> the addresses of its .gz (torchvision's mirrors) and the .gz's
    published MD5, in torchvision's order (train images, train labels, test images, labels)."""
    from torchvision.datasets import MNIST

    sources = {}
    for archive, md5 in MNIST.resources:
        sources[archive.removesuffix(".gz")] = ([mirror + archive for mirror in MNIST.mirrors], md5)
    return sources


def permission_denied(path) -> UserError:
    """The error for data this user may not read: neither missing nor corrupt, so it says so."""
    return UserError(
        f"cannot read {path}: permission denied (unreadable, not missing or corrupt): make it "
        "readable to this user, or pass another --data-dir"
    )


def missing_mnist_files(raw: Path) -> list[str]:
    """The raw MNIST files not in `raw`; a UserError if only their .gz are there."""
    try:
        present = set(os.listdir(raw)) if raw.is_dir() else set()
    except PermissionError:
        raise permission_denied(raw) from None
    missing = [name for name in mnist_sources() if name not in present]
    if missing and all(f"{name}.gz" in present for name in missing):
        raise UserError(f"only .gz files found in {raw} for {', '.join(missing)}: decompress them")
    return missing


def download_one(name: str, addresses: list[str], md5: str, folder: Path) -> None:
    """Download name.gz from the first address that works, check its MD5 and decompress it
    into folder; an OSError with every address's reason if none works."""
    from torchvision.datasets import utils

    reasons = []
    for url in addresses:
        try:
            utils.download_and_extract_archive(url, str(folder), filename=f"{name}.gz", md5=md5)
            return
        except Exception as error:  # offline: URLError; a bad MD5: RuntimeError
            reasons.append(f"{url}: {first_line(error)}")
    raise OSError("; ".join(reasons))


def download_mnist(data_dir: str, missing: list[str]) -> None:
    """Download the missing raw files into a temporary folder inside data_dir, then move them
    into MNIST/raw/ together. A failure leaves data_dir as it was (no empty folders, no partial
    files) and is a UserError naming every missing file, its address and why."""
    raw = Path(data_dir) / "MNIST" / "raw"
    made = [folder for folder in (Path(data_dir), raw.parent, raw) if not folder.exists()]
    sources = mnist_sources()
    try:
        Path(data_dir).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".mnist-download-", dir=data_dir) as staging:
            for name in missing:
                log(f"data: downloading {name} (MD5-checked)")
                download_one(name, *sources[name], Path(staging))
            raw.mkdir(parents=True, exist_ok=True)
            for name in missing:
                os.replace(Path(staging) / name, raw / name)
    except OSError as error:
        for folder in reversed(made):  # the innermost first; only folders this call made
            shutil.rmtree(folder, ignore_errors=True)
        listed = ", ".join(f"{name} ({sources[name][0][0]})" for name in missing)
        raise UserError(
            f"MNIST files missing in {raw}: {listed}; downloading them failed "
            f"({first_line(error)}); {PREFETCH_HINT}"
        ) from None


def load_mnist(data_dir, train=True) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST's train or test split from data_dir/MNIST/raw/, downloaded there if missing: uint8
    images (N, 28, 28), int64 labels (N,). An unreadable or damaged file is one UserError."""
    from torchvision.datasets import MNIST

    raw = Path(data_dir) / "MNIST" / "raw"
    missing = missing_mnist_files(raw)
    if missing:
        download_mnist(data_dir, missing)
    try:
        dataset = MNIST(root=str(data_dir), train=train, download=False)
    except PermissionError as error:
        raise permission_denied(error.filename or raw) from None
    except Exception as error:  # a truncated or corrupt IDX file fails inside torchvision
        split = "train" if train else "t10k"
        raise UserError(
            f"could not read the MNIST {split} files in {raw} ({type(error).__name__}: "
            f"{first_line(error)}); they are corrupt or truncated: delete them and fetch them "
            f"again; {PREFETCH_HINT}"
        ) from None
    images = dataset.data
    labels = dataset.targets
    shaped = images.dtype == torch.uint8 and images.shape[1:] == (28, 28)
    if not (shaped and len(images) == len(labels) > 0 and 0 <= labels.min() <= labels.max() <= 9):
        raise UserError(
            f"the MNIST files in {raw} hold {tuple(images.shape)} images and {len(labels)} "
            "labels, not N 28x28 images with labels 0-9; they are corrupt: fetch them again"
        )
    return images, labels.long()


def prefetch_mnist(data_dir: str) -> int:
    """--prefetch: download what is missing, check the MD5 of any .gz that torchvision's own
    download kept beside the files, read both splits, and report."""
    from torchvision.datasets.utils import check_integrity

    raw = Path(data_dir) / "MNIST" / "raw"
    downloaded = len(missing_mnist_files(raw))
    train_images = load_mnist(data_dir, train=True)[0]
    test_images = load_mnist(data_dir, train=False)[0]
    archives = 0
    for name, (_, md5) in mnist_sources().items():
        archive = raw / f"{name}.gz"
        if archive.is_file() and not check_integrity(str(archive), md5):
            raise UserError(f"{archive} is corrupt (its MD5 is not {md5}): delete it and {name}")
        archives += archive.is_file()
    log(
        f"MNIST ready in {raw}: {len(train_images):,} training and {len(test_images):,} test "
        f"images ({downloaded} files downloaded and MD5-checked, {archives} .gz checked)"
    )
    return 0


def synthetic_mnist(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """--dry-run's stand-in for MNIST: uint8 (count, 28, 28) noise in which each of the 10
    classes lights its own 6x6 block (learnable in a few steps), int64 labels (count,); one
    label in 20 is redrawn at random, so that a trained network still makes mistakes to show."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (count,), generator=generator)
    images = torch.randint(0, 60, (count, 28, 28), generator=generator)
    for index, label in enumerate(labels.tolist()):
        top = 2 + 8 * (label // 4)
        left = 2 + 6 * (label % 4)
        images[index, top : top + 6, left : left + 6] += 180
    mislabelled = torch.rand(count, generator=generator) < 0.05
    labels[mislabelled] = torch.randint(0, 10, (int(mislabelled.sum()),), generator=generator)
    return images.clamp(max=255).to(torch.uint8), labels


def load_data(args: argparse.Namespace, device: torch.device) -> dict[str, tuple]:
    """train, val (a seeded random --val-size images held out of train, for the validation
    curves) and test, as uint8 images and int64 labels on the device; MNIST (downloaded if
    missing) or, for --dry-run, synthetic images."""
    if args.dry_run:
        train_set = synthetic_mnist(DRY_RUN_IMAGES["train"], seed=1)
        test_set = synthetic_mnist(DRY_RUN_IMAGES["test"], seed=2)
    else:
        train_set = load_mnist(args.data_dir, train=True)
        test_set = load_mnist(args.data_dir, train=False)
    images, labels = train_set
    if not 0 <= args.val_size < len(images):
        raise UserError(f"--val-size {args.val_size} must be between 0 and {len(images) - 1}")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(args.seed))
    val = order[: args.val_size]
    train = order[args.val_size :]
    data = {
        "train": (images[train], labels[train]),
        "val": (images[val], labels[val]),
        "test": test_set,
    }
    return {name: (x.to(device), y.to(device)) for name, (x, y) in data.items()}


def preprocess(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 28, 28) on the device -> normalised float32 (N, 1, 28, 28), on the same device."""
    scale = 1.0 / (255.0 * MNIST_STD)
    return (images_uint8.float() * scale - MNIST_MEAN / MNIST_STD).unsqueeze(1)


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
    kh, kw = kernel
    sh, sw = stride
    ph, pw = padding
    n, c, h, w = x.shape
    padded = x.new_zeros((n, c, h + 2 * ph, w + 2 * pw))
    padded[:, :, ph : ph + h, pw : pw + w] = x
    windows = padded.unfold(2, kh, sh).unfold(3, kw, sw)  # (N, C, H_out, W_out, kh, kw), a view
    return windows.permute(0, 2, 3, 1, 4, 5).flatten(3)


def col2im(grad_windows: torch.Tensor, input_shape, stride, padding) -> torch.Tensor:
    """The adjoint of taking windows: grad_windows (N, C, H_out, W_out, kh, kw) -> (N, C, H, W),
    each window element's gradient added back where forward read it (overlaps add up)."""
    n, c, h, w = input_shape
    sh, sw = stride
    ph, pw = padding
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
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        shape = (out_channels, in_channels, *self.kernel_size)
        # He initialisation: keeps the activation variance constant through ReLU layers.
        self.params = _parameters(factory, shape, math.sqrt(2.0 / math.prod(shape[1:])))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        columns = im2col(x, self.kernel_size, self.stride, self.padding)
        self.cache = (x.shape, columns)
        rows = columns @ self.params["weight"].flatten(1).t() + self.params["bias"]
        return rows.permute(0, 3, 1, 2)  # (N, H_out, W_out, C_out) in memory

    def backward(self, grad_out: torch.Tensor) -> torch.Tensor | None:
        input_shape, columns = self.cache
        weight = self.params["weight"]
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
        kh, kw = self.kernel_size
        sh, sw = self.stride
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

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.buffers: dict[str, torch.Tensor] = {}  # by name; made on first use, kept after

    def reused(self, name: str, shape: tuple, like: torch.Tensor) -> torch.Tensor:
        buffer = self.buffers.get(name)
        wanted = (tuple(shape), like.dtype, like.device)
        if buffer is None or (tuple(buffer.shape), buffer.dtype, buffer.device) != wanted:
            buffer = like.new_zeros(shape)
            self.buffers[name] = buffer
        return buffer

    def transposed_windows(self, name: str, padded: torch.Tensor, window, stride) -> torch.Tensor:
        """im2col transposed, into the buffer `name`: padded (N, C, H_pad, W_pad) -> (C, wh, ww,
        N, H_out, W_out), the (K, P) columns, each row copied in long runs along W (in (P, K)
        order a row is a run of ww values: 4x slower to fill for one channel, measured)."""
        wh, ww = window
        sh, sw = stride
        windows = padded.unfold(2, wh, sh).unfold(3, ww, sw).permute(1, 4, 5, 0, 2, 3)
        return self.reused(name, windows.shape, padded).copy_(windows)


class ColumnsConv2D(BufferedConv2D):
    """Computes Conv2D (backward is the reference one, on the same columns), plus
    weight_grad_through_pool: the weight gradient of conv -> ReLU -> max-pool in one product.
    Faster forward: the columns are filled transposed, and BLAS multiplies their transpose as
    it is, straight into the channels-last output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        ph, pw = self.padding
        padded = self.reused("padded", (n, c, h + 2 * ph, w + 2 * pw), x)
        padded[:, :, ph : ph + h, pw : pw + w] = x
        windows = self.transposed_windows("columns", padded, self.kernel_size, self.stride)
        columns = windows.flatten(0, 2).flatten(1)  # (K, P)
        h_out, w_out = windows.shape[4:]
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
        kh, kw = self.kernel_size
        pool_h, pool_w = pool.kernel_size
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
        n, c, h, w = x.shape
        ph, pw = self.padding
        kh, kw = self.kernel_size
        padded = self.reused("padded", (n, h + 2 * ph, w + 2 * pw, c), x)
        padded[:, ph : ph + h, pw : pw + w] = x.permute(0, 2, 3, 1)
        # (N, H_pad, W_out, kw, C_in): what each kernel row sees, per padded row and output column
        row_windows = padded.unfold(2, kw, self.stride[1]).transpose(3, 4)
        w_out = row_windows.shape[2]
        count = math.prod(row_windows.shape[:3])
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
        kh, kw = self.kernel_size
        ph, pw = self.padding
        sw = self.stride[1]
        height = h + 2 * ph
        w_out = grad_out.shape[3]
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


def running_max(taps: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The elementwise maximum of taps (views of one shape), and per tap after the first a
    float 0/1 mask of where it beat every earlier one (so ties go to the first maximum)."""
    out, *others = taps
    takes = []
    for tap in others:
        takes.append(torch.gt(tap, out, out=torch.empty_like(tap)))
        out = torch.maximum(out, tap)
    return out, takes


def route_by_takes(grad_out: torch.Tensor, takes: list, grad_taps: list[torch.Tensor]) -> None:
    """The backward of running_max: write into grad_taps[t] what tap t takes of grad_out,
    from the last tap back, each taking what no later one took."""
    rest = grad_taps[0].copy_(grad_out)  # in place: no new tensor per step
    for take, grad_tap in zip(reversed(takes), reversed(grad_taps[1:])):
        rest.sub_(torch.mul(rest, take, out=grad_tap))


class FastMaxPool2D(MaxPool2D):
    """Computes MaxPool2D (first maximum on ties), plus relu_mask: the backward of a ReLU in
    front of it, on the pooled grid. Faster: separable, the maximum across each window's row
    (taps along W, strided views) and then down its rows, so the second pass runs along whole
    rows of the channels-last image; beside each running maximum a float 0/1 mask per tap of
    where it beat every earlier one, which backward routes by (float: the CPU's fast path)."""

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x's kh * kw views (N, C, H_out, W_out): tap (i, j) holds x[..., i + s*y, j + s*x]."""
        windows = self.windows(x)
        return [windows[..., i, j] for i, j in itertools.product(*map(range, self.kernel_size))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kh, kw = self.kernel_size
        sh, sw = self.stride
        across_taps = x.unfold(3, kw, sw).unbind(-1)  # (N, C, H, W_out) each
        across, across_takes = running_max(across_taps)  # per row of x, the window's columns
        out, down_takes = running_max(across.unfold(2, kh, sh).unbind(-1))
        self.cache = (x, out, across_takes, down_takes)
        return out

    def relu_mask(self, grad_out: torch.Tensor) -> torch.Tensor:
        """The backward of the ReLU in front of this pool, on the pooled grid (a quarter of the
        size): the pool hands each window's gradient to its maximum m, where the ReLU's
        derivative is [m > 0] = [pooled output > 0]. The same numbers."""
        pooled = self.cache[1]
        return torch.gt(pooled, 0, out=torch.empty_like(pooled)).mul_(grad_out)

    def route(self, grad_out: torch.Tensor, grad_taps: list[torch.Tensor]) -> None:
        """Write into grad_taps[t] (shaped like grad_out, t = i * kw + j) what tap (i, j) takes
        of each window's gradient: first to the window's rows, then along each row."""
        _, _, across_takes, down_takes = self.cache
        kh, kw = self.kernel_size
        rows = [torch.empty_like(grad_out) for _ in range(kh)]
        route_by_takes(grad_out, down_takes, rows)
        for i, row in enumerate(rows):
            row_takes = [take.unfold(2, kh, self.stride[0])[..., i] for take in across_takes]
            route_by_takes(row, row_takes, grad_taps[i * kw : (i + 1) * kw])

    def backward(self, grad_out: torch.Tensor) -> torch.Tensor:
        x, out = self.cache[:2]
        kh, kw = self.kernel_size
        sh, sw = self.stride
        if (kh, kw) == (sh, sw) and (out.shape[2] * kh, out.shape[3] * kw) == x.shape[2:]:
            grad_in = torch.empty_like(x)  # windows that tile x: each element written once
            self.route(grad_out, self.taps(grad_in))
            return grad_in
        shares = [torch.empty_like(out) for _ in range(kh * kw)]
        self.route(grad_out, shares)
        grad_in = torch.zeros_like(x)
        for tap, share in zip(self.taps(grad_in), shares):
            tap += share  # where windows overlap, their shares add up
        return grad_in


class CNN:
    """The seed architecture, forward(x (N, 1, 28, 28)) -> logits (N, 10).

    layers="reference" builds it from the reference layers and backpropagates by a plain loop
    over them in reverse; layers="fast" from the fast layers, with the fused backward below,
    the second convolution as ColumnsConv2D or KernelRowsConv2D (conv_kernels). Both kinds
    draw the same initial weights from the same generator.
    """

    def __init__(self, *, layers: str = "fast", conv_kernels: str = "kernel-rows", **factory):
        if layers not in LAYER_KINDS:
            raise ValueError(f"layers must be one of {LAYER_KINDS}, got {layers!r}")
        if layers == "fast" and conv_kernels not in CONV_KERNELS:
            raise ValueError(f"conv_kernels must be one of {CONV_KERNELS}, got {conv_kernels!r}")
        self.kind = layers
        if layers == "reference":
            block1 = [Conv2D(1, 8, 3, padding=1, **factory), ReLU(), MaxPool2D(2)]
            block2 = [Conv2D(8, 16, 3, padding=1, **factory), ReLU(), MaxPool2D(2)]
        else:
            second_conv = KernelRowsConv2D if conv_kernels == "kernel-rows" else ColumnsConv2D
            first_conv = ColumnsConv2D(1, 8, 3, padding=1, **factory)
            block1 = [first_conv, ReLU(inplace=True), FastMaxPool2D(2)]
            block2 = [second_conv(8, 16, 3, padding=1, **factory), ReLU(inplace=True)]
            block2.append(FastMaxPool2D(2))
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
        conv1, _, pool1, conv2, _, pool2, flatten, linear = self.layers
        grad = flatten.backward(linear.backward(grad))
        # Block 2 replaces relu2.backward(pool2.backward(grad)): the ReLU's mask is applied to
        # the pooled gradient (a quarter of the size, the same numbers), then the pool routes it.
        grad = conv2.backward(pool2.backward(pool2.relu_mask(grad)))
        # Block 1 replaces conv1.backward(relu1.backward(pool1.backward(grad))), whose input
        # gradient nothing needs: the ReLU's mask on the pooled gradient again, then the first
        # convolution's weight gradient straight through the pool, in one product.
        conv1.weight_grad_through_pool(pool1, pool1.relu_mask(grad))

    def trainable_layers(self) -> list[tuple[int, Conv2D | Linear]]:
        return [(i, layer) for i, layer in enumerate(self.layers) if hasattr(layer, "params")]

    def parameters(self) -> dict[str, torch.Tensor]:
        """Every layer's parameters, as "layers.<index>.<name>" (torch's state_dict keys)."""
        named = {}
        for index, layer in self.trainable_layers():
            for name, tensor in layer.params.items():
                named[f"layers.{index}.{name}"] = tensor
        return named

    def gradients(self) -> dict[str, torch.Tensor]:
        """The gradients of parameters() from the last backward, under the same keys."""
        named = {}
        for index, layer in self.trainable_layers():
            for name, tensor in layer.grads.items():
                named[f"layers.{index}.{name}"] = tensor
        return named

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {key: tensor.clone() for key, tensor in self.parameters().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy state's tensors in; a ValueError if its keys or shapes are not this network's."""
        params = self.parameters()
        if set(state) != set(params):
            raise ValueError(f"its tensors {sorted(state)} are not this network's")
        for key, tensor in params.items():
            if state[key].shape != tensor.shape:
                raise ValueError(f"{key} is {tuple(state[key].shape)}, not {tuple(tensor.shape)}")
            tensor.copy_(state[key])


class SGD:
    """SGD with Nesterov momentum and L2 weight decay, in place, as torch.optim.SGD(...,
    nesterov=True) does it: g = grad + weight_decay * p; buf = momentum * buf + g (buf from 0);
    p -= lr * (g + momentum * buf)."""

    def __init__(self, model: CNN, lr: float, momentum=0.9, weight_decay=0.0):
        self.model = model
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.buffers: dict[str, torch.Tensor] = {}

    def step(self) -> None:
        grads = self.model.gradients()
        for key, param in self.model.parameters().items():
            grad = grads[key].add(param, alpha=self.weight_decay)
            buffer = self.buffers.get(key, 0) * self.momentum + grad
            self.buffers[key] = buffer
            param.add_(grad.add(buffer, alpha=self.momentum), alpha=-self.lr)

    def state_dict(self) -> dict:
        return {"lr": self.lr, "buffers": {k: v.clone() for k, v in self.buffers.items()}}

    def load_state_dict(self, state: dict) -> None:
        params = self.model.parameters()  # the buffers go onto the parameters' device
        self.lr = state["lr"]
        self.buffers = {k: v.to(params[k].device, copy=True) for k, v in state["buffers"].items()}


def time_conv_kernels(batch_size: int, device: torch.device, repeats: int = 3) -> dict:
    """Median milliseconds of a forward and backward of the fast network with each of
    CONV_KERNELS, on one random batch of batch_size images, after a warmup step, interleaved
    (cuDNN's benchmark mode, by hand: which is faster depends on the CPU and its BLAS)."""
    generator = torch.Generator().manual_seed(0)  # the run's own random state stays untouched
    x = torch.randn(batch_size, 1, 28, 28, generator=generator).to(device)
    y = torch.randint(0, 10, (batch_size,), generator=generator).to(device)
    models = {
        kind: CNN(conv_kernels=kind, device=device, generator=generator) for kind in CONV_KERNELS
    }
    loss_fn = SoftmaxCrossEntropy()
    times = {kind: [] for kind in CONV_KERNELS}
    for repeat in range(repeats + 1):
        for kind, model in models.items():
            started = time.perf_counter()
            loss_fn.forward(model.forward(x), y)
            model.backward(loss_fn.backward())
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if repeat:  # repeat 0 allocates the buffers and warms the caches
                times[kind].append(1000 * (time.perf_counter() - started))
    return {kind: statistics.median(milliseconds) for kind, milliseconds in times.items()}


def own_output(layers: list, values: dict) -> torch.Tensor:
    """The output of the (index, layer) pairs `layers`, by their own forward, at `values`:
    "input" and the parameters "layers.<index>.<name>"."""
    x = values["input"]
    for index, layer in layers:
        at_values = copy.copy(layer)  # the same layer at these parameters
        at_values.params = {
            name: values[f"layers.{index}.{name}"] for name in getattr(layer, "params", {})
        }
        x = at_values.forward(x.clone())  # a clone: an in-place ReLU must keep the values
    return x


def torch_output(layers: list, values: dict) -> torch.Tensor:
    """The same by torch.nn.functional, which autograd differentiates."""
    import torch.nn.functional as F

    x = values["input"]
    for index, layer in layers:
        weight = values.get(f"layers.{index}.weight")
        bias = values.get(f"layers.{index}.bias")
        if isinstance(layer, Conv2D):
            x = F.conv2d(x, weight, bias, layer.stride, layer.padding)
        elif isinstance(layer, MaxPool2D):
            x = F.max_pool2d(x, layer.kernel_size, layer.stride)
        elif isinstance(layer, Linear):
            x = F.linear(x, weight, bias)
        elif isinstance(layer, ReLU):
            x = F.relu(x)
        else:
            x = x.flatten(1)
    return x


def weighted_sum(output: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum(output * weights): its gradient with respect to output is `weights`."""
    return (output * weights).sum()


def gradient_errors(objective, layers: list, target, values: dict, hand: dict, generator):
    """The largest relative errors of `hand`, the hand-written gradients of
    objective(output of layers at values, target): against central finite differences along a
    random direction per tensor, and against autograd through torch's own functions."""
    leaves = {name: tensor.clone().requires_grad_() for name, tensor in values.items()}
    with torch.enable_grad():
        loss = objective(torch_output(layers, leaves), target)
        by_autograd = torch.autograd.grad(loss, [leaves[name] for name in hand])
    finite = 0.0
    autograd = 0.0
    for (name, grad), expected in zip(hand.items(), by_autograd):
        direction = torch.randn(grad.shape, generator=generator, dtype=torch.float64)
        plus = own_output(layers, {**values, name: values[name] + 1e-6 * direction})
        minus = own_output(layers, {**values, name: values[name] - 1e-6 * direction})
        numeric = float(objective(plus, target) - objective(minus, target)) / 2e-6
        analytic = float((grad * direction).sum())
        finite = max(finite, abs(analytic - numeric) / max(abs(numeric), 1e-30))
        error = (grad - expected).abs().max() / expected.abs().max().clamp(min=1e-30)
        autograd = max(autograd, float(error))
    return finite, autograd


def network_gradient_errors(model: CNN, generator: torch.Generator) -> dict[str, tuple]:
    """gradient_errors of each layer on a random input of the shape it sees in the network and
    a random output gradient, then of the whole network's loss on two random images."""
    x = torch.randn(2, 1, 28, 28, generator=generator, dtype=torch.float64)
    errors = {}
    for index, layer in enumerate(model.layers):
        out = layer.forward(x.clone())
        weights = torch.randn(out.shape, generator=generator, dtype=torch.float64)
        grad_in = layer.backward(weights)
        values = {"input": x}
        hand = {}
        for name, tensor in getattr(layer, "params", {}).items():
            values[f"layers.{index}.{name}"] = tensor
            hand[f"layers.{index}.{name}"] = layer.grads[name]
        if grad_in is not None:
            hand["input"] = grad_in
        row = f"{index} {type(layer).__name__}"
        errors[row] = gradient_errors(
            weighted_sum, [(index, layer)], weights, values, hand, generator
        )
        x = torch.empty_like(out).normal_(generator=generator)  # distinct values: no ties
    x = torch.randn(2, 1, 28, 28, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 10, (2,), generator=generator)
    loss_fn = SoftmaxCrossEntropy()
    loss_fn.forward(model.forward(x), y)
    model.backward(loss_fn.backward())
    values = {"input": x, **model.parameters()}
    every_layer = list(enumerate(model.layers))
    hand = model.gradients()
    errors["whole network"] = gradient_errors(
        loss_fn.forward, every_layer, y, values, hand, generator
    )
    return errors


def check_gradients(seed: int = 0) -> int:
    """--check-gradients: network_gradient_errors of each layer kind in float64, logged; 0 if
    each is within GRADIENT_TOLERANCES, else FAILURE_EXIT_CODE."""
    log("largest relative difference of the hand-written gradients (float64):")
    log(f"{'layers':<11}{'layer':<22}{'vs finite differences':>22}{'vs autograd':>13}")
    worst = dict.fromkeys(GRADIENT_TOLERANCES, 0.0)
    for kind in LAYER_KINDS:
        generator = torch.Generator().manual_seed(seed)
        model = CNN(layers=kind, dtype=torch.float64, generator=generator)
        for _, layer in model.trainable_layers():
            layer.params["bias"].normal_(std=0.1, generator=generator)
        for name, errors in network_gradient_errors(model, generator).items():
            log(f"{kind:<11}{name:<22}{errors[0]:>22.1e}{errors[1]:>13.1e}")
            worst = {key: max(worst[key], error) for key, error in zip(worst, errors)}
    within = all(worst[key] <= limit for key, limit in GRADIENT_TOLERANCES.items())
    limits = ", ".join(f"{key} {limit:.0e}" for key, limit in GRADIENT_TOLERANCES.items())
    log(f"{'all within' if within else 'FAILED: not all within'} the tolerances ({limits})")
    return 0 if within else FAILURE_EXIT_CODE


# --------------------------------------------------------------------------------------------
# Training and evaluation
# --------------------------------------------------------------------------------------------


def default_warmup_epochs(epochs: int) -> float:
    """One epoch of warmup, but never more than a fifth of the run (5 epochs: 1)."""
    return min(1.0, epochs / 5)


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
def train_epoch(args, model: CNN, optimizer: SGD, train_set: tuple, state: dict, stop) -> None:
    """The steps of epoch state["epoch"] from state["step_in_epoch"] on, until its end or a stop
    signal. The loss and correct counts accumulate on the device and are read once, at the end,
    into state["sums"], so that no step waits for the device."""
    from tqdm import tqdm

    train_x, train_y = train_set
    loss_fn = SoftmaxCrossEntropy()
    steps_per_epoch = math.ceil(len(train_x) / args.batch_size)
    warmup_steps = round(args.warmup_epochs * steps_per_epoch)
    epoch = state["epoch"]
    if state["step_in_epoch"] == 0:
        state["sums"] = {"loss": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}
    sums = state["sums"]
    loss_sum = torch.tensor(sums["loss"], dtype=torch.float64, device=train_x.device)
    correct = torch.tensor(sums["correct"], device=train_x.device)
    # Each epoch's order comes from its own seeded generator: a resumed epoch draws the same
    # permutation and skips the steps it had already taken.
    shuffle = torch.Generator().manual_seed(args.seed * 1000 + epoch + 1)
    batches = torch.randperm(len(train_x), generator=shuffle).to(train_x.device)
    batches = batches.split(args.batch_size)
    done = state["step_in_epoch"]
    progress_bar = tqdm(
        batches[done:],
        desc=f"epoch {epoch + 1}/{args.epochs}",
        total=len(batches),
        initial=done,
        leave=False,
        disable=not sys.stderr.isatty(),  # a bar on a terminal; none in a SLURM .out file
    )
    for index in progress_bar:
        step = epoch * steps_per_epoch + state["step_in_epoch"]
        optimizer.lr = learning_rate(step, steps_per_epoch * args.epochs, args.lr, warmup_steps)
        logits = model.forward(preprocess(train_x[index]))
        y = train_y[index]
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
    sums["loss"] = float(loss_sum)  # waits for the device
    sums["correct"] = int(correct)


def end_epoch(args, model: CNN, optimizer: SGD, data: dict, state: dict, run_dir: Path) -> None:
    """Validate, then write history.csv and the checkpoint (in that order, so that history.csv
    is never short of the checkpoint) and log the epoch's line."""
    sums = state["sums"]
    seen = sums["seen"]
    seconds = sums["seconds"]
    val = evaluate(model, *data["val"])
    row = {
        "epoch": state["epoch"] + 1,
        "train_loss": sums["loss"] / seen,
        "train_accuracy": sums["correct"] / seen,
        "val_loss": val["loss"],
        "val_accuracy": val["accuracy"],
        "lr": optimizer.lr,
        "seconds": seconds,
        "images_per_s": seen / seconds,
    }
    state["history"].append(row)
    state["train_time_s"] += seconds
    state["epoch"] += 1
    state["step_in_epoch"] = 0
    write_csv(run_dir / "history.csv", state["history"])
    save_checkpoint(run_dir, model, optimizer, state)
    log(
        f"epoch {row['epoch']}/{args.epochs}  train loss {row['train_loss']:.4f} "
        f"acc {100 * row['train_accuracy']:.2f}%  val loss {row['val_loss']:.4f} "
        f"acc {100 * row['val_accuracy']:.2f}%  lr {row['lr']:.4g}  "
        f"{seconds:.1f}s  {row['images_per_s']:,.0f} img/s"
    )


@torch.no_grad()
def train(args, model: CNN, optimizer: SGD, data: dict, state: dict, stop, run_dir: Path) -> str:
    """Train (or continue) from `state` to args.epochs: "done", "stopped" or "diverged". A
    NaN/inf loss is caught at the epoch's (or stop's) read of the sums, before a checkpoint, so
    a checkpoint never holds a diverged model."""
    steps_per_epoch = math.ceil(len(data["train"][0]) / args.batch_size)
    while state["epoch"] < args.epochs:
        started = time.perf_counter()
        train_epoch(args, model, optimizer, data["train"], state, stop)
        state["sums"]["seconds"] += time.perf_counter() - started
        if not math.isfinite(state["sums"]["loss"]):
            return "diverged"
        if state["step_in_epoch"] < steps_per_epoch:  # stopped by a signal mid-epoch
            save_checkpoint(run_dir, model, optimizer, state)
            return "stopped"
        end_epoch(args, model, optimizer, data, state, run_dir)
        if stop.received and state["epoch"] < args.epochs:
            return "stopped"
    return "done"


# --------------------------------------------------------------------------------------------
# Outputs of this script: checkpoint, metrics, plots
# --------------------------------------------------------------------------------------------


def save_checkpoint(run_dir: Path, model: CNN, optimizer: SGD, state: dict) -> None:
    payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "state": state}
    atomic_write(run_dir / CHECKPOINT_NAME, {**payload, "rng": capture_rng_state()})


def load_checkpoint(path: Path, model: CNN, optimizer: SGD) -> dict:
    """Load the checkpoint into model and optimizer and restore the RNG state; returns the
    training state. A damaged file, or one that is not this network's, is a UserError."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        restore_rng_state(checkpoint["rng"])
        return checkpoint["state"]
    except Exception as error:  # truncated, not a torch file, or another network's tensors
        raise UserError(
            f"cannot resume from the checkpoint {path} ({type(error).__name__}: "
            f"{first_line(error)}): it is damaged or not this script's; start a new run"
        ) from None


def classification_metrics(labels: torch.Tensor, predicted: torch.Tensor) -> dict:
    """The confusion matrix (rows: true class, columns: predicted) and per-class precision,
    recall and F1 of the 10 digits, by scikit-learn."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    digits = list(range(10))
    true = labels.cpu().numpy()
    guessed = predicted.cpu().numpy()
    precision, recall, f1, support = precision_recall_fscore_support(
        true, guessed, labels=digits, zero_division=0
    )
    per_class = {}
    for digit in digits:
        per_class[str(digit)] = {
            "precision": float(precision[digit]),
            "recall": float(recall[digit]),
            "f1": float(f1[digit]),
            "support": int(support[digit]),
        }
    confusion = confusion_matrix(true, guessed, labels=digits).tolist()
    return {"macro_f1": float(f1.mean()), "per_class": per_class, "confusion_matrix": confusion}


def plot_training_curves(history: list[dict], lr_by_step: list, path: Path, title: str) -> None:
    """Loss and accuracy per epoch, train (the running mean over the epoch's steps, as the
    weights changed) beside val (the weights at the epoch's end), and each step's learning rate."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [row["epoch"] for row in history]
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.4), layout="constrained")
    labels = {"train": "train (running mean over the epoch)", "val": "val (at the epoch's end)"}
    for split, style in (("train", "o-"), ("val", "s--")):
        losses = [row[f"{split}_loss"] for row in history]
        accuracy = [100 * row[f"{split}_accuracy"] for row in history]
        axes[0].plot(epochs, losses, style, label=labels[split])
        axes[1].plot(epochs, accuracy, style, label=labels[split])
    steps_per_epoch = len(lr_by_step) / max(1, len(history))
    axes[2].plot([(step + 1) / steps_per_epoch for step in range(len(lr_by_step))], lr_by_step)
    names = ("cross-entropy loss", "accuracy (%)", "learning rate (per step)")
    for axis, name in zip(axes, names):
        axis.set(ylabel=name, title=name.split(" (")[0].capitalize(), xlabel="epoch")
        axis.set_xlim(0, max(epochs, default=1) + 0.25)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))  # 0 and 1, not 0.995 and 1.0
        axis.grid(alpha=0.3)
    axes[0].legend()
    axes[1].legend()
    figure.suptitle(title)
    save_figure(figure, path)


def plot_confusion_matrix(confusion: list, path: Path, title: str) -> None:
    """The 10 digits' test confusion matrix with the count in every cell: right answers on a
    grey diagonal, the errors on a colour scale of their own, so that a handful of mistakes
    shows beside a thousand right answers."""
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    matrix = np.array(confusion)
    diagonal = np.eye(10, dtype=bool)
    errors = np.where(diagonal | (matrix == 0), np.nan, matrix)  # nan: a white cell
    most = max(1.0, np.nanmax(errors, initial=0))
    figure, axis = plt.subplots(figsize=(7, 6), layout="constrained")
    image = axis.imshow(errors, cmap="Reds", vmin=0, vmax=most)
    axis.imshow(np.where(diagonal, 1.0, np.nan), cmap="Greys", vmin=0, vmax=5)
    counts = MaxNLocator(integer=True)  # no ticks at half an image
    figure.colorbar(image, ax=axis, label="misclassified test images (count)", ticks=counts)
    axis.set_xticks(range(10))
    axis.set_yticks(range(10))
    axis.set(xlabel="predicted digit", ylabel="true digit")
    correct = int(np.trace(matrix))
    axis.set_title(f"{title}\n{correct:,} of {int(matrix.sum()):,} correct (grey diagonal)")
    for (row, column), value in np.ndenumerate(matrix):
        if value or row == column:
            color = "white" if row != column and value > most / 2 else "black"
            weight = "bold" if row == column else "normal"
            axis.text(column, row, value, ha="center", va="center", color=color, weight=weight)
    save_figure(figure, path)


def plot_misclassified(images, labels, predicted, probabilities, path: Path, limit=36) -> None:
    """The most confident mistakes first, each with its true digit, the predicted one and the
    probability the network gave it."""
    import matplotlib.pyplot as plt

    labels = labels.cpu()
    predicted = predicted.cpu()
    probabilities = probabilities.cpu()
    wrong = (predicted != labels).nonzero().flatten()
    shown = wrong[probabilities[wrong].argsort(descending=True, stable=True)][:limit].tolist()
    columns = 6
    rows = max(1, math.ceil(len(shown) / columns))
    size = (columns * 1.7, rows * 1.9 + 0.5)
    figure, axes = plt.subplots(rows, columns, figsize=size, squeeze=False, layout="constrained")
    for axis in axes.flat:
        axis.axis("off")
    for axis, index in zip(axes.flat, shown):
        axis.imshow(images[index].cpu().numpy(), cmap="gray")
        probability = float(probabilities[index])
        axis.set_title(
            f"true {int(labels[index])}, predicted {int(predicted[index])}\np = {probability:.2f}",
            fontsize=8,
        )
    figure.suptitle(
        f"{len(shown)} of {len(wrong)} misclassified test images, most confident first "
        "(p: the predicted digit's probability)"
    )
    save_figure(figure, path)


def write_results(args, model: CNN, data: dict, state: dict, run_dir: Path) -> dict:
    """Test-set evaluation, history, plots, then metrics.json: written last, it marks the run
    finished, so a run killed before it is resumed and writes them all again."""
    test_x, test_y = data["test"]
    history = state["history"]
    seconds = state["train_time_s"]
    test = evaluate(model, test_x, test_y)
    metrics = {"test_accuracy": test["accuracy"], "test_loss": test["loss"]}
    metrics.update(classification_metrics(test_y, test["predictions"]))
    images = sum(row["seconds"] * row["images_per_s"] for row in history)
    metrics["train_time_s"] = seconds
    metrics["images_per_s"] = images / max(seconds, 1e-9)
    metrics["epochs"] = args.epochs
    metrics["layers"] = args.layers
    metrics["test_images"] = len(test_y)
    dry = ", DRY RUN on synthetic images" if args.dry_run else ""
    title = f"cnn_from_scratch.py ({args.layers} layers), seed {args.seed}{dry}"
    write_csv(run_dir / "history.csv", history)
    plot_training_curves(history, state["lr_by_step"], run_dir / "training_curves.png", title)
    heading = f"Test confusion matrix, {title}"
    plot_confusion_matrix(metrics["confusion_matrix"], run_dir / "confusion_matrix.png", heading)
    predicted = test["predictions"]
    probabilities = test["probabilities"]
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
    """The run folder to continue and its config.json (args then take its settings), or None,
    None for a new run."""
    if args.dry_run and args.resume:
        raise UserError("--dry-run always starts a new run: drop --resume")
    run_dir = find_resume_run(RUN, args.resume, args.output_dir)
    if run_dir is None:
        if args.resume == "auto":
            log("resume: no unfinished run found, starting a new run")
        return None, None
    lock.acquire(run_dir)
    record = read_run_record(run_dir)
    merge_resumed_args(RUN, args, record["args"], explicit)
    removed = remove_stale_temp_files(run_dir)
    if removed:
        log(f"resume: removed {removed} temporary files of an interrupted write")
    return run_dir, record


def choose_conv_kernels(args, device: torch.device) -> dict | None:
    """--conv-kernels auto with the fast layers: time both formulations on a batch of the
    run's size and take the faster; returns the timings (ms per step), None if none were made."""
    if args.layers != "fast" or args.conv_kernels != "auto":
        return None
    milliseconds = time_conv_kernels(args.batch_size, device)
    args.conv_kernels = min(milliseconds, key=milliseconds.get)
    timings = ", ".join(f"{kind} {value:.1f} ms" for kind, value in milliseconds.items())
    log(f"conv kernels: {args.conv_kernels}, the faster per step ({timings})")
    return milliseconds


def epoch_position(state: dict) -> str:
    """Where training stands, as the stop line and the resume line both say it (1-based)."""
    if state["step_in_epoch"]:
        return f"in epoch {state['epoch'] + 1} (step {state['step_in_epoch']})"
    return f"after epoch {state['epoch']}"


def run(args: argparse.Namespace, explicit: set[str], stop: StopSignal, lock: RunLock) -> int:
    if args.check_gradients:
        return check_gradients()
    if args.summarize:
        log(f"summary: {summarize_runs(RUN, args.summarize, args.output_dir)}")
        return 0
    if args.prefetch:
        return prefetch_mnist(args.data_dir)
    offset = apply_array_seed(args)
    if offset:
        log(f"seed: --seed + SLURM array task {offset} = {args.seed}")
    if args.dry_run and "val_size" not in explicit:
        args.val_size = 100  # of the synthetic training images
    run_dir, record = open_run(args, explicit, lock)
    if args.warmup_epochs is None:
        args.warmup_epochs = default_warmup_epochs(args.epochs)
    log(f"warmup: {args.warmup_epochs:g} of the {args.epochs} epochs")
    device = select_device(args.device)
    environment = environment_summary(device)
    log("environment: " + ", ".join(f"{k}={v}" for k, v in environment.items() if v is not None))
    data = load_data(args, device)
    sizes = ", ".join(f"{len(x)} {name}" for name, (x, _) in data.items())
    log(f"data: {sizes} images, uint8 on {device}{' (synthetic: --dry-run)' * args.dry_run}")
    raw = Path(args.data_dir) / "MNIST" / "raw"
    data_files = None if args.dry_run else data_fingerprint([raw / f for f in mnist_sources()])
    if record is not None:
        check_same_data(record.get("data_files"), data_files, args.data_dir)
    conv_kernel_ms = choose_conv_kernels(args, device)
    generator = torch.Generator().manual_seed(args.seed)
    model = CNN(
        layers=args.layers, conv_kernels=args.conv_kernels, device=device, generator=generator
    )
    optimizer = SGD(model, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    parameters = sum(tensor.numel() for tensor in model.parameters().values())
    log(f"model: {parameters:,} parameters, {args.layers} hand-written layers")
    if run_dir is None:
        random.seed(args.seed)
        torch.manual_seed(args.seed)
        removed = clean_unstarted_runs(RUN, args.output_dir)
        if removed:
            log(f"cleanup: removed {removed} temporary files of runs killed before a checkpoint")
        config = {
            "args": vars(args),
            "environment": environment,
            "parameters": parameters,
            "data_files": data_files,
            "conv_kernel_ms": conv_kernel_ms,
        }
        run_dir = new_run(RUN, args.output_dir, config, lock, dry_run=args.dry_run)
        # Where training stands; checkpointed, so that a resume continues bit-identically.
        state = {"epoch": 0, "step_in_epoch": 0, "history": [], "lr_by_step": [], "train_time_s": 0}
    else:
        state = load_checkpoint(run_dir / CHECKPOINT_NAME, model, optimizer)
        log(f"resumed {run_dir} {epoch_position(state)}")
    log(f"run folder: {run_dir}")
    outcome = train(args, model, optimizer, data, state, stop, run_dir)
    return report(args, outcome, model, data, state, stop, run_dir)


def report(args, outcome: str, model: CNN, data: dict, state: dict, stop, run_dir: Path) -> int:
    """The closing lines of a run by how training ended, and its exit code; a finished run's
    outputs are written first."""
    if outcome == "diverged":
        epoch = state["epoch"]
        kept = f"the last good checkpoint (epoch {epoch}) is kept in {run_dir}"
        if not epoch:
            kept = "no checkpoint was written (that needs a finished epoch)"
        advice = f"Lower --lr (now {args.lr}) or raise --warmup-epochs"
        message = f"the training loss became NaN/inf in epoch {epoch + 1}; {kept}. {advice}"
        print(f"error: {message}", file=sys.stderr, flush=True)
        return DIVERGED_EXIT_CODE
    if outcome == "stopped":
        log("\n".join(stop_lines(RUN, stop, run_dir, f" {epoch_position(state)}")))
        return stop.exit_code
    metrics = write_results(args, model, data, state, run_dir)
    log(
        f"test accuracy {100 * metrics['test_accuracy']:.2f}%  loss {metrics['test_loss']:.4f}  "
        f"macro F1 {100 * metrics['macro_f1']:.2f}%  train time {metrics['train_time_s']:.1f}s "
        f"({metrics['images_per_s']:,.0f} img/s)"
    )
    log(f"results: {run_dir}")
    return 0


if __name__ == "__main__":
    code = main()
    ignore_stop_signals()
    sys.exit(code)
