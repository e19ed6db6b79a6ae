"""The GPU check: on a CUDA machine lent for minutes, with no internet, no MNIST, no EMNIST and
no ImageNet weights, it runs what the CPU cannot show and prints one table.

    python3 bench/gpu_check.py --out DIR              # on the GPU machine (7 minutes at most)
    python3 bench/gpu_check.py --dry-run --out DIR    # every step at a tiny size, on the CPU

Steps, each a subprocess in its own process group with a share of the time left:
  tests                      tests/test_cuda.py (CUDA vs CPU layers, both precisions, resume,
                             cached vs uncached logits, NCCL with two GPUs), each test's result;
  cnn_gpu, cnn_host_cpu      bench/cnn_vs_autograd.py on the GPU, and on the host CPU at 2
                             threads: fast, reference and torch.nn images/s (synthetic data of
                             MNIST's shape unless --mnist-dir is given);
  resnet_*                   resnet18.py, each regime at EMNIST ByClass's full shape (697,932
                             train + 116,323 test synthetic 28x28 images, 62 classes, random
                             weights, 2 epochs): wall time, images/s, peak memory, whether the
                             frozen prefix was cached; partial_unfreeze with and without
                             --compile where resnet18.py has it (a dry run: without).

The time budget counts from this process's start. A step past its time-out has its whole
process group ended; the table says so and the next steps still run. Training runs and data
go to a temporary folder (removed at the end); --out gets only summary.md (the table, also
printed), metrics.json (the figures) and one <step>.log per step: at most 8 files, what a lent
machine sends back. Exit code 0 when every step passed, 1 when one failed, timed out or had no
time left, 2 for a usage error.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

STARTED = time.monotonic()  # the budget counts from here: before torch's import, CUDA's start

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from run_management import ArgumentParser, atomic_write, positive_float  # noqa: E402

MNIST_SHAPE = (60_000, 10_000)  # train, test
BYCLASS_SHAPE = (697_932, 116_323)  # EMNIST ByClass train, test; 62 classes
BYCLASS_CLASSES = 62
KILL_GRACE_S = 5  # after SIGTERM, a timed-out step's group gets this long before SIGKILL
LEAST_STEP_S = 5  # a step that would get less than this is not started
LOG_LIMIT_BYTES = 4 * 2**20  # a longer log keeps its end (a lent machine returns 16 MiB a file)
DRY_MNIST_SHAPE = (2_000, 500)
DRY_BYCLASS_SHAPE = (1_240, 310)  # 1,116 training images: no batch of one at batch size 64
DRY_CNN = ["--steps", "2", "--repeats", "1", "--batch-size", "64"]
# Every ResNet step's options but the data, regime and folder; 2 epochs: the second is the
# steady state (the first holds cuDNN's autotuning and torch.compile's start).
RESNET_OPTIONS = ["--device", "cuda", "--weights", "none", "--no-download", "--epochs", "2"]
DRY_RESNET_OPTIONS = ["--device", "cpu", "--weights", "none", "--no-download", "--epochs", "1"]
DRY_RESNET_OPTIONS += ["--img-size", "32", "--batch-size", "64"]
CNN_KINDS = ("fast", "reference", "torch.nn")
STEP_NAMES = ("tests", "cnn_gpu", "cnn_host_cpu", "resnet_linear_probe", "resnet_partial_unfreeze")
STEP_NAMES += ("resnet_partial_unfreeze_compile",)
RESNET_KEYS = (  # what the table and metrics.json keep of a regime's metrics.json
    "epochs_run",
    "wall_time_s",
    "train_time_s",
    "feature_time_s",
    "images_per_s",
    "step_images_per_s",
    "peak_memory_mib",
    "peak_memory_kind",
    "frozen_output_cached",
    "precision",
    "train_images",
    "val_images",
    "test_images",
)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def get_args_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument(
        "--out",
        help="a new or empty folder for summary.md, metrics.json and the step logs "
        "(default: results/gpu_check_<date>-<time>)",
    )
    parser.add_argument(
        "--budget-s",
        type=positive_float,
        default=420,
        help="seconds for all of it, from the process start: a lent machine's 8 minutes less one "
        "for its start-up and the transfers (default: %(default)s)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="every step at a tiny size on the CPU, to prove the check runs (default: off)",
    )
    parser.add_argument(
        "--steps",
        nargs="+",
        choices=STEP_NAMES,
        default=list(STEP_NAMES),
        metavar="STEP",
        help="the steps to run, of: %(choices)s (default: all; the compile step where "
        "resnet18.py has --compile)",
    )
    parser.add_argument(
        "--mnist-dir",
        help="a folder holding MNIST/raw/ for the CNN steps (default: synthetic data of MNIST's "
        "shape)",
    )
    return parser


# --------------------------------------------------------------------------------------------
# Data: synthetic images in the raw IDX layout the scripts' loaders read
# --------------------------------------------------------------------------------------------


def write_idx_pair(prefix: str, count: int, classes: int, generator) -> None:
    """Random uint8 images (count, 28, 28) and labels (count,) as <prefix>-images-idx3-ubyte and
    <prefix>-labels-idx1-ubyte."""
    import torch

    images = torch.randint(0, 256, (count, 28, 28), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, classes, (count,), dtype=torch.uint8, generator=generator)
    with open(f"{prefix}-images-idx3-ubyte", "wb") as handle:
        handle.write(b"".join(n.to_bytes(4, "big") for n in (2051, count, 28, 28)))
        images.numpy().tofile(handle)
    with open(f"{prefix}-labels-idx1-ubyte", "wb") as handle:
        handle.write(b"".join(n.to_bytes(4, "big") for n in (2049, count)))
        labels.numpy().tofile(handle)


def write_synthetic_data(root: Path, mnist_shape: tuple, byclass_shape: tuple) -> None:
    """root/mnist/MNIST/raw (10 classes) and root/emnist/EMNIST/raw (ByClass, 62 classes)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    mnist = root / "mnist" / "MNIST" / "raw"
    emnist = root / "emnist" / "EMNIST" / "raw"
    mnist.mkdir(parents=True)
    emnist.mkdir(parents=True)
    write_idx_pair(str(mnist / "train"), mnist_shape[0], 10, generator)
    write_idx_pair(str(mnist / "t10k"), mnist_shape[1], 10, generator)
    for part, count in zip(("train", "test"), byclass_shape):
        write_idx_pair(str(emnist / f"emnist-byclass-{part}"), count, BYCLASS_CLASSES, generator)


