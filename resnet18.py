"""ResNet-18 (ImageNet weights) fine-tuned on EMNIST ByClass (62 classes: 0-9A-Za-z).

    linear_probe      a new 62-way `fc` (31,806 parameters) on the frozen backbone's features
    partial_unfreeze  `layer4` + `fc` (8,425,534 parameters); up to `layer3` frozen in eval mode

Both: AdamW, linear warmup then cosine decay per step, early stopping on a stratified validation
split, the best epoch's weights for the one test evaluation; the frozen layers' output per image
computed once (--cache-frozen); bf16 autocast (fp16 + GradScaler on GPUs of compute capability
< 8.0); uint8 images on the device, resized and normalised there; conv1 summed over RGB.

    python resnet18.py --dry-run                            # the whole pipeline in a minute
    python resnet18.py --prefetch                           # download and verify, then exit
    python resnet18.py --data-dir ../shared/data            # both regimes, then a comparison
    python resnet18.py --regime partial_unfreeze --epochs 5 # one regime
    python resnet18.py --resume results/resnet_<stamp>      # continue a stopped run
    python resnet18.py --summarize results/resnet_*         # several seeds: mean and spread
    sbatch run_resnet.sbatch                                # SLURM; requeues near the limit
    torchrun --standalone --nproc-per-node=4 resnet18.py    # DDP; --batch-size is per process

Exit codes: 0 finished; 1 a write failed, or another process of the job died; 2 bad input (one
`error:` line says what to fix); 3 the loss diverged; 75 stopped by SIGTERM/SIGUSR1 after a
checkpoint (the SLURM wrapper requeues); 130 stopped by Ctrl-C. A stopped run's last lines give
the command that continues it (with the same number of processes).
"""

from __future__ import annotations

import signal

if __name__ == "__main__":
    # Hold Ctrl-C, SIGTERM and SIGUSR1 while the imports run (seconds): StopSignal takes them
    # when it starts, so that even an early signal ends in a clean, resumable exit.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGUSR1})

import argparse  # noqa: E402
import contextlib  # noqa: E402
import csv  # noqa: E402
import datetime  # noqa: E402
import hashlib  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import OrderedDict  # noqa: E402
from dataclasses import dataclass, field, replace  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from run_management import (  # noqa: E402
    CHECKPOINT_NAME,
    DIVERGED_EXIT_CODE,
    FAILURE_EXIT_CODE,
    FINISHED_RECORD,
    USAGE_EXIT_CODE,
    ArgumentParser,
    OutputError,
    RunLock,
    RunSpec,
    StopSignal,
    UserError,
    apply_array_seed,
    atomic_write,
    capture_rng_state,
    check_same_data,
    clean_unstarted_runs,
    data_fingerprint,
    environment_summary,
    error_text,
    explicit_options,
    find_resume_run,
    first_line,
    ignore_stop_signals,
    log,
    merge_resumed_args,
    new_run,
    non_negative_float,
    number_type,
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

RUN = RunSpec(
    prefix="resnet",
    script="resnet18.py",
    # Options a resume takes from config.json; an explicit value that differs is refused.
    defining_args=(
        "regime",
        "epochs",
        "lr",
        "weight_decay",
        "warmup_epochs",
        "patience",
        "min_delta",
        "batch_size",
        "img_size",
        "amp",
        "limit_train",
        "limit_test",
        "val_fraction",
        "seed",
        "weights",
        "lr_scaling",
    ),
    progress_files=(f"*/{CHECKPOINT_NAME}", f"*/{FINISHED_RECORD}"),
    history_files=("linear_probe/history.csv", "partial_unfreeze/history.csv"),
)

EMNIST_BYCLASS_CHARS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
NUM_CLASSES = len(EMNIST_BYCLASS_CHARS)
# One grey mean/std for all three stem channels (the mean of ImageNet's): what makes summing
# conv1 over RGB exactly equal to repeating the grey channel.
GREY_MEAN = (0.485 + 0.456 + 0.406) / 3
GREY_STD = (0.229 + 0.224 + 0.225) / 3
DEFAULT_IMG_SIZE = 96
MAX_EVAL_BATCH = 16384  # evaluation and caching batches: as many rows as memory allows, to this
FINITE_CHECK_INTERVAL = 50  # steps between the stop/divergence votes (each waits for the GPU)
DIVERGED_LOSS = 1e4  # a mean cross-entropy above this has diverged (chance: ln 62 = 4.1)
CACHE_MEMORY_SHARE = 0.5  # --cache-frozen auto: the cache may take this share of free memory
LR_REFERENCE_BATCH = 512  # the global batch the regimes' default learning rates were set at
DEFAULT_WARMUP_SHARE = 0.2  # the default warmup takes at most this share of a regime's epochs
DRY_RUN_PER_CLASS = {"train": 6, "test": 2}  # --dry-run: 496 synthetic images
DRY_RUN_EPOCHS = 2
REGIMES = ("linear_probe", "partial_unfreeze")
REGIME_DEFAULTS = {
    "linear_probe": {"epochs": 15, "lr": 0.01, "warmup_epochs": 0.0, "weight_decay": 0.0},
    "partial_unfreeze": {"epochs": 20, "lr": 5e-4, "warmup_epochs": 1.0, "weight_decay": 0.01},
}
# The network is torchvision's modules in one nn.Sequential (see as_layers); a regime trains
# layers[FIRST_TRAINED[regime]:] (from fc, or from layer4) and freezes the layers before, whose
# output per image never changes and is computed once (the 512-d features, or layer3's
# 256 x 6 x 6 at 96 px).
FIRST_TRAINED = {"linear_probe": 11, "partial_unfreeze": 8}
TRAINABLE_PREFIXES = {"linear_probe": ("fc.",), "partial_unfreeze": ("layer4.", "fc.")}
IMAGENET_URL = "https://download.pytorch.org/models/resnet18-f37072fd.pth"
EMNIST_URL = "https://biometrics.nist.gov/cs_links/EMNIST/gzip.zip"
FETCH_EMNIST = (
    "Run `./setup_env.sh --prefetch` (or `resnet18.py --prefetch`) on a machine with internet "
    "and copy the EMNIST folder here, or pass --data-dir to a folder holding EMNIST/raw/"
)
COMPILE_MODES = ("off", "default", "max-autotune-no-cudagraphs", "reduce-overhead")


# --------------------------------------------------------------------------------------------
# CLI and processes
# --------------------------------------------------------------------------------------------


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_options(parser.add_argument_group("the model and its training"))
    add_schedule_options(parser.add_argument_group("optimiser and schedule"))
    add_data_options(parser.add_argument_group("data"))
    add_run_options(parser.add_argument_group("runs and processes"))
    return parser


def add_model_options(group) -> None:
    group.add_argument(
        "--regime",
        default="both",
        choices=[*REGIMES, "both"],
        help="both: each in turn, then a comparison (default: %(default)s)",
    )
    group.add_argument(
        "--weights",
        default="imagenet",
        help="imagenet (torchvision's IMAGENET1K_V1, cached in $TORCH_HOME/hub/checkpoints), "
        "none (random) or a state dict's path (default: %(default)s)",
    )
    group.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="mixed precision: bf16 on the CPU and GPUs of compute capability >= 8.0, else "
        "fp16 + GradScaler (default: %(default)s)",
    )
    group.add_argument(
        "--seed",
        type=seed_int,
        default=0,
        help="fc's initialisation, the splits, the shuffles (default: %(default)s)",
    )
    group.add_argument(
        "--cache-frozen",
        default="auto",
        choices=["auto", "on", "off"],
        help="keep the frozen layers' output on the device; auto: when it fits in half the "
        "free memory (default: %(default)s)",
    )
    group.add_argument(
        "--compile",
        default="off",
        nargs="?",
        const="max-autotune-no-cudagraphs",
        choices=COMPILE_MODES,
        metavar="MODE",
        help="torch.compile the trained layers in this mode; --compile alone: "
        "%(const)s; reduce-overhead adds CUDA graphs (default: %(default)s)",
    )


def add_schedule_options(group) -> None:
    group.add_argument(
        "--epochs",
        type=positive_int,
        help="most epochs; early stopping may end sooner (default: 15 linear_probe, "
        "20 partial_unfreeze; 2 with --dry-run)",
    )
    group.add_argument(
        "--lr",
        type=positive_float,
        help="peak AdamW learning rate (default: 0.01 linear_probe, 0.0005 partial_unfreeze)",
    )
    group.add_argument(
        "--weight-decay",
        type=non_negative_float,
        help="AdamW's decoupled weight decay (default: 0 linear_probe, 0.01 partial_unfreeze)",
    )
    group.add_argument(
        "--warmup-epochs",
        type=non_negative_float,
        help="linear warmup in epochs, then cosine decay (default: 0 linear_probe, 1 "
        "partial_unfreeze, at most a fifth of the epochs; a value given is used as given)",
    )
    group.add_argument(
        "--patience",
        type=positive_int,
        default=3,
        help="early stopping: epochs without a gain (default: %(default)s)",
    )
    group.add_argument(
        "--min-delta",
        type=non_negative_float,
        default=0.0005,
        help="early stopping: the validation-accuracy gain that counts, 0.001 = 0.1 points "
        "(default: %(default)s)",
    )
    group.add_argument(
        "--batch-size",
        type=positive_int,
        default=512,
        help="training batch of each process (default: %(default)s)",
    )
    group.add_argument(
        "--lr-scaling",
        default="none",
        choices=["none", "sqrt", "linear"],
        help=f"the learning rate for a global batch B: as given, times sqrt(B/"
        f"{LR_REFERENCE_BATCH}) or times B/{LR_REFERENCE_BATCH} (default: %(default)s)",
    )


def add_data_options(group) -> None:
    group.add_argument(
        "--data-dir",
        default=os.environ.get("DATA_DIR", "./data"),
        help="holds EMNIST/raw/, downloaded there when missing (default: $DATA_DIR, else ./data)",
    )
    group.add_argument(
        "--limit-train",
        type=positive_int,
        help="a stratified subset of the training images (default: all)",
    )
    group.add_argument(
        "--limit-test",
        type=positive_int,
        help="a stratified subset of the test images (default: all)",
    )
    group.add_argument(
        "--val-fraction",
        type=open_fraction,
        default=0.1,
        help="training images held out to validate (default: %(default)s)",
    )
    group.add_argument(
        "--img-size",
        type=number_type(int, 32, 512, "a side from 32 to 512"),
        default=DEFAULT_IMG_SIZE,
        help="side the 28x28 images are resized to, bilinear (default: %(default)s)",
    )
    group.add_argument(
        "--no-download",
        action="store_true",
        help="missing data or weights: fail, never fetch",
    )
    group.add_argument(
        "--prefetch",
        action="store_true",
        help="download (where missing) and verify EMNIST ByClass and the ImageNet weights "
        "into --data-dir and $TORCH_HOME, then exit without training",
    )
    group.add_argument(
        "--dry-run",
        action="store_true",
        help="the whole pipeline on 496 synthetic EMNIST-shaped images with a random "
        "backbone, offline, in a minute; its run folder is resnet-dryrun_<stamp>",
    )


