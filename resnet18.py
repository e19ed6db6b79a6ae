"""ResNet-18 (ImageNet weights) on EMNIST ByClass (62 classes: 0-9A-Za-z) in two regimes.

    linear_probe      a new 62-way `fc` trains (31,806 parameters) on the frozen backbone's
                      512-d features, computed once per split.
    partial_unfreeze  `layer4` + `fc` train (8,425,534 parameters); everything up to `layer3`
                      stays frozen in eval mode (BatchNorm statistics included), so its output
                      is computed once per split too (--cache-frozen) and steps run layer4 + fc.

Both: AdamW on the trainable parameters, linear warmup then cosine decay per step, early
stopping on a stratified 10% validation split, and the best epoch's weights for the one test
evaluation. Mixed precision: bf16 autocast on the CPU and on GPUs of compute capability >= 8.0,
fp16 with a GradScaler on older GPUs. The uint8 images live on the device and are resized and
normalised there per batch; the grey image meets the RGB stem through conv1 summed over RGB
(the same as repeating the grey channel three times, at a third of the cost).

    python resnet18.py --data-dir ../shared/data            # both regimes, then a comparison
    python resnet18.py --regime partial_unfreeze --epochs 5 # one regime
    python resnet18.py --resume results/resnet_<stamp>      # continue a stopped run
    python resnet18.py --summarize results/resnet_*         # several seeds: mean and spread
    sbatch run_resnet.sbatch                                # SLURM; requeues near the limit
    torchrun --standalone --nproc-per-node=4 resnet18.py    # DDP on the 4 GPUs of a machine
    sbatch --nodes=2 --gpus-per-node=4 run_resnet.sbatch    # 2 nodes: srun starts torchrun
    sbatch --ntasks-per-node=4 --gpus-per-node=4 run_resnet.sbatch  # srun: a task per GPU

With several processes --batch-size is per process (the global batch is that times the
processes; --lr-scaling), rank 0 alone prints and writes, a stop signal to any process stops
all after the same step, and a run resumes only with the same number of processes.

Exit codes: 0 finished; 1 a write failed, or another process of the job died; 2 bad input (one
`error:` line says what to fix); 3 the loss diverged; 75 stopped by SIGTERM/SIGUSR1 after a
checkpoint (the SLURM wrapper requeues); 130 stopped by Ctrl-C after a checkpoint. A stopped
run's last lines give the command that continues it.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import fcntl
import inspect
import io
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
from dataclasses import dataclass, field
from pathlib import Path

STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGUSR1}
if __name__ == "__main__":
    # Hold stop signals while torch imports (seconds): StopSignal takes them when it starts.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

RUN_PREFIX = "resnet"
# Options a resume takes from config.json; an explicit value that differs is refused.
RUN_DEFINING_ARGS = (
    *("regime", "epochs", "lr", "weight_decay", "warmup_epochs", "patience", "min_delta"),
    *("batch_size", "img_size", "amp", "limit_train", "limit_test", "val_fraction", "seed"),
    *("weights", "lr_scaling"),
)
PROGRESS_FILES = ("*/last.pt", "*/metrics.json")
HISTORY_FILES = ("linear_probe/history.csv", "partial_unfreeze/history.csv")

EMNIST_BYCLASS_CHARS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
NUM_CLASSES = len(EMNIST_BYCLASS_CHARS)
# One grey mean/std for all three stem channels (the mean of ImageNet's): what makes summing
# conv1 over RGB exactly equal to repeating the grey channel.
GREY_MEAN = (0.485 + 0.456 + 0.406) / 3
GREY_STD = (0.229 + 0.224 + 0.225) / 3
DEFAULT_IMG_SIZE = 96
FEATURE_DIM = 512
EVAL_BATCH_SIZE = 4096  # evaluation and caching batches (fewer where memory is short)
FINITE_CHECK_INTERVAL = 50  # steps between the stop/divergence votes (each waits for the GPU)
DIVERGED_LOSS = 1e4  # a mean cross-entropy above this has diverged (chance: ln 62 = 4.1)
CACHE_MEMORY_SHARE = 0.5  # --cache-frozen auto: the cache may take this share of free memory
LR_REFERENCE_BATCH = 512  # the global batch the regimes' default learning rates were set at
REGIMES = ("linear_probe", "partial_unfreeze")
TRAINABLE_PREFIXES = {"linear_probe": ("fc.",), "partial_unfreeze": ("layer4.", "fc.")}
REGIME_DEFAULTS = {
    "linear_probe": {"epochs": 15, "lr": 0.01, "warmup_epochs": 0.0, "weight_decay": 0.0},
    "partial_unfreeze": {"epochs": 20, "lr": 5e-4, "warmup_epochs": 1.0, "weight_decay": 0.01},
}
# The forward pass in stages; a regime's first FROZEN_STAGES never change, so their output per
# image is computed once (the 512-d features, or layer3's 256 x 6 x 6 at 96 px).
STAGES = ("stem", "layer1", "layer2", "layer3", "layer4", "pool", "fc")
FROZEN_STAGES = {"linear_probe": 6, "partial_unfreeze": 4}
PERCENT_METRICS = ("test_accuracy", "top5_accuracy", "balanced_accuracy", "macro_f1", "weighted_f1")
METRIC_KEYS = (
    *PERCENT_METRICS,
    *("test_loss", "trainable_params", "epochs_run", "best_epoch", "stopped_early"),
    *("train_time_s", "images_per_s", "peak_memory_mb"),
)


# --------------------------------------------------------------------------------------------
# CLI and environment
# --------------------------------------------------------------------------------------------


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        description="Fine-tune ImageNet ResNet-18 on EMNIST ByClass: linear probe and/or "
        "partial unfreeze (layer4 + fc).",
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--data-dir",
        default=os.environ.get("DATA_DIR", "./data"),
        help="folder holding EMNIST/raw/ (torchvision's layout), downloaded there when missing "
        "and online. Default: $DATA_DIR, else ./data",
    )
    parser.add_argument(
        "--output-dir",
        default=os.environ.get("RESULTS_DIR", "./results"),
        help="where run folders are made. Default: $RESULTS_DIR, else ./results",
    )
    parser.add_argument(
        "--regime",
        default="both",
        choices=[*REGIMES, "both"],
        help="what to train; both: linear_probe, then partial_unfreeze, then a comparison",
    )
    for name, kind, what in (
        ("epochs", positive_int, "most epochs (early stopping may end sooner)"),
        ("lr", positive_float, "peak AdamW learning rate"),
        ("weight_decay", non_negative_float, "AdamW's decoupled weight decay"),
        ("warmup_epochs", non_negative_float, "linear warmup in epochs, then cosine decay"),
    ):
        per_regime = [f"{values[name]:g} {regime}" for regime, values in REGIME_DEFAULTS.items()]
        flag, help_text = "--" + name.replace("_", "-"), f"{what}; default: {', '.join(per_regime)}"
        parser.add_argument(flag, type=kind, help=help_text)
    parser.add_argument(
        "--patience", type=positive_int, default=3, help="early stopping: epochs without a gain"
    )
    parser.add_argument(
        "--min-delta",
        type=non_negative_float,
        default=0.0005,
        help="early stopping: the validation-accuracy gain that counts (0.001 = 0.1 points)",
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=512, help="training batch of each process"
    )
    parser.add_argument(
        "--img-size",
        type=number_type(int, lambda side: 32 <= side <= 512, "a side from 32 to 512"),
        default=DEFAULT_IMG_SIZE,
        help="side the 28x28 images are resized to on the device (bilinear)",
    )
    parser.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="mixed precision: bf16 (CPU, compute capability >= 8.0), else fp16 + GradScaler",
    )
    parser.add_argument(
        "--limit-train", type=positive_int, help="a stratified subset of the training images"
    )
    parser.add_argument(
        "--limit-test", type=positive_int, help="a stratified subset of the test images"
    )
    parser.add_argument(
        "--val-fraction",
        type=number_type(float, lambda share: 0 < share < 1, "a fraction between 0 and 1"),
        default=0.1,
        help="share of the training images held out for validation and early stopping",
    )
    parser.add_argument("--seed", type=seed_int, default=0, help="fc's init, splits, shuffles")
    return add_run_options(parser)


def add_run_options(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options that say where and how a run goes, not what it computes (most of them)."""
    parser.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda", "mps"],
        help="auto: cuda, else mps, else cpu (an error in a SLURM job given unusable GPUs)",
    )
    parser.add_argument(
        "--weights",
        default="imagenet",
        help="backbone: imagenet (torchvision's IMAGENET1K_V1, cached under $TORCH_HOME/hub/"
        "checkpoints), none (random init) or the path of a ResNet-18 state dict",
    )
    parser.add_argument(
        "--no-download", action="store_true", help="missing data or weights: fail, never fetch"
    )
    parser.add_argument(
        "--cache-frozen",
        default="auto",
        choices=["auto", "on", "off"],
        help="compute the frozen stages' output of every image once and keep it on the device "
        "(the same logits); auto: on when it fits in half the free memory",
    )
    parser.add_argument(
        "--lr-scaling",
        default="none",
        choices=["none", "sqrt", "linear"],
        help=f"the learning rate against global batch / {LR_REFERENCE_BATCH}: unchanged, "
        "times its square root, or times it",
    )
    parser.add_argument(
        "--dist-timeout",
        type=positive_float,
        default=900,
        help="several processes: seconds one waits for the others at a collective",
    )
    parser.add_argument(
        "--resume",
        help="continue a stopped run: its folder (or a file in it), or auto: the newest "
        "unfinished run of this SLURM job (outside SLURM, of --output-dir), else a new run",
    )
    parser.add_argument(
        "--summarize",
        nargs="+",
        metavar="RUN_DIR",
        help="mean and spread of finished runs' metrics (several seeds), in a new folder",
    )
    return parser