# --------------------------------------------------------------------------------------------
# Steps: each in its own process group, within its share of the time left
# --------------------------------------------------------------------------------------------


@dataclass
class Step:
    """A command run from the repository's root, its output in <out>/<name>.log."""

    name: str
    command: list[str]
    weight: float  # its share of the time left, against the steps not run yet
    env: dict[str, str] = field(default_factory=dict)  # on top of step_environment()


def step_environment(scratch: Path) -> dict[str, str]:
    """This environment without SLURM's variables (a run would take a job's seed or folder
    file), with unbuffered Python, no display, and torch's caches in the scratch folder."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.pop("RUN_FOLDER_FILE", None)
    env.update(PYTHONUNBUFFERED="1", MPLBACKEND="Agg", TORCH_HOME=str(scratch / "torch_home"))
    env["TORCHINDUCTOR_CACHE_DIR"] = str(scratch / "torchinductor")
    env["TRITON_CACHE_DIR"] = str(scratch / "triton")
    return env


def end_group(process: subprocess.Popen) -> None:
    """SIGTERM to the step's whole process group (a training run saves and stops), SIGKILL to
    what is left after KILL_GRACE_S, and the step itself reaped."""
    with contextlib.suppress(ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(KILL_GRACE_S)
    end_leftovers(process)
    process.wait()


def end_leftovers(process: subprocess.Popen) -> None:
    """SIGKILL to whatever still runs in the step's process group (a child a failed test left)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def run_step(step: Step, log_path: Path, timeout_s: float, env: dict[str, str]) -> dict:
    """Run the step in a new session (its own process group), its output to log_path; past
    timeout_s, or when this process is interrupted, the whole group is ended. Returns its row:
    {step, status, seconds, timeout_s}."""
    started = time.monotonic()
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(
            step.command,
            cwd=REPO,
            env={**env, **step.env},
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            code = process.wait(timeout_s)
            status = "ok" if code == 0 else f"failed (exit {code})"
            end_leftovers(process)
        except subprocess.TimeoutExpired:
            status = f"timed out after {timeout_s:.0f} s: its process group was ended"
            end_group(process)
        except BaseException:  # Ctrl-C or SIGTERM here: the step's group goes too
            end_group(process)
            raise
    trim_log(log_path)
    seconds = time.monotonic() - started
    return {"step": step.name, "status": status, "seconds": seconds, "timeout_s": timeout_s}


def trim_log(path: Path) -> None:
    """Keep the last LOG_LIMIT_BYTES of a longer log."""
    size = path.stat().st_size
    if size <= LOG_LIMIT_BYTES:
        return
    with open(path, "rb") as handle:
        handle.seek(size - LOG_LIMIT_BYTES)
        end = handle.read()
    path.write_bytes(f"[the first {size - LOG_LIMIT_BYTES:,} bytes were cut]\n".encode() + end)


def step_timeout(step: Step, waiting: list[Step], deadline: float) -> float:
    """The step's share of the time left before the deadline (less the kill grace), in
    proportion to its weight against the steps still waiting (itself included)."""
    left = deadline - time.monotonic() - KILL_GRACE_S
    return max(0.0, left) * step.weight / sum(s.weight for s in waiting)


def stop_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)  # run_step ends the step's group on the way out


