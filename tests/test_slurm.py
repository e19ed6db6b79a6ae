"""run_cnn.sbatch and run_resnet.sbatch: on a real two-node SLURM cluster, outside SLURM, and
their lint.

The cluster (tests/slurm_cluster.sh: two slurmd on this machine, nodes named after this host and
`localhost`) is started once for this module from Debian's slurmctld, slurmd and slurm-client
packages; without them (or without root) those tests are skipped with the reason. Each job is
submitted with plain `sbatch` from a copy of the repository (a throw-away git checkout sharing
this .venv), as a user would, so logs land in its logs/ and results in its results/. Jobs are
watched by polling scontrol/squeue (faster than `sbatch --wait`).

The CNN trains on a small MNIST written here (the four raw IDX files, 600 + 200 images in which
each digit lights its own block): an epoch is a fraction of a second, and what is tested is the
wrapper, not MNIST. Nothing depends on the machine's speed: the time-limit signal is sent by hand
(`scancel --batch --signal=USR1`, which is what `--signal=B:USR1@<lead>` makes SLURM do) once the
run has written its first checkpoint, into a run that has dozens of epochs left.

Markers: `slurm` and `slow` for the cluster, `slow` for anything that starts Python through a
wrapper; the rest (headers, shellcheck, the container definition, the launch shapes, signals
during the wrapper's own start-up) takes seconds.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from datasets import write_idx
from test_cnn_training import OUTPUT_FILES as CNN_OUTPUTS

REPO = Path(__file__).resolve().parents[1]
CLUSTER_SCRIPT = REPO / "tests" / "slurm_cluster.sh"
SLURM_BINARIES = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo")
TERMINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
}
CNN_EPOCHS = 12  # a fraction of a second each: the signal after the first lands far from the end
JOB_TIMEOUT_S = 900  # generous: the CPU may be shared; a quiet machine needs a fraction of it
NO_ARRAY_INDEX = "4294967294"  # what SLURM writes for %a in a job that is not an array


def slurm_skip_reason() -> str | None:
    missing = [name for name in SLURM_BINARIES if shutil.which(name) is None]
    if missing:
        return (
            f"SLURM is not installed ({', '.join(missing)} missing): "
            "apt-get install slurmctld slurmd slurm-client (as .ci/run does)"
        )
    if os.geteuid() != 0:
        return "the test cluster needs root (slurmd launches the jobs; mknod makes the fake GPUs)"
    if sys.prefix == sys.base_prefix:
        return "run the tests from the project's venv (.venv/bin/python -m pytest)"
    return None


needs_slurm = pytest.mark.skipif(slurm_skip_reason() is not None, reason=str(slurm_skip_reason()))


# --------------------------------------------------------------------------------------------
# Fixtures: a copy of the repository, a small MNIST, the cluster
# --------------------------------------------------------------------------------------------


def make_checkout(destination: Path) -> Path:
    """The working tree's files (tracked and untracked, not ignored) as a fresh one-commit git
    checkout, sharing this test run's venv through a .venv symlink."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    (destination / "logs").mkdir(exist_ok=True)
    (destination / ".venv").symlink_to(Path(sys.prefix))
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid"]
    git += ["-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q"], cwd=destination, check=True)
    subprocess.run(["git", "add", "-A"], cwd=destination, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "test checkout"], cwd=destination, check=True)
    return destination


