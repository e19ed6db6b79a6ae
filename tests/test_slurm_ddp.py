"""run_resnet.sbatch with several processes (DDP, gloo on the CPU) on the two-node test cluster.

The cluster, the throw-away checkout and the helpers come from test_slurm.py
(tests/slurm_cluster.sh; skipped with the reason when SLURM or root is missing). Each node has 4
fake GPUs, so every launch form of run_resnet.sbatch runs here, unmodified, with
CONTAINER=none and --device cpu (the fake GPUs only shape the allocation):
  sbatch --ntasks-per-node=2 --gpus-per-node=2   srun starts 2 processes (one GPU per task)
  sbatch --gpus-per-node=2                        srun starts torchrun, which starts 2
  sbatch --nodes=2                                a torchrun on each node, 1 process each
  sbatch --nodes=2 --gpus-per-node=2              a torchrun on each node, 2 processes each
all with the same global batch (64) as the one-process default they are compared with.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest
from datasets import write_emnist, write_standin_weights
from test_resnet18 import REGIME_FILES, RUN_FILES
from test_slurm import (  # noqa: F401 (cluster is a fixture)
    cluster,
    last_line,
    needs_slurm,
    read_json,
    read_rows,
    run_folder,
)

TEST_LIMIT = 123  # odd: the processes' test shares are uneven
REGIMES = ("linear_probe", "partial_unfreeze")
EPOCHS = 3
# Launch forms: (sbatch options, --batch-size per process, processes), 64 images per step in all.
FORMS = {
    "single": ((), 64, 1),
    "srun": (("--ntasks-per-node=2", "--gpus-per-node=2"), 32, 2),
    "torchrun": (("--gpus-per-node=2",), 32, 2),
    "2x1": (("--nodes=2",), 32, 2),
    "2x2": (("--nodes=2", "--gpus-per-node=2"), 16, 4),
}


def job_args(data_dir: Path, batch_size: int, *extra: str) -> list:
    return [
        "--data-dir",
        data_dir,
        "--img-size",
        "32",
        "--epochs",
        EPOCHS,
        "--patience",
        "5",
        "--device",
        "cpu",
        "--no-amp",
        "--limit-test",
        TEST_LIMIT,
        "--batch-size",
        batch_size,
        *extra,
    ]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("slurm_ddp")
    write_standin_weights(root / "torch_home")
    return {"data": write_emnist(root / "data"), "torch_home": root / "torch_home"}


def submit(cluster, inputs, options, args, **variables) -> str:  # noqa: F811
    """One OpenMP thread in every process: torchrun defaults its workers to 1 while srun's
    tasks would take all their CPUs, and a different thread count changes the order of
    floating-point sums, so the forms would not be bit-identical."""
    return cluster.submit(
        "run_resnet.sbatch",
        args,
        options=options,
        TORCH_HOME=inputs["torch_home"],
        OMP_NUM_THREADS="1",
        **variables,
    )


@pytest.fixture(scope="module")
def jobs(cluster, inputs) -> dict:  # noqa: F811
    """Every form at once, plus a two-node job that is sent USR1 once it has a checkpoint."""
    submitted = {
        name: submit(cluster, inputs, options, job_args(inputs["data"], batch))
        for name, (options, batch, _) in FORMS.items()
    }
    signalled = submit(cluster, inputs, ("--nodes=2",), job_args(inputs["data"], 32))
    cluster.wait_for_file(signalled, f"results/resnet_*_{signalled}/linear_probe/last.pt")
    cluster.signal_usr1(signalled)
    submitted["2x1 signalled"] = signalled
    started = time.monotonic()
    infos = {name: cluster.wait(job_id) for name, job_id in submitted.items()}
    print(f"\n{len(submitted)} ResNet jobs: {time.monotonic() - started:.0f} s")
    return {"ids": submitted, "infos": infos}


def completed_folder(cluster, jobs, name: str) -> Path:  # noqa: F811
    job_id, info = jobs["ids"][name], jobs["infos"][name]
    assert info["JobState"] == "COMPLETED", cluster.logs(job_id)
    assert info["ExitCode"] == "0:0", cluster.logs(job_id)
    return run_folder(cluster, "resnet", job_id)


@needs_slurm
@pytest.mark.parametrize("form", list(FORMS))
def test_job_completes_with_every_output_once(cluster, jobs, form):  # noqa: F811
    options, batch, processes = FORMS[form]
    job_id = jobs["ids"][form]
    folder = completed_folder(cluster, jobs, form)
    info = jobs["infos"][form]
    assert info["Restarts"] == "0"
    nodes = 2 if "--nodes=2" in options else 1
    assert info["NumNodes"] == str(nodes)
    out_log, err_log = cluster.log_paths("resnet", job_id)
    out = out_log.read_text()
    if form == "srun":
        assert "distributed: srun starts 2 processes (one per task) on 1 node(s)" in out
        assert "running: srun --kill-on-bad-exit=1 --ntasks=2 python resnet18.py" in out
    elif form != "single":
        per_node = processes // nodes
        assert (
            f"distributed: srun starts torchrun on each of {nodes} node(s), {per_node} processes"
            f" each ({processes} in all)" in out
        )
        assert f"--nnodes={nodes} --nproc-per-node={per_node} --rdzv-backend=c10d" in out
        assert "--max-restarts=0" in out
    # Every output once: one run folder, written by rank 0 alone, and rank 0's lines only.
    assert out.splitlines().count(f"results: {folder}") == 1
    assert last_line(out).endswith(f"finished (exit 0) === results: {folder}")
    for name in RUN_FILES:
        assert (folder / name).stat().st_size > 0, name
    config = read_json(folder / "config.json")
    if processes > 1:
        assert config["distributed"]["world_size"] == processes
        assert config["distributed"]["launcher"] == ("srun" if form == "srun" else "torchrun")
    for regime in REGIMES:
        for name in REGIME_FILES:
            assert (folder / regime / name).stat().st_size > 0, f"{regime}/{name}"
        metrics = read_json(folder / regime / "metrics.json")
        assert metrics["test_images"] == TEST_LIMIT and metrics["epochs_run"] == EPOCHS
        assert metrics.get("world_size", 1) == processes
        support = sum(int(row["support"]) for row in read_rows(folder / regime / "per_class.csv"))
        assert support == TEST_LIMIT
        assert out.count(f"{regime} epoch {EPOCHS}/{EPOCHS} ") == 1
    assert "Traceback" not in err_log.read_text()


@needs_slurm
def test_forms_agree_and_match_one_process(cluster, jobs):  # noqa: F811
    folders = {name: completed_folder(cluster, jobs, name) for name in FORMS}
    for regime in REGIMES:
        srun, torchrun = (
            read_json(folders[k] / regime / "metrics.json") for k in ("srun", "torchrun")
        )
        for key in ("test_accuracy", "test_loss", "macro_f1", "best_epoch", "test_images"):
            assert srun[key] == torchrun[key], (regime, key)  # the same computation, bit for bit
    # The linear probe against one process with the same global batch: float32 on both sides,
    # so only the order of sums differs (tests/test_resnet18_ddp.py explains the 1e-5). Two
    # nodes change nothing in that: the same shares, the same all-reduce.
    single = read_json(folders["single"] / "linear_probe" / "metrics.json")
    for form in ("srun", "2x1", "2x2"):
        ddp = read_json(folders[form] / "linear_probe" / "metrics.json")
        assert single["test_images"] == ddp["test_images"] == TEST_LIMIT
        assert single["test_accuracy"] == ddp["test_accuracy"], form
        assert single["macro_f1"] == ddp["macro_f1"], form
        assert abs(single["test_loss"] - ddp["test_loss"]) <= 1e-5 * single["test_loss"], form


@needs_slurm
def test_two_node_job_signalled_requeues_resumes_on_both_nodes_same_metrics(cluster, jobs):  # noqa: F811
    """The time-limit path (the USR1 that --signal=B:USR1@... sends the batch shell), sent by
    hand once the first checkpoint exists: the wrapper forwards it to srun, srun to both
    nodes' torchrun, torchrun to the workers; they checkpoint and exit 75, torchrun exits 1
    (or is ended by srun), and the wrapper, seeing a checkpoint newer than the signal,
    requeues the job, which resumes on two nodes again and ends with the uninterrupted
    two-node run's numbers."""
    name = "2x1 signalled"
    job_id = jobs["ids"][name]
    folder = completed_folder(cluster, jobs, name)
    logs = cluster.logs(job_id)
    assert jobs["infos"][name]["Restarts"] == "1", f"ended before the signal reached it?\n{logs}"
    assert jobs["infos"][name]["NumNodes"] == "2"
    out = cluster.log_paths("resnet", job_id)[0].read_text()
    assert out.count("received SIGUSR1: forwarding it") == 1
    # The first torchrun to see its worker's 75 exits 1; srun then ends the other one (143).
    assert re.search(r"torchrun exited (1|143) after the signal and a checkpoint was written", out)
    assert out.count(f"requeueing job {job_id}") == 1 and "start 2 (SLURM_RESTART_COUNT=1)" in out
    assert out.count("distributed: srun starts torchrun on each of 2 node(s), 1 processes") == 2
    assert out.count(f"stopped: {folder}") == 1
    assert last_line(out).endswith(f"finished (exit 0) === results: {folder}")
    reference = completed_folder(cluster, jobs, "2x1")
    for regime in REGIMES:
        got = read_json(folder / regime / "metrics.json")
        want = read_json(reference / regime / "metrics.json")
        for key in ("test_accuracy", "test_loss", "macro_f1", "best_epoch", "epochs_run"):
            assert got[key] == want[key], (regime, key)
        columns = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr")
        got_rows, want_rows = (read_rows(f / regime / "history.csv") for f in (folder, reference))
        assert [[r[c] for c in columns] for r in got_rows] == [
            [r[c] for c in columns] for r in want_rows
        ]


