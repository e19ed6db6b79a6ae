"""run_cnn.sbatch and run_resnet.sbatch on a real single-node SLURM cluster, and their lint.

The cluster (tests/slurm_cluster.sh) is started once for this module from Debian's slurmctld,
slurmd and slurm-client packages; without them (or without root) those tests are skipped with
the reason, while the lint and no-SLURM wrapper tests still run. Each job is submitted with
plain `sbatch` from a copy of the repository (a throw-away git checkout sharing this .venv), as
a user would (`cd repo && sbatch run_cnn.sbatch ...`), so logs land in its logs/ and results in
its results/. Jobs are watched by polling scontrol/squeue (faster than `sbatch --wait`).
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from datasets import write_emnist, write_standin_weights
from test_cnn_training import OUTPUT_FILES as CNN_OUTPUTS
from test_resnet18 import REGIME_FILES as RESNET_REGIME_OUTPUTS
from test_resnet18 import RUN_FILES as RESNET_RUN_OUTPUTS

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
# The time-limit test: a 1-minute limit with a 5 s signal lead. SLURM checks limits coarsely
# (up to 60 s early, says sbatch(1)); measured here, the USR1 arrives ~47 s after each start.
TIME_LIMIT_OPTIONS = ("--time=1", "--signal=B:USR1@5")
# The CNN runs (uninterrupted, and under that limit) train for ~TARGET_TRAIN_S or more at the
# speed this machine shows right now (a short probe; whole epochs run somewhat slower): longer
# than one ~47 s start, so the limited run needs at least two starts. On a CPU shared with
# other work, a load that rises during the test only makes it slower; one that falls sharply
# right after the probe can leave the limited run uninterrupted, which the test reports.
TARGET_TRAIN_S = 60
TRAIN_IMAGES = 59_000  # --val-size 1000 of MNIST's 60,000
JOB_TIMEOUT_S = 900  # generous: the CPU may be shared; a quiet machine needs a fraction of it


def mnist_root() -> Path | None:
    for candidate in (os.environ.get("MNIST_ROOT"), REPO.parent / "shared" / "data"):
        if candidate and (Path(candidate) / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
            return Path(candidate)
    return None


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
# Fixtures: a copy of the repository, the cluster, data
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


class Cluster:
    def __init__(self, folder: Path, checkout: Path, env: dict):
        self.folder, self.checkout, self.env = folder, checkout, env

    def submit(self, script: str, args=(), options=(), **variables) -> int:
        """`sbatch [options] script [args]` from the checkout's root; returns the job id."""
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
        return int(result.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict:
        output = subprocess.run(
            ["scontrol", "show", "job", "-o", str(job_id)],
            env=self.env,
            capture_output=True,
            text=True,
        ).stdout
        return dict(field.split("=", 1) for field in output.split() if "=" in field)

    def queued(self, job_id: int) -> bool:
        output = subprocess.run(
            ["squeue", "-h", "-j", str(job_id), "-o", "%T"],
            env=self.env,
            capture_output=True,
            text=True,
        ).stdout
        return bool(output.strip())

    def wait(self, job_id: int, timeout: float = JOB_TIMEOUT_S) -> dict:
        """Poll until the job has ended (not merely stopped for a requeue); its scontrol fields."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in TERMINAL_STATES and not self.queued(job_id):
                return info
            time.sleep(1)
        subprocess.run(["scancel", str(job_id)], env=self.env)
        pytest.fail(f"job {job_id} still running after {timeout} s:\n{self.logs(job_id)}")

    def log_paths(self, prefix: str, job_id: int) -> tuple[Path, Path]:
        logs = self.checkout / "logs"
        return logs / f"{prefix}_training_{job_id}.out", logs / f"{prefix}_training_{job_id}.err"

    def logs(self, job_id: int) -> str:
        texts = []
        for path in sorted((self.checkout / "logs").glob(f"*_{job_id}.*")):
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
    for name in ("DATA_DIR", "RESULTS_DIR", "VIRTUAL_ENV"):
        env.pop(name, None)
    yield Cluster(folder, checkout, env)
    subprocess.run(
        ["bash", str(CLUSTER_SCRIPT), "stop", str(folder / "cluster")],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def mnist() -> Path:
    root = mnist_root()
    if root is None:
        pytest.skip("real MNIST not found: set MNIST_ROOT or put it in ../shared/data/MNIST/raw")
    return root


def run_folder(cluster: Cluster, prefix: str, job_id: int) -> Path:
    folders = sorted((cluster.checkout / "results").glob(f"{prefix}_*_{job_id}"))
    assert len(folders) == 1, f"expected one results folder for job {job_id}, got {folders}"
    return folders[0]


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def cnn_images_per_second() -> float:
    """Training throughput of cnn_from_scratch's network here now (batch 640, median step)."""
    import torch

    import cnn_from_scratch as cnn

    model = cnn.CNN(generator=torch.Generator().manual_seed(0))
    optimizer = cnn.SGD(model, lr=0.01, momentum=0.9, weight_decay=5e-4)
    loss_fn = cnn.SoftmaxCrossEntropy()
    images = torch.randint(0, 256, (640, 28, 28), dtype=torch.uint8)
    labels = torch.randint(0, 10, (640,))
    seconds = []
    with torch.no_grad():
        for _ in range(12):
            started = time.perf_counter()
            loss_fn.forward(model.forward(cnn.preprocess(images)), labels)
            model.backward(loss_fn.backward())
            optimizer.step()
            seconds.append(time.perf_counter() - started)
    return 640 / sorted(seconds[1:])[5]  # the median after a warm-up step


@pytest.fixture(scope="module")
def cnn_args(mnist) -> list:
    speed = cnn_images_per_second()
    epochs = min(20, math.ceil(TARGET_TRAIN_S * speed / TRAIN_IMAGES))
    print(f"CNN: {speed:,.0f} images/s here now -> --epochs {epochs}")
    return ["--epochs", str(epochs), "--val-size", "1000", "--data-dir", str(mnist)]


@pytest.fixture(scope="module")
def cnn_job(cluster, cnn_args) -> dict:
    """One uninterrupted CNN job: the completion test's subject and the time-limit test's
    reference."""
    started = time.monotonic()
    job_id = cluster.submit("run_cnn.sbatch", cnn_args)
    info = cluster.wait(job_id)
    return {"id": job_id, "info": info, "seconds": time.monotonic() - started}


# --------------------------------------------------------------------------------------------
# Jobs on the cluster
# --------------------------------------------------------------------------------------------


@needs_slurm
def test_cnn_job_completes_with_logs_and_every_output(cluster, cnn_job, cnn_args):
    job_id, info = cnn_job["id"], cnn_job["info"]
    print(f"CNN job {job_id}: {info.get('JobState')} in {cnn_job['seconds']:.0f} s")
    assert info["JobState"] == "COMPLETED", cluster.logs(job_id)
    assert info["ExitCode"] == "0:0" and info["Restarts"] == "0"
    out_log, err_log = cluster.log_paths("cnn", job_id)
    assert out_log.is_file() and err_log.is_file(), sorted(os.listdir(cluster.checkout / "logs"))
    out = out_log.read_text()
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=cluster.checkout, capture_output=True, text=True
    ).stdout.strip()
    assert f"code: commit {head}" in out
    assert "git pull skipped (GIT_PULL=0)" in out
    assert f"job {job_id} (cnn_from_scratch)" in out and "restart 0" in out
    assert "--resume auto" in out  # the wrapper always lets the script pick up a checkpoint
    folder = run_folder(cluster, "cnn", job_id)
    assert f"results: {folder}" in out
    assert folder.parent == cluster.checkout / "results"  # RESULTS_DIR's default
    for name in CNN_OUTPUTS:
        assert (folder / name).is_file() and (folder / name).stat().st_size > 0, name
    metrics = read_json(folder / "metrics.json")
    assert metrics["test_images"] == 10_000 and metrics["epochs"] == int(cnn_args[1])
    assert metrics["test_accuracy"] > 0.95
    assert "Traceback" not in err_log.read_text()