# --------------------------------------------------------------------------------------------
# The steps' figures, read from their logs and run folders
# --------------------------------------------------------------------------------------------


def cuda_test_results(log_text: str) -> list[dict]:
    """Each test of pytest -v's log: {test, result, reason}; a test the log names without a
    result was cut off by the step's time-out."""
    results = {}
    for line in log_text.splitlines():
        found = re.match(r"tests/test_cuda\.py::(\S+)(?: (PASSED|FAILED|SKIPPED|ERROR))?(.*)", line)
        if found:
            name, result, rest = found.groups()
            reason = re.match(r" \((.*?)\)", rest or "")  # "SKIPPED (needs a CUDA GPU)"
            results[name] = {"test": name, "result": (result or "did not finish").lower()}
            results[name]["reason"] = reason[1] if reason else ""
    for line in log_text.splitlines():  # -ra's short summary says why a test failed
        found = re.match(r"(?:FAILED|ERROR) tests/test_cuda\.py::(\S+) - (.*)", line)
        if found and found[1] in results:
            results[found[1]]["reason"] = found[2][:200]
    return list(results.values())


def cnn_figures(log_text: str) -> dict:
    """{images_per_s: {kind: number}, ratio_to_torch_nn: {kind: number}, conv_kernels} from
    the bench's lines `<kind>  <images/s>  <ratio>x ...` and `conv kernels: <choice>`; {} when
    it printed no figures."""
    figures = {"images_per_s": {}, "ratio_to_torch_nn": {}}
    choice = re.search(r"^conv kernels: (\S+)", log_text, re.MULTILINE)  # the fast conv chosen
    figures["conv_kernels"] = choice[1] if choice else None
    for kind in CNN_KINDS:
        found = re.search(rf"^{re.escape(kind)}\s+([\d,.]+)\s+([\d.]+)x", log_text, re.MULTILINE)
        if found:
            figures["images_per_s"][kind] = float(found[1].replace(",", ""))
            figures["ratio_to_torch_nn"][kind] = float(found[2])
    return figures if figures["images_per_s"] else {}


