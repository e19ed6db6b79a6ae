"""run_resnet.sbatch with several processes (DDP, gloo on the CPU) on the single-node test cluster.

The cluster, the throw-away checkout and the data come from test_slurm.py (tests/slurm_cluster.sh;
skipped with the reason when SLURM or root is missing). The node has 4 fake GPUs, so both forms
of run_resnet.sbatch's launch run here: `sbatch --ntasks=2` (srun starts the two processes) and
`sbatch --gpus-per-node=2` (srun starts torchrun, which starts two). The script runs with
--device cpu: the fake GPUs only shape the allocation.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from datasets import write_emnist, write_standin_weights
from test_slurm import (  # noqa: F401 (cluster is a fixture)
    cluster,
    needs_slurm,
    read_json,
    read_rows,
    run_folder,
)

TEST_LIMIT = 123  # odd: the two ranks' test shares are uneven
REGIMES = ("linear_probe", "partial_unfreeze")


def job_args(data_dir: Path, *extra: str) -> list:
    return [
        "--data-dir",
        data_dir,
        "--img-size",
        "32",
        "--epochs",
        "2",
        "--patience",
        "5",
        "--device",
        "cpu",
        "--no-amp",
        "--limit-test",
        TEST_LIMIT,
        *extra,
    ]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("slurm_ddp")
    write_standin_weights(root / "torch_home")
    return {"data": write_emnist(root / "data"), "torch_home": root / "torch_home"}


@pytest.fixture(scope="module")
def jobs(cluster, inputs) -> dict:  # noqa: F811
    """Three jobs at once: srun with 2 tasks, torchrun on 2 (fake) GPUs, and the one-process
    default with the same global batch (64). One OpenMP thread in every process: torchrun
    defaults its workers to 1 while srun's tasks would take all their CPUs, and a different
    thread count changes the order of floating-point sums, so the forms would not be
    bit-identical."""
    threads = {"OMP_NUM_THREADS": "1"}
    submitted = {
        "srun": cluster.submit(
            "run_resnet.sbatch",
            job_args(inputs["data"], "--batch-size", "32"),
            options=("--ntasks=2",),
            TORCH_HOME=inputs["torch_home"],
            **threads,
        ),
        "torchrun": cluster.submit(
            "run_resnet.sbatch",
            job_args(inputs["data"], "--batch-size", "32"),
            options=("--gpus-per-node=2",),
            TORCH_HOME=inputs["torch_home"],
            **threads,
        ),
        "single": cluster.submit(
            "run_resnet.sbatch",
            job_args(inputs["data"], "--batch-size", "64"),
            TORCH_HOME=inputs["torch_home"],
            **threads,
        ),
    }
    started = time.monotonic()
    infos = {name: cluster.wait(job_id) for name, job_id in submitted.items()}
    print(f"\nthree ResNet jobs (2 + 2 + 1 processes): {time.monotonic() - started:.0f} s")
    return {"ids": submitted, "infos": infos}


@needs_slurm
@pytest.mark.parametrize("form", ["srun", "torchrun"])
def test_two_process_job_completes_with_every_output_once(cluster, jobs, form):  # noqa: F811
    job_id, info = jobs["ids"][form], jobs["infos"][form]
    assert info["JobState"] == "COMPLETED", cluster.logs(job_id)
    assert info["ExitCode"] == "0:0" and info["Restarts"] == "0"
    out_log, err_log = cluster.log_paths("resnet", job_id)
    out = out_log.read_text()
    if form == "srun":
        assert "distributed: srun starts 2 processes (one per task) on 1 node(s)" in out
        assert "running: srun --kill-on-bad-exit=1 --ntasks=2 python resnet18.py" in out
    else:
        assert "distributed: srun starts torchrun on each of 1 node(s), 2 processes each" in out
        assert "--nproc-per-node=2 --rdzv-backend=c10d" in out and "--max-restarts=0" in out
    assert f"distributed: 2 processes ({form}, gloo); batch 32 per process = 64 global" in out
    folder = run_folder(cluster, "resnet", job_id)
    assert out.count("results: ") == 1 and f"results: {folder}" in out
    config = read_json(folder / "config.json")
    assert config["distributed"]["world_size"] == 2
    assert config["distributed"]["launcher"] == form
    for regime in REGIMES:
        metrics = read_json(folder / regime / "metrics.json")
        assert metrics["test_images"] == TEST_LIMIT and metrics["world_size"] == 2
        support = sum(int(row["support"]) for row in read_rows(folder / regime / "per_class.csv"))
        assert support == TEST_LIMIT
        assert out.count(f"{regime} epoch 2/2 ") == 1
    assert "Traceback" not in err_log.read_text()


@needs_slurm
def test_both_forms_agree_and_match_one_process(cluster, jobs):  # noqa: F811
    folders = {}
    for name in ("srun", "torchrun", "single"):
        assert jobs["infos"][name]["JobState"] == "COMPLETED", cluster.logs(jobs["ids"][name])
        folders[name] = run_folder(cluster, "resnet", jobs["ids"][name])
    for regime in REGIMES:
        srun, torchrun = (
            read_json(folders[k] / regime / "metrics.json") for k in ("srun", "torchrun")
        )
        for key in ("test_accuracy", "test_loss", "macro_f1", "best_epoch", "test_images"):
            assert srun[key] == torchrun[key], (regime, key)  # the same computation, bit for bit
    # The linear probe against one process with the same global batch: float32 on both sides,
    # so only the order of sums differs (tests/test_resnet18_ddp.py explains the 1e-5).
    single = read_json(folders["single"] / "linear_probe" / "metrics.json")
    ddp = read_json(folders["srun"] / "linear_probe" / "metrics.json")
    assert single["test_images"] == ddp["test_images"] == TEST_LIMIT
    assert single["test_accuracy"] == ddp["test_accuracy"]
    assert single["macro_f1"] == ddp["macro_f1"]
    assert abs(single["test_loss"] - ddp["test_loss"]) <= 1e-5 * single["test_loss"]


@needs_slurm
def test_torchrun_job_signalled_checkpoints_requeues_and_resumes(cluster, inputs, jobs):  # noqa: F811
    """The time-limit path (the USR1 that --signal=B:USR1@... sends the batch shell), sent by
    hand once training runs: the wrapper forwards it to srun, srun to torchrun, torchrun to
    both workers; they checkpoint and exit 75, torchrun exits 1, and the wrapper, seeing a
    checkpoint newer than the signal, requeues the job, which resumes and finishes."""
    args = job_args(inputs["data"], "--batch-size", "32", "--regime", "partial_unfreeze")
    args[args.index("--epochs") + 1] = "10"
    job_id = cluster.submit(
        "run_resnet.sbatch",
        args,
        options=("--gpus-per-node=2",),
        TORCH_HOME=inputs["torch_home"],
        MAX_REQUEUES=2,
    )
    out_log, _ = cluster.log_paths("resnet", job_id)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if out_log.is_file() and "partial_unfreeze epoch 1/10" in out_log.read_text():
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"training never started:\n{cluster.logs(job_id)}")
    subprocess.run(
        ["scancel", "--batch", "--signal=USR1", str(job_id)], env=cluster.env, check=True
    )
    info = cluster.wait(job_id)
    logs = cluster.logs(job_id)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", logs
    out = out_log.read_text()
    assert "received SIGUSR1: forwarding it" in out
    assert "stopped by SIGUSR1 during partial_unfreeze" in out
    assert "torchrun exited 1 after the signal and a checkpoint was written since" in out
    assert f"requeueing job {job_id}" in out and "start 2 (SLURM_RESTART_COUNT=1)" in out
    assert "partial_unfreeze: resumed " in out and "finished (exit 0)" in out
    folder = run_folder(cluster, "resnet", job_id)
    metrics = json.loads((folder / "partial_unfreeze" / "metrics.json").read_text())
    assert metrics["epochs_run"] == 10 and metrics["test_images"] == TEST_LIMIT
    rows = read_rows(folder / "partial_unfreeze" / "history.csv")
    assert [int(float(row["epoch"])) for row in rows] == list(range(1, 11))