@needs_slurm
def test_time_limit_signal_checkpoint_requeue_resume_same_metrics(cluster, cnn_args, cnn_job):
    assert cnn_job["info"]["JobState"] == "COMPLETED", "the reference run failed"
    job_id = cluster.submit("run_cnn.sbatch", cnn_args, options=TIME_LIMIT_OPTIONS, MAX_REQUEUES=12)
    started = time.monotonic()
    info = cluster.wait(job_id)
    restarts = int(info["Restarts"])
    print(f"time-limited job {job_id}: {restarts} requeues, {time.monotonic() - started:.0f} s")
    logs = cluster.logs(job_id)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", logs
    assert restarts >= 1, (
        "never interrupted: the run ended within one start (did the CPU get faster after the "
        f"speed probe?)\n{logs}"
    )
    out_log, err_log = cluster.log_paths("cnn", job_id)
    out = out_log.read_text()
    # Every start is in the one (appended) log: signalled, checkpointed, requeued, resumed.
    for start in range(1, restarts + 2):
        assert f"run_cnn.sbatch: start {start} (SLURM_RESTART_COUNT={start - 1})" in out
    assert out.count("received SIGUSR1: forwarding it") == restarts
    # Each start ends in a checkpoint written on the signal, or -- when the signal comes while
    # the script is outside its training loop (starting, or evaluating after the last epoch) --
    # in a resume from the last per-epoch checkpoint.
    on_signal = out.count("stopped by SIGUSR1: checkpoint written")
    outside_loop = out.count("ended by SIGUSR1 outside its training loop")
    assert on_signal >= 1 and on_signal + outside_loop == restarts
    assert out.count(f"requeueing job {job_id}") == restarts
    assert out.count("resumed ") == restarts
    assert "finished (exit 0)" in out
    assert "TIME LIMIT" not in err_log.read_text()  # checkpointed before the hard limit
    # The same final metrics as the uninterrupted run (CPU resume is bit-identical).
    folder = run_folder(cluster, "cnn", job_id)
    reference = run_folder(cluster, "cnn", cnn_job["id"])
    got, want = read_json(folder / "metrics.json"), read_json(reference / "metrics.json")
    for key in ("test_accuracy", "test_loss", "macro_f1", "per_class", "confusion_matrix"):
        assert got[key] == want[key], key
    columns = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr")
    got_rows, want_rows = read_rows(folder / "history.csv"), read_rows(reference / "history.csv")
    assert [[r[c] for c in columns] for r in got_rows] == [
        [r[c] for c in columns] for r in want_rows
    ]


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
    assert "error: --epochs must be at least 1" in err
    assert "FAILED with exit code 2; not requeued" in err
    assert "git pull --ff-only failed" in err
    assert "requeueing" not in out_log.read_text()
    assert not list((cluster.checkout / "results").glob(f"cnn_*_{job_id}"))