def add_run_options(group) -> None:
    group.add_argument(
        "--output-dir",
        default=os.environ.get("RESULTS_DIR", "./results"),
        help="where run folders are made (default: $RESULTS_DIR, else ./results)",
    )
    group.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda", "mps"],
        help="auto: cuda, else mps, else cpu; an error in a SLURM job given GPUs torch "
        "cannot use (default: %(default)s)",
    )
    group.add_argument(
        "--dist-timeout",
        type=number_type(float, 1, 7 * 86400, "seconds from 1 to 604800"),
        default=900,
        help="several processes: seconds one waits for the others (default: %(default)s)",
    )
    group.add_argument(
        "--resume",
        help="a stopped run's folder (or a file in it), or auto: the newest unfinished run of "
        "this SLURM job (else of --output-dir), else a new run",
    )
    group.add_argument(
        "--summarize",
        nargs="+",
        metavar="RUN_DIR",
        help="mean and spread of finished runs' metrics (several seeds), in a new folder",
    )


@dataclass(frozen=True)
class Precision:
    """The one mixed-precision path: autocast and the GradScaler, each switched by a flag."""

    device_type: str
    dtype: torch.dtype
    enabled: bool
    use_scaler: bool  # fp16 needs loss scaling; bf16 has float32's range and does not

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)

    @property
    def autocast_dtype(self) -> str | None:
        return str(self.dtype).removeprefix("torch.") if self.enabled else None

    def describe(self) -> str:
        if not self.enabled:
            return "float32 (no autocast)"
        return f"{self.autocast_dtype} autocast" + (" + GradScaler" if self.use_scaler else "")


def select_precision(device: torch.device, amp: bool) -> Precision:
    """bf16 on the CPU and GPUs of compute capability >= 8.0; fp16 + loss scaling on older GPUs,
    where is_bf16_supported() says True through an emulation without cuDNN. MPS: float32."""
    dtype = torch.bfloat16 if device.type == "cpu" else torch.float32
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.half
    enabled = amp and dtype != torch.float32
    return Precision(device.type, dtype, enabled, enabled and dtype == torch.half)


def use_fast_cuda_kernels() -> None:
    """cuDNN's benchmark mode (the shapes are fixed) and TF32 for float32 matmuls and
    convolutions. Matmuls through set_float32_matmul_precision: torch.compile reads it back, and
    the newer per-backend fp32_precision alone leaves it undefined (compile fails on an H200)."""
    torch.backends.cudnn.benchmark = True
    torch.set_float32_matmul_precision("high")
    if hasattr(torch.backends.cudnn.conv, "fp32_precision"):  # torch >= 2.9
        torch.backends.cudnn.conv.fp32_precision = "tf32"
    else:
        torch.backends.cudnn.allow_tf32 = True


