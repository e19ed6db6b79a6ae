"""resnet18.py with several processes (torch.distributed DDP, gloo on the CPU).

Two processes on the small EMNIST-layout files and stand-in weights of test_resnet18.py:
`torchrun --standalone --nproc-per-node=2` against one process with the same global batch,
a signal that reaches only one rank, a rank that dies, and the launch detection and sharding
rules on their own. The SLURM-style launches (SLURM_PROCID/SLURM_NTASKS + MASTER_ADDR/PORT, as
`srun` gives them) start the two processes directly, so each one's exit code is seen.

Every process runs one torch thread (the machine is small and shared). The comparisons run with
--no-amp: in float32 the two runs differ only in the order of floating-point sums (DDP averages
two half-batch gradients; the features are computed in two blocks), measured ~1e-8 relative,
so 1e-5 is a tight bound that a mis-weighted uneven batch (~1e-3) would break. With bf16 the
same pair differed by 7e-5 in the test loss, bf16 rounding of the features.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from datasets import make_emnist_split, write_emnist_split  # noqa: E402

import resnet18  # noqa: E402
import run_management  # noqa: E402

TORCHRUN = Path(sys.executable).with_name("torchrun")
TEST_LIMIT = 123  # odd, as are the 335 training and 37 validation images: uneven shards
COMMON_ARGS = [
    "--img-size",
    "32",
    "--epochs",
    "2",
    "--patience",
    "5",
    "--seed",
    "0",
    "--device",
    "cpu",
    "--no-download",
    "--no-amp",
    "--limit-test",
    str(TEST_LIMIT),
    "--dist-timeout",
    "120",
]
GLOBAL_BATCH = 64  # 335 / 64: five full batches and one of 15 rows, split 8 + 7
RELATIVE_TOLERANCE = 1e-5
REGIMES = ("linear_probe", "partial_unfreeze")


# --------------------------------------------------------------------------------------------
# Fixtures and helpers
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict:
    """EMNIST-layout files, stand-in ImageNet weights and the environment of every process."""
    from torchvision.models import resnet18 as torchvision_resnet18

    root = tmp_path_factory.mktemp("ddp")
    raw = root / "data" / "EMNIST" / "raw"
    raw.mkdir(parents=True)
    test_images, test_labels = make_emnist_split(2, 2)
    write_emnist_split(raw, "train", *make_emnist_split(6, 1))
    write_emnist_split(raw, "test", test_images, test_labels)
    checkpoints = root / "torch_home" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.manual_seed(1234)
    torch.save(torchvision_resnet18().state_dict(), checkpoints / "resnet18-f37072fd.pth")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "TORCHELASTIC_"))
        and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(
        TORCH_HOME=str(root / "torch_home"),
        MPLBACKEND="Agg",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    # The stratified --limit-test subset the script takes: the support each class must show.
    keep = resnet18.stratified_sample(test_labels, TEST_LIMIT, torch.Generator().manual_seed(0 + 2))
    support = torch.bincount(test_labels[keep], minlength=62).tolist()
    return {"root": root, "data": root / "data", "env": env, "support": support}


def script_args(workspace: dict, output: Path, *extra: str) -> list[str]:
    return [*COMMON_ARGS, "--data-dir", str(workspace["data"]), "--output-dir", str(output), *extra]


def results_folder(stdout: str) -> Path:
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("results: "), stdout[-2000:]
    return Path(last.removeprefix("results: "))


def stopped_folder(stdout: str) -> Path:
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("stopped: "), stdout[-2000:]
    return Path(last.removeprefix("stopped: "))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def srun_style(workspace: dict, args: list[str], world_size: int = 2) -> list[subprocess.Popen]:
    """The processes as `srun --ntasks=N` starts them: SLURM's task variables, and
    MASTER_ADDR/MASTER_PORT as run_resnet.sbatch exports them."""
    port = str(free_port())
    processes = []
    for rank in range(world_size):
        env = dict(workspace["env"])
        env.update(
            SLURM_PROCID=str(rank),
            SLURM_NTASKS=str(world_size),
            SLURM_LOCALID=str(rank),
            SLURM_STEP_ID="0",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
        )
        processes.append(
            subprocess.Popen(
                [sys.executable, str(REPO / "resnet18.py"), *args],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return processes


def wait_for_line(process: subprocess.Popen, needle: str, timeout: float = 120) -> list[str]:
    """Read the process's stdout until a line contains `needle`; the lines read."""
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if needle in line:
            return lines
    pytest.fail(f"{needle!r} never appeared:\n{''.join(lines)}\n{process.stderr.read()[-3000:]}")