@needs_slurm
def test_resnet_job_completes_with_logs_and_every_output(cluster, tmp_path):
    if not (cluster.checkout / "resnet18.py").is_file():
        pytest.skip("resnet18.py is not in the repository yet")
    data_dir = write_emnist(tmp_path / "data")
    torch_home = tmp_path / "torch_home"
    write_standin_weights(torch_home)
    args = ["--data-dir", data_dir, "--regime", "both", "--epochs", "1", "--img-size", "32"]
    args += ["--batch-size", "32", "--device", "cpu"]
    started = time.monotonic()
    job_id = cluster.submit("run_resnet.sbatch", args, TORCH_HOME=torch_home)
    info = cluster.wait(job_id)
    print(f"ResNet job {job_id}: {info.get('JobState')} in {time.monotonic() - started:.0f} s")
    assert info["JobState"] == "COMPLETED", cluster.logs(job_id)
    assert info["ExitCode"] == "0:0" and info["Restarts"] == "0"
    out_log, err_log = cluster.log_paths("resnet", job_id)
    assert out_log.is_file() and err_log.is_file()
    out = out_log.read_text()
    assert "run_resnet.sbatch: start 1" in out and f"job {job_id} (resnet18_emnist)" in out
    folder = run_folder(cluster, "resnet", job_id)
    assert f"results: {folder}" in out
    for name in RESNET_RUN_OUTPUTS:
        assert (folder / name).is_file(), name
    for regime in ("linear_probe", "partial_unfreeze"):
        for name in RESNET_REGIME_OUTPUTS:
            assert (folder / regime / name).is_file(), f"{regime}/{name}"
        metrics = read_json(folder / regime / "metrics.json")
        assert metrics["epochs_run"] == 1
    assert "Traceback" not in err_log.read_text()


# --------------------------------------------------------------------------------------------
# The wrapper outside SLURM (no cluster needed): bad input, and the container path with a
# stand-in `apptainer` that records its arguments and runs the command as if inside
# --------------------------------------------------------------------------------------------

FAKE_APPTAINER = r"""#!/usr/bin/env bash
# Stand-in for apptainer: records its arguments, then runs the command "inside the container".
if [[ $1 == --version ]]; then echo "apptainer version 0.0-test"; exit 0; fi
printf '%s\n' "$@" > "$FAKE_APPTAINER_LOG"
[[ $1 == exec ]] || exit 99
shift
while [[ $1 == -* ]]; do
    case $1 in --bind | --pwd) shift 2 ;; *) shift ;; esac
done
export APPTAINER_CONTAINER=$1
shift
exec "$@"
"""