def error_text(error: BaseException) -> str:
    """An exception for a one-line message: its type and first line ("OSError: disk full"),
    or its type alone when it has no message (a bare AssertionError)."""
    text = first_line(error)
    return text if text == type(error).__name__ else f"{type(error).__name__}: {text}"


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
    """bf16 where the hardware has it: the CPU, and GPUs of compute capability >= 8.0 (A100,
    H100, ...). Older GPUs (V100, T4) get fp16 with loss scaling: torch.cuda.is_bf16_supported()
    says True there too, through an emulation that runs convolutions without cuDNN. MPS: float32."""
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.half
    else:
        dtype = torch.bfloat16 if device.type == "cpu" else torch.float32
    enabled = amp and dtype != torch.float32
    return Precision(device.type, dtype, enabled, enabled and dtype == torch.half)


@dataclass(frozen=True)
class World:
    """This process's place in a job: rank of size processes (size 1: a plain run)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    launcher: str = "none"
    backend: str | None = None


def launch_from_environment(env) -> World:
    """torchrun's RANK/WORLD_SIZE/LOCAL_RANK, or an srun step's SLURM_PROCID/SLURM_NTASKS/
    SLURM_LOCALID when MASTER_ADDR/MASTER_PORT say where rank 0 listens; else one process.
    (A batch script has SLURM's task variables before any srun: that is not a launch.)"""
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    launcher = "torchrun" if "TORCHELASTIC_RUN_ID" in env else "env"
    if not ("RANK" in env and "WORLD_SIZE" in env):
        names, launcher = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"), "srun"
        slurm = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_ID", "MASTER_ADDR", "MASTER_PORT")
        if not all(name in env for name in slurm):
            return World()
    try:
        rank, size = int(env[names[0]]), int(env[names[1]])
        local_rank = int(env.get(names[2], rank))
    except ValueError:
        bad = next(name for name in names if not env.get(name, "0").lstrip("-").isdigit())
        raise UserError(f"{bad}={env[bad]!r} is not an integer") from None
    if not (0 <= rank < size and 0 <= local_rank < size):
        raise UserError(f"{launcher} launch: rank {rank} (local {local_rank}) of {size}?")
    if size > 1 and not ("MASTER_ADDR" in env and "MASTER_PORT" in env):
        raise UserError(
            f"{names[0]}/{names[1]} say process {rank} of {size}, but MASTER_ADDR/MASTER_PORT "
            "(where rank 0 listens) are not set; launch with torchrun, which sets them"
        )
    return World(rank, size, local_rank, launcher)


def init_distributed(
    world: World, device: torch.device, timeout_s: float
) -> tuple[World, torch.device]:
    """Join the job's process group: each process on a GPU of its own (the local rank's, or
    the one GPU a per-task allocation shows), NCCL for CUDA tensors and gloo for the CPU's."""
    if world.size == 1:
        return world, device
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if world.local_rank >= count > 1:
            raise UserError(
                f"local rank {world.local_rank} needs a GPU of its own, but this node shows "
                f"{count}: start as many processes per node as it has GPUs"
            )
        device = torch.device("cuda", world.local_rank if count > 1 else 0)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise UserError(f"several processes need CUDA (NCCL) or the CPU (gloo), not {device}")
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(backend, rank=world.rank, world_size=world.size, timeout=timeout)
    world = World(world.rank, world.size, world.local_rank, world.launcher, backend)
    if device.type == "cuda":  # two processes on one GPU: say so before NCCL's "Duplicate GPU"
        mine = (socket.gethostname(), str(torch.cuda.get_device_properties(device).uuid))
        everyone = [None] * world.size
        dist.all_gather_object(everyone, mine)
        if len(set(everyone)) < world.size:
            raise UserError(
                f"{world.size} processes share {len(set(everyone))} GPU(s): each needs its own. "
                "Start as many processes per node as it has GPUs: with srun, sbatch "
                "--ntasks-per-node=N --gpus-per-node=N run_resnet.sbatch (or --gpus-per-task=1)"
            )
    return world, device


# Collectives: every process calls each, in the same order; with one process they do nothing.


def all_reduce(world: World, tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if world.size > 1:
        dist.all_reduce(tensor, op=op)
    return tensor


def any_rank(world: World, flag: bool) -> bool:
    return bool(all_reduce(world, torch.tensor([float(flag)]), dist.ReduceOp.MAX).item())


def broadcast_object(world: World, value):
    """Rank 0's `value` on every process."""
    box = [value]
    if world.size > 1:
        dist.broadcast_object_list(box, src=0)
    return box[0]


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
    if len(local) < per_rank:
        local = torch.cat([local, local.new_zeros((per_rank - len(local), *local.shape[1:]))])
    gathered = local.new_empty((per_rank * world.size, *local.shape[1:]))
    # all_gather_single replaces all_gather_into_tensor (deprecated in torch 2.14).
    getattr(dist, "all_gather_single", dist.all_gather_into_tensor)(gathered, local)
    return gathered[:total]


def sync_buffers(world: World, model: nn.Module) -> None:
    """Rank 0's BatchNorm statistics everywhere: the CPU has no SyncBatchNorm, so each process
    updated its own from its share of the batch."""
    if world.size > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def emnist_files(split: str = "byclass") -> tuple[str, ...]:
    """torchvision's raw file names for an EMNIST split (train and test, images and labels)."""
    return tuple(
        f"emnist-{split}-{part}-{kind}"
        for part in ("train", "test")
        for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")
    )


def load_emnist(
    data_dir: str | Path, split: str = "byclass", train: bool = True, download: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Upright uint8 images (N, 28, 28) and int64 labels (N,) through torchvision (which
    returns them transposed, as NIST stores them). Several processes of a job download one at
    a time (a lock file), so the later ones find the files."""
    from torchvision.datasets import EMNIST

    raw, part = Path(data_dir) / "EMNIST" / "raw", "train" if train else "test"
    needed = [raw / name for name in emnist_files(split) if f"-{part}-" in name]
    how = (
        f"EMNIST {split} needs {', '.join(emnist_files(split))} in {raw}: on a machine with "
        f"internet run `./setup_env.sh --prefetch` (or this script once) and copy the EMNIST "
        "folder there, or pass --data-dir to a folder holding EMNIST/raw/"
    )
    missing = [path.name for path in needed if not path.is_file()]
    if missing and download:
        try:
            raw.mkdir(parents=True, exist_ok=True)
            with open(raw / ".download.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if not all(path.is_file() for path in needed):
                    EMNIST(root=str(data_dir), split=split, train=train, download=True)
        except Exception as error:  # offline (URLError), read-only folder, a bad archive
            raise UserError(
                f"EMNIST files missing in {raw} ({', '.join(missing)}) and downloading them "
                f"failed ({error_text(error)}). {how}"
            ) from None
        missing = [path.name for path in needed if not path.is_file()]
    if missing:
        zipped = [name for name in missing if (raw / f"{name}.gz").is_file()]
        if zipped:
            raise UserError(
                f"{raw} holds only gzip-compressed copies of {', '.join(zipped)}: decompress "
                f"them (gunzip -k {raw}/*.gz), or let torchvision fetch and extract them"
            )
        raise UserError(f"EMNIST files missing in {raw}: {', '.join(missing)}. {how}")
    unreadable = [path.name for path in needed if not os.access(path, os.R_OK)]
    if unreadable:
        raise UserError(f"cannot read {', '.join(unreadable)} in {raw}: permission denied")
    try:
        dataset = EMNIST(root=str(data_dir), split=split, train=train, download=False)
        images, labels, classes = dataset.data, dataset.targets, len(dataset.classes)
    except Exception as error:  # a truncated or corrupt IDX file fails inside torchvision
        raise UserError(
            f"cannot read the EMNIST {split} {part} files in {raw} ({error_text(error)}): they "
            f"are corrupt or truncated; delete them and fetch them again. {how}"
        ) from None
    if not (
        images.dtype == torch.uint8
        and tuple(images.shape[1:]) == (28, 28)
        and len(labels) == len(images) > 0
        and 0 <= int(labels.min()) <= int(labels.max()) < classes
    ):
        raise UserError(
            f"the EMNIST {split} {part} files in {raw} hold {tuple(images.shape)} images and "
            f"{len(labels)} labels, not N 28x28 images with labels 0-{classes - 1}: they are "
            "corrupt; fetch them again"
        )
    return images.transpose(1, 2).contiguous(), labels.long()


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


def stratified_split(
    labels: torch.Tensor, val_fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified, seeded (train_index, val_index) of a training set."""
    val_index = stratified_sample(
        labels, round(val_fraction * len(labels)), torch.Generator().manual_seed(seed)
    )
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[val_index] = False
    return keep.nonzero().flatten(), val_index


def prepare_data(args: argparse.Namespace) -> dict:
    """EMNIST ByClass loaded, subset (--limit-*) and split, as uint8 on the CPU."""
    parts = {}
    for offset, (part, limit) in enumerate(
        (("train", args.limit_train), ("test", args.limit_test))
    ):
        images, labels = load_emnist(
            args.data_dir, "byclass", part == "train", not args.no_download
        )
        if limit is not None and limit < len(labels):
            # A generator per use: changing --limit-test never changes the training split.
            generator = torch.Generator().manual_seed(args.seed + 1 + offset)
            keep = stratified_sample(labels, limit, generator)
            images, labels = images[keep], labels[keep]
        parts[part] = images, labels
    (train_images, train_labels), (test_images, test_labels) = parts["train"], parts["test"]
    train_index, val_index = stratified_split(train_labels, args.val_fraction, args.seed)
    if len(val_index) == 0 or len(train_index) == 0:
        raise UserError(
            f"--val-fraction {args.val_fraction} of {len(train_labels)} training images leaves "
            f"{len(train_index)} to train on and {len(val_index)} to validate on; both must be "
            "non-empty: raise --limit-train or change --val-fraction"
        )
    return {
        "train": (train_images[train_index], train_labels[train_index]),
        "val": (train_images[val_index], train_labels[val_index]),
        "test": (test_images, test_labels),
    }


def normalise_and_resize(
    images_uint8: torch.Tensor, img_size: int, channels_last: bool = False
) -> torch.Tensor:
    """uint8 (N, 28, 28) on the device -> normalised float32 (N, 1, img_size, img_size).
    Normalising before the bilinear resize is the same (the resize is an affine combination
    with weights summing to 1), on 28x28 instead of img_size^2 pixels."""
    x = images_uint8.unsqueeze(1).float().mul_(1.0 / (255.0 * GREY_STD)).sub_(GREY_MEAN / GREY_STD)
    if x.shape[-1] != img_size:
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


def imagenet_weights_path() -> Path:
    """Where torchvision caches (and looks for) ResNet-18's IMAGENET1K_V1 weights."""
    from torchvision.models import ResNet18_Weights

    name = os.path.basename(ResNet18_Weights.IMAGENET1K_V1.url)
    return Path(torch.hub.get_dir()) / "checkpoints" / name


def load_backbone_weights(weights: str, download: bool) -> dict | None:
    """The backbone's state dict for --weights (conv1 summed over RGB), None for 'none'; the
    one error line for a missing, unreadable or mismatched file, before any run folder."""
    from torchvision.models import ResNet18_Weights, resnet18

    if weights == "none":
        return None
    path = imagenet_weights_path() if weights == "imagenet" else Path(weights)
    how = (
        f"torchvision expects ResNet-18's ImageNet weights at {path}: run `./setup_env.sh "
        "--prefetch` on a machine with internet and copy the file there (or download "
        "https://download.pytorch.org/models/resnet18-f37072fd.pth), or pass --weights none"
    )
    if weights == "imagenet" and not path.is_file() and not download:
        raise UserError(f"the ImageNet weights are not cached and --no-download is set. {how}")
    if weights != "imagenet" and not path.is_file():
        raise UserError(f"--weights {weights}: no such file; pass imagenet, none or a path")
    try:
        if weights == "imagenet":
            state = ResNet18_Weights.IMAGENET1K_V1.get_state_dict(progress=sys.stderr.isatty())
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # offline, a bad hash, a truncated or foreign file
        if weights != "imagenet":  # the user's own file: torch's advice is not for them
            raise UserError(
                f"--weights {weights} is not a file torch.load can read as a state dict "
                f"({type(error).__name__}); pass imagenet, none or ResNet-18's weights"
            ) from None
        raise UserError(f"cannot load the weights {path} ({error_text(error)}). {how}") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # a checkpoint written by this script
    state = {k: v for k, v in dict(state).items() if not str(k).startswith("fc.")}
    if getattr(state.get("conv1.weight"), "ndim", 0) == 4 and state["conv1.weight"].shape[1] == 3:
        state["conv1.weight"] = state["conv1.weight"].sum(dim=1, keepdim=True)
    grey = resnet18()
    fold_grey_stem(grey)
    # Old files (ImageNet's included) lack BatchNorm's num_batches_tracked: torch fills it in.
    expected = {k: v.shape for k, v in grey.state_dict().items() if not k.startswith("fc.")}
    misfits = [
        k
        for k, shape in expected.items()
        if getattr(state.get(k), "shape", None) != shape and not k.endswith("_tracked")
    ]
    unexpected = set(state) - set(expected)
    if misfits or unexpected:
        raise UserError(
            f"--weights {weights} is not a ResNet-18 state dict: {len(misfits)} of ResNet-18's "
            f"{len(expected)} backbone tensors are missing or of another shape (the first: "
            f"{misfits[0] if misfits else 'none'}) and {len(unexpected)} are unexpected; pass "
            "imagenet, none or ResNet-18's weights"
        )
    return state


def fold_grey_stem(model: nn.Module) -> None:
    """Replace the RGB conv1 by a 1-channel conv whose kernel is the sum over RGB: conv(repeat(
    x, 3), W) == conv(x, W.sum(1)) exactly (padding included), at a third of the cost."""
    rgb = model.conv1
    grey = nn.Conv2d(
        1, rgb.out_channels, rgb.kernel_size, rgb.stride, rgb.padding, bias=rgb.bias is not None
    )
    with torch.no_grad():
        grey.weight.copy_(rgb.weight.sum(dim=1, keepdim=True))
        if rgb.bias is not None:
            grey.bias.copy_(rgb.bias)
    model.conv1 = grey


def build_model(regime: str, backbone: dict | None, num_classes: int = NUM_CLASSES) -> nn.Module:
    """torchvision's resnet18 with the backbone weights (None: random), a grey 1-channel stem,
    a new `fc` (initialised from torch's global RNG) and requires_grad set for the regime."""
    from torchvision.models import resnet18

    model = resnet18()
    fold_grey_stem(model)
    if backbone is not None:
        model.load_state_dict(backbone, strict=False)
    model.fc = nn.Linear(FEATURE_DIM, num_classes)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.startswith(TRAINABLE_PREFIXES[regime]))
    return model


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def set_regime_mode(model: nn.Module, regime: str, training: bool) -> None:
    """Frozen parts always in eval mode (BatchNorm uses and keeps its running statistics);
    only the trainable modules switch to train mode while training."""
    model.eval()
    for prefix in TRAINABLE_PREFIXES[regime] if training else ():
        model.get_submodule(prefix.rstrip(".")).train()


def run_stages(model: nn.Module, x: torch.Tensor, first: int, last: int) -> torch.Tensor:
    """STAGES[first:last] of torchvision's ResNet forward on x (0, len(STAGES): model(x))."""
    for stage in STAGES[first:last]:
        if stage == "stem":
            x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        elif stage == "pool":
            x = torch.flatten(model.avgpool(x), 1)
        else:
            x = getattr(model, stage)(x)
    return x


class StagesFrom(nn.Module):
    """The model from stage `first` on: what training steps and evaluation call (on cached
    frozen outputs, or on images with first 0), and what DDP wraps."""

    def __init__(self, model: nn.Module, first: int):
        super().__init__()
        self.model, self.first = model, first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_stages(self.model, x, self.first, len(STAGES))


# --------------------------------------------------------------------------------------------
# Training and evaluation
# --------------------------------------------------------------------------------------------


class WarmupCosine:
    """LambdaLR factor: linear warmup from 1/warmup_steps to 1, then cosine decay to 0 at
    total_steps. A callable object (not a lambda) so the scheduler's state_dict keeps it."""

    def __init__(self, total_steps: int, warmup_steps: int):
        self.total_steps, self.warmup_steps = total_steps, warmup_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def iterate_batches(
    num_items: int, batch_size: int, generator: torch.Generator, device: torch.device
) -> list[torch.Tensor]:
    """One epoch's shuffled index batches (the last one may be short), moved to the device."""
    return list(torch.randperm(num_items, generator=generator).to(device).split(batch_size))


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The training loss (mean cross-entropy), in float32 whatever the autocast dtype."""
    return F.cross_entropy(logits.float(), labels)


def free_memory_bytes(device: torch.device) -> int:
    """What the device has free now: the GPU's memory, or the host's MemAvailable (0 unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            return next(int(line.split()[1]) * 1024 for line in meminfo if "MemAvail" in line)
    except (OSError, StopIteration, ValueError):
        return 0


def image_batch_size(img_size: int, device: torch.device) -> int:
    """EVAL_BATCH_SIZE images at a time without gradients, fewer where a quarter of the free
    memory cannot hold their activations (about four float32 copies of the stem's output)."""
    per_image = 4 * 4 * 64 * (img_size // 2) ** 2
    return int(min(EVAL_BATCH_SIZE, max(256, free_memory_bytes(device) // (4 * per_image))))


@dataclass
class RegimeInputs:
    """What a regime feeds its model per split (name -> (rows, labels), on the device): uint8
    images preprocessed per batch (first 0), or the cached output of the stages before
    STAGES[first]. Everything indexes rows, so each process takes its share of a batch."""

    splits: dict
    first: int
    img_size: int
    channels_last: bool = False

    def batch(self, split: str, index) -> tuple[torch.Tensor, torch.Tensor]:
        rows, labels = self.splits[split][0][index], self.splits[split][1][index]
        if self.first == 0:
            rows = normalise_and_resize(rows, self.img_size, self.channels_last)
        elif self.channels_last and rows.dim() == 4:
            rows = rows.contiguous(memory_format=torch.channels_last)
        return rows, labels

    def size(self, split: str) -> int:
        return len(self.splits[split][1])

    @property
    def device(self) -> torch.device:
        return self.splits["train"][1].device


@torch.no_grad()
def frozen_outputs(
    model: nn.Module,
    images: torch.Tensor,
    stages: int,
    img_size: int,
    precision: Precision,
    world: World = World(),
) -> torch.Tensor:
    """The output of the first `stages` stages for every image, in the autocast dtype, on the
    images' device: each process computes its shard() and all are gathered."""
    model.eval()
    start, end = shard(world, len(images))
    per_rank, batch = math.ceil(len(images) / world.size), image_batch_size(img_size, images.device)
    local, channels_last = None, images.device.type == "cuda"
    for offset in range(0, per_rank, batch):  # the same number of turns on every process
        rows = images[start + offset : min(start + offset + batch, end)]
        with precision.autocast():
            out = run_stages(model, normalise_and_resize(rows, img_size, channels_last), 0, stages)
        if local is None:  # per_rank rows: the last ones of the last process are padding
            local = out.new_empty((per_rank, *out.shape[1:]))
        local[offset : offset + len(out)] = out
    return gather_rows(world, local, len(images))


def regime_inputs(
    model: nn.Module,
    regime: str,
    data: dict,
    args: argparse.Namespace,
    precision: Precision,
    world: World,
) -> tuple[RegimeInputs, str]:
    """The regime's inputs, with the frozen stages' output cached when --cache-frozen says so
    (auto: when every process has room for it), and why."""
    device, stages = data["train"][1].device, FROZEN_STAGES[regime]
    channels_last = device.type == "cuda"
    with torch.no_grad(), precision.autocast():
        blank = torch.zeros(1, 28, 28, dtype=torch.uint8, device=device)
        one = run_stages(model.eval(), normalise_and_resize(blank, args.img_size), 0, stages)
    rows = sum(len(labels) for _, labels in data.values())
    needed = one.numel() * one.element_size() * rows * (1 + 1 / world.size)  # + the gather's
    cached, why = args.cache_frozen == "on", f"--cache-frozen {args.cache_frozen}"
    if args.cache_frozen == "auto":
        free = free_memory_bytes(device)
        cached = not any_rank(world, needed > CACHE_MEMORY_SHARE * free)
        verdict = "fits" if cached else "does not fit"
        why = f"{needed / 2**30:.2f} GiB {verdict} in half the {free / 2**30:.1f} GiB free"
    if not cached:
        return RegimeInputs(data, 0, args.img_size, channels_last), f"not cached ({why})"
    splits = {
        split: (frozen_outputs(model, images, stages, args.img_size, precision, world), labels)
        for split, (images, labels) in data.items()
    }
    return RegimeInputs(splits, stages, args.img_size, channels_last), f"cached ({why})"


@torch.no_grad()
def evaluate_split(
    module: nn.Module,
    inputs: RegimeInputs,
    split: str,
    precision: Precision,
    world: World = World(),
    keep_scores: bool = False,
) -> dict:
    """Mean loss, accuracy and size of a split, and its float32 class scores on the CPU when
    asked. Each process evaluates its shard(); the exact sums (float64) are all-reduced and
    the scores gathered in row order, so every row counts once however the split divides."""
    module.eval()
    device = inputs.splits[split][1].device
    batch = EVAL_BATCH_SIZE if inputs.first else image_batch_size(inputs.img_size, device)
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, correct, rows
    start, end = shard(world, inputs.size(split))
    scores = [torch.zeros(0, NUM_CLASSES, device=device)]
    for first in range(start, end, batch):
        rows, labels = inputs.batch(split, slice(first, min(first + batch, end)))
        with precision.autocast():
            logits = module(rows).float()
        sums[0] += F.cross_entropy(logits, labels, reduction="sum")
        sums[1] += (logits.argmax(dim=1) == labels).sum()
        sums[2] += len(labels)
        scores += [logits] if keep_scores else []
    loss, correct, count = all_reduce(world, sums).tolist()
    result = {"loss": loss / max(1, count), "accuracy": correct / max(1, count), "count": count}
    if keep_scores:
        result["scores"] = gather_rows(world, torch.cat(scores), inputs.size(split)).cpu()
    return result


def new_regime_state() -> dict:
    """What a checkpoint keeps of a regime's training, besides the model and optimiser."""
    return {
        "epoch": 0,
        "step_in_epoch": 0,
        "sums": {"loss": 0.0, "correct": 0.0, "seen": 0, "seconds": 0.0},
        "history": [],
        "lr_by_step": [],
        "train_time_s": 0.0,
        "feature_time_s": 0.0,
        "best_weights": None,  # the trainable tensors of the best epoch (best.pt is rebuilt)
        "early_stopping": {
            "best_val_accuracy": -math.inf,
            "best_epoch": 0,
            "bad_epochs": 0,
            "stopped_early": False,
        },
    }


def update_early_stopping(
    early: dict, val_accuracy: float, epoch: int, patience: int, min_delta: float
) -> bool:
    """Record epoch `epoch` (1-based); True when it is the new best. Stops after `patience`
    epochs in a row that fail to beat the best by more than min_delta."""
    if val_accuracy > early["best_val_accuracy"] + min_delta or early["best_epoch"] == 0:
        early.update(best_val_accuracy=val_accuracy, best_epoch=epoch, bad_epochs=0)
        return True
    early["bad_epochs"] += 1
    early["stopped_early"] = early["bad_epochs"] >= patience
    return False


@dataclass
class Job:
    """One regime in training: what its steps use, and what its checkpoint keeps."""

    regime: str
    settings: dict
    model: nn.Module
    module: nn.Module  # what steps call: StagesFrom(model, inputs.first), in DDP's wrapper
    inputs: RegimeInputs
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    precision: Precision
    world: World
    folder: Path
    state: dict = field(default_factory=new_regime_state)


def training_step(job: Job, index: torch.Tensor) -> torch.Tensor:
    """One optimiser step on this process's share (every size-th index) of a global batch;
    returns its (loss sum, correct count) as a float64 tensor on the device. The loss is
    weighted by the share's size, so the gradients DDP averages are the global batch's."""
    rows, labels = job.inputs.batch("train", index[job.world.rank :: job.world.size])
    with job.precision.autocast():
        logits = job.module(rows)
    # An empty share (a last batch smaller than the world) still joins DDP's gradient sum.
    loss = classification_loss(logits, labels) if len(labels) else logits.float().sum() * 0
    job.optimizer.zero_grad(set_to_none=True)
    job.scaler.scale(loss * (len(labels) * job.world.size / len(index))).backward()
    job.scaler.step(job.optimizer)
    job.scaler.update()
    job.state["lr_by_step"].append(job.optimizer.param_groups[0]["lr"])
    job.scheduler.step()
    correct = (logits.detach().argmax(dim=1) == labels).sum()
    return torch.stack([loss.detach().double() * len(labels), correct.double()])


def stop_vote(
    world: World, stop: StopSignal, loss_sum: torch.Tensor | None = None, rows: int = 0
) -> str:
    """'stopped' (a signal reached any process), 'diverged' (any process's running loss sum is
    not finite, or above DIVERGED_LOSS a row) or 'next': the same answer on every process."""
    flags = torch.tensor([float(stop.received is not None), 0.0])
    if loss_sum is not None:
        flags = flags.to(loss_sum.device)
        flags[1] = ~torch.isfinite(loss_sum) | (loss_sum > DIVERGED_LOSS * max(1, rows))
    stopped, diverged = all_reduce(world, flags, dist.ReduceOp.MAX).tolist()
    return "diverged" if diverged else "stopped" if stopped else "next"


def train_regime_epoch(job: Job, args: argparse.Namespace, stop: StopSignal) -> str:
    """One epoch (what is left of it after a resume), its validation and checkpoint; returns
    'next', 'stopped' (after a checkpoint) or 'diverged' (nothing written: the last checkpoint
    is the last good state). Each epoch's order comes from its own seeded generator, so a
    resumed epoch draws the same permutation and skips the steps already taken."""
    from tqdm import tqdm

    state, world, sums = job.state, job.world, job.state["sums"]
    device = job.inputs.device
    seed = args.seed * 1_000_003 + REGIMES.index(job.regime) * 10_007 + state["epoch"] + 1
    batches = iterate_batches(
        job.inputs.size("train"),
        args.batch_size * world.size,
        torch.Generator().manual_seed(seed),
        device,
    )
    running = torch.zeros(2, dtype=torch.float64, device=device)  # read back only at votes
    rows, outcome, started = 0, "next", time.perf_counter()
    progress = tqdm(
        total=len(batches),
        initial=state["step_in_epoch"],
        desc=f"{job.regime} {state['epoch'] + 1}/{job.settings['epochs']}",
        disable=not sys.stderr.isatty() or world.rank != 0,
        leave=False,
    )
    set_regime_mode(job.model, job.regime, training=True)
    for index in batches[state["step_in_epoch"] :]:
        running += training_step(job, index)
        rows += len(index[world.rank :: world.size])
        state["step_in_epoch"] += 1
        sums["seen"] += len(index)
        progress.update()
        # All processes vote at the same steps; one alone stops as soon as a signal comes.
        if state["step_in_epoch"] % FINITE_CHECK_INTERVAL == 0 or (
            world.size == 1 and stop.received
        ):
            outcome = stop_vote(world, stop, running[0], rows)
            if outcome != "next":
                break
    progress.close()
    if outcome == "next":  # the epoch's end: its loss too must be finite before a checkpoint
        outcome = stop_vote(world, stop, running[0], rows)
    loss, correct = all_reduce(world, running).tolist()
    seconds = time.perf_counter() - started
    sums.update(loss=sums["loss"] + loss, correct=sums["correct"] + correct)
    sums["seconds"] += seconds
    if outcome == "diverged":
        return outcome
    if state["step_in_epoch"] < len(batches):
        state["train_time_s"] += seconds
        save_regime_checkpoint(job, improved=False)
        return "stopped"
    end_epoch(job, args, started)
    return "stopped" if outcome == "stopped" or stop_vote(world, stop) == "stopped" else "next"


def end_epoch(job: Job, args: argparse.Namespace, started: float) -> None:
    """A finished epoch's validation, early stopping, history row and checkpoint."""
    state, sums, early = job.state, job.state["sums"], job.state["early_stopping"]
    sync_buffers(job.world, job.model)
    module = StagesFrom(job.model, job.inputs.first)
    val = evaluate_split(module, job.inputs, "val", job.precision, job.world)
    epoch = state["epoch"] + 1
    improved = update_early_stopping(early, val["accuracy"], epoch, args.patience, args.min_delta)
    if improved:
        state["best_weights"] = trainable_state(job.model, job.regime)
    row = {
        "epoch": epoch,
        "train_loss": sums["loss"] / sums["seen"],
        "train_accuracy": sums["correct"] / sums["seen"],
        "val_loss": val["loss"],
        "val_accuracy": val["accuracy"],
        "lr": state["lr_by_step"][-1],
        "seconds": sums["seconds"],
        "images_per_s": sums["seen"] / max(sums["seconds"], 1e-9),
        "best": improved,
    }
    state["history"].append(row)
    state.update(epoch=epoch, step_in_epoch=0, sums=new_regime_state()["sums"])
    state["train_time_s"] += time.perf_counter() - started
    save_regime_checkpoint(job, improved)
    log(
        f"{job.regime} epoch {epoch}/{job.settings['epochs']}  train loss {row['train_loss']:.4f}"
        f" acc {100 * row['train_accuracy']:.2f}%  val loss {row['val_loss']:.4f} acc "
        f"{100 * row['val_accuracy']:.2f}%  lr {row['lr']:.3g}  {row['seconds']:.1f}s  "
        f"{row['images_per_s']:,.0f} img/s" + ("  (best)" if improved else "")
    )


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
# Outputs of this script: checkpoints, test metrics, the comparison of the regimes
# --------------------------------------------------------------------------------------------

MOST_CONFUSED_COLUMNS = ("true_label", "true_char", "predicted_label", "predicted_char")
MOST_CONFUSED_COLUMNS += ("count", "share_of_true_class")


def trainable_state(model: nn.Module, regime: str) -> dict:
    """A CPU copy of the regime's trainable tensors (BatchNorm statistics included)."""
    return {
        name: tensor.detach().to("cpu", copy=True)
        for name, tensor in model.state_dict().items()
        if name.startswith(TRAINABLE_PREFIXES[regime])
    }


def save_regime_checkpoint(job: Job, improved: bool) -> None:
    """history.csv, best.pt (when the epoch improved), then last.pt, all from the same state:
    none of them is ever behind the checkpoint that a resume continues from."""
    if job.world.rank != 0:
        return
    write_csv(job.folder / "history.csv", job.state["history"])
    if improved:
        write_best(job)
    checkpoint = {
        "model": job.model.state_dict(),
        "optimizer": job.optimizer.state_dict(),
        "scheduler": job.scheduler.state_dict(),
        "scaler": job.scaler.state_dict(),  # empty unless fp16
        "state": job.state,
        "epoch": job.state["epoch"],
        "rng": capture_rng_state(),
        "autocast_dtype": job.precision.autocast_dtype,
        "regime": job.regime,
        "settings": job.settings,
    }
    atomic_torch_save(checkpoint, job.folder / "last.pt")


def write_best(job: Job) -> None:
    """best.pt: what evaluating the best epoch needs (weights, regime, its validation score)."""
    early = job.state["early_stopping"]
    best = {
        "model": {**job.model.state_dict(), **job.state["best_weights"]},
        "regime": job.regime,
        "epoch": early["best_epoch"],
        "val_accuracy": early["best_val_accuracy"],
        "img_size": job.inputs.img_size,
        "classes": EMNIST_BYCLASS_CHARS,
    }
    atomic_torch_save(best, job.folder / "best.pt")


def read_regime_checkpoint(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # truncated, or not a checkpoint at all
        raise UserError(
            f"cannot read the checkpoint {path} ({error_text(error)}): "
            "it is damaged; start a new run without --resume"
        ) from None


def resume_job(job: Job, checkpoint: dict, path: Path) -> None:
    """Continue from last.pt. The precision follows this device (a bf16 checkpoint continues
    in fp16 on an older GPU, and back): a scaler state is loaded only where both have one."""
    try:
        job.model.load_state_dict(checkpoint["model"])
        job.optimizer.load_state_dict(checkpoint["optimizer"])
        job.scheduler.load_state_dict(checkpoint["scheduler"])
        state, rng, scaler = checkpoint["state"], checkpoint["rng"], checkpoint["scaler"]
        dtype = checkpoint["autocast_dtype"]
        if job.scaler.is_enabled() and scaler:
            job.scaler.load_state_dict(scaler)
        restore_rng_state(rng)
    except (KeyError, ValueError, RuntimeError, TypeError) as error:
        what = f"it has no {error}" if isinstance(error, KeyError) else error_text(error)
        raise UserError(
            f"{path} does not fit this run ({what}): it was written by another version of "
            "resnet18.py or for another model; start a new run without --resume"
        ) from None
    job.state = state
    log(f"{job.regime}: resumed {path} at epoch {state['epoch']} step {state['step_in_epoch']}")
    if dtype != job.precision.autocast_dtype:
        log(f"{job.regime}: ran {dtype or 'float32'} so far; now {job.precision.describe()}")
    if state["best_weights"] is not None and not (job.folder / "best.pt").is_file():
        if job.world.rank == 0:
            write_best(job)
        log(f"{job.regime}: best.pt was missing: rebuilt from {path}")


def score_test_set(labels: torch.Tensor, scores: torch.Tensor) -> dict:
    """The test metrics of class scores (N, 62) against labels (N,), as scikit-learn defines
    them: the headline numbers, per-class precision/recall/F1/support and the confusion
    matrix (rows: true class). Macro F1 and balanced accuracy average over the classes present
    (in the labels or predictions; in the labels), all 62 on the full test set."""
    predicted = scores.argmax(dim=1)
    confusion = torch.bincount(labels * NUM_CLASSES + predicted, minlength=NUM_CLASSES**2)
    confusion = confusion.view(NUM_CLASSES, NUM_CLASSES).double()
    correct, support, chosen = confusion.diag(), confusion.sum(dim=1), confusion.sum(dim=0)
    precision, recall = correct / chosen.clamp(min=1), correct / support.clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    top5 = (scores.topk(5, dim=1).indices == labels[:, None]).any(dim=1)
    result = {
        "test_accuracy": correct.sum().item() / len(labels),
        "top5_accuracy": top5.double().mean().item(),
        "balanced_accuracy": recall[support > 0].mean().item(),
        "macro_f1": f1[(support > 0) | (chosen > 0)].mean().item(),
        "weighted_f1": (f1 * support).sum().item() / len(labels),
    }
    result["per_class"] = [
        {
            "label": k,
            "character": EMNIST_BYCLASS_CHARS[k],
            "precision": precision[k].item(),
            "recall": recall[k].item(),
            "f1": f1[k].item(),
            "support": int(support[k]),
        }
        for k in range(NUM_CLASSES)
    ]
    result["confusion_matrix"] = confusion.long().tolist()
    return result


def most_confused_pairs(confusion: list[list[int]], limit: int = 30) -> list[dict]:
    """The largest off-diagonal confusion counts (o->0, l->1, ...), as csv rows."""
    matrix = torch.tensor(confusion, dtype=torch.int64)
    support = matrix.sum(dim=1)
    counts, flat = matrix.fill_diagonal_(0).flatten().sort(descending=True, stable=True)
    rows = []
    for count, index in zip(counts[:limit].tolist(), flat[:limit].tolist()):
        true, predicted = divmod(index, NUM_CLASSES)
        values = (true, EMNIST_BYCLASS_CHARS[true], predicted, EMNIST_BYCLASS_CHARS[predicted])
        share = count / max(1, int(support[true]))
        rows += [dict(zip(MOST_CONFUSED_COLUMNS, (*values, count, share)))] if count else []
    return rows


def regime_metrics(job: Job, scored: dict, test: dict, wall_started: float) -> dict:
    """metrics.json of a regime: the test scores and how the training went (the settings are
    in config.json)."""
    state, early, device = job.state, job.state["early_stopping"], job.inputs.device
    images = sum(row["seconds"] * row["images_per_s"] for row in state["history"])
    if device.type == "cuda":
        memory, kind = torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    else:  # the whole process's peak (KiB on Linux), not one regime's
        import resource

        memory, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_max_rss"
    return {
        "regime": job.regime,
        **{key: scored[key] for key in PERCENT_METRICS},
        "test_loss": test["loss"],
        "trainable_params": count_trainable(job.model),
        "epochs_run": len(state["history"]),
        "best_epoch": early["best_epoch"],
        "best_val_accuracy": early["best_val_accuracy"],
        "stopped_early": early["stopped_early"],
        # Steps, validation and (cached inputs) the frozen stages' pass; not checkpoints/test.
        "train_time_s": state["train_time_s"],
        "feature_time_s": state["feature_time_s"],
        "images_per_s": round(images) / max(state["train_time_s"], 1e-9),
        "step_images_per_s": images / max(sum(row["seconds"] for row in state["history"]), 1e-9),
        "peak_memory_mb": memory,
        "peak_memory_kind": kind,
        "test_images": int(test["count"]),
        "train_images": job.inputs.size("train"),
        "val_images": job.inputs.size("val"),
        "world_size": job.world.size,
        "global_batch_size": job.settings["batch_size"] * job.world.size,
        "precision": job.precision.describe(),
        "autocast_dtype": job.precision.autocast_dtype,
        "cached_frozen_stages": job.inputs.first,
        "wall_time_s": time.perf_counter() - wall_started,  # this invocation's part
    }


def metric_text(key: str, value, sign: str = "") -> str:
    """A metric as the console and comparison.md show it (scores in percent)."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if key in PERCENT_METRICS:
        return f"{100 * value:{sign}.2f}"
    if isinstance(value, int):
        return f"{value:{sign},}"
    if key == "test_loss":
        return f"{value:{sign}.4f}"
    return f"{value:{sign},.1f}" if key == "train_time_s" else f"{value:{sign},.0f}"


METRIC_UNITS = {
    **dict.fromkeys(PERCENT_METRICS, "%"),
    "trainable_params": "parameters",
    "epochs_run": "epochs",
    "best_epoch": "epoch",
    "train_time_s": "s",
    "images_per_s": "images/s",
    "peak_memory_mb": "MiB",
}


def write_comparison(run_dir: Path, results: dict[str, dict]) -> None:
    """comparison.md and .json (every metric side by side, and the difference) and
    comparison.png (test scores, validation curves, training time, trainable parameters)."""
    regimes = list(results)
    first, last = results[regimes[0]], results[regimes[-1]]
    lines = [
        f"# ResNet-18 on EMNIST ByClass: {' vs '.join(regimes)}",
        "",
        f"Run `{run_dir.name}`, {first['test_images']:,} test images; the training time "
        "includes the frozen stages' pass (cached inputs). Difference: "
        f"{regimes[-1]} minus {regimes[0]} (percentage points for %).",
        "",
        f"| metric | unit | {' | '.join(regimes)} | difference |",
        "|---|---|" + "---|" * len(regimes) + "---|",
    ]
    for key in METRIC_KEYS:
        cells = [metric_text(key, results[regime][key]) for regime in regimes]
        numeric = not isinstance(first[key], bool)
        change = metric_text(key, last[key] - first[key], "+") if numeric else ""
        lines.append(f"| {key} | {METRIC_UNITS.get(key, '')} | {' | '.join(cells)} | {change} |")
    atomic_write_text(run_dir / "comparison.md", "\n".join(lines) + "\n")
    table = {regime: {key: results[regime][key] for key in METRIC_KEYS} for regime in regimes}
    atomic_write_json(run_dir / "comparison.json", table)
    plot_comparison(run_dir, results)


def plot_comparison(run_dir: Path, results: dict[str, dict]) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    regimes, width = list(results), 0.8 / len(results)
    figure, axes = plt.subplots(2, 2, figsize=(13, 9), layout="constrained")
    scores, curves, times, sizes = axes.flatten()
    for offset, regime in enumerate(regimes):
        places = [k + (offset - (len(regimes) - 1) / 2) * width for k in range(5)]
        values = [100 * results[regime][key] for key in PERCENT_METRICS]
        scores.bar_label(scores.bar(places, values, width, label=regime), fmt="%.1f", fontsize=8)
        with open(run_dir / regime / "history.csv", newline="") as handle:
            history = list(csv.DictReader(handle))
        epochs = [int(row["epoch"]) for row in history]
        accuracy = [100 * float(row["val_accuracy"]) for row in history]
        curves.plot(epochs, accuracy, "o-", label=regime)
    names = ["test\naccuracy", "top-5\naccuracy", "balanced\naccuracy", "macro F1", "weighted F1"]
    scores.set_xticks(range(len(names)), names)
    scores.set(ylim=(0, 109), ylabel="percent of the test set", title="Test scores (%)")
    curves.set(xlabel="epoch", ylabel="validation accuracy (%)", title="Validation accuracy")
    curves.xaxis.set_major_locator(MaxNLocator(integer=True))
    for axis, key, unit, title in (
        (times, "train_time_s", "seconds", "Training time (s): steps, validation, frozen pass"),
        (sizes, "trainable_params", "parameters", "Trainable parameters (log scale)"),
    ):
        values = [results[regime][key] for regime in regimes]
        bars = axis.bar(regimes, values, color=["tab:blue", "tab:orange"][: len(regimes)])
        axis.bar_label(bars, [metric_text(key, value) for value in values])
        axis.set(ylabel=unit, title=title, ylim=(0, 1.15 * max(values)))
    sizes.set_yscale("log")
    sizes.set_ylim(1, 30 * max(results[regime]["trainable_params"] for regime in regimes))
    for axis in axes.flatten():
        axis.grid(alpha=0.3, axis="y")
    scores.legend(), curves.legend()
    figure.suptitle(f"ResNet-18 on EMNIST ByClass: {' vs '.join(regimes)} ({run_dir.name})")
    save_figure(figure, run_dir / "comparison.png")


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def lr_scale(rule: str, global_batch: int) -> float:
    """--lr-scaling's factor for a global batch, relative to LR_REFERENCE_BATCH."""
    ratio = global_batch / LR_REFERENCE_BATCH
    return {"none": 1.0, "sqrt": math.sqrt(ratio), "linear": ratio}[rule]


def regime_settings(args: argparse.Namespace, regime: str, world_size: int = 1) -> dict:
    """The regime's defaults with the command line's overrides; `lr` is the peak learning rate
    used, `base_lr` the one given (or defaulted) before --lr-scaling."""
    settings = dict(REGIME_DEFAULTS[regime], batch_size=args.batch_size)
    settings.update({k: getattr(args, k) for k in REGIME_DEFAULTS[regime] if getattr(args, k)})
    settings["base_lr"] = settings["lr"]
    settings["lr"] *= lr_scale(args.lr_scaling, args.batch_size * world_size)
    if settings["warmup_epochs"] > settings["epochs"]:
        raise UserError(
            f"{regime}: --warmup-epochs {settings['warmup_epochs']:g} is longer than its "
            f"{settings['epochs']} epochs"
        )
    return settings


def distributed_record(args: argparse.Namespace, world: World, device, settings: dict) -> dict:
    """How the work is spread over processes, and the batch and learning rate that follow."""
    global_batch = args.batch_size * world.size
    rule = f"x {lr_scale(args.lr_scaling, global_batch):.4g} ({args.lr_scaling} of "
    rule += f"{global_batch}/{LR_REFERENCE_BATCH})"
    if world.size == 1:
        batchnorm = "one process: each batch's statistics"
    elif device.type == "cuda":
        batchnorm = "SyncBatchNorm: the statistics of the whole global batch"
    else:
        batchnorm = "per process (no SyncBatchNorm on the CPU); rank 0's running statistics"
    return {
        "world_size": world.size,
        "launcher": world.launcher,
        "backend": world.backend,
        "per_process_batch_size": args.batch_size,
        "global_batch_size": global_batch,
        "lr_scaling": args.lr_scaling,
        "lr_rule": "as given, not scaled with the batch" if args.lr_scaling == "none" else rule,
        "lr": {regime: values["lr"] for regime, values in settings.items()},
        "batchnorm": batchnorm,
    }


def training_module(model: nn.Module, first: int, world: World, device) -> nn.Module:
    """What training steps call: the stages from `first` on, and with several processes
    inside DDP, which averages the gradients (and on the CPU, which has no SyncBatchNorm,
    starts each forward from rank 0's BatchNorm statistics)."""
    from torch.nn.parallel import DistributedDataParallel

    if world.size == 1:
        return StagesFrom(model, first)
    # forward_sync_buffers replaces broadcast_buffers (deprecated in torch 2.14).
    sync = "forward_sync_buffers"
    if sync not in inspect.signature(DistributedDataParallel).parameters:
        sync = "broadcast_buffers"
    devices = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(
        StagesFrom(model, first), devices, **{sync: device.type != "cuda"}
    )


def optimiser_and_schedule(model: nn.Module, settings: dict, steps_per_epoch: int, precision):
    """AdamW on the trainable parameters, warmup then cosine decay per step, and the scaler."""
    device = next(model.parameters()).device
    # The fused kernel updates every tensor in one pass (for layer4: 5.6x faster on a CPU).
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        settings["lr"],
        weight_decay=settings["weight_decay"],
        fused=device.type in ("cpu", "cuda"),
    )
    warmup = round(settings["warmup_epochs"] * steps_per_epoch)
    schedule = WarmupCosine(steps_per_epoch * settings["epochs"], warmup)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return optimizer, scheduler, torch.amp.GradScaler(device.type, enabled=precision.use_scaler)


def start_job(
    args: argparse.Namespace,
    regime: str,
    settings: dict,
    data: dict,
    precision: Precision,
    world: World,
    folder: Path,
) -> Job:
    """The regime's model, inputs and optimiser, continued from its last.pt when there is one.
    (A stop signal that comes meanwhile is seen at the first training step.)"""
    device = data["train"][1].device
    # Read first: a damaged checkpoint fails before the slow part.
    checkpoint = read_regime_checkpoint(folder / "last.pt")
    random.seed(args.seed)
    torch.manual_seed(args.seed)  # the same fc whether or not another regime ran first
    model = build_model(regime, load_backbone_weights(args.weights, not args.no_download))
    if world.size > 1 and device.type == "cuda" and regime == "partial_unfreeze":
        # layer4 normalises with the whole global batch's statistics, as one process would.
        model.layer4 = nn.SyncBatchNorm.convert_sync_batchnorm(model.layer4)
    layout = torch.channels_last if device.type == "cuda" else torch.preserve_format
    model = model.to(device, memory_format=layout)
    started = time.perf_counter()
    inputs, how = regime_inputs(model, regime, data, args, precision, world)
    seconds = (time.perf_counter() - started) if inputs.first else 0.0
    log(f"{regime}: {' + '.join(STAGES[: FROZEN_STAGES[regime]])} {how} in {seconds:.1f}s")
    steps = math.ceil(inputs.size("train") / (args.batch_size * world.size))
    optimizer, scheduler, scaler = optimiser_and_schedule(model, settings, steps, precision)
    module = training_module(model, inputs.first, world, device)
    job = Job(
        regime,
        settings,
        model,
        module,
        inputs,
        optimizer,
        scheduler,
        scaler,
        precision,
        world,
        folder,
    )
    if checkpoint is not None:
        resume_job(job, checkpoint, folder / "last.pt")
    job.state["feature_time_s"] += seconds
    job.state["train_time_s"] += seconds
    return job


def finish_regime(job: Job, test_labels: torch.Tensor, wall_started: float) -> dict:
    """The test set, once, through the best epoch's weights; every output of the regime, with
    metrics.json last (its presence means the regime is finished)."""
    job.model.load_state_dict(job.state["best_weights"], strict=False)
    module = StagesFrom(job.model, job.inputs.first)
    test = evaluate_split(module, job.inputs, "test", job.precision, job.world, keep_scores=True)
    if job.world.rank != 0:
        return {}
    folder, state, title = job.folder, job.state, f"ResNet-18 {job.regime}"
    scored = score_test_set(test_labels.cpu(), test["scores"])
    metrics = regime_metrics(job, scored, test, wall_started)
    write_csv(folder / "per_class.csv", scored["per_class"])
    confused = most_confused_pairs(scored["confusion_matrix"])
    if confused:
        write_csv(folder / "most_confused.csv", confused)
    else:  # a perfect score: the header alone, so the file still parses as the same table
        atomic_write_text(folder / "most_confused.csv", ",".join(MOST_CONFUSED_COLUMNS) + "\n")
    write_csv(folder / "history.csv", state["history"])
    curves = folder / "training_curves.png"
    plot_training_curves(state["history"], state["lr_by_step"], curves, title)
    classes, confusion = list(EMNIST_BYCLASS_CHARS), scored["confusion_matrix"]
    plot_confusion_matrix(confusion, classes, folder / "confusion_matrix.png", f"{title}: test")
    atomic_write_json(folder / FINISHED_RECORD, metrics)
    shown = {key: metric_text(key, metrics[key]) for key in METRIC_KEYS}
    log(
        f"{job.regime}: test accuracy {shown['test_accuracy']}%  top-5 {shown['top5_accuracy']}%"
        f"  balanced {shown['balanced_accuracy']}%  macro F1 {shown['macro_f1']}%  loss "
        f"{shown['test_loss']}  best epoch {metrics['best_epoch']} of {metrics['epochs_run']}  "
        f"train time {shown['train_time_s']}s ({shown['images_per_s']} img/s)"
    )
    return metrics


def run_regime(
    args: argparse.Namespace,
    regime: str,
    settings: dict,
    data: dict,
    precision: Precision,
    world: World,
    folder: Path,
    stop: StopSignal,
) -> tuple[str, dict]:
    """Train (or continue) and test one regime: ('done', metrics), or ('stopped' or
    'diverged', where). A finished regime (its metrics.json exists) is only read back."""
    if (folder / FINISHED_RECORD).is_file():
        log(f"{regime}: already finished, not redone ({folder / FINISHED_RECORD})")
        return "done", json.loads((folder / FINISHED_RECORD).read_text())
    started = time.perf_counter()
    if world.rank == 0:
        folder.mkdir(exist_ok=True)
    job = start_job(args, regime, settings, data, precision, world, folder)
    log(
        f"{regime}: {count_trainable(job.model):,} trainable parameters "
        f"({' + '.join(p.rstrip('.') for p in TRAINABLE_PREFIXES[regime])}); AdamW lr "
        f"{settings['lr']:g} weight decay {settings['weight_decay']:g}, at most "
        f"{settings['epochs']} epochs, {settings['warmup_epochs']:g} warmup, batch "
        f"{args.batch_size}{f' x {world.size} processes' if world.size > 1 else ''}, early "
        f"stopping patience {args.patience}"
    )
    if job.inputs.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(job.inputs.device)
    state, early = job.state, job.state["early_stopping"]
    while state["epoch"] < settings["epochs"] and not early["stopped_early"]:
        outcome = train_regime_epoch(job, args, stop)
        if outcome != "next":
            return outcome, {"epoch": state["epoch"], "step_in_epoch": state["step_in_epoch"]}
    return "done", finish_regime(job, data["test"][1], started)


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    return run_main(run, args, explicit_options(parser, argv))


def run(args: argparse.Namespace, explicit: set[str], stop: StopSignal) -> int:
    """Everything each process checks before the process group starts (the run to resume,
    the weights, the data: a first download must not outlast NCCL's watchdog), then training."""
    if args.summarize:
        log(f"summary: {summarize_runs(args.summarize, args.output_dir)}")
        return 0
    offset = apply_array_seed(args)
    args.data_dir = str(Path(args.data_dir).resolve())
    world = launch_from_environment(os.environ)
    if world.rank != 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (rank 0 alone prints)
    device = select_device(args.device)
    run_dir = find_resume_run(args.resume, args.output_dir)
    if run_dir is not None:
        recorded = read_run_record(run_dir)
        merge_resumed_args(args, recorded.get("args", {}), explicit)
        processes = recorded.get("distributed", {}).get("world_size", 1)
        if processes != world.size:
            raise UserError(
                f"{run_dir} was trained by {processes} process(es) and this launch has "
                f"{world.size}: resume with {processes}, so that the global batch, the steps "
                "per epoch and the step to continue from stay the same"
            )
    elif args.resume == "auto":
        log("resume: no unfinished run found, starting a new run")
    if offset:
        log(f"seed: {args.seed} (--seed + SLURM_ARRAY_TASK_ID {offset})")
    regimes = REGIMES if args.regime == "both" else (args.regime,)
    settings = {regime: regime_settings(args, regime, world.size) for regime in regimes}
    load_backbone_weights(args.weights, not args.no_download)  # before any run folder
    data = prepare_data(args)
    world, device = init_distributed(world, device, args.dist_timeout)
    try:
        code = train_and_report(args, stop, world, device, data, run_dir, settings)
    except BaseException as error:
        if world.size == 1:
            raise
        end_after_failure(world, error)
    if world.size > 1:
        dist.barrier()  # nobody exits while rank 0 still writes
        dist.destroy_process_group()
    return code


def end_after_failure(world: World, error: BaseException) -> None:
    """One process of several failed, or saw another fail at a collective: one error line,
    then exit at once, skipping the interpreter's cleanup of a broken process group (which can
    hang); torchrun and srun --kill-on-bad-exit end the other processes."""
    if isinstance(error, (UserError, OutputError)):
        message, code = str(error), USAGE_EXIT_CODE if isinstance(error, UserError) else 1
    else:
        message, code = (
            f"rank {world.rank} of {world.size} on {socket.gethostname()}: stopping after "
            f"{error_text(error)}. Another process of this job has "
            "died or hung (its own log says why), or this one failed; the checkpoints written "
            "before are intact: --resume <the run folder this log names> continues it",
            FAILURE_EXIT_CODE,
        )
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code)


def train_and_report(
    args: argparse.Namespace,
    stop: StopSignal,
    world: World,
    device: torch.device,
    data: dict,
    run_dir: Path | None,
    settings: dict,
) -> int:
    precision = select_precision(device, args.amp)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its kernels
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    import torchvision

    environment = {**environment_summary(device), "torchvision": torchvision.__version__}
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        environment["cuda"] = torch.version.cuda
        environment["compute_capability"] = f"{properties.major}.{properties.minor}"
        environment["gpu_memory_gb"] = round(properties.total_memory / 2**30, 1)
    log("environment: " + ", ".join(f"{k}={v}" for k, v in environment.items() if v is not None))
    data = {split: (x.to(device), labels.to(device)) for split, (x, labels) in data.items()}
    sizes = {split: len(labels) for split, (_, labels) in data.items()}
    log(
        f"data: EMNIST ByClass {sizes['train']:,} train, {sizes['val']:,} val, "
        f"{sizes['test']:,} test images on {device} (uint8, upright), resized to "
        f"{args.img_size}x{args.img_size} there; {precision.describe()}"
    )
    parallel = distributed_record(args, world, device, settings)
    if world.size > 1:
        log(
            f"distributed: {world.size} processes ({world.launcher}, {world.backend}); batch "
            f"{args.batch_size} per process = {parallel['global_batch_size']} global; learning "
            f"rate: {parallel['lr_rule']}; layer4 BatchNorm: {parallel['batchnorm']}"
        )
    if world.rank == 0 and run_dir is None:
        record = {"args": vars(args), "environment": environment, "data": sizes}
        record.update(precision=precision.describe(), autocast_dtype=precision.autocast_dtype)
        record.update(regime_settings=settings, distributed=parallel)
        run_dir = new_run(args.output_dir, record)
    elif world.rank == 0:
        removed = remove_stale_temp_files(run_dir)
        log(f"resuming {run_dir}" + (f" ({removed} temporary files removed)" if removed else ""))
    run_dir = Path(broadcast_object(world, str(run_dir)))
    log(f"run folder: {run_dir}")
    results = {}
    for regime, values in settings.items():
        folder = run_dir / regime
        outcome, results[regime] = run_regime(
            args, regime, values, data, precision, world, folder, stop
        )
        if outcome != "done":
            return report_unfinished(outcome, results[regime], folder, values, stop, world)
    if world.rank == 0:
        finish_run(run_dir, results)
    log(f"results: {run_dir}")
    return 0


def report_unfinished(
    outcome: str, where: dict, folder: Path, settings: dict, stop: StopSignal, world: World
) -> int:
    """The closing lines of a regime whose loss diverged (exit 3) or that a signal stopped."""
    position = f"epoch {where['epoch'] + 1}, step {where['step_in_epoch']}"
    if outcome == "diverged":
        last = folder / "last.pt"
        kept = "no checkpoint was written before it"
        kept = f"the last good checkpoint is {last}" if last.is_file() else kept
        print(
            f"error: the {folder.name} training loss diverged (NaN/inf or above "
            f"{DIVERGED_LOSS:g}) at {position}; {kept}. Lower --lr (now "
            f"{settings['lr']:g}) or raise --warmup-epochs, and start a new run",
            file=sys.stderr if world.rank == 0 else sys.stdout,
            flush=True,
        )
        return DIVERGED_EXIT_CODE
    for line in stop_lines(stop, folder.parent, f" during {folder.name} ({position})"):
        log(line)
    return stop.exit_code


def finish_run(run_dir: Path, results: dict) -> None:
    """The comparison of the regimes, then the run's metrics.json, last: the run is finished."""
    if len(results) > 1:
        write_comparison(run_dir, results)
        summary = [
            f"{regime} test accuracy {metric_text('test_accuracy', metrics['test_accuracy'])}% "
            f"in {metrics['train_time_s']:.1f}s"
            for regime, metrics in results.items()
        ]
        log("comparison: " + "; ".join(summary))
    atomic_write_json(run_dir / FINISHED_RECORD, results)


if __name__ == "__main__":
    code = main()
    # Python's shutdown resets handled signals to their defaults: ignore stop signals from
    # here on, so that a late one cannot kill the exiting process (143 where 75 was meant).
    for number in STOP_SIGNALS:
        signal.signal(number, signal.SIG_IGN)
    sys.exit(code)