def resnet_figures(runs: Path) -> dict:
    """What the table needs of the finished regime's metrics.json under runs/<run>/<regime>/,
    with its last epoch's images/s from history.csv; {} when no regime finished."""
    import csv

    finished = sorted(runs.glob("*/*/metrics.json"))
    if not finished:
        return {}
    metrics = json.loads(finished[-1].read_text())
    figures = {key: metrics[key] for key in RESNET_KEYS if key in metrics}
    history = finished[-1].with_name("history.csv")
    if history.is_file():
        with open(history, newline="") as handle:
            rows = list(csv.DictReader(handle))
        figures["last_epoch_images_per_s"] = float(rows[-1]["images_per_s"]) if rows else None
    return figures


def cache_text(figures: dict) -> str:
    """Whether the frozen prefix's output was cached: yes, no, or ? when metrics.json lacks it."""
    cached = figures.get("frozen_output_cached")  # one entry per invocation of the run
    if not cached:
        return "?"
    return "yes" if all(cached) else "no" if not any(cached) else "in part"


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux; platform's guess elsewhere)."""
    cpuinfo = Path("/proc/cpuinfo")
    text = cpuinfo.read_text() if cpuinfo.is_file() else ""
    found = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    return found[1].strip() if found else platform.processor() or platform.machine()


def machine_facts(cuda: bool) -> dict:
    """The GPU, the host CPU (model, threads this process may use, BLAS) and the versions."""
    import torch

    blas = re.search(r"BLAS_INFO=(\w+)", torch.__config__.show())
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    facts = {"python": platform.python_version(), "torch": torch.__version__}
    facts.update(cuda=torch.version.cuda, cpu=cpu_model(), cpu_threads=threads)
    facts["blas"] = blas[1] if blas else "unknown"
    if cuda:
        gpu = torch.cuda.get_device_properties(0)
        facts.update(gpu=gpu.name, gpu_memory_gib=round(gpu.total_memory / 2**30, 1))
        facts.update(compute_capability=f"{gpu.major}.{gpu.minor}", gpus=torch.cuda.device_count())
        facts["cudnn"] = torch.backends.cudnn.version()
    return facts


# --------------------------------------------------------------------------------------------
# Outputs: the table (summary.md, printed) and the figures (metrics.json)
# --------------------------------------------------------------------------------------------


def number(value, style: str = ",.0f") -> str:
    return format(value, style) if isinstance(value, (int, float)) else "?"


def heading_lines(report: dict) -> list[str]:
    """The title (the GPU), the versions, the host CPU and the budget."""
    facts, check = report["machine"], report["check"]
    title = "# GPU check: dry run on the CPU (tiny sizes: the figures mean nothing)"
    if not check["dry_run"]:
        gpu = f"{facts['gpu']} ({facts['gpu_memory_gib']} GiB"
        title = f"# GPU check: {gpu}, compute capability {facts['compute_capability']})"
    versions = f"torch {facts['torch']}, CUDA {facts['cuda'] or 'none'}, Python {facts['python']}"
    if facts.get("cudnn"):
        versions += f", cuDNN {facts['cudnn']}"
    host = f"host CPU {facts['cpu']}, {facts['cpu_threads']} threads, BLAS {facts['blas']}"
    budget = f"budget {check['budget_s']:.0f} s from the process start"
    return [title, "", f"{versions}; {host}.", f"{budget}; took {check['elapsed_s']:.0f} s.", ""]


def step_lines(report: dict) -> list[str]:
    lines = ["| step | result | seconds | time-out s |", "|---|---|---|---|"]
    for row in report["steps"]:
        seconds = f"{row['seconds']:.0f} | {row['timeout_s']:.0f}"
        lines.append(f"| {row['step']} | {row['status']} | {seconds} |")
    return [*lines, ""]


def test_lines(report: dict) -> list[str]:
    lines = ["| CUDA test (tests/test_cuda.py) | result |", "|---|---|"]
    for test in report["cuda_tests"]:
        reason = f" ({test['reason']})".replace("|", "/") if test["reason"] else ""
        lines.append(f"| {test['test']} | {test['result']}{reason} |")
    if not report["cuda_tests"]:
        lines.append("| none reported | see tests.log |")
    return [*lines, ""]