def wrapper_env(tmp_path: Path, **variables) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
    for name in ("DATA_DIR", "RESULTS_DIR", "TORCH_HOME", "VIRTUAL_ENV"):
        env.pop(name, None)
    env.update(GIT_PULL="0", RESULTS_DIR=str(tmp_path / "results"))
    env.update({k: str(v) for k, v in variables.items()})
    return env


@pytest.fixture
def checkout(tmp_path) -> Path:
    return make_checkout(tmp_path / "repo")


def test_wrapper_outside_slurm_reports_a_bad_argument(checkout, tmp_path):
    result = subprocess.run(
        ["bash", "run_cnn.sbatch", "--epochs", "0"],
        cwd=checkout,
        env=wrapper_env(tmp_path, CONTAINER="none"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "error: --epochs must be at least 1" in result.stderr
    assert "FAILED with exit code 2; not requeued" in result.stderr


def test_wrapper_forwards_usr1_at_once_and_exits_resumable(checkout, tmp_path, mnist):
    """The trap fires while Python runs in the background; outside SLURM there is no requeue."""
    process = subprocess.Popen(
        ["bash", "run_cnn.sbatch", "--epochs", "1", "--val-size", "1000", "--data-dir", mnist],
        cwd=checkout,
        env=wrapper_env(tmp_path, CONTAINER="none"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines = []
        for line in process.stdout:
            lines.append(line)
            if line.startswith("run folder:"):
                time.sleep(1)  # into the training loop
                signalled = time.monotonic()
                process.send_signal(signal.SIGUSR1)  # to the wrapper's bash, as B:USR1 does
                break
        remaining, stderr = process.communicate(timeout=120)
        seconds = time.monotonic() - signalled
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    out = "".join(lines) + remaining
    assert process.returncode == 75, out + stderr
    assert "received SIGUSR1: forwarding it to the training process" in out
    assert "stopped by SIGUSR1: checkpoint written" in out
    assert "not under SLURM: rerun the same command to continue" in out
    assert seconds < 30  # stopped within a step, not at the end of the epoch
    assert len(list((tmp_path / "results").glob("cnn_*/checkpoint_last.pt"))) == 1
    assert not list((tmp_path / "results").glob("cnn_*/metrics.json"))


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


def test_wrapper_runs_the_script_in_the_container_with_binds(checkout, tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "apptainer").write_text(FAKE_APPTAINER)
    (fake_bin / "apptainer").chmod(0o755)
    image = tmp_path / "image.sif"
    image.write_bytes(b"not a real image")
    data_dir, torch_home = tmp_path / "mydata", tmp_path / "torch"
    env = wrapper_env(
        tmp_path,
        CONTAINER=image,
        PATH=f"{fake_bin}:{os.environ['PATH']}",
        FAKE_APPTAINER_LOG=tmp_path / "apptainer_args",
        CONTAINER_VENV=sys.prefix,  # the "container's" Python environment: this venv
        TORCH_HOME=torch_home,
    )
    result = subprocess.run(
        ["bash", "run_cnn.sbatch", "--epochs", "0", "--data-dir", data_dir],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "error: --epochs must be at least 1" in result.stderr  # Python ran, inside
    args = (tmp_path / "apptainer_args").read_text().splitlines()
    assert args[:2] == ["exec", "--nv"]
    binds = args[args.index("--bind") + 1].split(",")
    for path in (checkout, checkout / "data", tmp_path / "results", torch_home, data_dir):
        assert str(path.resolve()) in binds, (path, binds)
    assert str(image) in args and "cnn_from_scratch.py" in args
    assert args[-2:] == ["--resume", "auto"]
    # setup_env.sh made .venv-container on top of the "container's" environment, reusing it.
    venv = checkout / ".venv-container"
    assert "include-system-site-packages = true" in (venv / "pyvenv.cfg").read_text()
    pth = list(venv.glob("lib/python*/site-packages/_container_venv.pth"))
    assert len(pth) == 1 and pth[0].read_text().strip().startswith(sys.prefix)
    assert not list(venv.glob("lib/python*/site-packages/torch"))  # reused, not reinstalled


# --------------------------------------------------------------------------------------------
# Static checks: #SBATCH headers, shellcheck, container.def
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
    assert options["--output"] == f"logs/{prefix}_training_%j.out"
    assert options["--error"] == f"logs/{prefix}_training_%j.err"
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


def definition_sections(text: str) -> tuple[dict, dict]:
    """(header keywords, {section name: body}) of an Apptainer definition file."""
    header, sections, current = {}, {}, None
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
