"""The GPU check, in one command: on a CUDA machine with no internet, no EMNIST and minutes to
spare, it runs what the CPU cannot show and prints one table.

    python bench/gpu_check.py --out gpu_check            # on the GPU machine (about 8 minutes)
    python bench/gpu_check.py --dry-run --out /tmp/dry   # the same code at tiny sizes, CPU

1. tests/test_cuda.py's CUDA-marked tests (CPU vs CUDA agreement of the from-scratch layers,
   both precisions of a tiny ResNet run, resume across an interruption, cached vs uncached
   logits, a 2-process NCCL run when two GPUs are present);
2. bench/cnn_vs_autograd.py --device cuda on synthetic images of MNIST's exact shape;
3. bench/resnet_full_gpu.py: both regimes at the full EMNIST ByClass shape (synthetic data,
   early stopping off: every epoch runs), with each regime's wall time, images/s and peak memory.

It runs with the Python that runs it (or $PYTHON): the lent machines have no venv of ours, only
a python3 with torch, torchvision, scikit-learn, matplotlib, tqdm and pytest. Each step gets what
is left of --budget-s; its log goes to --out, with the table (summary.md). Without a GPU it says
so and exits 0 after the dry run. Exit code 1 when a step failed or ran out of time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def write_synthetic_mnist(root: Path, train: int, test: int) -> None:
    """Random uint8 images in MNIST's raw IDX layout (what cnn_from_scratch.load_mnist reads)."""
    import torch

    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    for prefix, count in (("train", train), ("t10k", test)):
        images = torch.randint(0, 256, (count, 28, 28), dtype=torch.uint8, generator=generator)
        labels = torch.randint(0, 10, (count,), dtype=torch.uint8, generator=generator)
        with open(raw / f"{prefix}-images-idx3-ubyte", "wb") as handle:
            handle.write(struct.pack(">IIII", 2051, count, 28, 28) + images.numpy().tobytes())
        with open(raw / f"{prefix}-labels-idx1-ubyte", "wb") as handle:
            handle.write(struct.pack(">II", 2049, count) + labels.numpy().tobytes())


class Steps:
    """Runs each step as a subprocess within what is left of the budget, logging to `out`."""

    def __init__(self, out: Path, budget_s: float, python: str):
        self.out, self.python, self.deadline = out, python, time.monotonic() + budget_s
        self.rows: list[tuple[str, str, float]] = []

    def run(self, name: str, command: list[str], share: float = 1.0) -> str:
        left = self.deadline - time.monotonic()
        timeout = max(10.0, share * left)
        env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1"}
        started = time.monotonic()
        print(f"[{name}] {' '.join(command)} (up to {timeout:.0f}s)", flush=True)
        try:
            result = subprocess.run(
                [self.python, *command],
                cwd=REPO,
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
            output, status = result.stdout + result.stderr, f"exit {result.returncode}"
            status = "ok" if result.returncode == 0 else status
        except subprocess.TimeoutExpired as expired:
            output = (expired.stdout or b"").decode() + (expired.stderr or b"").decode()
            status = f"timed out after {timeout:.0f}s"
        seconds = time.monotonic() - started
        (self.out / f"{name}.log").write_text(output)
        print(f"[{name}] {status} in {seconds:.0f}s; log: {self.out / f'{name}.log'}", flush=True)
        self.rows.append((name, status, seconds))
        return output


def resnet_rows(output: str) -> list[str]:
    """Each regime's wall time, images/s and peak memory, from the run's metrics.json."""
    found = re.findall(r"^results: (.+)$", output, re.MULTILINE)
    if not found:
        return ["| resnet | no results (see resnet.log) | | | |"]
    rows = []
    for regime in ("linear_probe", "partial_unfreeze"):
        path = Path(found[-1]) / regime / "metrics.json"
        if not path.is_file():
            rows.append(f"| {regime} | not finished (see resnet.log) | | | |")
            continue
        metrics = json.loads(path.read_text())
        rows.append(
            f"| {regime} | {metrics['wall_time_s']:.1f} | {metrics['epochs_run']} | "
            f"{metrics['images_per_s']:,.0f} | {metrics['peak_memory_mb']:,.0f} "
            f"({metrics['precision']}) |"
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_check", help="folder for the logs and the table")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU")
    parser.add_argument("--budget-s", type=float, default=480, help="all steps together")
    args = parser.parse_args(argv)
    import torch

    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        print("no CUDA GPU here: running the dry run on the CPU only", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if cuda else "cpu"
    gpu = torch.cuda.get_device_name(0) if cuda else "none (dry run on the CPU)"
    steps = Steps(out, args.budget_s, os.environ.get("PYTHON", sys.executable))
    steps.run("tests", ["-m", "pytest", "tests/test_cuda.py", "-m", "cuda", "-q", "-rs"], 0.3)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as scratch:
        sizes = (60_000, 10_000) if cuda else (2_000, 500)
        write_synthetic_mnist(Path(scratch), *sizes)
        quick = [] if cuda else ["--steps", "2", "--repeats", "1", "--batch-size", "64"]
        command = ["bench/cnn_vs_autograd.py", "--data-dir", scratch, "--device", device]
        cnn = steps.run("cnn", [*command, "--epochs", "1" if cuda else "0", *quick], 0.2)
    ratio = re.findall(r"^throughput ratio (.+)$", cnn, re.MULTILINE)  # "<ours> / torch.nn: 1.3x"
    full = ["--device", device, "--output-dir", str(out / "resnet_runs")]
    if not cuda:
        full += ["--scale", "0.0005", "--img-size", "32", "--epochs", "1", "--batch-size", "64"]
    resnet = steps.run("resnet", ["bench/resnet_full_gpu.py", *full])
    table = [
        f"# GPU check: {gpu}",
        "",
        f"torch {torch.__version__} (CUDA {torch.version.cuda}), Python {sys.version.split()[0]}",
        "",
        "| step | status | wall s |",
        "|---|---|---|",
        *(f"| {name} | {status} | {seconds:.0f} |" for name, status, seconds in steps.rows),
        "",
        f"From-scratch CNN, training throughput ratio {ratio[-1] if ratio else 'n/a'}",
        "",
        "| ResNet-18 regime | wall s | epochs | images/s | peak memory MB |",
        "|---|---|---|---|---|",
        *resnet_rows(resnet),
    ]
    (out / "summary.md").write_text("\n".join(table) + "\n")
    print("\n".join(table), flush=True)
    failed = [name for name, status, _ in steps.rows if status != "ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