@dataclass(frozen=True)
class World:
    """This process's place in a job: rank of size processes (size 1: a plain run)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    launcher: str = "none"
    backend: str | None = None


def launch_from_environment(env) -> World:
    """torchrun's RANK/WORLD_SIZE/LOCAL_RANK, or an srun step's SLURM_PROCID/NTASKS/LOCALID with
    MASTER_ADDR/PORT, else one process (a batch script's SLURM variables are not a launch)."""
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    launcher = "torchrun" if "TORCHELASTIC_RUN_ID" in env else "env"
    if "RANK" not in env or "WORLD_SIZE" not in env:
        names = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")
        launcher = "srun"
        if not all(k in env for k in (*names[:2], "SLURM_STEP_ID", "MASTER_ADDR", "MASTER_PORT")):
            return World()
    bad = [name for name in names if not re.fullmatch(r"\s*[+-]?\d+\s*", env.get(name, "0"))]
    if bad:
        raise UserError(f"{bad[0]}={env[bad[0]]!r} is not an integer")
    rank = int(env[names[0]])
    size = int(env[names[1]])
    local_rank = int(env.get(names[2], rank))
    if not (0 <= rank < size and 0 <= local_rank < size):
        raise UserError(f"{launcher} launch: rank {rank} (local {local_rank}) of {size} processes?")
    if size > 1 and not ("MASTER_ADDR" in env and "MASTER_PORT" in env):
        where = "MASTER_ADDR/MASTER_PORT (where rank 0 listens) are not set: launch with torchrun"
        raise UserError(f"{names[0]}/{names[1]} say process {rank} of {size}, but {where}")
    port = env.get("MASTER_PORT", "1").strip()
    if size > 1 and not (port.isdigit() and 1 <= int(port) <= 65535):
        raise UserError(f"MASTER_PORT={port!r} is not a port number (1 to 65535)")
    return World(rank, size, local_rank, launcher)


def init_distributed(world: World, device: torch.device, timeout_s: float):
    """(world, device) in the job's process group: each process on a GPU of its own (the local
    rank's, or the one a per-task allocation shows); NCCL for CUDA tensors, gloo for the CPU's."""
    if world.size == 1:
        return world, device
    advice = "start as many processes per node as it has GPUs"
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if world.local_rank >= count > 1:
            mine = f"local rank {world.local_rank} needs a GPU of its own"
            raise UserError(f"{mine}, but this node shows {count}: {advice}")
        device = torch.device("cuda", world.local_rank if count > 1 else 0)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise UserError(f"several processes need CUDA (NCCL) or the CPU (gloo), not {device}")
    world = replace(world, backend="cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")
    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        dist.init_process_group(
            world.backend, rank=world.rank, world_size=world.size, timeout=timeout
        )
    except RuntimeError as error:  # DistStoreError, DistNetworkError: a peer that never came
        where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        raise UserError(
            f"process {world.rank} of {world.size} could not join the others at {where} within "
            f"--dist-timeout {timeout_s:g} s ({first_line(error)}): start all {world.size} "
            "processes (torchrun --nproc-per-node, srun) with the same MASTER_ADDR/PORT"
        ) from None
    if device.type == "cuda":  # two processes on one GPU: say so before NCCL's "Duplicate GPU"
        everyone = [None] * world.size
        uuid = str(torch.cuda.get_device_properties(device).uuid)
        dist.all_gather_object(everyone, (socket.gethostname(), uuid))
        if len(set(everyone)) < world.size:
            shared = f"{world.size} processes share {len(set(everyone))} GPU(s): each needs its own"
            srun = "sbatch --ntasks-per-node=N --gpus-per-node=N run_resnet.sbatch"
            raise UserError(f"{shared}; {advice}: with srun, {srun} (or --gpus-per-task=1)")
    return world, device


# Collectives: every process calls each, in the same order; with one process they do nothing.


def all_reduce(world: World, tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if world.size > 1:
        dist.all_reduce(tensor, op=op)
    return tensor


def shard(world: World, total: int) -> tuple[int, int]:
    """This process's block [start, stop) of `total` rows: ceil(total / size) each, in rank
    order, the last ones shorter (maybe empty), so the blocks tile the rows exactly once."""
    per_rank = math.ceil(total / world.size)
    return min(total, world.rank * per_rank), min(total, (world.rank + 1) * per_rank)


def gather_rows(world: World, local: torch.Tensor, total: int) -> torch.Tensor:
    """Every process's shard() of the rows, concatenated: rows 0..total on every process."""
    if world.size == 1:
        return local
    per_rank = math.ceil(total / world.size)
    local = torch.cat([local, local.new_zeros((per_rank - len(local), *local.shape[1:]))])
    gathered = local.new_empty((per_rank * world.size, *local.shape[1:]))
    # all_gather_single replaces all_gather_into_tensor (deprecated in torch 2.14).
    getattr(dist, "all_gather_single", dist.all_gather_into_tensor)(gathered, local)
    return gathered[:total]


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def emnist_files(split: str = "byclass") -> tuple[str, ...]:
    """torchvision's raw file names for an EMNIST split (train and test, images and labels)."""
    kinds = ("images-idx3-ubyte", "labels-idx1-ubyte")
    return tuple(f"emnist-{split}-{part}-{kind}" for part in ("train", "test") for kind in kinds)


@contextlib.contextmanager
def removing_new_folders(folder: Path):
    """Make `folder` (and its parents); if the block fails, remove the ones made here, so a
    failed download leaves nothing behind."""
    folder = Path(folder).absolute()
    created = [path for path in (folder, *folder.parents) if not path.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        for path in created:  # deepest first
            with contextlib.suppress(OSError):
                path.rmdir()
        raise


def download_emnist(raw: Path) -> None:
    """EMNIST's zip into a temporary folder (torchvision checks its published MD5), then the
    four ByClass files, decompressed, moved into `raw`; a failure leaves nothing behind."""
    from torchvision.datasets import EMNIST
    from torchvision.datasets import utils as dataset_utils

    with (
        removing_new_folders(raw),
        tempfile.TemporaryDirectory(prefix=".download-", dir=raw.parent) as temporary,
    ):
        dataset_utils.download_and_extract_archive(EMNIST.url, temporary, md5=EMNIST.md5)
        for name in emnist_files():
            dataset_utils.extract_archive(Path(temporary) / "gzip" / f"{name}.gz", temporary)
        for name in emnist_files():
            os.replace(Path(temporary) / name, raw / name)


def check_emnist_files(data_dir, download: bool) -> Path:
    """The folder of the four ByClass files, downloaded when missing and allowed; else one
    error naming every missing file, where it goes and how to get it."""
    raw = Path(data_dir) / "EMNIST" / "raw"
    missing = [name for name in emnist_files() if not (raw / name).is_file()]
    if missing and download:
        try:
            download_emnist(raw)
        except Exception as error:  # offline (URLError), a read-only folder, a bad archive
            names = ", ".join(missing)
            failed = f"downloading them from {EMNIST_URL} failed ({error_text(error)})"
            where = f"EMNIST files missing in {raw} ({names})"
            raise UserError(f"{where} and {failed}. {FETCH_EMNIST}") from None
        missing = []
    zipped = [name for name in missing if (raw / f"{name}.gz").is_file()]
    if zipped:
        unzip = f"decompress them (gunzip -k {raw}/*.gz) or let torchvision fetch them"
        raise UserError(f"{raw} holds only gzip-compressed copies of {', '.join(zipped)}: {unzip}")
    if missing:
        names = ", ".join(missing)
        raise UserError(f"EMNIST files missing in {raw}: {names} (in {EMNIST_URL}). {FETCH_EMNIST}")
    return raw


def load_emnist(data_dir, split: str = "byclass", train: bool = True, download: bool = True):
    """Upright uint8 images (N, 28, 28) and int64 labels (N,) of EMNIST's raw files, through
    torchvision (which returns them transposed, as NIST stores them)."""
    from torchvision.datasets import EMNIST

    raw = check_emnist_files(data_dir, download)
    part = "train" if train else "test"
    try:  # a truncated or unreadable file fails in torchvision, a foreign one in the checks
        dataset = EMNIST(root=str(data_dir), split=split, train=train, download=False)
        images = dataset.data
        labels = dataset.targets
        if images.shape[1:] != (28, 28) or len(labels) != len(images):
            raise ValueError(f"{tuple(images.shape)} images and {len(labels)} labels")
        if not 0 <= int(labels.min()) <= int(labels.max()) < len(dataset.classes):
            raise ValueError(f"labels {int(labels.min())} to {int(labels.max())}")
    except Exception as error:
        wrong = f"cannot read the EMNIST {split} {part} files in {raw} ({error_text(error)})"
        raise UserError(
            f"{wrong}: corrupt or unreadable, fetch them again. {FETCH_EMNIST}"
        ) from None
    return images.transpose(1, 2).contiguous(), labels.long()


def synthetic_emnist(seed: int) -> dict:
    """--dry-run's data, EMNIST's shapes without EMNIST: {"train"/"test": (uint8 (N, 28, 28),
    int64 (N,))}, each of the 62 classes a random pattern plus noise."""
    generator = torch.Generator().manual_seed(seed)
    patterns = (torch.rand(NUM_CLASSES, 28, 28, generator=generator) > 0.8) * 150
    parts = {}
    for part, per_class in DRY_RUN_PER_CLASS.items():
        labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
        noise = torch.randint(0, 100, (len(labels), 28, 28), generator=generator)
        parts[part] = (patterns[labels] + noise).to(torch.uint8), labels
    return parts


def stratified_sample(labels: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Sorted indices of `size` items drawn per class in proportion to the class counts
    (largest remainder rounding, so the total is exact), seeded by `generator`."""
    counts = torch.bincount(labels, minlength=int(labels.max()) + 1 if len(labels) else 0)
    quotas = counts.double() * size / max(1, len(labels))
    takes = quotas.floor().long()
    # The leftover places go to the largest fractional quotas (ties: the lower label).
    by_remainder = sorted(range(len(counts)), key=lambda k: (-(quotas[k] - takes[k]).item(), k))
    open_places = [k for k in by_remainder if takes[k] < counts[k]]
    takes[open_places[: size - int(takes.sum())]] += 1
    order = torch.argsort(labels, stable=True)
    chosen = [
        members[torch.randperm(len(members), generator=generator)[:take]]
        for members, take in zip(order.split(counts.tolist()), takes.tolist())
    ]
    return torch.cat(chosen).sort().values if chosen else torch.zeros(0, dtype=torch.long)


def stratified_split(labels: torch.Tensor, val_fraction: float, seed: int):
    """Stratified, seeded (train_index, val_index) of a training set."""
    generator = torch.Generator().manual_seed(seed)
    val_index = stratified_sample(labels, round(val_fraction * len(labels)), generator)
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[val_index] = False
    return keep.nonzero().flatten(), val_index


def prepare_data(args: argparse.Namespace) -> dict:
    """EMNIST ByClass (or --dry-run's synthetic images) loaded, subset (--limit-*) and split:
    {"train"/"val"/"test": (uint8 images (N, 28, 28), int64 labels (N,))}."""
    parts = synthetic_emnist(args.seed) if args.dry_run else {}
    for offset, part in enumerate(("train", "test")):
        if not args.dry_run:
            parts[part] = load_emnist(
                args.data_dir, "byclass", part == "train", not args.no_download
            )
        images, labels = parts[part]
        limit = getattr(args, f"limit_{part}")
        if limit is not None and limit < len(labels):
            # A generator per use: changing --limit-test never changes the training split.
            generator = torch.Generator().manual_seed(args.seed + 1 + offset)
            keep = stratified_sample(labels, limit, generator)
            parts[part] = images[keep], labels[keep]
    images, labels = parts["train"]
    train_index, val_index = stratified_split(labels, args.val_fraction, args.seed)
    if len(val_index) == 0 or len(train_index) < 2:
        leaves = f"leaves {len(train_index)} to train on and {len(val_index)} to validate on"
        fix = "at least 2 and 1 are needed: raise --limit-train or change --val-fraction"
        raise UserError(f"--val-fraction {args.val_fraction} of {len(labels)} {leaves}; {fix}")
    parts["val"] = images[val_index], labels[val_index]
    parts["train"] = images[train_index], labels[train_index]
    return parts


def data_files(args: argparse.Namespace) -> dict | None:
    """What identifies the data (run_management.data_fingerprint of the four raw files); None
    for --dry-run's synthetic images."""
    if args.dry_run:
        return None
    raw = Path(args.data_dir) / "EMNIST" / "raw"
    return data_fingerprint([raw / name for name in emnist_files()])


def normalise_and_resize(images_uint8, img_size: int, channels_last: bool = False):
    """uint8 (N, 28, 28) -> normalised float32 (N, 1, img_size, img_size), on their device:
    normalised first, on 28x28 pixels (the same: the bilinear weights sum to 1)."""
    x = images_uint8.unsqueeze(1).float().mul_(1.0 / (255.0 * GREY_STD)).sub_(GREY_MEAN / GREY_STD)
    if x.shape[-1] != img_size:
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


def imagenet_weights_path() -> Path:
    """Where torchvision caches (and looks for) ResNet-18's IMAGENET1K_V1 weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(IMAGENET_URL)


def download_imagenet_weights(path: Path) -> None:
    """torch.hub's download, which checks the sha256 prefix in the file's name; a failure
    leaves nothing behind (torch.hub removes its partial file, this the folders it made)."""
    with removing_new_folders(path.parent):
        prefix = torch.hub.HASH_REGEX.search(path.name).group(1)
        torch.hub.download_url_to_file(IMAGENET_URL, str(path), prefix, sys.stderr.isatty())


def backbone_identity(weights: str, download: bool) -> dict:
    """Which weights file --weights names, and its sha256: {"weights", "file", "sha256"}; the
    ImageNet file downloaded when missing and allowed. A file at torchvision's cache path whose
    hash does not start as its name says gets a warning line."""
    if weights == "none":
        return {"weights": "none", "file": None, "sha256": None}
    path = imagenet_weights_path() if weights == "imagenet" else Path(weights)
    how = (
        f"torchvision expects ResNet-18's ImageNet weights at {path}: run `./setup_env.sh "
        "--prefetch` on a machine with internet and copy the file there (or download "
        f"{IMAGENET_URL}), or pass --weights none"
    )
    if weights != "imagenet" and not path.is_file():
        raise UserError(f"--weights {weights}: no such file; pass imagenet, none or a path")
    if not path.is_file() and not download:
        raise UserError(f"the ImageNet weights are not cached and --no-download is set. {how}")
    if not path.is_file():
        try:
            download_imagenet_weights(path)
        except Exception as error:  # offline, a bad hash
            raise UserError(f"cannot download {path} ({error_text(error)}). {how}") from None
    with open(path, "rb") as handle:
        sha256 = hashlib.file_digest(handle, "sha256").hexdigest()
    wrong = misnamed(path, sha256) if weights == "imagenet" else None
    if wrong:
        log(f"warning: {wrong}")
    return {"weights": weights, "file": str(path), "sha256": sha256}


def misnamed(path: Path, sha256: str) -> str | None:
    """What is wrong with a file whose sha256 does not start with the hex digits its name
    carries (torch.hub's convention: resnet18-f37072fd.pth); None when it does."""
    named = torch.hub.HASH_REGEX.search(path.name)
    if named is None or sha256.startswith(named.group(1)):
        return None
    return f"{path} has sha256 {sha256[:8]}..., not {named.group(1)} as its name says"


def load_backbone_weights(identity: dict) -> dict | None:
    """The backbone's state dict (conv1 summed over RGB, no fc) of backbone_identity()'s file,
    None for 'none'; one error line for an unreadable or mismatched file."""
    if identity["file"] is None:
        return None
    path = Path(identity["file"])
    weights = identity["weights"]
    try:
        state = dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as error:  # a truncated or foreign file
        kind = type(error).__name__  # alone: torch's advice on weights_only is not for the user
        unreadable = f"--weights {weights} ({path}) is not a file torch.load can read"
        raise UserError(
            f"{unreadable} as a state dict ({kind}); pass imagenet, none or a path"
        ) from None
    state = {key: value for key, value in state.items() if not str(key).startswith("fc.")}
    if getattr(state.get("conv1.weight"), "ndim", 0) == 4 and state["conv1.weight"].shape[1] == 3:
        state["conv1.weight"] = state["conv1.weight"].sum(dim=1, keepdim=True)
    grey = build_model("linear_probe", None).state_dict()
    expected = {key: tensor.shape for key, tensor in grey.items() if not key.startswith("fc.")}
    # Old files (ImageNet's included) lack BatchNorm's num_batches_tracked: torch fills it in.
    misfits = [k for k, shape in expected.items() if getattr(state.get(k), "shape", 0) != shape]
    misfits = [key for key in misfits if not key.endswith("_tracked")]
    unexpected = len(set(state) - set(expected))
    if misfits or unexpected:
        counts = f"{len(misfits)} of ResNet-18's {len(expected)} backbone tensors are missing or"
        first = f"of another shape (the first: {(misfits or ['none'])[0]})"
        misfit = f"--weights {weights} is not a ResNet-18 state dict: {counts} {first}"
        raise UserError(f"{misfit} and {unexpected} are unexpected")
    return state


def fold_grey_stem(model: nn.Module) -> None:
    """Replace the RGB conv1 (no bias) by a 1-channel conv whose kernel is the sum over RGB:
    conv(repeat(x, 3), W) == conv(x, W.sum(1)) exactly (padding included), a third the cost."""
    grey = nn.Conv2d(1, 64, 7, 2, 3, bias=False)  # torchvision's stem conv
    with torch.no_grad():
        grey.weight.copy_(model.conv1.weight.sum(dim=1, keepdim=True))
    model.conv1 = grey


def build_model(regime: str, backbone: dict | None, num_classes: int = NUM_CLASSES) -> nn.Module:
    """torchvision's resnet18 with the backbone weights (None: random), a grey 1-channel stem,
    a new `fc` (initialised from torch's global RNG) and requires_grad set for the regime."""
    from torchvision.models import resnet18

    model = resnet18()
    fold_grey_stem(model)
    if backbone is not None:
        model.load_state_dict(backbone, strict=False)
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.startswith(TRAINABLE_PREFIXES[regime]))
    return model


class Preprocess(nn.Module):
    """uint8 images (N, 28, 28) -> normalised float (N, 1, S, S), channels_last on a GPU."""

    def __init__(self, img_size: int):
        super().__init__()
        self.img_size = img_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return normalise_and_resize(images, self.img_size, channels_last=images.is_cuda)


def as_layers(model: nn.Module, img_size: int) -> nn.Sequential:
    """torchvision's ResNet forward as one nn.Sequential of its own modules, under their names,
    from uint8 images to logits: layers[:k] is a frozen prefix, layers[k:] the rest."""
    layers = OrderedDict(
        preprocess=Preprocess(img_size),
        conv1=model.conv1,
        bn1=model.bn1,
        relu=model.relu,
        maxpool=model.maxpool,
        layer1=model.layer1,
        layer2=model.layer2,
        layer3=model.layer3,
        layer4=model.layer4,
        avgpool=model.avgpool,
        flatten=nn.Flatten(1),
        fc=model.fc,
    )
    return nn.Sequential(layers)


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def trainable_state(model: nn.Module, regime: str) -> dict:
    """The regime's trainable tensors and BatchNorm buffers, under torchvision's names."""
    prefixes = TRAINABLE_PREFIXES[regime]
    return {key: value for key, value in model.state_dict().items() if key.startswith(prefixes)}


def set_regime_mode(model: nn.Module, regime: str, training: bool) -> None:
    """Frozen parts always in eval mode (BatchNorm uses and keeps its running statistics);
    only the trainable modules switch to train mode while training."""
    model.eval()
    for prefix in TRAINABLE_PREFIXES[regime] if training else ():
        model.get_submodule(prefix.rstrip(".")).train()


# --------------------------------------------------------------------------------------------
# Training and evaluation
# --------------------------------------------------------------------------------------------


class WarmupCosine:
    """LambdaLR factor: linear warmup from 1/warmup_steps to 1, then cosine decay to 0 at
    total_steps. A callable object (not a lambda) so the scheduler's state_dict keeps it."""

    def __init__(self, total_steps: int, warmup_steps: int):
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def epoch_batches(num_items: int, global_batch: int, world_size: int, generator, device):
    """One epoch's shuffled index batches, on the device. A last batch too small to give each
    process two rows (BatchNorm cannot normalise one image) is folded into the one before."""
    batches = list(torch.randperm(num_items, generator=generator).to(device).split(global_batch))
    if len(batches) > 1 and len(batches[-1]) < 2 * world_size:
        batches[-2:] = [torch.cat(batches[-2:])]
    return batches


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The training loss (mean cross-entropy), in float32 whatever the autocast dtype."""
    return F.cross_entropy(logits.float(), labels)


def free_memory_bytes(device: torch.device) -> int:
    """What the device has free now: the GPU's memory, or the host's MemAvailable (0 unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    meminfo = Path("/proc/meminfo").read_text() if Path("/proc/meminfo").is_file() else ""
    found = re.search(r"MemAvailable:\s*(\d+)", meminfo)
    return 1024 * int(found.group(1)) if found else 0


def eval_batch_rows(rows: torch.Tensor, img_size: int) -> int:
    """Rows per batch without gradients: as many as a quarter of the free memory holds (about
    four float32 copies of the stem's output per image; of the input per cached row)."""
    if rows.dtype == torch.uint8:
        per_row = 4 * 4 * 64 * (img_size // 2) ** 2
    else:
        per_row = 16 * rows[0].numel() * 4
    return int(min(MAX_EVAL_BATCH, max(256, free_memory_bytes(rows.device) // (4 * per_row))))


@torch.no_grad()
def forward_all(network: nn.Module, rows, img_size: int, precision, world=World()):
    """network(rows) for every row in eval mode, in the autocast dtype, on the rows' device:
    the frozen layers' output to cache, or the logits. Each process computes its shard() in
    batches and all are gathered."""
    network.eval()
    start, end = shard(world, len(rows))
    per_rank = math.ceil(len(rows) / world.size)
    batch = eval_batch_rows(rows, img_size)
    local = None
    for offset in range(0, per_rank, batch):  # the same number of turns on every process
        with precision.autocast():
            out = network(rows_of(rows, slice(start + offset, min(start + offset + batch, end))))
        if local is None:  # per_rank rows: the last ones of the last process are padding
            local = out.new_empty((per_rank, *out.shape[1:]))
        local[offset : offset + len(out)] = out
    return gather_rows(world, local, len(rows))


def frozen_cache_size(layers, first_trained: int, data: dict, precision, world) -> int:
    """Bytes the frozen layers' output of every split takes on each process; with several
    processes, the gather's receive buffer is there once more."""
    images = data["train"][0][:1]
    with torch.no_grad(), precision.autocast():
        one = layers[:first_trained].eval()(images)
    rows = sum(len(labels) for _, labels in data.values())
    extra = 1 / world.size if world.size > 1 else 0.0
    return int(one.numel() * one.element_size() * rows * (1 + extra))


def cache_fits(needed: int, device: torch.device, world: World) -> bool:
    """--cache-frozen auto: does the cache fit in CACHE_MEMORY_SHARE of every process's free
    memory?"""
    short = torch.tensor([float(needed > CACHE_MEMORY_SHARE * free_memory_bytes(device))])
    return not all_reduce(world, short.to(device), dist.ReduceOp.MAX).item()


def rows_of(split_rows: torch.Tensor, index) -> torch.Tensor:
    """A batch (an index tensor or a slice) of a split's rows; cached 4-d features in the GPU's
    channels_last layout."""
    rows = split_rows[index]
    if rows.is_cuda and rows.dim() == 4:
        rows = rows.contiguous(memory_format=torch.channels_last)
    return rows


def evaluate(network: nn.Module, rows, labels, precision, img_size: int, world=World()) -> dict:
    """Mean loss, accuracy and size of a split, and its float32 scores (N, 62) on its device,
    the same on every process."""
    scores = forward_all(network, rows, img_size, precision, world).float()
    return {
        "loss": F.cross_entropy(scores, labels).item(),
        "accuracy": (scores.argmax(dim=1) == labels).double().mean().item(),
        "count": len(labels),
        "scores": scores,
    }


def new_regime_state() -> dict:
    """What last.pt keeps of a regime's progress besides the tensors: where it is, the epoch's
    running sums, the history, the early-stopping record and what each invocation cached."""
    return {
        "epoch": 0,
        "step_in_epoch": 0,
        "history": [],
        "lr_by_step": [],
        "train_time_s": 0.0,
        "feature_time_s": 0.0,
        "frozen_output_cached": [],  # one entry per invocation that trained this regime
        "sums": {"loss": 0.0, "correct": 0.0, "seen": 0, "seconds": 0.0},
        "early_stopping": {
            "best_val_accuracy": -math.inf,
            "best_epoch": 0,
            "bad_epochs": 0,
            "stopped_early": False,
        },
    }


def update_early_stopping(early: dict, accuracy: float, epoch: int, patience: int, min_delta):
    """Record epoch `epoch` (1-based) of validation accuracy `accuracy`; True when it is the new
    best. Stops after `patience` epochs in a row that fail to beat the best by min_delta."""
    if accuracy > early["best_val_accuracy"] + min_delta or early["best_epoch"] == 0:
        early.update(best_val_accuracy=accuracy, best_epoch=epoch, bad_epochs=0)
        return True
    early["bad_epochs"] += 1
    early["stopped_early"] = early["bad_epochs"] >= patience
    return False


@dataclass
class Training:
    """One regime in training. `model`: torchvision's ResNet-18 (its names are the checkpoints'
    keys). `network`: a split's rows to logits (the trained layers on the cached frozen output,
    or all layers on the images). `step_network`: the same as the steps call it, in DDP and
    compiled where asked; evaluation calls `network` (no collective, no recompilation)."""

    regime: str
    settings: dict
    model: nn.Module
    network: nn.Module
    step_network: nn.Module
    splits: dict
    img_size: int
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    precision: Precision
    world: World
    folder: Path
    backbone: dict  # backbone_identity(): what the checkpoints name to rebuild the frozen part
    inputs_cached: bool  # the splits hold the frozen layers' output, not the images
    cache_seconds: float  # what computing that output took in this invocation
    state: dict = field(default_factory=new_regime_state)


def make_step_network(layers: nn.Sequential, first_trained: int, cached: bool, args, world, device):
    """What the training steps call: layers[first_trained:] (torch.compile'd with --compile),
    after the frozen layers unless their output is cached; in DDP with several processes (on
    the CPU, without SyncBatchNorm, each forward starts from rank 0's BatchNorm buffers)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    trained = layers[first_trained:]
    if args.compile != "off":
        trained = torch.compile(trained, mode=args.compile)
    network = trained if cached else nn.Sequential(layers[:first_trained], trained)
    if world.size == 1:
        return network
    # forward_sync_buffers replaces broadcast_buffers in torch 2.14.
    sync = "forward_sync_buffers"
    sync = sync if sync in inspect.signature(DDP).parameters else "broadcast_buffers"
    devices = [device.index] if device.type == "cuda" else None
    return DDP(network, devices, **{sync: device.type != "cuda"})


def make_optimizer(model: nn.Module, settings: dict, device: torch.device, steps: int):
    """AdamW on the trainable parameters (fused: one kernel for every tensor) and its
    warmup-then-cosine schedule, stepped once per training step."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    fused = device.type in ("cpu", "cuda")
    optimizer = torch.optim.AdamW(
        trainable, settings["lr"], weight_decay=settings["weight_decay"], fused=fused
    )
    warmup = round(settings["warmup_epochs"] * steps)
    schedule = WarmupCosine(steps * settings["epochs"], warmup)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def training_step(training: Training, index: torch.Tensor) -> torch.Tensor:
    """One step on this process's share (every size-th index) of a global batch, the loss
    weighted by the share's size so that DDP averages the global batch's gradients; returns
    the share's (loss sum, correct count) as float64 on the device: no wait for the GPU."""
    world = training.world
    share = index[world.rank :: world.size]
    rows = rows_of(training.splits["train"][0], share)
    labels = training.splits["train"][1][share]
    with training.precision.autocast():
        logits = training.step_network(rows)
    # An empty share (a last batch smaller than the world) still joins DDP's gradient sum.
    loss = classification_loss(logits, labels) if len(labels) else logits.float().sum() * 0
    training.optimizer.zero_grad(set_to_none=True)
    training.scaler.scale(loss * (len(labels) * world.size / len(index))).backward()
    training.scaler.step(training.optimizer)
    training.scaler.update()
    training.state["lr_by_step"].append(training.optimizer.param_groups[0]["lr"])
    training.scheduler.step()
    correct = (logits.detach().argmax(dim=1) == labels).sum()
    return torch.stack([loss.detach().double() * len(labels), correct.double()])


def any_process_stopped(world: World, stop: StopSignal) -> bool:
    """Did a stop signal reach any process? The same answer on every process."""
    flag = torch.tensor([float(stop.received is not None)])
    return bool(all_reduce(world, flag, dist.ReduceOp.MAX).item())


def any_process_diverged(world: World, loss_sum: torch.Tensor, rows: int) -> bool:
    """Is any process's running loss sum not finite, or above DIVERGED_LOSS a row?"""
    bad = ~torch.isfinite(loss_sum) | (loss_sum > DIVERGED_LOSS * max(1, rows))
    return bool(all_reduce(world, bad.double().reshape(1), dist.ReduceOp.MAX).item())


def train_epoch(training: Training, args: argparse.Namespace, stop: StopSignal) -> str:
    """The steps of one epoch (what is left of it after a resume): 'done', 'stopped' (a signal
    reached a process) or 'diverged'. Each epoch's order comes from its own seeded generator,
    so a resumed epoch draws the same permutation and skips the steps taken."""
    from tqdm import tqdm

    state = training.state
    world = training.world
    labels = training.splits["train"][1]
    epoch = state["epoch"] + 1
    seed = args.seed * 1_000_003 + REGIMES.index(training.regime) * 10_007 + epoch
    generator = torch.Generator().manual_seed(seed)
    batches = epoch_batches(
        len(labels), args.batch_size * world.size, world.size, generator, labels.device
    )
    running = torch.zeros(2, dtype=torch.float64, device=labels.device)  # read only at votes
    rows = 0
    started = time.perf_counter()
    done = state["step_in_epoch"]
    quiet = world.rank != 0 or not sys.stderr.isatty()  # the bar: rank 0's, on a terminal only
    description = f"{training.regime} {epoch}/{training.settings['epochs']}"
    bar = tqdm(batches[done:], description, len(batches), initial=done, leave=False, disable=quiet)
    set_regime_mode(training.model, training.regime, training=True)
    outcome = "done"
    for index in bar:
        running += training_step(training, index)
        rows += len(index[world.rank :: world.size])
        state["step_in_epoch"] += 1
        state["sums"]["seen"] += len(index)
        # All processes vote at the same steps; one alone stops as soon as a signal comes.
        alone = world.size == 1 and stop.received is not None
        due = alone or state["step_in_epoch"] % FINITE_CHECK_INTERVAL == 0
        if due and (
            any_process_diverged(world, running[0], rows) or any_process_stopped(world, stop)
        ):
            break
    bar.close()
    if any_process_diverged(world, running[0], rows):  # the epoch's loss too must be finite
        outcome = "diverged"
    elif state["step_in_epoch"] < len(batches):
        outcome = "stopped"
    loss, correct = all_reduce(world, running).tolist()
    seconds = time.perf_counter() - started
    state["sums"]["loss"] += loss
    state["sums"]["correct"] += correct
    state["sums"]["seconds"] += seconds
    state["train_time_s"] += seconds
    return outcome


def end_epoch(training: Training, args: argparse.Namespace) -> dict:
    """Validation (on rank 0's BatchNorm statistics: without SyncBatchNorm each process updated
    its own), early stopping and the epoch's history row."""
    state = training.state
    started = time.perf_counter()
    for buffer in training.model.buffers() if training.world.size > 1 else ():
        dist.broadcast(buffer, src=0)
    val_rows, val_labels = training.splits["val"]
    val = evaluate(
        training.network,
        val_rows,
        val_labels,
        training.precision,
        training.img_size,
        training.world,
    )
    epoch = state["epoch"] + 1
    early = state["early_stopping"]
    improved = update_early_stopping(early, val["accuracy"], epoch, args.patience, args.min_delta)
    sums = state["sums"]
    seconds = sums["seconds"]
    row = {
        "epoch": epoch,
        "train_loss": sums["loss"] / sums["seen"],
        "train_accuracy": sums["correct"] / sums["seen"],
        "val_loss": val["loss"],
        "val_accuracy": val["accuracy"],
        "lr": state["lr_by_step"][-1],
        "seconds": seconds,
        "images_per_s": sums["seen"] / max(seconds, 1e-9),
        "best": improved,
    }
    state["history"].append(row)
    state["epoch"] = epoch
    state["step_in_epoch"] = 0
    state["sums"] = new_regime_state()["sums"]
    state["train_time_s"] += time.perf_counter() - started
    return row


# --------------------------------------------------------------------------------------------
# Outputs: checkpoints, test metrics, plots, the comparison of the regimes
# --------------------------------------------------------------------------------------------


def save_checkpoint(training: Training, improved: bool) -> None:
    """history.csv, best.pt (if the epoch improved), then last.pt, from the same state: none is
    ever behind the checkpoint a resume continues. Both hold the trainable tensors and the
    backbone's identity, from which load_best() and a resume rebuild the frozen layers; last.pt
    also what else training changes (optimiser, scaler, schedule, progress, RNG)."""
    if training.world.rank != 0:
        return
    write_csv(training.folder / "history.csv", training.state["history"])
    trained = {
        "script": RUN.script,
        "regime": training.regime,
        "backbone": training.backbone,
        "model": trainable_state(training.model, training.regime),
    }
    early = training.state["early_stopping"]
    if improved:
        best = {
            **trained,
            "epoch": early["best_epoch"],
            "val_accuracy": early["best_val_accuracy"],
            "img_size": training.img_size,
            "classes": EMNIST_BYCLASS_CHARS,
        }
        atomic_write(training.folder / "best.pt", best)
    checkpoint = {
        **trained,
        "optimizer": training.optimizer.state_dict(),
        "scheduler": training.scheduler.state_dict(),
        "scaler": training.scaler.state_dict(),  # {} when disabled (bf16, float32)
        "state": training.state,
        "epoch": training.state["epoch"],
        "rng": capture_rng_state(),
        "autocast_dtype": training.precision.autocast_dtype,
        "settings": training.settings,
    }
    atomic_write(training.folder / CHECKPOINT_NAME, checkpoint)


def read_checkpoint(path: Path, regime: str, backbone: dict) -> dict:
    """A last.pt or best.pt of this regime, trained on this backbone file; else one error."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, or not a checkpoint at all
        damaged = f"cannot read the checkpoint {path} ({error_text(error)}): it is damaged"
        raise UserError(f"{damaged}; start a new run without --resume") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("script") != RUN.script:
        raise UserError(
            f"{path} is not a checkpoint of this version of {RUN.script} (another script's, or "
            "one of an earlier version, which held the whole model); start a new run"
        )
    if checkpoint.get("regime") != regime:
        raise UserError(f"{path} is a checkpoint of {checkpoint.get('regime')}, not of {regime}")
    made = checkpoint.get("backbone") or {}
    if made.get("sha256") != backbone["sha256"]:
        was = f"{made.get('file') or 'random weights'} (sha256 {made.get('sha256')})"
        now = f"{backbone['file'] or 'random weights'} (sha256 {backbone['sha256']})"
        raise UserError(
            f"{path} was trained on the backbone {was}, but this run now has {now}: its frozen "
            "layers would differ; put that weights file back, or start a new run"
        )
    return checkpoint


def load_best(path: str | Path) -> nn.Module:
    """The whole model of a best.pt, in eval mode: its backbone file (which must hash as it did)
    with the best epoch's trainable tensors."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    backbone = backbone_identity(saved["backbone"]["weights"], download=False)
    checkpoint = read_checkpoint(Path(path), saved["regime"], backbone)
    model = build_model(checkpoint["regime"], load_backbone_weights(backbone))
    model.load_state_dict(checkpoint["model"], strict=False)
    return model.eval()


def resume_training(training: Training, checkpoint: dict, path: Path) -> None:
    """Continue from last.pt. The precision follows this device (a bf16 checkpoint continues
    in fp16 on an older GPU, and back): a scaler state is loaded only where both have one."""
    try:
        missing, unexpected = training.model.load_state_dict(checkpoint["model"], strict=False)
        absent = [key for key in missing if key.startswith(TRAINABLE_PREFIXES[training.regime])]
        if absent or unexpected:
            raise KeyError((absent + unexpected)[0])
        training.optimizer.load_state_dict(checkpoint["optimizer"])
        training.scheduler.load_state_dict(checkpoint["scheduler"])
        if training.scaler.is_enabled() and checkpoint["scaler"]:
            training.scaler.load_state_dict(checkpoint["scaler"])
        restore_rng_state(checkpoint["rng"])
        training.state = checkpoint["state"]
        dtype = checkpoint["autocast_dtype"]
    except (KeyError, ValueError, RuntimeError, TypeError) as error:
        what = f"it has no {error}" if isinstance(error, KeyError) else error_text(error)
        lines = str(error).splitlines()
        what = next((line.strip() for line in lines if "size mismatch" in line), what)
        fits = f"{path} does not fit this run ({what}): written by another version of resnet18.py"
        raise UserError(f"{fits} or for another model; start a new run") from None
    state = training.state
    epoch = state["epoch"] + 1
    log(f"{training.regime}: resumed {path} in epoch {epoch} at step {state['step_in_epoch']}")
    if dtype != training.precision.autocast_dtype:
        now = training.precision.describe()
        log(f"{training.regime}: ran {dtype or 'float32'} so far; now {now}")
    best = training.folder / "best.pt"
    if state["early_stopping"]["best_epoch"] and not best.is_file():
        raise UserError(
            f"{best} is missing: it alone holds the best epoch's weights, which the test "
            "evaluation needs; put it back, or start a new run"
        )


def score_test_set(labels: torch.Tensor, scores: torch.Tensor) -> dict:
    """The test metrics of scores (N, 62) against labels (N,), by scikit-learn (macro F1 and
    balanced accuracy over the classes present), per-class rows and the confusion matrix
    (rows: true class)."""
    import warnings

    from sklearn import metrics

    truth = labels.numpy()
    predicted = scores.argmax(dim=1).numpy()
    classes = list(range(NUM_CLASSES))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a --limit-test subset may lack a class
        per_class = metrics.precision_recall_fscore_support(
            truth, predicted, labels=classes, zero_division=0
        )
        balanced = metrics.balanced_accuracy_score(truth, predicted)
    names = ("precision", "recall", "f1", "support")
    rows = [
        {"label": k, "character": EMNIST_BYCLASS_CHARS[k]}
        | {name: column[k].item() for name, column in zip(names, per_class)}
        for k in classes
    ]
    return {
        "test_accuracy": metrics.accuracy_score(truth, predicted),
        "top5_accuracy": metrics.top_k_accuracy_score(truth, scores.numpy(), k=5, labels=classes),
        "balanced_accuracy": balanced,
        "macro_f1": metrics.f1_score(truth, predicted, average="macro", zero_division=0),
        "weighted_f1": metrics.f1_score(truth, predicted, average="weighted", zero_division=0),
        "per_class": rows,
        "confusion_matrix": metrics.confusion_matrix(truth, predicted, labels=classes).tolist(),
    }


MOST_CONFUSED_COLUMNS = ("true_label", "true_char", "predicted_label", "predicted_char")
MOST_CONFUSED_COLUMNS += ("count", "share_of_true_class")


def most_confused_pairs(confusion: list[list[int]], limit: int = 30) -> list[dict]:
    """The largest off-diagonal confusion counts (o->0, l->1, ...), as csv rows."""
    matrix = torch.tensor(confusion, dtype=torch.int64)
    support = matrix.sum(dim=1)
    counts, flat = matrix.fill_diagonal_(0).flatten().sort(descending=True, stable=True)
    rows = []
    for count, index in zip(counts[:limit].tolist(), flat[:limit].tolist()):
        if count == 0:
            break
        true, predicted = divmod(index, NUM_CLASSES)
        values = (true, EMNIST_BYCLASS_CHARS[true], predicted, EMNIST_BYCLASS_CHARS[predicted])
        share = count / max(1, int(support[true]))
        rows.append(dict(zip(MOST_CONFUSED_COLUMNS, (*values, count, share))))
    return rows


def plot_training_curves(history: list[dict], lr_by_step: list, best_epoch: int, path, title):
    """Loss and accuracy per epoch (train: the running mean over the epoch's steps; val: at the
    epoch's end), the restored best epoch marked, and the learning rate of each step."""
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2), layout="constrained")
    labels = {"train": "train (running mean over the epoch)", "val": "val (end of epoch)"}
    for split, style in (("train", "o-"), ("val", "s--")):
        axes[0].plot(epochs, [row[f"{split}_loss"] for row in history], style, label=labels[split])
        accuracy = [100 * row[f"{split}_accuracy"] for row in history]
        axes[1].plot(epochs, accuracy, style, label=labels[split])
    for axis in axes[:2]:
        axis.axvline(best_epoch, color="grey", linestyle=":", label="best epoch (restored)")
    steps_per_epoch_shown = len(lr_by_step) / max(1, len(history))
    step_epochs = [(step + 1) / steps_per_epoch_shown for step in range(len(lr_by_step))]
    axes[2].plot(step_epochs, lr_by_step)
    names = ("cross-entropy loss", "accuracy (%)", "learning rate (per step)")
    for axis, name in zip(axes, names):
        axis.set(ylabel=name, title=name.split(" (")[0].capitalize())
        epoch_axis(axis, max(epochs, default=1))
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    figure.suptitle(title)
    save_figure(figure, path)


def epoch_axis(axis, last_epoch: int) -> None:
    """An x axis of whole epochs from 0 (a one-epoch run gets 0 and 1, not 0.995), and a grid."""
    from matplotlib.ticker import MaxNLocator

    axis.set(xlabel="epoch", xlim=(0, last_epoch + 0.25))
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.grid(alpha=0.3)


def plot_confusion_matrix(confusion: list, path: Path, title: str) -> None:
    """The 62-class confusion matrix row-normalised: each row is a true class, split into the
    share predicted as each class (the diagonal: the class's accuracy). A square-root colour
    scale, so a 2% confusion still shows beside a 98% diagonal."""
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import PowerNorm

    matrix = np.array(confusion, dtype=float)
    support = matrix.sum(axis=1, keepdims=True)
    shares = 100 * matrix / np.maximum(support, 1)
    shares[support[:, 0] == 0] = np.nan  # a class the test set lacks: a white row
    figure, axis = plt.subplots(figsize=(13, 12), layout="constrained")
    image = axis.imshow(shares, cmap="viridis", norm=PowerNorm(0.5, vmin=0, vmax=100))
    figure.colorbar(image, ax=axis, shrink=0.8, label="share of the true class (%)")
    ticks = range(NUM_CLASSES)
    axis.set_xticks(ticks, list(EMNIST_BYCLASS_CHARS), fontsize=8, family="monospace")
    axis.set_yticks(ticks, list(EMNIST_BYCLASS_CHARS), fontsize=8, family="monospace")
    for edge in (9.5, 35.5):  # digits | upper case | lower case
        axis.axhline(edge, color="white", linewidth=0.8)
        axis.axvline(edge, color="white", linewidth=0.8)
    axis.set(xlabel="predicted class", ylabel="true class")
    accuracy = np.trace(matrix) / max(1.0, matrix.sum())
    mean_per_class = np.nanmean(np.diag(shares))
    summary = f"accuracy {100 * accuracy:.2f}%, mean per-class accuracy {mean_per_class:.2f}%"
    axis.set_title(f"{title}: {summary}\nrows normalised: the diagonal is each class's accuracy")
    save_figure(figure, path)


PERCENT_METRICS = ("test_accuracy", "top5_accuracy", "balanced_accuracy", "macro_f1", "weighted_f1")
PERCENT_LABELS = ("accuracy", "top-5\naccuracy", "balanced\naccuracy", "macro F1", "weighted F1")
# The metrics comparison.md shows, with their unit and format spec (scores in percent).
METRIC_FORMATS = {
    "test_accuracy": ("%", ".2f"),
    "top5_accuracy": ("%", ".2f"),
    "balanced_accuracy": ("%", ".2f"),
    "macro_f1": ("%", ".2f"),
    "weighted_f1": ("%", ".2f"),
    "test_loss": ("", ".4f"),
    "trainable_params": ("parameters", ","),
    "epochs_run": ("epochs", ","),
    "best_epoch": ("epoch", ","),
    "stopped_early": ("", ""),
    "train_time_s": ("s", ",.1f"),
    "images_per_s": ("images/s", ",.0f"),
    "peak_memory_mib": ("MiB", ",.0f"),
}
METRIC_KEYS = tuple(METRIC_FORMATS)


def metric_text(key: str, value, sign: str = "") -> str:
    """A metric as comparison.md and the console show it; sign "+" for a difference."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    unit, spec = METRIC_FORMATS[key]
    return format(100 * value if unit == "%" else value, sign + spec)


def peak_memory_mib(device: torch.device) -> tuple[float, str]:
    """(MiB, what was measured): the GPU's peak allocation since the regime began, or the
    whole process's peak resident memory on the CPU (KiB on Linux)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_max_rss"


def regime_metrics(training: Training, test: dict, scored: dict, wall_started: float) -> dict:
    """metrics.json's content: the test scores (scored: score_test_set's), how training went,
    what it cost, and the confusion matrix (rows: true class)."""
    state = training.state
    early = state["early_stopping"]
    history = state["history"]
    images = sum(row["seconds"] * row["images_per_s"] for row in history)
    step_seconds = sum(row["seconds"] for row in history)
    memory, memory_kind = peak_memory_mib(training.splits["test"][1].device)
    metrics = {"regime": training.regime, **{key: scored[key] for key in PERCENT_METRICS}}
    metrics |= {
        "test_loss": test["loss"],
        "trainable_params": count_trainable(training.model),
        "epochs_run": len(history),
        "best_epoch": early["best_epoch"],
        "best_val_accuracy": early["best_val_accuracy"],
        "stopped_early": early["stopped_early"],
        "train_time_s": state["train_time_s"],
        "feature_time_s": state["feature_time_s"],
        "images_per_s": round(images) / max(state["train_time_s"], 1e-9),
        "step_images_per_s": images / max(step_seconds, 1e-9),
        "peak_memory_mib": memory,
        "peak_memory_kind": memory_kind,
        "test_images": int(test["count"]),
        "train_images": len(training.splits["train"][1]),
        "val_images": len(training.splits["val"][1]),
        "world_size": training.world.size,
        "global_batch_size": training.settings["batch_size"] * training.world.size,
        "precision": training.precision.describe(),
        "autocast_dtype": training.precision.autocast_dtype,
        "frozen_output_cached": state["frozen_output_cached"],
        "backbone_sha256": training.backbone["sha256"],
        "wall_time_s": time.perf_counter() - wall_started,
        "confusion_matrix": scored["confusion_matrix"],
    }
    return metrics


def finish_regime(training: Training, wall_started: float) -> dict:
    """The test set, once, through the best epoch's weights (from best.pt), and every output of
    the regime, its metrics.json last (the regime is finished)."""
    best = read_checkpoint(training.folder / "best.pt", training.regime, training.backbone)
    if best["epoch"] != training.state["early_stopping"]["best_epoch"]:
        raise UserError(f"{training.folder / 'best.pt'} is of another epoch; start a new run")
    training.model.load_state_dict(best["model"], strict=False)
    rows, labels = training.splits["test"]
    test = evaluate(
        training.network, rows, labels, training.precision, training.img_size, training.world
    )
    if training.world.rank != 0:
        return {}
    scored = score_test_set(labels.cpu(), test["scores"].cpu())
    metrics = regime_metrics(training, test, scored, wall_started)
    folder = training.folder
    confusion = scored["confusion_matrix"]
    write_csv(folder / "per_class.csv", scored["per_class"])
    confused = most_confused_pairs(confusion)
    if confused:
        write_csv(folder / "most_confused.csv", confused)
    else:  # a perfect score: the header alone, so the file still parses as the same table
        atomic_write(folder / "most_confused.csv", ",".join(MOST_CONFUSED_COLUMNS) + "\n")
    write_csv(folder / "history.csv", training.state["history"])
    title = f"ResNet-18 {training.regime}"
    state = training.state
    best_epoch = state["early_stopping"]["best_epoch"]
    curves = folder / "training_curves.png"
    plot_training_curves(state["history"], state["lr_by_step"], best_epoch, curves, title)
    plot_confusion_matrix(confusion, folder / "confusion_matrix.png", f"{title}, test set")
    atomic_write(folder / FINISHED_RECORD, metrics)
    shown = {key: metric_text(key, metrics[key]) for key in METRIC_KEYS}
    scores = "  ".join(f"{key.replace('_', ' ')} {shown[key]}%" for key in PERCENT_METRICS)
    epochs = f"best epoch {metrics['best_epoch']} of {metrics['epochs_run']}"
    time_taken = f"train time {shown['train_time_s']}s ({shown['images_per_s']} img/s)"
    log(f"{training.regime}: {scores}  loss {shown['test_loss']}  {epochs}  {time_taken}")
    return metrics


def comparison_table(run_dir: Path, results: dict[str, dict]) -> str:
    """comparison.md: every metric of the regimes side by side, and the difference."""
    regimes = list(results)
    first = results[regimes[0]]
    last = results[regimes[-1]]
    lines = [
        f"# ResNet-18 on EMNIST ByClass: {' vs '.join(regimes)}",
        "",
        f"Run `{run_dir.name}`, {first['test_images']:,} test images; the training time includes "
        f"the frozen layers' pass. Difference: {regimes[-1]} minus {regimes[0]} (percentage "
        "points for %).",
        "",
        f"| metric | unit | {' | '.join(regimes)} | difference |",
        "|---|---|" + "---|" * len(regimes) + "---|",
    ]
    for key, (unit, _) in METRIC_FORMATS.items():
        cells = " | ".join(metric_text(key, results[regime][key]) for regime in regimes)
        numeric = not isinstance(first[key], bool)
        change = metric_text(key, last[key] - first[key], "+") if numeric else ""
        lines.append(f"| {key} | {unit} | {cells} | {change} |")
    return "\n".join(lines) + "\n"


def write_comparison(run_dir: Path, results: dict[str, dict]) -> None:
    """comparison.md and .json (every metric side by side) and comparison.png: the test scores,
    the validation curves with each regime's restored best epoch, the training times."""
    import matplotlib.pyplot as plt

    regimes = list(results)
    atomic_write(run_dir / "comparison.md", comparison_table(run_dir, results))
    table = {regime: {key: results[regime][key] for key in METRIC_KEYS} for regime in regimes}
    atomic_write(run_dir / "comparison.json", table)
    figure, (scores, curves, times) = plt.subplots(1, 3, figsize=(18, 5), layout="constrained")
    last_epoch = 1
    for offset, regime in enumerate(regimes):
        places = [k + 0.4 * offset for k in range(len(PERCENT_METRICS))]
        values = [100 * results[regime][key] for key in PERCENT_METRICS]
        scores.bar_label(scores.bar(places, values, 0.4, label=regime), fmt="%.1f", fontsize=8)
        with open(run_dir / regime / "history.csv", newline="") as handle:
            history = list(csv.DictReader(handle))
        epochs = [int(row["epoch"]) for row in history]
        last_epoch = max(last_epoch, *epochs)
        accuracy = [100 * float(row["val_accuracy"]) for row in history]
        line = curves.plot(epochs, accuracy, "o-", label=regime)[0]
        best = results[regime]["best_epoch"]
        curves.plot(best, accuracy[epochs.index(best)], "*", markersize=16, color=line.get_color())
    curves.plot([], [], "*", color="grey", markersize=12, label="restored best epoch")
    scores.set_xticks([k + 0.2 for k in range(len(PERCENT_METRICS))], PERCENT_LABELS)
    scores.set(ylim=(0, 109), ylabel="percent of the test set", title="Test scores")
    curves.set(ylabel="validation accuracy (%)", title="Validation accuracy (end of each epoch)")
    epoch_axis(curves, last_epoch)
    seconds = [results[regime]["train_time_s"] for regime in regimes]
    times.bar_label(times.bar(regimes, seconds, color=["tab:blue", "tab:orange"]), fmt="%.1f")
    times.set(ylabel="seconds", title="Training time: steps, validation, frozen pass")
    scores.legend()
    curves.legend()
    title = f"ResNet-18 on EMNIST ByClass: {' vs '.join(regimes)}"
    figure.suptitle(f"{title} ({run_dir.name})")
    save_figure(figure, run_dir / "comparison.png")


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def lr_scale(rule: str, global_batch: int) -> float:
    """--lr-scaling's factor for a global batch, relative to LR_REFERENCE_BATCH."""
    ratio = global_batch / LR_REFERENCE_BATCH
    return {"none": 1.0, "sqrt": math.sqrt(ratio), "linear": ratio}[rule]


def regime_settings(args: argparse.Namespace, regime: str, world_size: int = 1) -> dict:
    """The regime's defaults with the values given (0 included) in their place; the default
    warmup takes at most DEFAULT_WARMUP_SHARE of the epochs. `lr` is the peak learning rate
    used, `base_lr` the one given (or defaulted) before --lr-scaling."""
    settings = dict(REGIME_DEFAULTS[regime], batch_size=args.batch_size)
    for name in REGIME_DEFAULTS[regime]:
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    if args.warmup_epochs is None:
        share = DEFAULT_WARMUP_SHARE * settings["epochs"]
        settings["warmup_epochs"] = min(settings["warmup_epochs"], share)
    settings["base_lr"] = settings["lr"]
    settings["lr"] *= lr_scale(args.lr_scaling, args.batch_size * world_size)
    if settings["warmup_epochs"] > settings["epochs"]:
        warmup = f"--warmup-epochs {settings['warmup_epochs']:g}"
        raise UserError(f"{regime}: {warmup} is longer than its {settings['epochs']} epochs")
    return settings


def prefetch(args: argparse.Namespace) -> int:
    """--prefetch: EMNIST ByClass and the ImageNet weights, downloaded where missing (and
    verified: the zip's published MD5, the weights' sha256 prefix); one error naming each file
    that is still missing, with its address."""
    problems = []
    try:
        raw = check_emnist_files(args.data_dir, download=not args.no_download)
        for train in (True, False):
            load_emnist(args.data_dir, "byclass", train, download=False)
        log(f"prefetch: EMNIST ByClass in {raw}: {', '.join(emnist_files())}")
    except UserError as error:
        problems.append(str(error))
    try:
        identity = backbone_identity("imagenet", download=not args.no_download)
        load_backbone_weights(identity)
        wrong = misnamed(Path(identity["file"]), identity["sha256"])
        if wrong:
            raise UserError(f"{wrong}: delete it and run --prefetch again ({IMAGENET_URL})")
        log(f"prefetch: ImageNet weights {identity['file']} (sha256 {identity['sha256'][:8]}...)")
    except UserError as error:
        problems.append(str(error))
    if problems:
        raise UserError(" | ".join(problems))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    return run_main(run, args, explicit_options(parser, argv))


def run(args: argparse.Namespace, explicit: set[str], stop: StopSignal, lock: RunLock) -> int:
    """What each process checks before the process group starts (the run to resume, weights,
    data: a download must not outlast NCCL's watchdog), then training. A failing process of
    several prints one line and exits at once (a broken group's cleanup can hang)."""
    if args.summarize:
        log(f"summary: {summarize_runs(RUN, args.summarize, args.output_dir)}")
        return 0
    if args.prefetch:
        return prefetch(args)
    if args.dry_run and args.resume is not None:
        raise UserError("--dry-run starts a new run on synthetic data; it never resumes one")
    offset = apply_array_seed(args)
    args.data_dir = str(Path(args.data_dir).resolve())
    world = launch_from_environment(os.environ)
    if world.rank != 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (rank 0 alone prints)
    device = select_device(args.device)
    run_dir = find_resume_run(RUN, args.resume, args.output_dir)
    recorded = read_run_record(run_dir) if run_dir is not None else None
    if recorded is not None:
        merge_resumed_args(RUN, args, recorded["args"], explicit)
        check_same_world(run_dir, recorded, world)
    elif args.resume == "auto":
        log("resume: no unfinished run found, starting a new run")
    if offset:
        log(f"seed: {args.seed} (--seed + SLURM_ARRAY_TASK_ID {offset})")
    if args.dry_run:
        log("dry run: 496 synthetic EMNIST-shaped images, a random backbone; nothing is read")
        args.weights = "none"
        args.epochs = DRY_RUN_EPOCHS if args.epochs is None else args.epochs
    regimes = REGIMES if args.regime == "both" else (args.regime,)
    settings = {regime: regime_settings(args, regime, world.size) for regime in regimes}
    backbone = backbone_identity(args.weights, not args.no_download)  # before any run folder
    weights = load_backbone_weights(backbone)
    data = prepare_data(args)
    fingerprint = data_files(args)
    if recorded is not None:
        check_same_data(recorded.get("data_files"), fingerprint, args.data_dir)
    world, device = init_distributed(world, device, args.dist_timeout)
    record = {"args": vars(args), "backbone": backbone, "data_files": fingerprint}
    precision = select_precision(device, args.amp)
    setup = Setup(args, world, device, precision, stop, backbone, weights, settings)
    try:
        code = train_and_test(setup, lock, data, run_dir, record)
    except BaseException as error:
        if world.size == 1:
            raise
        exit_one_process_of_many(world, error)
    if world.size > 1:
        dist.barrier()  # nobody exits while rank 0 still writes
        dist.destroy_process_group()
    return code


def check_same_world(run_dir: Path, recorded: dict, world: World) -> None:
    """A resume runs with as many processes as the run had: the global batch, the steps per
    epoch and the step to continue from stay what they were."""
    processes = recorded.get("distributed", {}).get("world_size", 1)
    if processes != world.size:
        trained = f"{run_dir} was trained by {processes} process(es) and this launch has"
        same = "the global batch, the steps per epoch and the step to continue from"
        raise UserError(f"{trained} {world.size}: resume with {processes}, so that {same} stay")


def exit_one_process_of_many(world: World, error: BaseException) -> None:
    """One `error:` line and an immediate exit: a broken process group's cleanup can hang."""
    message = str(error)
    if not isinstance(error, (UserError, OutputError)):
        where = f"rank {world.rank} of {world.size} on {socket.gethostname()}"
        died = "Another process of this job has died or hung (its own log says why)"
        resume = "--resume <the run folder this log names> continues it"
        message = (
            f"{where}: stopping after {error_text(error)}. {died}, or this one failed; "
            f"the checkpoints written before are intact: {resume}"
        )
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(USAGE_EXIT_CODE if isinstance(error, UserError) else FAILURE_EXIT_CODE)


@dataclass(frozen=True)
class Setup:
    """What every regime of this invocation shares: the options, where it runs, in which
    precision, the stop flag, the backbone (its identity and its state dict) and each regime's
    settings (regime_settings())."""

    args: argparse.Namespace
    world: World
    device: torch.device
    precision: Precision
    stop: StopSignal
    backbone: dict
    weights: dict | None
    settings: dict


def distributed_record(setup: Setup) -> dict:
    """config.json's account of how the work is spread over the processes."""
    args = setup.args
    world = setup.world
    batch = args.batch_size * world.size
    rule = args.lr_scaling
    batchnorm = "one process: each batch's statistics"
    if world.size > 1 and setup.device.type == "cuda":
        batchnorm = "SyncBatchNorm: the global batch's statistics"
    elif world.size > 1:
        batchnorm = "per process (no SyncBatchNorm on the CPU); rank 0's statistics"
    scaled = f"x {lr_scale(rule, batch):.4g} ({rule} of {batch}/{LR_REFERENCE_BATCH})"
    return {
        "world_size": world.size,
        "launcher": world.launcher,
        "backend": world.backend,
        "per_process_batch_size": args.batch_size,
        "global_batch_size": batch,
        "lr_scaling": rule,
        "lr_rule": "as given, not scaled with the batch" if rule == "none" else scaled,
        "lr": {regime: values["lr"] for regime, values in setup.settings.items()},
        "batchnorm": batchnorm,
    }


def open_run(setup: Setup, lock: RunLock, run_dir: Path | None, record: dict) -> Path:
    """The run folder on every process: run_dir resumed, or a new one (rank 0's) with its
    config.json; rank 0 holds its lock."""
    if setup.world.rank == 0 and run_dir is None:
        removed = clean_unstarted_runs(RUN, setup.args.output_dir)
        if removed:
            log(f"removed {removed} temporary files that killed runs left in unstarted runs")
        run_dir = new_run(RUN, setup.args.output_dir, record, lock, dry_run=setup.args.dry_run)
    elif setup.world.rank == 0:
        lock.acquire(run_dir)
        removed = remove_stale_temp_files(run_dir)
        log(f"resuming {run_dir}" + (f" ({removed} temporary files removed)" if removed else ""))
    shared = [str(run_dir)]  # rank 0's
    if setup.world.size > 1:
        dist.broadcast_object_list(shared, src=0)
    log(f"run folder: {shared[0]}")
    return Path(shared[0])


def train_and_test(setup: Setup, lock: RunLock, data: dict, run_dir, record: dict) -> int:
    """On this process's device: the data moved there, the run folder made (or run_dir
    continued), each regime trained and tested in turn, then the comparison; the exit code."""
    import torchvision

    device = setup.device
    if device.type == "cuda":
        use_fast_cuda_kernels()
    environment = {**environment_summary(device), "torchvision": torchvision.__version__}
    log("environment: " + ", ".join(f"{k}={v}" for k, v in environment.items() if v is not None))
    data = {split: (x.to(device), labels.to(device)) for split, (x, labels) in data.items()}
    sizes = {split: len(labels) for split, (_, labels) in data.items()}
    record |= {
        "data": sizes,
        "precision": setup.precision.describe(),
        "autocast_dtype": setup.precision.autocast_dtype,
        "environment": environment,
        "regime_settings": setup.settings,
        "distributed": distributed_record(setup),
    }
    if setup.world.size > 1:
        shown = ", ".join(f"{k} {v}" for k, v in record["distributed"].items())
        log(f"distributed: {setup.world.size} processes; {shown}")
    run_dir = open_run(setup, lock, run_dir, record)
    counts = ", ".join(f"{count:,} {split}" for split, count in sizes.items())
    resized = f"resized to {setup.args.img_size}x{setup.args.img_size} there"
    precision = setup.precision.describe()
    log(f"data: {counts} images on {device} (uint8, upright), {resized}; {precision}")
    results = {}
    for regime in setup.settings:
        outcome, results[regime] = train_regime(setup, regime, data, run_dir)
        if outcome != "done":
            return stopped_or_diverged(setup, regime, outcome, results[regime], run_dir)
    if setup.world.rank == 0 and len(results) > 1:
        write_comparison(run_dir, results)
        accuracy = {r: metric_text("test_accuracy", m["test_accuracy"]) for r, m in results.items()}
        shown = ", ".join(f"{regime} {value}%" for regime, value in accuracy.items())
        log(f"comparison: test accuracy {shown} ({run_dir / 'comparison.md'})")
    if setup.world.rank == 0:  # the run's metrics.json, last: the run is finished
        atomic_write(run_dir / FINISHED_RECORD, results)
    log(f"results: {run_dir}")
    return 0


def stopped_or_diverged(setup: Setup, regime: str, outcome: str, state: dict, run_dir) -> int:
    """The closing lines of a stopped run (exit 75 or 130), or the one error line of a
    diverged one (exit 3)."""
    where = f"in epoch {state['epoch'] + 1} (step {state['step_in_epoch']})"
    if outcome == "stopped":
        for line in stop_lines(RUN, setup.stop, run_dir, f" during {regime} {where}"):
            log(line)
        return setup.stop.exit_code
    last = run_dir / regime / CHECKPOINT_NAME
    kept = f"the last good checkpoint is {last}" if last.is_file() else "no checkpoint was written"
    diverged = f"the {regime} training loss diverged (NaN/inf or above {DIVERGED_LOSS:g})"
    lr = setup.settings[regime]["base_lr"]
    advice = f"Lower --lr (now {lr:g}) or raise --warmup-epochs; start a new run"
    stream = sys.stderr if setup.world.rank == 0 else sys.stdout
    print(f"error: {diverged} {where}; {kept} before it. {advice}", file=stream, flush=True)
    return DIVERGED_EXIT_CODE


def prepare_inputs(setup: Setup, layers, first_trained: int, data: dict, regime: str):
    """(splits, cached, seconds): the splits the steps read, the frozen layers' output
    (computed once) when --cache-frozen says so (auto: when it fits in every process's free
    memory), else the images; and the seconds the frozen pass took."""
    args = setup.args
    needed = frozen_cache_size(layers, first_trained, data, setup.precision, setup.world)
    cached = args.cache_frozen == "on"
    why = f"--cache-frozen {args.cache_frozen}"
    if args.cache_frozen == "auto":
        cached = cache_fits(needed, setup.device, setup.world)
        free = free_memory_bytes(setup.device) / 2**30
        verdict = "fits" if cached else "does not fit"
        why = f"{needed / 2**30:.2f} GiB {verdict} in half the {free:.1f} GiB free"
    frozen = ", ".join(name for name, _ in layers[1:first_trained].named_children())
    if not cached:
        log(f"{regime}: frozen {frozen}: output not cached ({why})")
        return data, False, 0.0
    started = time.perf_counter()
    splits = {}
    for split, (images, labels) in data.items():
        outputs = forward_all(
            layers[:first_trained], images, args.img_size, setup.precision, setup.world
        )
        splits[split] = outputs, labels
    seconds = time.perf_counter() - started
    log(f"{regime}: frozen {frozen}: output cached ({why}) in {seconds:.1f}s")
    return splits, True, seconds


def train_regime(setup: Setup, regime: str, data: dict, run_dir: Path):
    """Train (or continue) and test one regime: ('done', metrics), or ('stopped' or 'diverged',
    its state); a finished one is only read back. A signal meanwhile is seen at the first step."""
    args = setup.args
    settings = setup.settings[regime]
    folder = run_dir / regime
    if (folder / FINISHED_RECORD).is_file():
        log(f"{regime}: already finished, not redone ({folder / FINISHED_RECORD})")
        return "done", json.loads((folder / FINISHED_RECORD).read_text())
    started = time.perf_counter()
    checkpoint = None
    if (folder / CHECKPOINT_NAME).is_file():  # first: a damaged checkpoint fails before the rest
        checkpoint = read_checkpoint(folder / CHECKPOINT_NAME, regime, setup.backbone)
    if setup.world.rank == 0:
        folder.mkdir(exist_ok=True)
    training = start_training(setup, regime, data, folder)
    if checkpoint is not None:
        resume_training(training, checkpoint, folder / CHECKPOINT_NAME)
    state = training.state
    state["frozen_output_cached"].append(training.inputs_cached)
    state["feature_time_s"] += training.cache_seconds
    state["train_time_s"] += training.cache_seconds
    parts = " + ".join(prefix.rstrip(".") for prefix in TRAINABLE_PREFIXES[regime])
    shown = ", ".join(f"{key} {value:g}" for key, value in settings.items())
    processes = f"patience {args.patience}, {setup.world.size} process(es)"
    trainable = f"{count_trainable(training.model):,} trainable parameters ({parts})"
    log(f"{regime}: {trainable}; AdamW, {shown}, {processes}")
    if setup.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(setup.device)
    while state["epoch"] < settings["epochs"] and not state["early_stopping"]["stopped_early"]:
        outcome = train_epoch(training, args, setup.stop)
        if outcome == "diverged":
            return outcome, state
        improved = False
        if outcome == "done":
            row = end_epoch(training, args)
            improved = row["best"]
            log_epoch(regime, row, settings["epochs"])
        save_checkpoint(training, improved)
        if outcome == "stopped" or any_process_stopped(setup.world, setup.stop):
            return "stopped", state
    return "done", finish_regime(training, started)


def log_epoch(regime: str, row: dict, epochs: int) -> None:
    train = f"train loss {row['train_loss']:.4f} acc {100 * row['train_accuracy']:.2f}%"
    validation = f"val loss {row['val_loss']:.4f} acc {100 * row['val_accuracy']:.2f}%"
    speed = f"lr {row['lr']:.3g}  {row['seconds']:.1f}s  {row['images_per_s']:,.0f} img/s"
    best = "  (best)" if row["best"] else ""
    log(f"{regime} epoch {row['epoch']}/{epochs}  {train}  {validation}  {speed}{best}")


def start_training(setup: Setup, regime: str, data: dict, folder: Path):
    """The model (the same fc for a seed whether or not another regime ran first), its layers
    on the device, the splits the steps read, the network, the optimiser and its schedule."""
    args = setup.args
    world = setup.world
    device = setup.device
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    model = build_model(regime, setup.weights)
    if world.size > 1 and device.type == "cuda" and regime == "partial_unfreeze":
        # layer4 normalises with the whole global batch's statistics, as one process would.
        model.layer4 = nn.SyncBatchNorm.convert_sync_batchnorm(model.layer4)
    layout = torch.channels_last if device.type == "cuda" else torch.preserve_format
    model = model.to(device, memory_format=layout)
    layers = as_layers(model, args.img_size)
    first_trained = FIRST_TRAINED[regime]
    splits, cached, cache_seconds = prepare_inputs(setup, layers, first_trained, data, regime)
    step_network = make_step_network(layers, first_trained, cached, args, world, device)
    network = layers[first_trained:] if cached else layers
    global_batch = args.batch_size * world.size
    # The number of steps per epoch, for the schedule (a generator of its own: the global RNG
    # must not move).
    count = len(data["train"][1])
    steps = len(epoch_batches(count, global_batch, world.size, torch.Generator(), "cpu"))
    optimizer, scheduler = make_optimizer(model, setup.settings[regime], device, steps)
    scaler = torch.amp.GradScaler(device.type, enabled=setup.precision.use_scaler)
    return Training(
        regime=regime,
        settings=setup.settings[regime],
        model=model,
        network=network,
        step_network=step_network,
        splits=splits,
        img_size=args.img_size,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        precision=setup.precision,
        world=world,
        folder=folder,
        backbone=setup.backbone,
        inputs_cached=cached,
        cache_seconds=cache_seconds,
    )


if __name__ == "__main__":
    code = main()
    ignore_stop_signals()
    sys.exit(code)