def finish(processes: list[subprocess.Popen], timeout: float = 180) -> list[tuple[int, str, str]]:
    outcomes = []
    for process in processes:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for other in processes:
                other.kill()
            pytest.fail("a process of the distributed job hung")
        outcomes.append((process.returncode, stdout, stderr))
    return outcomes


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def metrics_of(folder: Path, regime: str) -> dict:
    return json.loads((folder / regime / "metrics.json").read_text())


def close(a: float, b: float, tolerance: float = RELATIVE_TOLERANCE) -> bool:
    return math.isclose(a, b, rel_tol=tolerance, abs_tol=tolerance)


@pytest.fixture(scope="module")
def paired_runs(workspace) -> dict:
    """`--regime both` twice: one process with batch 64, and torchrun's two with 32 each."""
    root = workspace["root"]
    single = subprocess.run(
        [
            sys.executable,
            str(REPO / "resnet18.py"),
            *script_args(workspace, root / "single", "--batch-size", str(GLOBAL_BATCH)),
        ],
        env=workspace["env"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    started = time.monotonic()
    ddp = subprocess.run(
        [
            str(TORCHRUN),
            "--standalone",
            "--nproc-per-node=2",
            str(REPO / "resnet18.py"),
            *script_args(workspace, root / "ddp", "--batch-size", str(GLOBAL_BATCH // 2)),
        ],
        env=workspace["env"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    print(f"\ntorchrun, 2 processes, both regimes: {time.monotonic() - started:.1f} s")
    assert ddp.returncode == 0, ddp.stdout[-3000:] + ddp.stderr[-3000:]
    return {
        "single": results_folder(single.stdout),
        "ddp": results_folder(ddp.stdout),
        "ddp_stdout": ddp.stdout,
        "ddp_root": root / "ddp",
    }


# --------------------------------------------------------------------------------------------
# Launch detection and sharding rules
# --------------------------------------------------------------------------------------------

MASTER = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, resnet18.World()),
        (  # a batch script before any srun: SLURM variables alone are not a launch
            {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0"},
            resnet18.World(),
        ),
        (
            {
                "SLURM_PROCID": "3",
                "SLURM_NTASKS": "4",
                "SLURM_LOCALID": "1",
                "SLURM_STEP_ID": "0",
                **MASTER,
            },
            resnet18.World(3, 4, 1, "srun"),
        ),
        (
            {
                "RANK": "1",
                "WORLD_SIZE": "2",
                "LOCAL_RANK": "1",
                "TORCHELASTIC_RUN_ID": "x",
                **MASTER,
            },
            resnet18.World(1, 2, 1, "torchrun"),
        ),
        (  # torchrun inside an srun task: torchrun's variables win over the task's
            {
                "RANK": "5",
                "WORLD_SIZE": "8",
                "LOCAL_RANK": "1",
                "TORCHELASTIC_RUN_ID": "x",
                "SLURM_PROCID": "1",
                "SLURM_NTASKS": "2",
                "SLURM_LOCALID": "0",
                **MASTER,
            },
            resnet18.World(5, 8, 1, "torchrun"),
        ),
        ({"RANK": "0", "WORLD_SIZE": "1"}, resnet18.World(0, 1, 0, "env")),
    ],
)
def test_launch_from_environment(env, expected):
    assert resnet18.launch_from_environment(env) == expected


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RANK": "1", "WORLD_SIZE": "2"}, "MASTER_ADDR/MASTER_PORT"),
        ({"RANK": "x", "WORLD_SIZE": "2", **MASTER}, "RANK='x' is not an integer"),
        ({"RANK": "2", "WORLD_SIZE": "2", **MASTER}, "rank 2"),
        (
            {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "n1", "MASTER_PORT": "http"},
            "MASTER_PORT='http' is not a port number",
        ),
        (
            {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "n1", "MASTER_PORT": "70000"},
            "MASTER_PORT='70000' is not a port number",
        ),
    ],
)
def test_launch_from_environment_refuses_inconsistent_variables(env, message):
    with pytest.raises(resnet18.UserError, match=message):
        resnet18.launch_from_environment(env)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_shares_cover_every_row_exactly_once(world_size):
    ranks = [resnet18.World(rank, world_size, rank, "env") for rank in range(world_size)]
    for total in range(12):
        rows = [row for r in ranks for row in range(*resnet18.shard(r, total))]
        assert rows == list(range(total)), (world_size, total)  # contiguous, in rank order
    for size in range(1, 12):
        index = torch.randperm(size)
        parts = [index[r.rank :: r.size] for r in ranks]  # training_step's share of a batch
        assert sorted(torch.cat(parts).tolist()) == sorted(index.tolist())
        assert max(map(len, parts)) - min(map(len, parts)) <= 1 and len(parts[0]) >= 1


def test_lr_scaling_rules():
    assert resnet18.lr_scale("none", 4096) == 1.0
    assert resnet18.lr_scale("linear", 1024) == 2.0
    assert resnet18.lr_scale("sqrt", 2048) == 2.0


# --------------------------------------------------------------------------------------------
# torchrun: two processes against one with the same global batch
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_processes_write_every_output_once(paired_runs, workspace):
    stdout, folder = paired_runs["ddp_stdout"], paired_runs["ddp"]
    # Rank 1 prints nothing: every line of the log is rank 0's, once.
    assert stdout.count("results: ") == 1 and stdout.count("distributed: 2 processes") == 1
    for regime in REGIMES:
        for epoch in (1, 2):
            assert stdout.count(f"{regime} epoch {epoch}/2 ") == 1
    assert list(paired_runs["ddp_root"].iterdir()) == [folder]
    leftovers = [p for p in folder.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]
    assert not leftovers
    for name in ("config.json", "comparison.md", "comparison.json", "comparison.png"):
        assert (folder / name).is_file(), name
    config = json.loads((folder / "config.json").read_text())
    parallel = config["distributed"]
    assert parallel["world_size"] == 2 and parallel["backend"] == "gloo"
    assert parallel["launcher"] == "torchrun"
    assert parallel["per_process_batch_size"] == 32 and parallel["global_batch_size"] == 64
    assert parallel["lr_scaling"] == "none" and "not scaled" in parallel["lr_rule"]
    assert parallel["lr"] == {"linear_probe": 0.01, "partial_unfreeze": 5e-4}
    for regime in REGIMES:
        for name in ("history.csv", "per_class.csv", "most_confused.csv", "best.pt", "last.pt"):
            assert (folder / regime / name).is_file(), f"{regime}/{name}"
        metrics = metrics_of(folder, regime)
        assert metrics["world_size"] == 2 and metrics["global_batch_size"] == 64
        # Exact over the whole split: every test image counted once, none twice.
        assert metrics["test_images"] == TEST_LIMIT
        assert metrics["val_images"] == 37 and metrics["train_images"] == 335
        per_class = read_rows(folder / regime / "per_class.csv")
        assert [int(row["support"]) for row in per_class] == workspace["support"]
        assert len(read_rows(folder / regime / "history.csv")) == metrics["epochs_run"] == 2


@pytest.mark.slow
def test_linear_probe_matches_one_process_with_the_same_global_batch(paired_runs):
    single, ddp = (metrics_of(paired_runs[k], "linear_probe") for k in ("single", "ddp"))
    for key in ("test_accuracy", "top5_accuracy", "balanced_accuracy", "macro_f1", "weighted_f1"):
        assert single[key] == ddp[key], key  # the same predictions, image for image
    for key in ("best_epoch", "epochs_run", "stopped_early", "test_images"):
        assert single[key] == ddp[key], key
    assert close(single["test_loss"], ddp["test_loss"]), (single["test_loss"], ddp["test_loss"])
    single_rows, ddp_rows = (
        read_rows(paired_runs[k] / "linear_probe" / "history.csv") for k in ("single", "ddp")
    )
    for one, two in zip(single_rows, ddp_rows, strict=True):
        for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr"):
            assert close(float(one[key]), float(two[key])), (key, one[key], two[key])


@pytest.mark.slow
def test_partial_unfreeze_follows_the_same_schedule_on_the_same_data(paired_runs):
    """On the CPU, PyTorch's SyncBatchNorm is unavailable, so layer4's BatchNorm normalises each
    process's half-batch, not the global batch: the trajectories differ by design (on CUDA
    SyncBatchNorm makes them match). What must still be identical is checked exactly."""
    single, ddp = (metrics_of(paired_runs[k], "partial_unfreeze") for k in ("single", "ddp"))
    for key in ("trainable_params", "epochs_run", "test_images", "train_images", "val_images"):
        assert single[key] == ddp[key], key
    single_rows, ddp_rows = (
        read_rows(paired_runs[k] / "partial_unfreeze" / "history.csv") for k in ("single", "ddp")
    )
    assert [r["lr"] for r in single_rows] == [r["lr"] for r in ddp_rows]
    # The first epoch starts from the same weights on the same batches: close, not equal
    # (measured 0.4% apart).
    first = float(single_rows[0]["train_loss"]), float(ddp_rows[0]["train_loss"])
    assert close(*first, tolerance=0.02), first
    assert all(math.isfinite(ddp[k]) for k in ("test_loss", "test_accuracy"))


# --------------------------------------------------------------------------------------------
# Signals and failures (srun-style launches: each process's exit code is visible)
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_signal_to_one_rank_stops_all_then_resume_matches(paired_runs, workspace):
    output = workspace["root"] / "signalled"
    args = script_args(
        workspace, output, "--batch-size", "32", "--regime", "partial_unfreeze", "--resume", "auto"
    )
    processes = srun_style(workspace, args)
    # Rank 1 alone gets SIGUSR1 as soon as training starts (what a node-local signal does).
    lines = wait_for_line(processes[0], "partial_unfreeze: 8,425,534 trainable")
    processes[1].send_signal(signal.SIGUSR1)
    outcomes = finish(processes)
    stdout = "".join(lines) + outcomes[0][1]
    assert [code for code, _, _ in outcomes] == [75, 75], outcomes
    assert "stopped by a signal to another process of this job during partial_unfreeze" in stdout
    assert outcomes[1][1] == ""  # rank 1 prints nothing
    folder = stopped_folder(stdout)
    assert (folder / "partial_unfreeze" / "last.pt").is_file()
    assert not (folder / "partial_unfreeze" / "metrics.json").exists()
    stopped = torch.load(folder / "partial_unfreeze" / "last.pt", weights_only=True)["state"]
    assert stopped["epoch"] < 2, "the signal came too late to interrupt the training"

    resumed = finish(srun_style(workspace, args))
    assert [code for code, _, _ in resumed] == [0, 0], resumed
    assert f"resuming {folder}" in resumed[0][1] and results_folder(resumed[0][1]) == folder
    # Resuming two processes from the checkpoint gives what the uninterrupted pair gave.
    got = metrics_of(folder, "partial_unfreeze")
    want = metrics_of(paired_runs["ddp"], "partial_unfreeze")
    for key in ("test_accuracy", "test_loss", "macro_f1", "best_epoch", "test_images"):
        assert got[key] == want[key], key
    columns = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr")
    got_rows = read_rows(folder / "partial_unfreeze" / "history.csv")
    want_rows = read_rows(paired_runs["ddp"] / "partial_unfreeze" / "history.csv")
    assert [[r[c] for c in columns] for r in got_rows] == [
        [r[c] for c in columns] for r in want_rows
    ]


@pytest.mark.slow
def test_resume_with_another_number_of_processes_is_refused(paired_runs, workspace, tmp_path):
    unfinished = tmp_path / paired_runs["ddp"].name
    shutil.copytree(paired_runs["ddp"], unfinished)
    (unfinished / "metrics.json").unlink()
    result = subprocess.run(
        [sys.executable, str(REPO / "resnet18.py"), "--resume", str(unfinished)],
        env=workspace["env"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "was trained by 2 process(es) and this launch has 1" in result.stderr


@pytest.mark.slow
def test_a_rank_that_dies_takes_the_job_down_with_a_clear_error(workspace):
    output = workspace["root"] / "killed"
    args = script_args(
        workspace, output, "--batch-size", "32", "--regime", "partial_unfreeze", "--epochs", "50"
    )
    processes = srun_style(workspace, args)
    wait_for_line(processes[0], "partial_unfreeze: 8,425,534 trainable")
    time.sleep(1)
    processes[1].kill()  # SIGKILL: no handler, no goodbye
    killed_at = time.monotonic()
    code, _, stderr = finish(processes[:1], timeout=100)[0]
    waited = time.monotonic() - killed_at
    print(f"\nrank 0 stopped {waited:.1f} s after rank 1 was killed")
    assert code == run_management.FAILURE_EXIT_CODE, stderr[-3000:]
    assert stderr.startswith("error: rank 0 of 2") and stderr.count("\n") == 1, stderr
    assert "Another process of this job has died or hung" in stderr
    assert "--resume <the run folder this log names> continues it" in stderr
    assert waited < 60  # not the --dist-timeout of 120 s, let alone a job's time limit
    processes[1].wait()


@pytest.mark.slow
def test_bad_input_stops_every_rank_with_the_same_line(workspace, tmp_path):
    """Every process checks the command line, the run to resume, the weights and the data
    itself, before the process group exists: each says what is wrong and exits 2."""
    missing = tmp_path / "no_such_run"
    processes = srun_style(workspace, script_args(workspace, tmp_path, "--resume", str(missing)))
    outcomes = finish(processes, timeout=120)
    for code, _, stderr in outcomes:
        assert code == 2 and stderr.startswith(f"error: --resume {missing}: no run folder")
        assert stderr.count("\n") == 1 and stderr == outcomes[0][2]