def small_digits(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (count, 28, 28) noise in which each of the 10 classes lights its own 6x6 block,
    and int64 labels (count,): learnable in a few epochs."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (count,), generator=generator)
    images = torch.randint(0, 60, (count, 28, 28), generator=generator)
    for index, label in enumerate(labels.tolist()):
        top = 2 + 8 * (label // 4)
        left = 2 + 6 * (label % 4)
        images[index, top : top + 6, left : left + 6] += 180
    return images.clamp(max=255).to(torch.uint8), labels


@pytest.fixture(scope="module")
def mnist(tmp_path_factory) -> Path:
    """A data folder holding MNIST/raw/ with 600 training and 200 test images."""
    data_dir = tmp_path_factory.mktemp("small_mnist")
    raw = data_dir / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split, count, seed in (("train", 600, 1), ("t10k", 200, 2)):
        images, labels = small_digits(count, seed)
        write_idx(raw / f"{split}-images-idx3-ubyte", images)
        write_idx(raw / f"{split}-labels-idx1-ubyte", labels)
    return data_dir


class Cluster:
    def __init__(self, folder: Path, checkout: Path, env: dict):
        self.folder = folder
        self.checkout = checkout
        self.env = env
        self.nodes = (folder / "cluster" / "nodes").read_text().split()

    def run(self, *command: str, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(
            command, env=self.env, capture_output=True, text=True, timeout=60, **kwargs
        )

    def submit(self, script: str, args=(), options=(), **variables) -> str:
        """`sbatch [options] script [args]` from the checkout's root; returns the job id (the
        array job's id for an array)."""
        env = {**self.env, **{k: str(v) for k, v in variables.items()}}
        result = subprocess.run(
            ["sbatch", "--parsable", *options, script, *map(str, args)],
            cwd=self.checkout,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, f"sbatch failed: {result.stderr}"
        return result.stdout.strip().split(";")[0]

    def job(self, job: str) -> dict:
        """scontrol's fields of one job or array task ("123" or "123_4")."""
        output = self.run("scontrol", "show", "job", "-o", job).stdout
        return dict(field.split("=", 1) for field in output.split() if "=" in field)

    def queued(self, job: str) -> bool:
        return bool(self.run("squeue", "-h", "-j", job, "-o", "%T").stdout.strip())

    def ended(self, job: str) -> dict | None:
        """The job's fields once it has ended (not merely stopped for a requeue), else None."""
        info = self.job(job)
        if info.get("JobState") in TERMINAL_STATES and not self.queued(job):
            return info
        return None

    def wait(self, job: str, timeout: float = JOB_TIMEOUT_S) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.ended(job)
            if info:
                return info
            time.sleep(0.5)
        self.run("scancel", job.split("_")[0])
        pytest.fail(f"job {job} still running after {timeout} s:\n{self.logs(job)}")

    def wait_for_files(self, patterns: dict[str, str], then, timeout: float = JOB_TIMEOUT_S):
        """then(job) for each job as soon as a file under the checkout matches its glob."""
        pending = dict(patterns)
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            for job, pattern in list(pending.items()):
                if list(self.checkout.glob(pattern)):
                    then(job)
                    del pending[job]
                elif self.ended(job):
                    pytest.fail(f"job {job} ended before writing {pattern}:\n{self.logs(job)}")
            time.sleep(0.1)
        for job, pattern in pending.items():
            pytest.fail(f"job {job} wrote no {pattern} within {timeout} s:\n{self.logs(job)}")

    def wait_for_file(self, job: str, pattern: str) -> None:
        self.wait_for_files({job: pattern}, lambda _: None)

    def signal_usr1(self, job: str) -> None:
        """What `--signal=B:USR1@<lead>` does ahead of the time limit: USR1 to the batch shell."""
        result = self.run("scancel", "--batch", "--signal=USR1", job)
        assert result.returncode == 0, result.stderr

    def log_paths(self, prefix: str, tag: str) -> tuple[Path, Path]:
        """logs/<prefix>_training_<tag>.out/.err: tag is the job id, or <array job>_<task>."""
        logs = self.checkout / "logs"
        return logs / f"{prefix}_training_{tag}.out", logs / f"{prefix}_training_{tag}.err"

    def logs(self, tag: str) -> str:
        texts = []
        for path in sorted((self.checkout / "logs").glob(f"*_training_{tag}.*")):
            texts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-6000:]}")
        return "\n".join(texts) or "(no log files)"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Cluster:
    reason = slurm_skip_reason()
    if reason:
        pytest.skip(reason)
    folder = tmp_path_factory.mktemp("slurm")
    checkout = make_checkout(tmp_path_factory.mktemp("checkout"))
    started = time.monotonic()
    result = subprocess.run(
        ["bash", str(CLUSTER_SCRIPT), "start", str(folder / "cluster")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"the test cluster did not start:\n{result.stderr}"
    print(f"\nSLURM test cluster idle after {time.monotonic() - started:.1f} s")
    env = {**os.environ, "SLURM_CONF": result.stdout.strip().splitlines()[-1]}
    for name in [name for name in env if name.startswith(("SLURM_", "SBATCH_"))]:
        if name != "SLURM_CONF":
            env.pop(name)  # e.g. when pytest itself runs inside a SLURM job
    env.update(CONTAINER="none", GIT_PULL="0")
    for name in ("DATA_DIR", "RESULTS_DIR", "VIRTUAL_ENV", "RUN_FOLDER_FILE"):
        env.pop(name, None)
    yield Cluster(folder, checkout, env)
    subprocess.run(
        ["bash", str(CLUSTER_SCRIPT), "stop", str(folder / "cluster")],
        capture_output=True,
        text=True,
        timeout=120,
    )


def run_folder(cluster: Cluster, prefix: str, tag: str) -> Path:
    """The one run folder of a job (tag: job id) or array task (tag: <array job>_<task>)."""
    name = re.compile(rf"{prefix}_\d{{8}}-\d{{6}}_{tag}(-\d+)?")
    folders = [
        path
        for path in sorted((cluster.checkout / "results").glob(f"{prefix}_*"))
        if name.fullmatch(path.name)
    ]
    assert len(folders) == 1, f"expected one results folder for {tag}, got {folders}"
    return folders[0]


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def last_line(text: str) -> str:
    return text.rstrip("\n").rsplit("\n", 1)[-1]


def cnn_args(mnist: Path, epochs: int = CNN_EPOCHS) -> list:
    """--device cpu: the test cluster's GPUs are fake, and `auto` refuses GPUs it cannot use;
    one --conv-kernels for all: `auto` times both on the (busy) machine, and the two sum in
    different orders, so runs to compare must not choose apart."""
    return [
        "--epochs",
        epochs,
        "--val-size",
        "100",
        "--data-dir",
        mnist,
        "--device",
        "cpu",
        "--conv-kernels",
        "kernel-rows",
    ]


def computed_rows(path: Path) -> list[list[str]]:
    """history.csv without its timing columns: what a resumed run must reproduce exactly."""
    rows = read_rows(path)
    columns = [name for name in rows[0] if "second" not in name and "per_s" not in name]
    return [[row[name] for name in columns] for row in rows]


def assert_same_cnn_results(folder: Path, reference: Path) -> None:
    """The same final metrics and history as the uninterrupted run (CPU resume is bit-exact)."""
    got = read_json(folder / "metrics.json")
    want = read_json(reference / "metrics.json")
    for key in ("test_accuracy", "test_loss", "macro_f1", "per_class", "confusion_matrix"):
        assert got[key] == want[key], key
    assert computed_rows(folder / "history.csv") == computed_rows(reference / "history.csv")


def assert_requeued_once(out: str, script: str, job: str) -> None:
    """One signal, one checkpoint, one requeue and one resume in the (appended) log; `job` is
    how the requeue line names the job ("123", or "(array task 120_0)")."""
    for start in (1, 2):
        assert f"{script}: start {start} (SLURM_RESTART_COUNT={start - 1})" in out
    assert f"{script}: start 3" not in out
    assert out.count("received SIGUSR1: forwarding it") == 1
    assert out.count("stopped after SIGUSR1 (exit 75)") == 1
    assert out.count("requeueing job ") == 1
    assert job in out.partition("requeueing job ")[2].partition("(restart")[0]
    assert "finished (exit 0)" in out


@pytest.fixture(scope="module")
def cnn_jobs(cluster, mnist) -> dict:
    """The CNN jobs, all at once: an uninterrupted one (seed 0; the completion test's subject
    and the reference of the others), one sent USR1 once its first checkpoint exists, and an
    array of three seeds whose task 0 is sent USR1 the same way."""
    started = time.monotonic()
    ids = {
        "reference": cluster.submit("run_cnn.sbatch", cnn_args(mnist)),
        "signalled": cluster.submit("run_cnn.sbatch", cnn_args(mnist), MAX_REQUEUES=2),
    }
    array = cluster.submit("run_cnn.sbatch", cnn_args(mnist), options=("--array=0-2",))
    ids.update({f"task {task}": f"{array}_{task}" for task in range(3)})
    first_checkpoints = {
        ids[name]: f"results/cnn_*_{ids[name]}/last.pt" for name in ("signalled", "task 0")
    }
    cluster.wait_for_files(first_checkpoints, cluster.signal_usr1)
    infos = {name: cluster.wait(job) for name, job in ids.items()}
    print(f"\n{len(ids)} CNN jobs: {time.monotonic() - started:.0f} s")
    return {"ids": ids, "infos": infos, "array": array}


# --------------------------------------------------------------------------------------------
# The cluster itself
# --------------------------------------------------------------------------------------------


@pytest.mark.slurm
@pytest.mark.slow
@needs_slurm
def test_cluster_has_two_nodes_each_with_its_own_slurmd(cluster):
    assert len(cluster.nodes) == 2 and "localhost" in cluster.nodes, cluster.nodes
    states = cluster.run("sinfo", "-h", "-N", "-o", "%N %t").stdout.split("\n")
    assert sorted(line.split()[0] for line in states if line) == sorted(cluster.nodes)
    config = (cluster.folder / "cluster" / "slurm.conf").read_text()
    ports = re.findall(r"^NodeName=\S+ NodeAddr=127\.0\.0\.1 Port=(\d+) ", config, re.M)
    assert len(set(ports)) == 2, "each slurmd needs its own port"
    for node in cluster.nodes:
        assert (cluster.folder / "cluster" / f"slurmd-{node}.log").is_file()
        assert (cluster.folder / "cluster" / "spool" / node).is_dir()
    # One task on each node, and both node names resolve here (MASTER_ADDR is one).
    result = cluster.run("srun", "--nodes=2", "--ntasks-per-node=1", "printenv", "SLURMD_NODENAME")
    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.split()) == sorted(cluster.nodes)
    for node in cluster.nodes:
        assert subprocess.run(["getent", "hosts", node], capture_output=True).returncode == 0


# --------------------------------------------------------------------------------------------
# CNN jobs on the cluster
# --------------------------------------------------------------------------------------------


@pytest.mark.slurm
@pytest.mark.slow
@needs_slurm
def test_cnn_job_completes_with_logs_and_every_output(cluster, cnn_jobs):
    job_id = cnn_jobs["ids"]["reference"]
    info = cnn_jobs["infos"]["reference"]
    assert info["JobState"] == "COMPLETED", cluster.logs(job_id)
    assert info["ExitCode"] == "0:0" and info["Restarts"] == "0"
    out_log, err_log = cluster.log_paths("cnn", job_id)
    # Not an array: SLURM names the logs <job>_4294967294 (%A_%a); the wrapper links <job>.
    for path in (out_log, err_log):
        assert path.is_symlink(), sorted(os.listdir(cluster.checkout / "logs"))
        assert os.readlink(path) == path.name.replace(f"_{job_id}.", f"_{job_id}_{NO_ARRAY_INDEX}.")
    out = out_log.read_text()
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=cluster.checkout, capture_output=True, text=True
    ).stdout.strip()
    assert f"code: commit {head}" in out
    assert "git pull skipped (GIT_PULL=0)" in out
    assert f"job {job_id} (cnn_from_scratch)" in out and "restart 0" in out
    assert "--resume auto" in out  # inside SLURM the wrapper lets the script pick up its run
    folder = run_folder(cluster, "cnn", job_id)
    assert f"results: {folder}" in out
    assert last_line(out).endswith(f"finished (exit 0) === results: {folder}")
    assert folder.parent == cluster.checkout / "results"  # RESULTS_DIR's default
    for name in CNN_OUTPUTS:
        assert (folder / name).is_file() and (folder / name).stat().st_size > 0, name
    metrics = read_json(folder / "metrics.json")
    assert metrics["test_images"] == 200 and metrics["epochs"] == CNN_EPOCHS
    assert metrics["test_accuracy"] > 0.9
    assert "Traceback" not in err_log.read_text()
    assert not list((cluster.checkout / "logs").glob(".run_folder.*"))  # read and removed


@pytest.mark.slurm
@pytest.mark.slow
@needs_slurm
def test_time_limit_signal_checkpoint_requeue_resume_same_metrics(cluster, cnn_jobs):
    """The USR1 that `--signal=B:USR1@<lead>` sends ahead of the time limit, sent once the first
    epoch's checkpoint exists: the run checkpoints, the job requeues itself, the restart resumes
    the same run and ends with the uninterrupted run's exact numbers."""
    assert cnn_jobs["infos"]["reference"]["JobState"] == "COMPLETED", "the reference run failed"
    job_id = cnn_jobs["ids"]["signalled"]
    info = cnn_jobs["infos"]["signalled"]
    logs = cluster.logs(job_id)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", logs
    assert info["Restarts"] == "1", f"the run ended before the signal reached it?\n{logs}"
    out_log, err_log = cluster.log_paths("cnn", job_id)
    out = out_log.read_text()
    assert_requeued_once(out, "run_cnn.sbatch", job_id)
    folder = run_folder(cluster, "cnn", job_id)
    assert f"it will continue {folder} from its checkpoint" in out  # named before the restart
    assert out.count(f"stopped: {folder}") == 1 and out.count(f"results: {folder}") == 2
    assert "TIME LIMIT" not in err_log.read_text()
    assert_same_cnn_results(folder, run_folder(cluster, "cnn", cnn_jobs["ids"]["reference"]))


@pytest.mark.slurm
@pytest.mark.slow
@needs_slurm
def test_array_job_one_seed_per_task_requeued_task_resumes_then_summarised(
    cluster, cnn_jobs, tmp_path
):
    """sbatch --array=0-2: three seeds (--seed 0 + task id), each task in its own run folder and
    logs named <array job>_<task>; task 0 requeued by USR1 resumes its own run (and no other)
    and matches the uninterrupted seed-0 job; then the three runs are summarised."""
    tasks = [cnn_jobs["ids"][f"task {task}"] for task in range(3)]
    assert tasks[0] == f"{cnn_jobs['array']}_0"
    folders = []
    for task_id, task in enumerate(tasks):
        info = cnn_jobs["infos"][f"task {task_id}"]
        logs = cluster.logs(task)
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", logs
        assert info["Restarts"] == ("1" if task_id == 0 else "0"), logs
        out_log, err_log = cluster.log_paths("cnn", task)
        assert out_log.is_file() and not out_log.is_symlink() and err_log.is_file(), logs
        out = out_log.read_text()
        assert f"array task {task} (seed = --seed + {task_id})" in out
        folder = run_folder(cluster, "cnn", task)
        assert last_line(out).endswith(f"finished (exit 0) === results: {folder}")
        config = read_json(folder / "config.json")
        assert config["args"]["seed"] == task_id
        folders.append(folder)
    first_out = cluster.log_paths("cnn", tasks[0])[0].read_text()
    assert_requeued_once(first_out, "run_cnn.sbatch", f"(array task {tasks[0]})")
    assert_same_cnn_results(folders[0], run_folder(cluster, "cnn", cnn_jobs["ids"]["reference"]))
    # mean ± std over the seeds
    result = subprocess.run(
        [sys.executable, "cnn_from_scratch.py", "--summarize", *map(str, folders)]
        + ["--output-dir", str(tmp_path)],
        cwd=cluster.checkout,
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    summary_dir = Path(last_line(result.stdout).removeprefix("summary: "))
    assert last_line(result.stdout) == f"summary: {summary_dir}"
    assert summary_dir.parent == tmp_path
    for name in ("summary.json", "summary.md", "summary.png"):
        assert (summary_dir / name).stat().st_size > 0, name
    summary = read_json(summary_dir / "summary.json")
    accuracies = [read_json(folder / "metrics.json")["test_accuracy"] for folder in folders]
    got = summary["metrics"]["test_accuracy"]
    assert got["n"] == 3 and sorted(summary["seeds"]) == [0, 1, 2]
    assert got["mean"] == pytest.approx(statistics.fmean(accuracies), abs=1e-12)
    assert got["std"] == pytest.approx(statistics.stdev(accuracies), abs=1e-12)
    assert (got["min"], got["max"]) == (min(accuracies), max(accuracies))


@pytest.mark.slurm
@pytest.mark.slow
@needs_slurm
def test_failing_job_fails_visibly_and_is_not_requeued(cluster, mnist):
    # GIT_PULL left at its default: the checkout has no upstream, so the pull fails, warns and
    # the job goes on with the checked-out code.
    job_id = cluster.submit(
        "run_cnn.sbatch", ["--epochs", "0", "--data-dir", mnist], GIT_PULL="1", MAX_REQUEUES=5
    )
    info = cluster.wait(job_id, timeout=300)
    assert info["JobState"] == "FAILED", cluster.logs(job_id)
    assert info["ExitCode"] == "2:0" and info["Restarts"] == "0"
    out_log, err_log = cluster.log_paths("cnn", job_id)
    err = err_log.read_text()
    assert re.search(r"^error: .*--epochs", err, re.M), err
    assert "FAILED with exit code 2; not requeued" in err
    assert "git pull --ff-only failed" in err
    assert "requeueing" not in out_log.read_text()
    assert not list((cluster.checkout / "results").glob(f"cnn_*_{job_id}"))


# --------------------------------------------------------------------------------------------
# The wrapper outside SLURM (no cluster needed): plain runs, signals at every stage, the run
# folder it names, and the container path with a stand-in `apptainer` that records its
# arguments and runs the command as if inside
# --------------------------------------------------------------------------------------------

FAKE_APPTAINER = r"""#!/usr/bin/env bash
# Stand-in for apptainer: records its arguments and environment, then runs the command "inside".
if [[ $1 == --version ]]; then echo "apptainer version 0.0-test"; exit 0; fi
printf '%s\n' "$@" > "$FAKE_APPTAINER_LOG"
printf 'RUN_FOLDER_FILE=%s\n' "$RUN_FOLDER_FILE" >> "$FAKE_APPTAINER_LOG.env"
[[ $1 == exec ]] || exit 99
shift
while [[ $1 == -* ]]; do
    case $1 in --bind | --pwd) shift 2 ;; *) shift ;; esac
done
export APPTAINER_CONTAINER=$1
shift
exec "$@"
"""

# Stand-in for git: the first call marks the wrapper's start-up and lasts a second, so that a
# signal sent then lands while the wrapper is still preparing.
SLOW_GIT = """#!/bin/sh
[ -e "$STARTUP_MARK" ] && exit 1
touch "$STARTUP_MARK"
sleep 1
exit 1
"""


def wrapper_env(tmp_path: Path, **variables) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
    for name in ("DATA_DIR", "RESULTS_DIR", "TORCH_HOME", "VIRTUAL_ENV", "RUN_FOLDER_FILE"):
        env.pop(name, None)
    env.update(GIT_PULL="0", RESULTS_DIR=str(tmp_path / "results"))
    env.update({k: str(v) for k, v in variables.items()})
    return env


@pytest.fixture
def checkout(tmp_path) -> Path:
    return make_checkout(tmp_path / "repo")


def run_wrapper(checkout: Path, env: dict, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "run_cnn.sbatch", *map(str, args)],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def start_wrapper(checkout: Path, env: dict, *args) -> subprocess.Popen:
    """The wrapper in its own process group, as a terminal starts a command."""
    return subprocess.Popen(
        ["bash", "run_cnn.sbatch", *map(str, args)],
        cwd=checkout,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def finish(process: subprocess.Popen) -> tuple[str, str]:
    try:
        return process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def wait_for(folder: Path, pattern: str, process: subprocess.Popen, timeout: float = 300) -> Path:
    """The first path under `folder` that matches the glob `pattern`, once there is one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = sorted(folder.glob(pattern))
        if found:
            return found[0]
        assert process.poll() is None, "".join(finish(process))
        time.sleep(0.02)
    pytest.fail(f"no {folder / pattern} within {timeout} s")


@pytest.mark.slow
def test_wrapper_outside_slurm_refuses_an_abbreviated_option(checkout, tmp_path):
    """`--output` for `--output-dir`: the script takes no abbreviations (nor does the wrapper)."""
    env = wrapper_env(tmp_path, CONTAINER="none")
    result = run_wrapper(checkout, env, "--dry-run", "--output", tmp_path / "elsewhere")
    assert result.returncode == 2, result.stdout + result.stderr
    assert re.search(r"^error: .*--output\s", result.stderr, re.M), result.stderr
    assert "FAILED with exit code 2; not requeued" in result.stderr
    assert not (tmp_path / "elsewhere").exists()


@pytest.mark.slow
def test_wrapper_runs_started_together_each_name_their_own_run(checkout, tmp_path):
    """Two plain runs (no --resume outside SLURM) started in the same second into one
    --output-dir: each last line names the run that wrapper started."""
    env = wrapper_env(tmp_path, CONTAINER="none")
    output = tmp_path / "shared_output"
    args = ("--dry-run", "--epochs", "1", "--output-dir", output)
    processes = [start_wrapper(checkout, env, *args) for _ in "ab"]
    results = [(process, *finish(process)) for process in processes]
    runs = sorted(output.glob("cnn*"))
    assert len(runs) == 2, runs
    named = []
    for process, out, err in results:
        assert process.returncode == 0, out + err
        running = next(line for line in out.splitlines() if "running: " in line)
        assert "--resume" not in running
        run = Path(last_line(out).partition("finished (exit 0) === results: ")[2])
        assert f"results: {run}" in out.splitlines()  # the script's own last line
        named.append(run)
    assert sorted(named) == runs


@pytest.mark.slow
def test_wrapper_forwards_usr1_then_resume_auto_names_the_same_run(checkout, tmp_path, mnist):
    """The trap fires while Python runs in the background; outside SLURM there is no requeue,
    the wrapper says how to continue, and `--resume auto` continues that run, named again on
    the last line."""
    env = wrapper_env(tmp_path, CONTAINER="none")
    args = cnn_args(mnist, epochs=4)  # the signal comes from here, within milliseconds
    process = start_wrapper(checkout, env, *args)
    wait_for(tmp_path / "results", "cnn_*/last.pt", process)
    process.send_signal(signal.SIGUSR1)  # to the wrapper's bash, as B:USR1 does
    out, err = finish(process)
    assert process.returncode == 75, out + err
    assert "received SIGUSR1: forwarding it to the training process" in out
    [run] = (tmp_path / "results").glob("cnn_*")
    assert f"stopped: {run}" in out.splitlines()
    assert f"not requeued. Continue with: bash run_cnn.sbatch --resume {run}" in out
    assert last_line(out).endswith(f"stopped (exit 75) === run: {run}")
    assert not (run / "metrics.json").exists()
    resumed = run_wrapper(checkout, env, *args, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert last_line(resumed.stdout).endswith(f"finished (exit 0) === results: {run}")
    assert (run / "metrics.json").is_file()


@pytest.mark.slow
def test_wrapper_ctrl_c_to_the_process_group_stops_the_run_with_130(checkout, tmp_path, mnist):
    """Ctrl-C reaches the wrapper and Python at once: Python checkpoints and exits 130, the
    wrapper does not pass a second SIGINT on (that would abort), and names the run."""
    env = wrapper_env(tmp_path, CONTAINER="none")
    args = cnn_args(mnist, epochs=4)  # the signal comes from here, within milliseconds
    process = start_wrapper(checkout, env, *args)
    wait_for(tmp_path / "results", "cnn_*/last.pt", process)
    os.killpg(process.pid, signal.SIGINT)
    out, err = finish(process)
    assert process.returncode == 130, out + err
    [run] = (tmp_path / "results").glob("cnn_*")
    assert f"stopped: {run}" in out.splitlines()
    assert "forwarding it" not in out
    assert last_line(out).endswith(f"stopped (exit 130) === run: {run}")
    assert "Traceback" not in err and "interrupted again" not in err


@pytest.mark.slow
def test_wrapper_sigterm_while_python_starts_ends_resumable(checkout, tmp_path, mnist):
    """SIGTERM as soon as the wrapper has started Python (the interpreter still loading): 75,
    and the documented last line, whether Python was ended by it or stopped on it."""
    env = wrapper_env(tmp_path, CONTAINER="none")
    process = start_wrapper(checkout, env, *cnn_args(mnist))
    for line in process.stdout:
        if "running: " in line:
            process.send_signal(signal.SIGTERM)
            break
    out, err = finish(process)
    assert process.returncode == 75, out + err
    assert re.search(r"=== cnn_from_scratch\.py stopped \(exit 75\) === run: \S", last_line(out))
    assert "FAILED" not in out + err and "Traceback" not in err


@pytest.mark.parametrize(("send", "code"), [("USR1", 75), ("INT", 130)])
def test_wrapper_signalled_during_its_own_start_up(checkout, tmp_path, send, code):
    """USR1 to the wrapper, or Ctrl-C to its process group, while it still prepares (a slow
    `git`): the script is not started, and the wrapper ends with the stop's code and line."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "git").write_text(SLOW_GIT)
    (fake_bin / "git").chmod(0o755)
    mark = tmp_path / "started"
    env = wrapper_env(
        tmp_path, CONTAINER="none", PATH=f"{fake_bin}:{os.environ['PATH']}", STARTUP_MARK=mark
    )
    process = start_wrapper(checkout, env, "--epochs", "1")
    wait_for(tmp_path, mark.name, process, timeout=60)
    if send == "INT":
        os.killpg(process.pid, signal.SIGINT)
    else:
        process.send_signal(signal.SIGUSR1)
    out, err = finish(process)
    assert process.returncode == code, out + err
    assert f"signalled ({send}) before cnn_from_scratch.py started: not starting it" in err
    assert "running: " not in out
    ending = f"cnn_from_scratch.py stopped (exit {code}) === run: (no run folder)"
    assert last_line(out).endswith(ending)


def test_wrapper_refuses_a_missing_container_image(checkout, tmp_path):
    result = subprocess.run(
        ["bash", "run_resnet.sbatch"],
        cwd=checkout,
        env=wrapper_env(tmp_path),  # CONTAINER unset: <repo>/container.sif, which is absent
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert f"container image {checkout / 'container.sif'} not found" in result.stderr
    assert "CONTAINER=none" in result.stderr


@pytest.mark.slow
def test_wrapper_runs_the_script_in_the_container_with_binds(checkout, tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "apptainer").write_text(FAKE_APPTAINER)
    (fake_bin / "apptainer").chmod(0o755)
    image = tmp_path / "image.sif"
    image.write_bytes(b"not a real image")
    data_dir = tmp_path / "mydata"
    torch_home = tmp_path / "torch"
    env = wrapper_env(
        tmp_path,
        CONTAINER=image,
        PATH=f"{fake_bin}:{os.environ['PATH']}",
        FAKE_APPTAINER_LOG=tmp_path / "apptainer_args",
        CONTAINER_VENV=sys.prefix,  # the "container's" Python environment: this venv
        TORCH_HOME=torch_home,
        SLURM_JOB_ID="4242",  # as inside a job: the wrapper adds --resume auto
    )
    result = run_wrapper(checkout, env, "--epochs", "0", "--data-dir", data_dir)
    assert result.returncode == 2, result.stdout + result.stderr
    assert re.search(r"^error: .*--epochs", result.stderr, re.M)  # Python ran, inside
    args = (tmp_path / "apptainer_args").read_text().splitlines()
    assert args[:2] == ["exec", "--nv"]
    binds = args[args.index("--bind") + 1].split(",")
    for path in (checkout, checkout / "data", tmp_path / "results", torch_home, data_dir):
        assert str(path.resolve()) in binds, (path, binds)
    assert str(image) in args and "cnn_from_scratch.py" in args
    assert args[-2:] == ["--resume", "auto"]
    # The run folder file travels into the container (in logs/, which is bound).
    passed = (tmp_path / "apptainer_args.env").read_text().strip().removeprefix("RUN_FOLDER_FILE=")
    assert Path(passed).parent == checkout / "logs" and not Path(passed).exists()
    # setup_env.sh made .venv-container on top of the "container's" environment, reusing it.
    venv = checkout / ".venv-container"
    assert "include-system-site-packages = true" in (venv / "pyvenv.cfg").read_text()
    pth = list(venv.glob("lib/python*/site-packages/_container_venv.pth"))
    assert len(pth) == 1 and pth[0].read_text().strip().startswith(sys.prefix)
    assert not list(venv.glob("lib/python*/site-packages/torch"))  # reused, not reinstalled


def launch_shape(tmp_path: Path, **variables) -> str:
    """slurm_ddp_launch's TRAIN_LAUNCHER and MASTER_ADDR:PORT for an allocation described by
    SLURM_* variables (a stand-in scontrol names the nodes)."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir(exist_ok=True)
    (fake_bin / "scontrol").write_text("#!/bin/sh\necho node1\necho node2\n")
    (fake_bin / "scontrol").chmod(0o755)
    script = 'source "$1/slurm_common.sh" && slurm_ddp_launch >/dev/null'
    script += ' && echo "${TRAIN_LAUNCHER[*]-} | ${MASTER_ADDR-}:${MASTER_PORT-}"'
    env = {"PATH": f"{fake_bin}:{os.environ['PATH']}", "SLURM_JOB_ID": "20001"}
    env.update({k: str(v) for k, v in variables.items()})
    result = subprocess.run(
        ["bash", "-c", script, "bash", str(REPO)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_ddp_launch_is_srun_with_one_task_per_gpu(tmp_path):
    """Every multi-process shape becomes one srun task per GPU (the script reads SLURM_PROCID
    and MASTER_ADDR/PORT); one GPU on one node stays a plain process."""
    srun = "srun --kill-on-bad-exit=0 --wait=60"
    one = {"SLURM_NNODES": 1, "SLURM_NTASKS": 1, "SLURM_GPUS_PER_NODE": 1}
    assert launch_shape(tmp_path, **one) == "| :"
    tasks = {"SLURM_NNODES": 2, "SLURM_NTASKS": 8, "SLURM_GPUS_PER_NODE": 4}
    assert launch_shape(tmp_path, **tasks) == f"{srun} --ntasks=8 | node1:20001"
    nodes = {"SLURM_NNODES": 2, "SLURM_NTASKS": 2, "SLURM_GPUS_PER_NODE": "gpu:a100:4"}
    shape = f"{srun} --ntasks=8 --ntasks-per-node=4 --cpus-per-task=2 | node1:7"
    assert launch_shape(tmp_path, **nodes, SLURM_CPUS_ON_NODE=8, DIST_PORT=7) == shape
    cpu_nodes = {"SLURM_NNODES": 2, "SLURM_NTASKS": 2, "NPROC_PER_NODE": 3}
    shape = f"{srun} --ntasks=6 --ntasks-per-node=3 --cpus-per-task=1 | node1:20001"
    assert launch_shape(tmp_path, **cpu_nodes) == shape
    assert launch_shape(tmp_path, **one, SLURM_JOB_ID="") == "| :"  # outside SLURM: nothing


# --------------------------------------------------------------------------------------------
# Static checks: #SBATCH headers, shellcheck, container.def, no Python in shell files
# --------------------------------------------------------------------------------------------


def sbatch_options(path: Path) -> dict:
    options = {}
    for line in path.read_text().splitlines():
        if line.startswith("#SBATCH "):
            name, _, value = line.removeprefix("#SBATCH ").strip().partition("=")
            options[name] = value
        elif line and not line.startswith("#"):
            break  # SLURM stops reading #SBATCH lines at the first command
    return options


@pytest.mark.parametrize(
    ("script", "prefix", "time_limit"),
    [("run_cnn.sbatch", "cnn", "04:00:00"), ("run_resnet.sbatch", "resnet", "06:00:00")],
)
def test_sbatch_header(script, prefix, time_limit):
    options = sbatch_options(REPO / script)
    assert options["--time"] == time_limit
    # %A_%a: <array job>_<task> in an array, <job id>_4294967294 otherwise (linked to <job id>).
    assert options["--output"] == f"logs/{prefix}_training_%A_%a.out"
    assert options["--error"] == f"logs/{prefix}_training_%A_%a.err"
    assert re.fullmatch(r"B:USR1@\d+", options["--signal"])
    assert 60 <= int(options["--signal"].split("@")[1]) <= 900
    assert "--requeue" in options and options["--open-mode"] == "append"
    assert options["--gpus-per-node"] == "1"
    assert int(options["--cpus-per-task"]) >= 1 and options["--mem"].endswith("G")
    assert options["--job-name"]
    for forbidden in ("--partition", "-p", "--account", "-A", "--gres", "--nodes", "--ntasks"):
        assert forbidden not in options, forbidden
    # The log folder must exist at submission: it is in the repository (logs/.gitkeep).
    assert (REPO / "logs" / ".gitkeep").is_file()
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", "logs/.gitkeep"], cwd=REPO, capture_output=True
    )
    assert ignored.returncode == 1, "logs/.gitkeep is git-ignored, so clones lack logs/"


def shell_files() -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "*.sh", "*.sbatch", ".ci/run"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return [REPO / name for name in listed if (REPO / name).is_file()]


def test_shellcheck_clean():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    files = shell_files()
    names = {path.name for path in files}
    assert {"setup_env.sh", "run_cnn.sbatch", "run_resnet.sbatch", "slurm_cluster.sh"} <= names
    result = subprocess.run(
        ["shellcheck", "-x", *map(str, files)], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_shell_files_hold_no_python_and_stay_small():
    """Python lives in .py files (the prefetch is the scripts' own --prefetch); the two shell
    files a user reads stay within the sizes issue 17 set."""
    for path in shell_files():
        text = path.read_text()
        assert not re.search(r"\bpython3?\s+-(\s|$)", text, re.M), f"{path.name}: Python from stdin"
    assert len((REPO / "setup_env.sh").read_text().splitlines()) <= 200
    assert len((REPO / "slurm_common.sh").read_text().splitlines()) <= 220


def definition_sections(text: str) -> tuple[dict, dict]:
    """(header keywords, {section name: body}) of an Apptainer definition file."""
    header = {}
    sections = {}
    current = None
    for line in text.splitlines():
        match = re.match(r"^%(\w+)\s*$", line)
        if match:
            current = match.group(1)
            sections[current] = []
        elif current is None:
            if ":" in line and not line.lstrip().startswith("#"):
                key, _, value = line.partition(":")
                header[key.strip()] = value.strip()
        else:
            sections[current].append(line)
    return header, {name: "\n".join(body) for name, body in sections.items()}


def test_container_definition():
    header, sections = definition_sections((REPO / "container.def").read_text())
    assert header == {
        "Bootstrap": "docker",
        "From": "nvidia/cuda:12.6.2-cudnn-devel-ubuntu24.04",
    }
    for name in ("labels", "help", "files", "environment", "post", "runscript", "test"):
        assert sections.get(name, "").strip(), f"%{name} missing or empty"
    post = sections["post"]
    assert "python3 -m venv /opt/venv" in post
    assert "--index-url https://download.pytorch.org/whl/cu126" in post
    assert "-r /opt/requirements.txt" in post
    assert "requirements.txt /opt/requirements.txt" in sections["files"]
    assert "CONTAINER_VENV=/opt/venv" in sections["environment"]
    test = sections["test"]
    assert "torch.cuda.is_available()" in test and "cudnn" in test
    assert 'startswith("12.6")' in test
    python = re.search(r"<<'EOF'\n(.*?)\nEOF", test, re.S)
    assert python, "%test should run its checks as a Python heredoc"
    compile(python.group(1), "container.def %test", "exec")
    # %post, %environment, %runscript and %test are /bin/sh scripts: shellcheck them as such.
    if shutil.which("shellcheck"):
        for name in ("post", "environment", "runscript", "test"):
            result = subprocess.run(
                ["shellcheck", "-s", "sh", "-"],
                input=sections[name],
                capture_output=True,
                text=True,
            )
            assert result.returncode == 0, f"%{name}:\n{result.stdout}"