def cnn_lines(report: dict) -> list[str]:
    """Images/s of each kind of layers, and fast / torch.nn, on the GPU and the host CPU."""
    facts = report["machine"]
    where = {"cnn_gpu": facts.get("gpu", "the CPU (dry run)")}
    where["cnn_host_cpu"] = f"{facts['cpu']}, 2 threads"
    lines = ["From-scratch CNN training (bench/cnn_vs_autograd.py), images/s:", ""]
    header = "| step | on | fast | reference | torch.nn | fast / torch.nn | fast conv kernels |"
    lines += [header, "|---|---|---|---|---|---|---|"]
    for step, figures in report["cnn"].items():
        rates = [number(figures.get("images_per_s", {}).get(kind)) for kind in CNN_KINDS]
        ratio = number(figures.get("ratio_to_torch_nn", {}).get("fast"), ".2f")
        kernels = figures.get("conv_kernels") or "?"
        lines.append(f"| {step} | {where[step]} | {' | '.join(rates)} | {ratio}x | {kernels} |")
    return [*lines, ""]


def resnet_lines(report: dict) -> list[str]:
    """Each regime's wall time, images/s, peak memory and whether its frozen prefix was cached."""
    train, test = report["check"]["byclass_shape"]
    data = f"synthetic {train:,} train + {test:,} test images of 28x28, {BYCLASS_CLASSES} classes"
    options = " ".join(report["check"]["resnet_options"])
    lines = [f"ResNet-18 (resnet18.py {options}), {data}:", ""]
    header = "| run | epochs | wall s | frozen pass s | images/s with it | last epoch images/s |"
    header += " peak memory MiB | frozen output cached | precision |"
    lines += [header, "|---|---|---|---|---|---|---|---|---|"]
    for step, metrics in report["resnet"].items():
        run = step.removeprefix("resnet_").replace("_compile", " --compile")
        if not metrics:
            lines.append(f"| {run} | no metrics.json (see {step}.log) | | | | | | | |")
            continue
        figures = [str(metrics.get("epochs_run", "?"))]
        figures += [number(metrics.get(key), ".1f") for key in ("wall_time_s", "feature_time_s")]
        figures += [number(metrics.get(k)) for k in ("images_per_s", "last_epoch_images_per_s")]
        figures += [number(metrics.get("peak_memory_mib")), cache_text(metrics)]
        figures.append(metrics.get("precision", "?"))
        lines.append(f"| {run} | {' | '.join(figures)} |")
    return [*lines, ""]


def summary_text(report: dict) -> str:
    lines = heading_lines(report) + step_lines(report) + test_lines(report)
    return "\n".join(lines + cnn_lines(report) + resnet_lines(report))


def write_outputs(out: Path, report: dict) -> str:
    """summary.md and metrics.json (after every step: a check cut short still leaves its table)."""
    report["check"]["elapsed_s"] = time.monotonic() - STARTED
    summary = summary_text(report)
    atomic_write(out / "summary.md", summary)
    atomic_write(out / "metrics.json", report)
    return summary


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def resnet18_has_compile() -> bool:
    """Whether resnet18.py offers --compile (torch.compile of the cached-prefix step)."""
    return '"--compile"' in (REPO / "resnet18.py").read_text()


