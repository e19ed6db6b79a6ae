"""ResNet-18 (ImageNet weights) fine-tuned on EMNIST ByClass (62 classes: 0-9A-Za-z).

    linear_probe      a new 62-way `fc` (31,806 parameters) on the frozen backbone's features
    partial_unfreeze  `layer4` + `fc` (8,425,534 parameters); up to `layer3` frozen in eval mode

Both: AdamW, linear warmup then cosine decay per step, early stopping on a stratified validation
split, the best epoch's weights for the one test evaluation; the frozen stages' output per image
computed once (--cache-frozen); bf16 autocast (fp16 + GradScaler on GPUs of compute capability
< 8.0); uint8 images on the device, resized and normalised there; conv1 summed over RGB.

    python resnet18.py --data-dir ../shared/data            # both regimes, then a comparison
    python resnet18.py --regime partial_unfreeze --epochs 5 # one regime
    python resnet18.py --resume results/resnet_<stamp>      # continue a stopped run
    python resnet18.py --summarize results/resnet_*         # several seeds: mean and spread
    sbatch run_resnet.sbatch                                # SLURM; requeues near the limit
    torchrun --standalone --nproc-per-node=4 resnet18.py    # DDP; --batch-size is per process
    sbatch --ntasks-per-node=4 --gpus-per-node=4 run_resnet.sbatch  # srun: a task per GPU

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
import csv  # noqa: E402
import datetime  # noqa: E402
import fcntl  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
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
    environment_summary,
    error_text,
    explicit_options,
    find_resume_run,
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


# --------------------------------------------------------------------------------------------
# CLI and environment
# --------------------------------------------------------------------------------------------


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    where = "holds EMNIST/raw/ (downloaded there when missing). Default: $DATA_DIR, else ./data"
    add("--data-dir", default=os.environ.get("DATA_DIR", "./data"), help=where)
    where = "where run folders are made. Default: $RESULTS_DIR, else ./results"
    add("--output-dir", default=os.environ.get("RESULTS_DIR", "./results"), help=where)
    which = "both: each in turn, then a comparison"
    add("--regime", default="both", choices=[*REGIMES, "both"], help=which)
    for name, kind, what in (
        ("epochs", positive_int, "most epochs (early stopping may end sooner)"),
        ("lr", positive_float, "peak AdamW learning rate"),
        ("weight_decay", non_negative_float, "AdamW's decoupled weight decay"),
        ("warmup_epochs", non_negative_float, "linear warmup in epochs, then cosine decay"),
    ):
        defaults = ", ".join(f"{values[name]:g} {key}" for key, values in REGIME_DEFAULTS.items())
        add("--" + name.replace("_", "-"), type=kind, help=f"{what}; default: {defaults}")
    add("--patience", type=positive_int, default=3, help="early stopping: epochs without a gain")
    gain = "early stopping: the validation-accuracy gain that counts (0.001: 0.1 points)"
    add("--min-delta", type=non_negative_float, default=0.0005, help=gain)
    add("--batch-size", type=positive_int, default=512, help="training batch of each process")
    side = number_type(int, 32, 512, "a side from 32 to 512")
    add("--img-size", type=side, default=DEFAULT_IMG_SIZE, help="side to resize to (bilinear)")
    amp = "mixed precision: bf16 (CPU, compute capability >= 8.0), else fp16 + GradScaler"
    add("--amp", action=argparse.BooleanOptionalAction, default=True, help=amp)
    for part in ("train", "test"):
        add(f"--limit-{part}", type=positive_int, help=f"a stratified subset of the {part} images")
    share = open_fraction
    add("--val-fraction", type=share, default=0.1, help="training images held out to validate")
    add("--seed", type=seed_int, default=0, help="fc's init, splits, shuffles")
    auto = "auto: cuda, else mps, else cpu (an error in a SLURM job given unusable GPUs)"
    add("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help=auto)
    backbone = "imagenet (torchvision's IMAGENET1K_V1, cached in $TORCH_HOME/hub/checkpoints), "
    add("--weights", default="imagenet", help=backbone + "none (random) or a state dict's path")
    add("--no-download", action="store_true", help="missing data or weights: fail, never fetch")
    once = "keep the frozen stages' output on the device; auto: when it fits in half the free"
    add("--cache-frozen", default="auto", choices=["auto", "on", "off"], help=once + " memory")
    rule = f"the learning rate for a global batch B: as given, times sqrt(B/{LR_REFERENCE_BATCH})"
    rule += f" or B/{LR_REFERENCE_BATCH}"
    add("--lr-scaling", default="none", choices=["none", "sqrt", "linear"], help=rule)
    wait = "several processes: seconds one waits for the others at a collective"
    add("--dist-timeout", type=positive_float, default=900, help=wait)
    which = "a stopped run's folder (or a file in it), or auto: the newest unfinished run of "
    add("--resume", help=which + "this SLURM job (else of --output-dir), else a new run")
    seeds = "mean and spread of finished runs' metrics (several seeds), in a new folder"
    add("--summarize", nargs="+", metavar="RUN_DIR", help=seeds)
    return parser


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
        names, launcher = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"), "srun"
        if not all(k in env for k in (*names[:2], "SLURM_STEP_ID", "MASTER_ADDR", "MASTER_PORT")):
            return World()
    bad = [name for name in names if not re.fullmatch(r"\s*[+-]?\d+\s*", env.get(name, "0"))]
    if bad:
        raise UserError(f"{bad[0]}={env[bad[0]]!r} is not an integer")
    rank, size = int(env[names[0]]), int(env[names[1]])
    local_rank = int(env.get(names[2], rank))
    if not (0 <= rank < size and 0 <= local_rank < size):
        raise UserError(f"{launcher} launch: rank {rank} (local {local_rank}) of {size} processes?")
    if size > 1 and not ("MASTER_ADDR" in env and "MASTER_PORT" in env):
        where = "MASTER_ADDR/MASTER_PORT (where rank 0 listens) are not set: launch with torchrun"
        raise UserError(f"{names[0]}/{names[1]} say process {rank} of {size}, but {where}")
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
    dist.init_process_group(world.backend, rank=world.rank, world_size=world.size, timeout=timeout)
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


def load_emnist(data_dir, split: str = "byclass", train: bool = True, download: bool = True):
    """Upright uint8 images (N, 28, 28) and int64 labels (N,) of EMNIST's raw files, through
    torchvision (which returns them transposed, as NIST stores them)."""
    from torchvision.datasets import EMNIST

    raw, part = Path(data_dir) / "EMNIST" / "raw", "train" if train else "test"
    how = f"EMNIST {split} needs {', '.join(emnist_files(split))} in {raw}: run `./setup_env.sh "
    how += "--prefetch` (or this script once) on a machine with internet and copy the EMNIST "
    how += "folder there, or pass --data-dir to a folder holding EMNIST/raw/"
    missing = [n for n in emnist_files(split) if f"-{part}-" in n and not (raw / n).is_file()]
    if missing and download:
        try:  # one process at a time: the later ones find the files (torchvision skips them)
            raw.mkdir(parents=True, exist_ok=True)
            with open(raw / ".download.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                EMNIST(root=str(data_dir), split=split, train=train, download=True)
        except Exception as error:  # offline (URLError), read-only folder, a bad archive
            failed = f"downloading them failed ({error_text(error)})"
            raise UserError(f"EMNIST files missing in {raw} and {failed}. {how}") from None
        missing = [name for name in missing if not (raw / name).is_file()]
    zipped = [name for name in missing if (raw / f"{name}.gz").is_file()]
    if zipped:
        unzip = f"decompress them (gunzip -k {raw}/*.gz) or let torchvision fetch them"
        raise UserError(f"{raw} holds only gzip-compressed copies of {', '.join(zipped)}: {unzip}")
    if missing:
        raise UserError(f"EMNIST files missing in {raw}: {', '.join(missing)}. {how}")
    try:  # a truncated or unreadable file fails in torchvision, a foreign one in the checks
        dataset = EMNIST(root=str(data_dir), split=split, train=train, download=False)
        images, labels = dataset.data, dataset.targets
        if images.shape[1:] != (28, 28) or len(labels) != len(images):
            raise ValueError(f"{tuple(images.shape)} images and {len(labels)} labels")
        if not 0 <= int(labels.min()) <= int(labels.max()) < len(dataset.classes):
            raise ValueError(f"labels {int(labels.min())} to {int(labels.max())}")
    except Exception as error:
        wrong = f"cannot read the EMNIST {split} {part} files in {raw} ({error_text(error)})"
        raise UserError(f"{wrong}: corrupt or unreadable, fetch them again. {how}") from None
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


def stratified_split(labels: torch.Tensor, val_fraction: float, seed: int):
    """Stratified, seeded (train_index, val_index) of a training set."""
    generator = torch.Generator().manual_seed(seed)
    val_index = stratified_sample(labels, round(val_fraction * len(labels)), generator)
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[val_index] = False
    return keep.nonzero().flatten(), val_index


def prepare_data(args: argparse.Namespace) -> dict:
    """EMNIST ByClass loaded, subset (--limit-*) and split: {split: (uint8 images, labels)}."""
    parts, download = {}, not args.no_download
    for offset, part in enumerate(("train", "test")):
        images, labels = load_emnist(args.data_dir, "byclass", part == "train", download)
        limit = getattr(args, f"limit_{part}")
        if limit is not None and limit < len(labels):
            # A generator per use: changing --limit-test never changes the training split.
            generator = torch.Generator().manual_seed(args.seed + 1 + offset)
            keep = stratified_sample(labels, limit, generator)
            images, labels = images[keep], labels[keep]
        parts[part] = images, labels
    images, labels = parts["train"]
    train_index, val_index = stratified_split(labels, args.val_fraction, args.seed)
    if len(val_index) == 0 or len(train_index) == 0:
        leaves = f"leaves {len(train_index)} to train on and {len(val_index)} to validate on"
        fix = "both must be non-empty: raise --limit-train or change --val-fraction"
        raise UserError(f"--val-fraction {args.val_fraction} of {len(labels)} {leaves}; {fix}")
    parts["val"] = images[val_index], labels[val_index]
    parts["train"] = images[train_index], labels[train_index]
    return parts


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
    from torchvision.models import ResNet18_Weights

    name = os.path.basename(ResNet18_Weights.IMAGENET1K_V1.url)
    return Path(torch.hub.get_dir()) / "checkpoints" / name


def load_backbone_weights(weights: str, download: bool) -> dict | None:
    """The backbone's state dict for --weights (conv1 summed over RGB), None for 'none'; one
    error line for a missing, unreadable or mismatched file."""
    from torchvision.models import ResNet18_Weights

    if weights == "none":
        return None
    imagenet = weights == "imagenet"
    path = imagenet_weights_path() if imagenet else Path(weights)
    how = f"torchvision expects ResNet-18's ImageNet weights at {path}: run `./setup_env.sh "
    how += "--prefetch` on a machine with internet and copy the file there (or download "
    how += "https://download.pytorch.org/models/resnet18-f37072fd.pth), or pass --weights none"
    if not imagenet and not path.is_file():
        raise UserError(f"--weights {weights}: no such file; pass imagenet, none or a path")
    if imagenet and not path.is_file() and not download:
        raise UserError(f"the ImageNet weights are not cached and --no-download is set. {how}")
    try:
        if imagenet:
            state = ResNet18_Weights.IMAGENET1K_V1.get_state_dict(progress=sys.stderr.isatty())
        else:
            state = dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as error:  # offline, a bad hash, a truncated or foreign file
        if imagenet:
            raise UserError(f"cannot load {path} ({error_text(error)}). {how}") from None
        kind = type(error).__name__  # alone: torch's advice on weights_only is not for the user
        unreadable = f"--weights {weights} is not a file torch.load can read as a state dict"
        raise UserError(f"{unreadable} ({kind}); pass imagenet, none or a path") from None
    state = state["model"] if isinstance(state.get("model"), dict) else state  # our checkpoint
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
    rgb, grey = model.conv1, nn.Conv2d(1, 64, 7, 2, 3, bias=False)  # torchvision's stem conv
    with torch.no_grad():
        grey.weight.copy_(rgb.weight.sum(dim=1, keepdim=True))
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
    """The model from stage `first` on, on rows of a split: uint8 images it preprocesses (first
    0), or the cached output of the stages before. What steps and evaluation call, DDP wraps."""

    def __init__(self, model: nn.Module, first: int, img_size: int = DEFAULT_IMG_SIZE):
        super().__init__()
        self.model, self.first, self.img_size = model, first, img_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels_last = x.is_cuda  # the layout cuDNN's convolutions are fastest in
        if self.first == 0:
            x = normalise_and_resize(x, self.img_size, channels_last)
        elif channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
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


def iterate_batches(num_items: int, batch_size: int, generator: torch.Generator, device):
    """One epoch's shuffled index batches (the last one may be short), moved to the device."""
    return list(torch.randperm(num_items, generator=generator).to(device).split(batch_size))


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The training loss (mean cross-entropy), in float32 whatever the autocast dtype."""
    return F.cross_entropy(logits.float(), labels)


def free_memory_bytes(device: torch.device) -> int:
    """What the device has free now: the GPU's memory, or the host's MemAvailable (0 unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    meminfo = Path("/proc/meminfo").read_text() if Path("/proc/meminfo").is_file() else ""
    return 1024 * int((re.search(r"MemAvailable:\s*(\d+)", meminfo) or [0, 0])[1])


def image_batch_size(img_size: int, device: torch.device) -> int:
    """EVAL_BATCH_SIZE images at a time without gradients, fewer where a quarter of the free
    memory cannot hold their activations (about four float32 copies of the stem's output)."""
    per_image = 4 * 4 * 64 * (img_size // 2) ** 2
    return int(min(EVAL_BATCH_SIZE, max(256, free_memory_bytes(device) // (4 * per_image))))


@torch.no_grad()
def frozen_outputs(model, images, stages: int, img_size: int, precision, world=World()):
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


def regime_inputs(model, regime: str, data: dict, args, precision, world) -> tuple:
    """(splits, first stage, a phrase for the log): the images, or the frozen stages' output
    when --cache-frozen says so (auto: when it fits in every process's free memory)."""
    device, stages, size = data["train"][1].device, FROZEN_STAGES[regime], args.img_size
    with torch.no_grad(), precision.autocast():
        blank = normalise_and_resize(torch.zeros(1, 28, 28, dtype=torch.uint8, device=device), size)
        one = run_stages(model.eval(), blank, 0, stages)  # one image's cached output
    rows = sum(len(labels) for _, labels in data.values())
    needed = one.numel() * one.element_size() * rows * (1 + 1 / world.size)  # + the gather's
    cached, why = args.cache_frozen == "on", f"--cache-frozen {args.cache_frozen}"
    if args.cache_frozen == "auto":
        free = free_memory_bytes(device)
        short = torch.tensor([float(needed > CACHE_MEMORY_SHARE * free)])
        cached = not all_reduce(world, short, dist.ReduceOp.MAX).item()  # room everywhere
        verdict = "fits" if cached else "does not fit"
        why = f"{needed / 2**30:.2f} GiB {verdict} in half the {free / 2**30:.1f} GiB free"
    if not cached:
        return data, 0, f"not cached ({why})"
    outputs = {}
    for split, (images, labels) in data.items():
        outputs[split] = frozen_outputs(model, images, stages, size, precision, world), labels
    return outputs, stages, f"cached ({why})"


@torch.no_grad()
def evaluate_split(module, rows, labels, precision, world=World(), keep_scores=False) -> dict:
    """Mean loss, accuracy and size of a split (and its float32 scores on the CPU): each process
    evaluates its shard(), the float64 sums are all-reduced, the scores gathered in row order."""
    module.eval()
    batch = EVAL_BATCH_SIZE if module.first else image_batch_size(module.img_size, labels.device)
    sums = torch.zeros(3, dtype=torch.float64, device=labels.device)  # loss, correct, rows
    start, end = shard(world, len(labels))
    scores = [torch.zeros(0, NUM_CLASSES, device=labels.device)]
    for first in range(start, end, batch):
        chunk = slice(first, min(first + batch, end))
        with precision.autocast():
            logits = module(rows[chunk]).float()
        sums[0] += F.cross_entropy(logits, labels[chunk], reduction="sum")
        sums[1] += (logits.argmax(dim=1) == labels[chunk]).sum()
        sums[2] += len(logits)
        scores += [logits] if keep_scores else []
    loss, correct, count = all_reduce(world, sums).tolist()
    result = {"loss": loss / max(1, count), "accuracy": correct / max(1, count), "count": count}
    if keep_scores:
        result["scores"] = gather_rows(world, torch.cat(scores), len(labels)).cpu()
    return result


def new_regime_state() -> dict:
    """What a checkpoint keeps of a regime's training besides the model and optimiser: where it
    is, the epoch's running sums, the history and the best epoch's trainable tensors."""
    state = {"epoch": 0, "step_in_epoch": 0, "history": [], "lr_by_step": [], "best_weights": None}
    state.update(train_time_s=0.0, feature_time_s=0.0)
    state["sums"] = {"loss": 0.0, "correct": 0.0, "seen": 0, "seconds": 0.0}
    early = {"best_val_accuracy": -math.inf, "best_epoch": 0, "bad_epochs": 0}
    return {**state, "early_stopping": {**early, "stopped_early": False}}


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
class Job:
    """One regime in training: its stages and splits, and made from them the optimiser (fused
    AdamW on the trainable parameters), the warmup-then-cosine schedule per step, the GradScaler
    (on for fp16) and the module steps call: the stages, in DDP with several processes (on the
    CPU, with no SyncBatchNorm, each forward starts from rank 0's BatchNorm buffers)."""

    regime: str
    settings: dict
    stages: StagesFrom
    splits: dict
    precision: Precision
    world: World
    folder: Path
    state: dict = field(default_factory=new_regime_state)

    def __post_init__(self) -> None:
        from torch.nn.parallel import DistributedDataParallel as DDP

        device, settings, world = self.splits["train"][1].device, self.settings, self.world
        self.model = self.stages.model
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        # The fused kernel updates every tensor in one pass (for layer4: 5.6x faster on a CPU).
        decay, fused = settings["weight_decay"], device.type in ("cpu", "cuda")
        self.optimizer = torch.optim.AdamW(
            trainable, settings["lr"], weight_decay=decay, fused=fused
        )
        steps = math.ceil(len(self.splits["train"][1]) / (settings["batch_size"] * world.size))
        warmup = round(settings["warmup_epochs"] * steps)
        schedule = WarmupCosine(steps * settings["epochs"], warmup)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision.use_scaler)
        self.module = self.stages
        if world.size > 1:  # forward_sync_buffers replaces broadcast_buffers in torch 2.14
            sync = "forward_sync_buffers"
            sync = sync if sync in inspect.signature(DDP).parameters else "broadcast_buffers"
            devices = [device.index] if device.type == "cuda" else None
            self.module = DDP(self.stages, devices, **{sync: device.type != "cuda"})


def training_step(job: Job, index: torch.Tensor) -> torch.Tensor:
    """One step on this process's share (every size-th index) of a global batch, the loss
    weighted by the share's size so that DDP averages the global batch's gradients; returns
    the share's (loss sum, correct count) as float64 on the device."""
    share = index[job.world.rank :: job.world.size]
    images, labels = job.splits["train"][0][share], job.splits["train"][1][share]
    with job.precision.autocast():
        logits = job.module(images)
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


def stop_vote(world: World, stop: StopSignal, loss_sum=None, rows: int = 0) -> str:
    """'stopped' (a signal reached any process), 'diverged' (any process's running loss sum is
    not finite, or above DIVERGED_LOSS a row) or 'next': the same answer on every process."""
    flags = torch.tensor([float(stop.received is not None), 0.0])
    if loss_sum is not None:
        flags = flags.to(loss_sum.device)
        flags[1] = ~torch.isfinite(loss_sum) | (loss_sum > DIVERGED_LOSS * max(1, rows))
    stopped, diverged = all_reduce(world, flags, dist.ReduceOp.MAX).tolist()
    return "diverged" if diverged else "stopped" if stopped else "next"


def train_regime_epoch(job: Job, args: argparse.Namespace, stop: StopSignal) -> str:
    """One epoch (what is left of it after a resume), its validation, early stopping, history
    row and checkpoint: 'next', 'stopped' (after a checkpoint) or 'diverged' (nothing written:
    the last checkpoint is the last good state). Each epoch's order comes from its own seeded
    generator, so a resumed epoch draws the same permutation and skips the steps taken."""
    from tqdm import tqdm

    state, world, sums, labels = job.state, job.world, job.state["sums"], job.splits["train"][1]
    epoch, seed = state["epoch"] + 1, args.seed * 1_000_003 + REGIMES.index(job.regime) * 10_007
    generator = torch.Generator().manual_seed(seed + epoch)
    batches = iterate_batches(len(labels), args.batch_size * world.size, generator, labels.device)
    running = torch.zeros(2, dtype=torch.float64, device=labels.device)  # read only at votes
    rows, started, done = 0, time.perf_counter(), state["step_in_epoch"]
    desc, quiet = f"{job.regime} {epoch}/{job.settings['epochs']}", world.rank != 0
    quiet = quiet or not sys.stderr.isatty()  # the bar: rank 0's, on a terminal only
    bar = tqdm(batches[done:], desc, total=len(batches), initial=done, leave=False, disable=quiet)
    set_regime_mode(job.model, job.regime, training=True)
    for index in bar:
        running += training_step(job, index)
        rows += len(index[world.rank :: world.size])
        state["step_in_epoch"] += 1
        sums["seen"] += len(index)
        # All processes vote at the same steps; one alone stops as soon as a signal comes.
        alone = world.size == 1 and stop.received is not None
        due = alone or state["step_in_epoch"] % FINITE_CHECK_INTERVAL == 0
        if due and stop_vote(world, stop, running[0], rows) != "next":
            break
    bar.close()
    outcome = stop_vote(world, stop, running[0], rows)  # the epoch's loss too must be finite
    loss, correct = all_reduce(world, running).tolist()
    seconds = time.perf_counter() - started
    sums.update(loss=sums["loss"] + loss, correct=sums["correct"] + correct)
    sums["seconds"] += seconds
    if outcome == "diverged":
        return outcome
    if state["step_in_epoch"] < len(batches):  # stopped inside the epoch
        state["train_time_s"] += seconds
        save_regime_checkpoint(job, improved=False)
        return outcome
    # Validation on rank 0's BatchNorm statistics (without SyncBatchNorm each updated its own).
    for buffer in job.model.buffers() if world.size > 1 else ():
        dist.broadcast(buffer, src=0)
    val = evaluate_split(job.stages, *job.splits["val"], job.precision, world)
    early, trainable = state["early_stopping"], TRAINABLE_PREFIXES[job.regime]
    improved = update_early_stopping(early, val["accuracy"], epoch, args.patience, args.min_delta)
    if improved:  # a CPU copy of the trainable tensors (BatchNorm statistics included)
        weights = {k: v.detach().to("cpu", copy=True) for k, v in job.model.state_dict().items()}
        state["best_weights"] = {k: v for k, v in weights.items() if k.startswith(trainable)}
    seen, seconds = sums["seen"], sums["seconds"]
    row = {"epoch": epoch, "train_loss": sums["loss"] / seen}
    row["train_accuracy"] = sums["correct"] / seen
    row.update(val_loss=val["loss"], val_accuracy=val["accuracy"], lr=state["lr_by_step"][-1])
    row.update(seconds=seconds, images_per_s=seen / max(seconds, 1e-9), best=improved)
    state["history"].append(row)
    state.update(epoch=epoch, step_in_epoch=0, sums=new_regime_state()["sums"])
    state["train_time_s"] += time.perf_counter() - started
    save_regime_checkpoint(job, improved)
    train = f"train loss {row['train_loss']:.4f} acc {100 * row['train_accuracy']:.2f}%"
    validation = f"val loss {val['loss']:.4f} acc {100 * val['accuracy']:.2f}%"
    speed = f"lr {row['lr']:.3g}  {seconds:.1f}s  {row['images_per_s']:,.0f} img/s"
    shown = f"{train}  {validation}  {speed}" + ("  (best)" if improved else "")
    log(f"{job.regime} epoch {epoch}/{job.settings['epochs']}  {shown}")
    return "stopped" if outcome == "stopped" or stop_vote(world, stop) == "stopped" else "next"


# --------------------------------------------------------------------------------------------
# Outputs of this script: checkpoints, test metrics, the comparison of the regimes
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


PERCENT_METRICS = ("test_accuracy", "top5_accuracy", "balanced_accuracy", "macro_f1", "weighted_f1")
# The metrics comparison.md shows, with their unit and format spec (scores in percent).
METRIC_FORMATS = {**dict.fromkeys(PERCENT_METRICS, ("%", ".2f")), "test_loss": ("", ".4f")}
METRIC_FORMATS.update(trainable_params=("parameters", ","), epochs_run=("epochs", ","))
METRIC_FORMATS.update(best_epoch=("epoch", ","), stopped_early=("", ""), train_time_s=("s", ",.1f"))
METRIC_FORMATS.update(images_per_s=("images/s", ",.0f"), peak_memory_mb=("MiB", ",.0f"))
METRIC_KEYS = tuple(METRIC_FORMATS)
MOST_CONFUSED_COLUMNS = ("true_label", "true_char", "predicted_label", "predicted_char")
MOST_CONFUSED_COLUMNS += ("count", "share_of_true_class")
CHECKPOINTED = ("model", "optimizer", "scheduler", "scaler")  # the parts of a Job in last.pt


def save_regime_checkpoint(job: Job, improved: bool) -> None:
    """history.csv, best.pt (if the epoch improved; no optimiser state), then
    last.pt, from the same state: none is ever behind the checkpoint a resume continues."""
    if job.world.rank != 0:
        return
    write_csv(job.folder / "history.csv", job.state["history"])
    if improved:
        write_best(job)
    checkpoint = {part: getattr(job, part).state_dict() for part in CHECKPOINTED}  # scaler: {}
    checkpoint.update(state=job.state, epoch=job.state["epoch"], rng=capture_rng_state())
    checkpoint.update(autocast_dtype=job.precision.autocast_dtype, regime=job.regime)
    atomic_write(job.folder / "last.pt", {**checkpoint, "settings": job.settings})


def write_best(job: Job) -> None:
    """best.pt: what evaluating the best epoch needs (weights, regime, its validation score)."""
    early = job.state["early_stopping"]
    best = {"model": {**job.model.state_dict(), **job.state["best_weights"]}}
    best.update(regime=job.regime, epoch=early["best_epoch"])
    best["val_accuracy"] = early["best_val_accuracy"]
    best.update(img_size=job.stages.img_size, classes=EMNIST_BYCLASS_CHARS)
    atomic_write(job.folder / "best.pt", best)


def resume_job(job: Job, checkpoint: dict, path: Path) -> None:
    """Continue from last.pt. The precision follows this device (a bf16 checkpoint continues
    in fp16 on an older GPU, and back): a scaler state is loaded only where both have one."""
    try:
        for part in CHECKPOINTED[:3]:
            getattr(job, part).load_state_dict(checkpoint[part])
        if job.scaler.is_enabled() and checkpoint["scaler"]:
            job.scaler.load_state_dict(checkpoint["scaler"])
        restore_rng_state(checkpoint["rng"])
        job.state, dtype = checkpoint["state"], checkpoint["autocast_dtype"]
    except (KeyError, ValueError, RuntimeError, TypeError) as error:
        what = f"it has no {error}" if isinstance(error, KeyError) else error_text(error)
        fits = f"{path} does not fit this run ({what}): written by another version of resnet18.py"
        raise UserError(f"{fits} or for another model; start a new run") from None
    state = job.state
    log(f"{job.regime}: resumed {path} at epoch {state['epoch']} step {state['step_in_epoch']}")
    if dtype != job.precision.autocast_dtype:
        log(f"{job.regime}: ran {dtype or 'float32'} so far; now {job.precision.describe()}")
    if job.state["best_weights"] is not None and not (job.folder / "best.pt").is_file():
        if job.world.rank == 0:
            write_best(job)
        log(f"{job.regime}: best.pt was missing: rebuilt from {path}")


def score_test_set(labels: torch.Tensor, scores: torch.Tensor) -> dict:
    """The test metrics of scores (N, 62) against labels (N,) as scikit-learn defines them (over
    the classes present), per-class rows and the confusion matrix (rows: true class)."""
    predicted = scores.argmax(dim=1)
    confusion = torch.bincount(labels * NUM_CLASSES + predicted, minlength=NUM_CLASSES**2)
    confusion = confusion.view(NUM_CLASSES, NUM_CLASSES).double()
    correct, support, chosen = confusion.diag(), confusion.sum(dim=1), confusion.sum(dim=0)
    precision, recall = correct / chosen.clamp(min=1), correct / support.clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    top5 = (scores.topk(5, dim=1).indices == labels[:, None]).any(dim=1)
    columns = zip(EMNIST_BYCLASS_CHARS, precision.tolist(), recall.tolist(), f1.tolist())
    names = ("label", "character", "precision", "recall", "f1", "support")
    per_class = [dict(zip(names, (k, *row, int(support[k])))) for k, row in enumerate(columns)]
    return {
        "test_accuracy": correct.sum().item() / len(labels),
        "top5_accuracy": top5.double().mean().item(),
        "balanced_accuracy": recall[support > 0].mean().item(),
        "macro_f1": f1[(support > 0) | (chosen > 0)].mean().item(),
        "weighted_f1": (f1 * support).sum().item() / len(labels),
        "per_class": per_class,
        "confusion_matrix": confusion.long().tolist(),
    }


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


def metric_text(key: str, value, sign: str = "") -> str:
    """A metric as comparison.md and the console show it; sign "+" for a difference."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    unit, spec = METRIC_FORMATS[key]
    return format(100 * value if unit == "%" else value, sign + spec)


def finish_regime(job: Job, wall_started: float) -> dict:
    """The test set, once, through the best epoch's weights, and every output of the regime, its
    metrics.json last (the regime is finished). train_time_s: the steps, validation and frozen
    stages' pass; wall_time_s: this invocation's part."""
    job.model.load_state_dict(job.state["best_weights"], strict=False)
    (rows, labels), world, precision = job.splits["test"], job.world, job.precision
    test = evaluate_split(job.stages, rows, labels, precision, world, keep_scores=True)
    if world.rank != 0:
        return {}
    state, early, folder, device = job.state, job.state["early_stopping"], job.folder, rows.device
    scored = score_test_set(labels.cpu(), test["scores"])
    history, train_time = state["history"], state["train_time_s"]
    images = sum(row["seconds"] * row["images_per_s"] for row in history)
    if device.type == "cuda":
        memory, kind = torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    else:  # the whole process's peak (KiB on Linux), not one regime's
        import resource

        memory, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_max_rss"
    metrics = {"regime": job.regime, **{key: scored[key] for key in PERCENT_METRICS}}
    metrics.update(test_loss=test["loss"], trainable_params=count_trainable(job.model))
    metrics.update(epochs_run=len(history), best_epoch=early["best_epoch"])
    metrics.update({key: early[key] for key in ("best_val_accuracy", "stopped_early")})
    metrics.update(train_time_s=train_time, feature_time_s=state["feature_time_s"])
    metrics["images_per_s"] = round(images) / max(train_time, 1e-9)
    metrics["step_images_per_s"] = images / max(sum(row["seconds"] for row in history), 1e-9)
    metrics.update(peak_memory_mb=memory, peak_memory_kind=kind, test_images=int(test["count"]))
    metrics.update(train_images=len(job.splits["train"][1]), val_images=len(job.splits["val"][1]))
    metrics.update(world_size=world.size, global_batch_size=job.settings["batch_size"] * world.size)
    metrics.update(precision=precision.describe(), autocast_dtype=precision.autocast_dtype)
    metrics.update(cached_frozen_stages=job.stages.first)
    metrics["wall_time_s"] = time.perf_counter() - wall_started
    write_csv(folder / "per_class.csv", scored["per_class"])
    confused = most_confused_pairs(scored["confusion_matrix"])
    if confused:
        write_csv(folder / "most_confused.csv", confused)
    else:  # a perfect score: the header alone, so the file still parses as the same table
        atomic_write(folder / "most_confused.csv", ",".join(MOST_CONFUSED_COLUMNS) + "\n")
    write_csv(folder / "history.csv", history)
    title, classes = f"ResNet-18 {job.regime}", list(EMNIST_BYCLASS_CHARS)
    plot_training_curves(history, state["lr_by_step"], folder / "training_curves.png", title)
    confusion, where = scored["confusion_matrix"], folder / "confusion_matrix.png"
    plot_confusion_matrix(confusion, classes, where, f"{title}: test")
    atomic_write(folder / FINISHED_RECORD, metrics)
    shown = {key: metric_text(key, metrics[key]) for key in METRIC_KEYS}
    scores = "  ".join(f"{key.replace('_', ' ')} {shown[key]}%" for key in PERCENT_METRICS)
    epochs = f"best epoch {metrics['best_epoch']} of {metrics['epochs_run']}"
    time_taken = f"train time {shown['train_time_s']}s ({shown['images_per_s']} img/s)"
    log(f"{job.regime}: {scores}  loss {shown['test_loss']}  {epochs}  {time_taken}")
    return metrics


def write_comparison(run_dir: Path, results: dict[str, dict]) -> None:
    """comparison.md and .json (every metric side by side, and the difference) and .png."""
    import matplotlib.pyplot as plt

    regimes, title = list(results), f"ResNet-18 on EMNIST ByClass: {' vs '.join(results)}"
    first, last = results[regimes[0]], results[regimes[-1]]
    about = f"Run `{run_dir.name}`, {first['test_images']:,} test images; the training time "
    about += f"includes the frozen stages' pass. Difference: {regimes[-1]} minus {regimes[0]} "
    about += "(percentage points for %)."
    lines = [f"# {title}", "", about, "", f"| metric | unit | {' | '.join(regimes)} | difference |"]
    lines.append("|---|---|" + "---|" * len(regimes) + "---|")
    for key, (unit, _) in METRIC_FORMATS.items():
        cells = " | ".join(metric_text(key, results[regime][key]) for regime in regimes)
        numeric = not isinstance(first[key], bool)
        change = metric_text(key, last[key] - first[key], "+") if numeric else ""
        lines.append(f"| {key} | {unit} | {cells} | {change} |")
    atomic_write(run_dir / "comparison.md", "\n".join(lines) + "\n")
    table = {regime: {key: results[regime][key] for key in METRIC_KEYS} for regime in regimes}
    atomic_write(run_dir / "comparison.json", table)
    figure, (scores, curves, times) = plt.subplots(1, 3, figsize=(18, 5), layout="constrained")
    for offset, regime in enumerate(regimes):
        places = [k + 0.4 * offset for k in range(len(PERCENT_METRICS))]
        values = [100 * results[regime][key] for key in PERCENT_METRICS]
        scores.bar_label(scores.bar(places, values, 0.4, label=regime), fmt="%.1f", fontsize=8)
        with open(run_dir / regime / "history.csv", newline="") as handle:
            history = list(csv.DictReader(handle))
        accuracy = [100 * float(row["val_accuracy"]) for row in history]
        curves.plot([int(row["epoch"]) for row in history], accuracy, "o-", label=regime)
    names = [key.replace("_", "\n") for key in PERCENT_METRICS]
    scores.set_xticks([k + 0.2 for k in range(len(PERCENT_METRICS))], names)
    scores.set(ylim=(0, 109), ylabel="percent of the test set", title="Test scores")
    curves.set(ylabel="validation accuracy (%)", title="Validation accuracy")
    epoch_axis(curves, max(int(max(line.get_xdata())) for line in curves.lines))
    seconds = [results[regime]["train_time_s"] for regime in regimes]
    times.bar_label(times.bar(regimes, seconds, color=["tab:blue", "tab:orange"]), fmt="%.1f")
    times.set(ylabel="seconds", title="Training time: steps, validation, frozen pass")
    scores.legend()
    curves.legend()
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
    """The regime's defaults with the command line's overrides; `lr` is the peak learning rate
    used, `base_lr` the one given (or defaulted) before --lr-scaling."""
    settings = dict(REGIME_DEFAULTS[regime], batch_size=args.batch_size)
    settings.update({k: getattr(args, k) for k in REGIME_DEFAULTS[regime] if getattr(args, k)})
    settings["base_lr"] = settings["lr"]
    settings["lr"] *= lr_scale(args.lr_scaling, args.batch_size * world_size)
    if settings["warmup_epochs"] > settings["epochs"]:
        warmup = f"--warmup-epochs {settings['warmup_epochs']:g}"
        raise UserError(f"{regime}: {warmup} is longer than its {settings['epochs']} epochs")
    return settings


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    return run_main(run, args, explicit_options(parser, argv))


def run(args: argparse.Namespace, explicit: set[str], stop: StopSignal, lock: RunLock) -> int:
    """What each process checks before the process group starts (run to resume, weights, data:
    a download must not outlast NCCL's watchdog), then training. A failing process of several
    prints one line and exits at once (a broken group's cleanup can hang); srun ends the rest."""
    if args.summarize:
        log(f"summary: {summarize_runs(RUN, args.summarize, args.output_dir)}")
        return 0
    offset = apply_array_seed(args)
    args.data_dir = str(Path(args.data_dir).resolve())
    world = launch_from_environment(os.environ)
    if world.rank != 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (rank 0 alone prints)
    device = select_device(args.device)
    run_dir = find_resume_run(RUN, args.resume, args.output_dir)
    if run_dir is not None:
        recorded = read_run_record(run_dir)
        merge_resumed_args(RUN, args, recorded.get("args", {}), explicit)
        processes = recorded.get("distributed", {}).get("world_size", 1)
        if processes != world.size:
            trained = f"{run_dir} was trained by {processes} process(es) and this launch has"
            same = "the global batch, the steps per epoch and the step to continue from"
            raise UserError(f"{trained} {world.size}: resume with {processes}, so that {same} stay")
    elif args.resume == "auto":
        log("resume: no unfinished run found, starting a new run")
    if offset:
        log(f"seed: {args.seed} (--seed + SLURM_ARRAY_TASK_ID {offset})")
    regimes = REGIMES if args.regime == "both" else (args.regime,)
    settings = {regime: regime_settings(args, regime, world.size) for regime in regimes}
    backbone = load_backbone_weights(args.weights, not args.no_download)  # before any run folder
    data = prepare_data(args)
    world, device = init_distributed(world, device, args.dist_timeout)
    try:
        code = train_and_report(args, stop, lock, world, device, data, run_dir, settings, backbone)
    except BaseException as error:
        if world.size == 1:
            raise
        message = str(error)
        if not isinstance(error, (UserError, OutputError)):
            where = f"rank {world.rank} of {world.size} on {socket.gethostname()}"
            died = "Another process of this job has died or hung (its own log says why)"
            resume = "--resume <the run folder this log names> continues it"
            message = f"{where}: stopping after {error_text(error)}. {died}, or this one failed; "
            message += f"the checkpoints written before are intact: {resume}"
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(USAGE_EXIT_CODE if isinstance(error, UserError) else FAILURE_EXIT_CODE)
    if world.size > 1:
        dist.barrier()  # nobody exits while rank 0 still writes
        dist.destroy_process_group()
    return code


def start_run(args, lock, world: World, device, run_dir, settings: dict, record: dict) -> Path:
    """The run folder on every process: run_dir resumed, or a new one (rank 0's) with its
    config.json: `record`, the environment and how the work is spread over the processes."""
    import torchvision

    environment = {**environment_summary(device), "torchvision": torchvision.__version__}
    if device.type == "cuda":
        gpu = torch.cuda.get_device_properties(device)
        environment.update(cuda=torch.version.cuda, compute_capability=f"{gpu.major}.{gpu.minor}")
        environment["gpu_memory_gb"] = round(gpu.total_memory / 2**30, 1)
    log("environment: " + ", ".join(f"{k}={v}" for k, v in environment.items() if v is not None))
    rule, batch = args.lr_scaling, args.batch_size * world.size
    scaled = f"x {lr_scale(rule, batch):.4g} ({rule} of {batch}/{LR_REFERENCE_BATCH})"
    spread = {"world_size": world.size, "launcher": world.launcher, "backend": world.backend}
    spread.update(per_process_batch_size=args.batch_size, global_batch_size=batch, lr_scaling=rule)
    spread["lr_rule"] = "as given, not scaled with the batch" if rule == "none" else scaled
    spread["lr"] = {regime: values["lr"] for regime, values in settings.items()}
    spread["batchnorm"] = "one process: each batch's statistics"
    if world.size > 1:
        spread["batchnorm"] = "SyncBatchNorm: the global batch's statistics"
        if device.type != "cuda":
            spread["batchnorm"] = "per process (no SyncBatchNorm on the CPU); rank 0's statistics"
        shown = ", ".join(f"{key} {value}" for key, value in spread.items())
        log(f"distributed: {world.size} processes; {shown}")
    if world.rank == 0 and run_dir is None:
        record.update(environment=environment, regime_settings=settings, distributed=spread)
        run_dir = new_run(RUN, args.output_dir, record, lock)
    elif world.rank == 0:
        lock.acquire(run_dir)
        removed = remove_stale_temp_files(run_dir)
        log(f"resuming {run_dir}" + (f" ({removed} temporary files removed)" if removed else ""))
    shared = [str(run_dir)]  # rank 0's
    if world.size > 1:
        dist.broadcast_object_list(shared, src=0)
    log(f"run folder: {shared[0]}")
    return Path(shared[0])


def train_and_report(args, stop, lock, world, device, data, run_dir, settings, backbone) -> int:
    """On this process's device: the data moved there, the run folder made (or run_dir
    continued), each regime trained and tested in turn, then the comparison; the exit code."""
    precision = select_precision(device, args.amp)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its kernels
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    data = {split: (x.to(device), labels.to(device)) for split, (x, labels) in data.items()}
    sizes = {split: len(labels) for split, (_, labels) in data.items()}
    record = {"args": vars(args), "data": sizes, "precision": precision.describe()}
    record["autocast_dtype"] = precision.autocast_dtype
    run_dir, results = start_run(args, lock, world, device, run_dir, settings, record), {}
    counts = ", ".join(f"{count:,} {split}" for split, count in sizes.items())
    resized = f"resized to {args.img_size}x{args.img_size} there; {precision.describe()}"
    log(f"data: EMNIST ByClass {counts} images on {device} (uint8, upright), {resized}")
    for regime, values in settings.items():
        folder = run_dir / regime
        outcome, results[regime] = run_regime(
            args, regime, values, data, backbone, precision, world, folder, stop
        )
        if outcome == "done":
            continue
        state = results[regime]
        where = f"epoch {state['epoch'] + 1}, step {state['step_in_epoch']}"
        if outcome == "stopped":
            for line in stop_lines(RUN, stop, run_dir, f" during {regime} ({where})"):
                log(line)
            return stop.exit_code
        # Diverged: one error line (on rank 0's stderr), exit 3.
        last, kept = folder / "last.pt", "no checkpoint was written before it"
        if last.is_file():
            kept = f"the last good checkpoint is {last}"
        diverged = f"the {regime} training loss diverged (NaN/inf or above {DIVERGED_LOSS:g})"
        advice = f"Lower --lr (now {values['lr']:g}) or raise --warmup-epochs; start a new run"
        stream = sys.stderr if world.rank == 0 else sys.stdout
        print(f"error: {diverged} at {where}; {kept}. {advice}", file=stream, flush=True)
        return DIVERGED_EXIT_CODE
    if world.rank == 0 and len(results) > 1:
        write_comparison(run_dir, results)
        accuracy = {r: metric_text("test_accuracy", m["test_accuracy"]) for r, m in results.items()}
        shown = ", ".join(f"{regime} {value}%" for regime, value in accuracy.items())
        log(f"comparison: test accuracy {shown} ({run_dir / 'comparison.md'})")
    if world.rank == 0:  # the run's metrics.json, last: the run is finished
        atomic_write(run_dir / FINISHED_RECORD, results)
    log(f"results: {run_dir}")
    return 0


def run_regime(args, regime, settings, data, backbone, precision, world, folder, stop) -> tuple:
    """Train (or continue) and test one regime: ('done', metrics), or ('stopped' or 'diverged',
    its state); a finished one is only read back. A signal meanwhile is seen at the first step."""
    if (folder / FINISHED_RECORD).is_file():
        log(f"{regime}: already finished, not redone ({folder / FINISHED_RECORD})")
        return "done", json.loads((folder / FINISHED_RECORD).read_text())
    started, device, last = time.perf_counter(), data["train"][1].device, folder / "last.pt"
    if world.rank == 0:
        folder.mkdir(exist_ok=True)
    try:  # first: a damaged checkpoint fails before the slow part
        checkpoint = last.is_file() and torch.load(last, map_location="cpu", weights_only=False)
    except Exception as error:  # truncated, or not a checkpoint at all
        damaged = f"cannot read the checkpoint {last} ({error_text(error)}): it is damaged"
        raise UserError(f"{damaged}; start a new run without --resume") from None
    random.seed(args.seed)
    torch.manual_seed(args.seed)  # the same fc whether or not another regime ran first
    model = build_model(regime, backbone)
    if world.size > 1 and device.type == "cuda" and regime == "partial_unfreeze":
        # layer4 normalises with the whole global batch's statistics, as one process would.
        model.layer4 = nn.SyncBatchNorm.convert_sync_batchnorm(model.layer4)
    layout = torch.channels_last if device.type == "cuda" else torch.preserve_format
    model, caching = model.to(device, memory_format=layout), time.perf_counter()
    splits, first, how = regime_inputs(model, regime, data, args, precision, world)
    seconds = time.perf_counter() - caching if first else 0.0
    log(f"{regime}: {' + '.join(STAGES[: FROZEN_STAGES[regime]])} {how} in {seconds:.1f}s")
    stages = StagesFrom(model, first, args.img_size)
    job = Job(regime, settings, stages, splits, precision, world, folder)
    if checkpoint:
        resume_job(job, checkpoint, last)
    state, early = job.state, job.state["early_stopping"]
    state["feature_time_s"] += seconds
    state["train_time_s"] += seconds
    parts = " + ".join(prefix.rstrip(".") for prefix in TRAINABLE_PREFIXES[regime])
    shown = ", ".join(f"{key} {value:g}" for key, value in settings.items())
    shown += f", patience {args.patience}, {world.size} process(es)"
    log(f"{regime}: {count_trainable(model):,} trainable parameters ({parts}); AdamW, {shown}")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    while state["epoch"] < settings["epochs"] and not early["stopped_early"]:
        outcome = train_regime_epoch(job, args, stop)
        if outcome != "next":
            return outcome, state
    return "done", finish_regime(job, started)


if __name__ == "__main__":
    code = main()
    ignore_stop_signals()
    sys.exit(code)