def torchrun_processes(job_id: str, node: str) -> list[int]:
    """The PIDs of the job's torchrun on one node (its step's processes running
    torch.distributed.run)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            command = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        variables = dict(item.split(b"=", 1) for item in environ if b"=" in item)
        if (
            variables.get(b"SLURM_JOB_ID") == job_id.encode()
            and variables.get(b"SLURMD_NODENAME") == node.encode()
            and b"SLURM_STEP_ID" in variables
            and b"torch.distributed.run" in command
        ):
            found.append(int(entry.name))
    return found


@needs_slurm
def test_node_that_dies_ends_the_job_with_a_clear_error(cluster, inputs):  # noqa: F811
    """The second node's torchrun killed (SIGKILL) once training runs: its worker dies with it
    (--pdeathsig), the first node's worker fails its next collective, and srun ends the job
    within seconds, failed, with the node named in the log -- not a hang until the limit."""
    args = job_args(inputs["data"], 32, "--regime", "partial_unfreeze")
    args[args.index("--epochs") + 1] = "30"
    job_id = submit(cluster, inputs, ("--nodes=2", "--time=10"), args)
    cluster.wait_for_file(job_id, f"results/resnet_*_{job_id}/partial_unfreeze/last.pt")
    batch_host = cluster.job(job_id)["BatchHost"]
    [other] = [node for node in cluster.nodes if node != batch_host]
    [torchrun] = torchrun_processes(job_id, other)
    os.kill(torchrun, signal.SIGKILL)
    info = cluster.wait(job_id, timeout=300)
    out_log, err_log = cluster.log_paths("resnet", job_id)
    out, err = out_log.read_text(), err_log.read_text()
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", cluster.logs(job_id)
    assert f"error: {other}: task 1: Killed" in err
    assert "resnet18.py FAILED with exit code" in err and "not requeued" in err
    assert "its node died, and srun ended the others" in err
    assert "finished (exit 0)" not in out and "requeueing" not in out
    history = read_rows(run_folder(cluster, "resnet", job_id) / "partial_unfreeze" / "history.csv")
    assert len(history) < 30  # ended mid-run, not after training on without the node