def plan_steps(args, scratch: Path, cuda: bool) -> list[Step]:
    """The steps in the order they run; each weight is about its seconds on an H200."""
    python = sys.executable
    device = "cuda" if cuda else "cpu"
    pytest = [python, "-m", "pytest", "tests/test_cuda.py", "-v", "-p", "no:cacheprovider"]
    pytest += ["--basetemp", str(scratch / "pytest")]
    mnist = str(Path(args.mnist_dir).resolve()) if args.mnist_dir else str(scratch / "mnist")
    cnn = [python, "bench/cnn_vs_autograd.py", "--data-dir", mnist, "--epochs", "0"]
    cnn += [] if cuda else DRY_CNN
    two_threads = {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    resnet = [python, "resnet18.py", "--data-dir", str(scratch / "emnist")]
    resnet += RESNET_OPTIONS if cuda else DRY_RESNET_OPTIONS
    steps = [Step("tests", pytest, 120, {"COLUMNS": "250"})]  # COLUMNS: skip reasons kept whole
    steps.append(Step("cnn_gpu", [*cnn, "--device", device], 30))
    steps.append(Step("cnn_host_cpu", [*cnn, "--device", "cpu"], 40, two_threads))
    runs = [("resnet_linear_probe", 50, []), ("resnet_partial_unfreeze", 60, [])]
    if resnet18_has_compile():  # last: it gets what the others leave
        # A dry run proves the step without compiling (minutes on a CPU at any size).
        compile_flag = ["--compile"] if cuda else []
        runs.append(("resnet_partial_unfreeze_compile", 120, compile_flag))
    for name, weight, extra in runs:
        regime = name.removeprefix("resnet_").removesuffix("_compile")
        where = ["--regime", regime, "--output-dir", str(scratch / "runs" / name)]
        steps.append(Step(name, [*resnet, *where, *extra], weight))
    return steps


def read_figures(report: dict, step: Step, log_path: Path, scratch: Path) -> None:
    """The step's figures into the report (empty ones for a step that gave none)."""
    text = log_path.read_text(errors="replace") if log_path.is_file() else ""
    if step.name == "tests":
        report["cuda_tests"] = cuda_test_results(text)
    elif step.name.startswith("cnn_"):
        report["cnn"][step.name] = cnn_figures(text)
    else:
        report["resnet"][step.name] = resnet_figures(scratch / "runs" / step.name)


def run_check(args, out: Path, scratch: Path, cuda: bool) -> int:
    """Synthetic data into scratch, then each step in turn; the table. The exit code."""
    byclass = BYCLASS_SHAPE if cuda else DRY_BYCLASS_SHAPE
    check = {"dry_run": not cuda, "budget_s": args.budget_s, "byclass_shape": byclass}
    check["resnet_options"] = RESNET_OPTIONS if cuda else DRY_RESNET_OPTIONS
    report = {"check": check, "machine": machine_facts(cuda), "steps": [], "cuda_tests": []}
    report.update(cnn={}, resnet={})
    write_synthetic_data(scratch, MNIST_SHAPE if cuda else DRY_MNIST_SHAPE, byclass)
    print(f"synthetic data written at {time.monotonic() - STARTED:.0f} s", flush=True)
    env = step_environment(scratch)
    if not cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""  # a dry run stays on the CPU, also on a GPU machine
    steps = [step for step in plan_steps(args, scratch, cuda) if step.name in args.steps]
    deadline = STARTED + args.budget_s
    for index, step in enumerate(steps):
        timeout = step_timeout(step, steps[index:], deadline)
        log_path = out / f"{step.name}.log"
        if timeout < LEAST_STEP_S:
            row = {"step": step.name, "status": "not run: no time left", "seconds": 0.0}
            row["timeout_s"] = timeout
        else:
            print(f"[{step.name}] {' '.join(step.command)} (up to {timeout:.0f} s)", flush=True)
            row = run_step(step, log_path, timeout, env)
        try:
            read_figures(report, step, log_path, scratch)
        except Exception as error:  # figures in a form not foreseen must not end the check
            row["status"] += f"; its figures could not be read ({type(error).__name__}: {error})"
        print(f"[{step.name}] {row['status']} in {row['seconds']:.0f} s", flush=True)
        report["steps"].append(row)
        write_outputs(out, report)
    print(write_outputs(out, report), flush=True)
    return 0 if all(row["status"] == "ok" for row in report["steps"]) else 1


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    out = Path(args.out or time.strftime("results/gpu_check_%Y%m%d-%H%M%S"))
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        fix = "give a new or empty folder (a lent machine returns at most 8 files from it)"
        print(f"error: --out {out} is not a new or empty folder: {fix}", file=sys.stderr)
        return 2
    import torch

    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        print(f"no CUDA GPU here (torch {torch.__version__}): the dry run instead", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    scratch = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    try:
        return run_check(args, out, scratch, cuda)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
