"""What any training script here needs the same way: exit codes and one-line errors, the
command line's number types and explicit options, stop signals, atomic writes, run folders and
their lock, resume, seeds of SLURM job arrays, seed summaries, the device and the environment.

cnn_from_scratch.py and resnet18.py import it; what differs between them is one RunSpec.
Importing it runs nothing. Exit codes: see the *_EXIT_CODE constants below.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import io
import json
import math
import os
import platform
import random
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

FAILURE_EXIT_CODE = 1  # a write failed (disk full, ...), or another process of the job died
USAGE_EXIT_CODE = 2  # bad input: the one `error:` line says what to fix
DIVERGED_EXIT_CODE = 3  # the loss became NaN/inf or exploded
RESUMABLE_EXIT_CODE = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGUSR1 after a checkpoint; requeue
INTERRUPTED_EXIT_CODE = 130  # stopped by Ctrl-C after a checkpoint, or aborted by a second one
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGUSR1}

RUN_RECORD = "config.json"  # written when the run folder is made, never rewritten
FINISHED_RECORD = "metrics.json"  # written last: its presence means the run is finished
CHECKPOINT_NAME = "last.pt"  # the checkpoint a resume continues from, in both scripts
LOCK_FILE = "run.lock"  # held by the one process that trains the run
HEARTBEAT_S = 30  # how often the holder touches its lock
STALE_LOCK_S = 600  # a lock untouched this long belongs to a process that is gone
DRY_RUN_SUFFIX = "-dryrun"  # a --dry-run's folder: <prefix>-dryrun_<stamp>
RUN_FOLDER_FILE_VARIABLE = "RUN_FOLDER_FILE"  # the SLURM wrappers read the run folder there
# Where or how fast a run went, not what it computed: runs differing only in these (and the
# seed) are summarised together.
NOT_SETTINGS = (
    "seed",
    "data_dir",
    "output_dir",
    "resume",
    "device",
    "summarize",
    "no_download",
    "prefetch",
    "dry_run",
    "check_gradients",
    "conv_kernels",
    "compile",
    "cache_frozen",
    "dist_timeout",
)


@dataclass(frozen=True)
class RunSpec:
    """What differs between the training scripts, for the functions of this module.

    prefix: the run folders' name before the time stamp ("cnn": cnn_20261204-101500)
    script: the script's file name, written in config.json and in the resume command
    defining_args: options a resume takes from config.json (a different explicit value is refused)
    progress_files: glob patterns whose match makes a run resumable (its checkpoints)
    history_files: the history.csv files the seed summary plots
    """

    prefix: str
    script: str
    defining_args: tuple[str, ...]
    progress_files: tuple[str, ...]
    history_files: tuple[str, ...]


# --------------------------------------------------------------------------------------------
# Errors and the command line
# --------------------------------------------------------------------------------------------


class UserError(Exception):
    """A mistake the user can fix, or a damaged input: one `error:` line, exit code 2."""


class OutputError(Exception):
    """A file could not be written (disk full, file-size limit, path too long): exit code 1."""


def log(message: str) -> None:
    print(message, flush=True)


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (some run to dozens), at most 200 characters."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[0] if lines else type(error).__name__)[:200]


def error_text(error: BaseException) -> str:
    """An exception as "OSError: disk full" (its type alone when it has no message)."""
    text = first_line(error)
    if text == type(error).__name__:
        return text
    return f"{type(error).__name__}: {text}"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one `error:` line and exit code 2, and no abbreviated options (the SLURM
    wrappers look for --resume and --output-dir by their full names)."""

    def __init__(self, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(**kwargs)

    def error(self, message: str):
        option = re.fullmatch(r"argument (--[\w-]+): expected one argument", message)
        if option:
            # argparse reads "-1e-9" as an option, not as the value of the option before it.
            message += f"; a value that starts with '-' is written with '=': {option[1]}=-1e-9"
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr, flush=True)
        sys.exit(USAGE_EXIT_CODE)


def number_type(convert, low, high, expected: str):
    """An argparse `type=`: `convert` (int or float) of the text, refused unless finite and
    within [low, high]; very large values are refused too, before they overflow somewhere."""

    def parse(text: str):
        try:
            value = convert(text)
            accepted = math.isfinite(value) and low <= value <= high
        except (ValueError, OverflowError):  # math.isfinite(10**400) overflows too
            accepted = False
        if accepted:
            return value
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")

    return parse


LARGEST_COUNT = 2**31 - 1  # what every tensor index and size here can hold
positive_int = number_type(int, 1, LARGEST_COUNT, f"a whole number from 1 to {LARGEST_COUNT}")
count_int = number_type(int, 0, LARGEST_COUNT, f"a whole number from 0 to {LARGEST_COUNT}")
seed_int = number_type(int, 0, 2**32 - 1, "a seed from 0 to 4294967295")
positive_float = number_type(float, 1e-300, 1e300, "a number above 0 (and below 1e300)")
non_negative_float = number_type(float, 0, 1e300, "a number from 0 to 1e300")
open_fraction = number_type(float, 1e-9, 1 - 1e-9, "a fraction between 0 and 1")

NOT_GIVEN = object()  # a value no option can have: what parse_explicit finds unchanged


def explicit_options(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """The options the command line gave itself, one equal to its default included: parsed into
    a namespace pre-filled with NOT_GIVEN, where argparse sets only what it was given."""
    names = list(vars(parser.parse_args([])))  # every option's destination
    prefilled = argparse.Namespace(**dict.fromkeys(names, NOT_GIVEN))
    parsed = parser.parse_args(argv, namespace=prefilled)
    return {name for name in names if getattr(parsed, name) is not NOT_GIVEN}


def merge_resumed_args(
    spec: RunSpec, args: argparse.Namespace, recorded: dict, explicit: set[str]
) -> None:
    """A resumed run keeps what it was made with: spec.defining_args come from its config.json,
    and a value given on this command line that differs is refused, never replaced."""
    for name in spec.defining_args:
        given = getattr(args, name)
        made_with = recorded.get(name, given)
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


# --------------------------------------------------------------------------------------------
# Signals and the main function
# --------------------------------------------------------------------------------------------


class StopSignal:
    """SIGINT (Ctrl-C), SIGTERM and SIGUSR1 (SLURM's warning before the time limit) become a
    flag that training checks: it finishes the step, writes a checkpoint and exits resumable.
    A second Ctrl-C aborts at once; a second SIGTERM/SIGUSR1 changes nothing."""

    def __enter__(self) -> StopSignal:
        self.received = None
        self.exited = False
        self.previous = {number: signal.signal(number, self.handle) for number in STOP_SIGNALS}
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # those held since startup
        return self

    def __exit__(self, *exc) -> None:
        # After a stop the handlers stay and ignore what comes: a late signal while Python shuts
        # down must not kill it (exit 143 where the SLURM wrapper waits for 75).
        self.exited = True
        if self.received is None:
            for number, handler in self.previous.items():
                signal.signal(number, handler)

    def handle(self, number: int, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(number).name
        elif number == signal.SIGINT and not self.exited:
            raise KeyboardInterrupt

    @property
    def exit_code(self) -> int:
        if self.received == "SIGINT":
            return INTERRUPTED_EXIT_CODE
        return RESUMABLE_EXIT_CODE


def run_main(run, args: argparse.Namespace, explicit: set[str]) -> int:
    """`run(args, explicit, stop, lock)` with stop signals caught from the start and the run
    folder's lock released at the end, however it ends; what a user can act on ends as one
    `error:` line and an exit code, never a traceback."""
    try:
        with StopSignal() as stop, RunLock() as lock:
            return run(args, explicit, stop, lock)
    except UserError as error:
        message = str(error)
        code = USAGE_EXIT_CODE
    except OutputError as error:
        message = str(error)
        code = FAILURE_EXIT_CODE
    except KeyboardInterrupt:
        message = f"interrupted again: stopped at once; {saved_work(lock.run_dir)}"
        code = INTERRUPTED_EXIT_CODE
    print(f"error: {message}", file=sys.stderr, flush=True)
    return code


def holds_checkpoint(run_dir: Path) -> bool:
    """True when a last.pt lies in the run folder or one of its regime folders."""
    return any(run_dir.glob(f"**/{CHECKPOINT_NAME}"))


def saved_work(run_dir: Path | None) -> str:
    """What an abort left: the run's last checkpoint, or nothing."""
    if run_dir is None or not holds_checkpoint(run_dir):
        return "nothing was saved"
    return f"the last checkpoint is intact: --resume {shell_path(run_dir)} continues from it"


def ignore_stop_signals() -> None:
    """For the exiting process: Python's shutdown resets handled signals to their defaults, and
    a late SIGTERM would then end it with 143 where 75 was meant."""
    for number in STOP_SIGNALS:
        signal.signal(number, signal.SIG_IGN)


def shell_path(path: str | Path) -> str:
    """A path as a user pastes it: relative to the working folder when under it, quoted."""
    path = Path(path).absolute()
    with contextlib.suppress(ValueError):
        path = path.relative_to(Path.cwd())
    return shlex.quote(str(path))


def resume_command(spec: RunSpec, run_dir: Path) -> str:
    """The command that continues run_dir, with this very interpreter (a quick-start user has no
    `python` with torch on the PATH) and the script as it was started."""
    script = Path(sys.argv[0]) if Path(sys.argv[0]).name == spec.script else Path(spec.script)
    return f"{shell_path(sys.executable)} {shell_path(script)} --resume {shell_path(run_dir)}"


def stop_lines(spec: RunSpec, stop: StopSignal, run_dir: Path, where: str = "") -> list[str]:
    """A stopped run's closing lines (a finished run's last line is `results: <run_dir>`);
    `where`: " during <what> (<position>)"."""
    cause = (stop.received or "a signal to another process of this job") + where
    then = f"; continue with: {resume_command(spec, run_dir)}"
    if run_state(spec, run_dir) != "resumable":
        then = " before the first checkpoint, so nothing was saved: start it again"
    return [f"stopped by {cause}{then}", f"stopped: {run_dir}"]


def announce_run_folder(run_dir: Path) -> None:
    """Write the run folder to the file $RUN_FOLDER_FILE names, if set: the SLURM wrappers read
    it there (a plain file beats parsing the log)."""
    target = os.environ.get(RUN_FOLDER_FILE_VARIABLE)
    if target:
        atomic_write(target, f"{Path(run_dir).absolute()}\n")


# --------------------------------------------------------------------------------------------
# Atomic outputs
# --------------------------------------------------------------------------------------------


def atomic_write(path: str | Path, payload) -> None:
    """Write `payload` (bytes or text; for a .json path, JSON; for a .pt path, torch.save) to a
    temporary file beside `path`, fsync it, then os.replace: all or nothing. A failed write
    (disk full, file-size limit, path too long) raises OutputError."""
    path = Path(path)
    if path.suffix == ".pt":
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        payload = buffer.getvalue()
    elif path.suffix == ".json":
        payload = json_text(payload)
    if isinstance(payload, str):
        payload = payload.encode("utf-8")
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # removed by the next run
    try:
        with open(temporary, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError as error:
        with contextlib.suppress(OSError):
            temporary.unlink()
        reason = error.strerror or error
        raise OutputError(f"cannot write {path}: {reason}; {after_failed_write(path)}") from None


def json_text(value, indent: str = "") -> str:
    """JSON with two-space indents, where a list of numbers or strings stays on one line: a
    confusion matrix reads one row per line, rows the true classes."""
    inner = indent + "  "
    if isinstance(value, dict) and value:
        items = [f"{inner}{json.dumps(str(k))}: {json_text(v, inner)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{indent}}}" + ("" if indent else "\n")
    if isinstance(value, (list, tuple)) and any(isinstance(v, (dict, list, tuple)) for v in value):
        items = [inner + json_text(v, inner) for v in value]
        return "[\n" + ",\n".join(items) + f"\n{indent}]" + ("" if indent else "\n")
    return json.dumps(value) + ("" if indent else "\n")


def after_failed_write(path: Path) -> str:
    """What a user does after a failed write of `path`: continue the run, or start again."""
    run_dir = next((p for p in path.parents if (p / RUN_RECORD).is_file()), None)
    if run_dir is None or not holds_checkpoint(run_dir):
        return "nothing to resume yet: make room (or pass another --output-dir), then start again"
    return f"make room, then continue: {saved_work(run_dir)}"


def save_figure(figure, path: str | Path) -> None:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(figure)
    atomic_write(path, buffer.getvalue())


def write_csv(path: str | Path, rows: list[dict]) -> None:
    """Floats to 12 significant digits: a learning rate of 0.1 reads 0.1, not 0.0999..."""
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            rounded = {k: float(f"{v:.12g}") if isinstance(v, float) else v for k, v in row.items()}
            writer.writerow(rounded)
    atomic_write(path, buffer.getvalue())


def read_json_or_none(path: Path):
    """A JSON file's content, or None when it is missing, unreadable or not JSON."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def remove_stale_temp_files(run_dir: Path) -> int:
    """Delete the `.<name>.<pid>.tmp` files that killed writes left in a run folder; a read-only
    folder keeps them (nothing is lost: they are never read)."""
    removed = 0
    for path in run_dir.rglob(".*.tmp"):
        with contextlib.suppress(OSError):
            path.unlink()
            removed += 1
    return removed


# --------------------------------------------------------------------------------------------
# Run folders, their lock and their state
# --------------------------------------------------------------------------------------------


def job_tag() -> str | None:
    """This SLURM job's part of a run folder's name: <array job>_<task>, or the job id."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"{array_job}_{task}"
    return os.environ.get("SLURM_JOB_ID")


RUN_NAME = r"_(?P<stamp>\d{8}-\d{6})(?:_(?P<tag>\d+(?:_\d+)?))?(?:-(?P<clash>\d+))?"


def make_run_dir(output_dir: str | Path, prefix: str) -> Path:
    """A new <output_dir>/<prefix>_<YYYYmmdd-HHMMSS>[_<job tag>], or -2, -3, ... after it:
    mkdir creates a folder or fails, so two runs started in the same second never share one."""
    tag = job_tag()
    name = f"{prefix}_{time.strftime('%Y%m%d-%H%M%S')}"
    if tag:
        name += f"_{tag}"
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


TOKENS_HELD_HERE = set()  # the locks this process holds


class RunLock:
    """The lock of a run folder, held by the one process that trains it.

    A file created exclusively (O_EXCL, which NFS, Lustre and GPFS honour where flock may be
    missing or node-local) that names its holder: host, pid and a random token. Its
    modification time is a heartbeat that a thread touches every HEARTBEAT_S seconds. A lock
    whose holder is gone, on this host a pid that no longer runs, an earlier start of this
    same SLURM job (requeued, maybe after its node died), anywhere a heartbeat older than
    STALE_LOCK_S, is taken over with a log line: a killed or requeued run is never locked out.
    Use: `with RunLock() as lock: ... lock.acquire(run_dir) ...`.
    """

    def __init__(self):
        self.run_dir = None  # the run folder it was acquired for (kept after release)
        self.path = None
        self.token = uuid.uuid4().hex
        self.stopped = threading.Event()
        self.thread = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self, run_dir: Path) -> None:
        path = Path(run_dir) / LOCK_FILE
        record = {"host": socket.gethostname(), "pid": os.getpid(), "token": self.token}
        record["slurm_job"] = slurm_incarnation()
        for _ in range(5):
            try:
                descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = read_lock(path)
                if holder is None:
                    continue  # released between the two calls
                why_gone = lock_holder_gone(holder)
                if why_gone is None:
                    raise UserError(
                        f"{run_dir} is being trained by {describe_holder(holder)} (its "
                        f"{LOCK_FILE}): wait for it to end, or start a new run"
                    ) from None
                if take_over(path, holder):
                    log(f"lock: took over {path} from {describe_holder(holder)} ({why_gone})")
                continue
            except OSError as error:
                raise OutputError(f"cannot create {path}: {error.strerror}") from None
            with os.fdopen(descriptor, "w") as handle:
                json.dump(record, handle)
            TOKENS_HELD_HERE.add(self.token)
            self.run_dir = Path(run_dir)
            self.path = path
            announce_run_folder(run_dir)  # the one process that trains it says where it is
            self.thread = threading.Thread(target=self.beat, daemon=True)
            self.thread.start()
            return
        raise UserError(f"{path}: other processes keep taking this run over; start a new run")

    def beat(self) -> None:
        while not self.stopped.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        if self.path is None:
            return
        self.stopped.set()
        holder = read_lock(self.path)
        if holder is not None and holder.get("token") == self.token:
            with contextlib.suppress(OSError):
                self.path.unlink()
        TOKENS_HELD_HERE.discard(self.token)
        self.path = None


def read_lock(path: Path) -> dict | None:
    """A lock file's holder and age in seconds; None when there is no lock."""
    try:
        age = time.time() - path.stat().st_mtime
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError:
        text = ""
        age = 0.0
    try:
        holder = json.loads(text)
    except ValueError:
        holder = None  # being written, or its writer died first: judged by its age alone
    if not isinstance(holder, dict):
        holder = {}
    return {**holder, "age_s": age}


def slurm_incarnation() -> list | None:
    """This SLURM job's id and restart count: a requeued job is a new incarnation of the same
    id, and SLURM never runs two incarnations of one job at once."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return None
    return [job, os.environ.get("SLURM_RESTART_COUNT", "0")]


def lock_holder_gone(holder: dict) -> str | None:
    """Why a lock's holder is gone (its lock may be taken over), or None while it may live."""
    if holder["age_s"] > STALE_LOCK_S:
        return f"no heartbeat for {holder['age_s']:.0f} s"
    mine = slurm_incarnation()
    theirs = holder.get("slurm_job")
    if mine and isinstance(theirs, list) and theirs[0] == mine[0] and theirs != mine:
        return f"an earlier run of SLURM job {mine[0]}, requeued since (a node may have died)"
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return None
    if holder.get("token") in TOKENS_HELD_HERE:
        return None
    if holder["pid"] == os.getpid():  # a requeued job's container can reuse a pid
        return "an earlier process with this pid"
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return f"process {holder['pid']} has ended"
    except PermissionError:
        return None  # it runs, as another user
    return None


def describe_holder(holder: dict) -> str:
    host = holder.get("host", "an unknown host")
    return f"process {holder.get('pid', '?')} on {host} (heartbeat {holder['age_s']:.0f} s ago)"


def take_over(path: Path, holder: dict) -> bool:
    """Move a dead holder's lock out of the way; False if another process moved it first. Should
    a live process have re-created the lock in between, its lock is put back."""
    moved = path.with_name(f".{LOCK_FILE}.{uuid.uuid4().hex}.stale")
    try:
        os.rename(path, moved)
    except FileNotFoundError:
        return False
    taken = read_json_or_none(moved)
    if isinstance(taken, dict) and taken.get("token") != holder.get("token"):
        with contextlib.suppress(OSError):
            os.link(moved, path)  # not ours to remove: back where it was, unless re-made
        moved.unlink(missing_ok=True)
        return False
    moved.unlink(missing_ok=True)
    return True


def is_held(run_dir: Path) -> bool:
    """True while a live process holds the run folder's lock."""
    holder = read_lock(Path(run_dir) / LOCK_FILE)
    return holder is not None and lock_holder_gone(holder) is None


def new_run(
    spec: RunSpec, output_dir: str | Path, config: dict, lock: RunLock, dry_run: bool = False
) -> Path:
    """A new run folder, held by `lock` before anything is written in it, with its config.json.
    A dry run's folder says so in its name and its config.json."""
    prefix = spec.prefix + DRY_RUN_SUFFIX if dry_run else spec.prefix
    run_dir = make_run_dir(output_dir, prefix)
    lock.acquire(run_dir)
    atomic_write(run_dir / RUN_RECORD, {"script": spec.script, "dry_run": dry_run, **config})
    return run_dir


def read_run_record(run_dir: Path) -> dict:
    """config.json, with the keys every run has; a damaged one is a UserError that says so."""
    path = run_dir / RUN_RECORD
    try:
        record = json.loads(path.read_text())
    except OSError as error:
        raise UserError(f"cannot read {path}: {error.strerror}") from None
    except ValueError as error:
        raise UserError(
            f"{path} is damaged (not JSON: {first_line(error)}); restore it, or start a new run"
        ) from None
    if not isinstance(record, dict) or not isinstance(record.get("args"), dict):
        raise UserError(f'{path} is damaged (no "args" object); restore it, or start a new run')
    return record


def run_state(spec: RunSpec, run_dir: Path) -> str:
    """'finished', 'resumable' (has a checkpoint), 'unstarted' (stopped or failed before its
    first checkpoint), 'foreign' (a run folder of another script) or 'missing' (no run folder,
    or a config.json that is not this project's)."""
    record = read_json_or_none(run_dir / RUN_RECORD)
    if not isinstance(record, dict) or not isinstance(record.get("script"), str):
        return "missing"
    if record["script"] != spec.script:
        return "foreign"
    if (run_dir / FINISHED_RECORD).is_file():
        return "finished"
    if any(next(run_dir.glob(pattern), None) for pattern in spec.progress_files):
        return "resumable"
    return "unstarted"


def find_resume_run(spec: RunSpec, resume: str | None, output_dir: str | Path) -> Path | None:
    """--resume auto: the newest unfinished run with a checkpoint that no process holds, of this
    SLURM job (or array task) inside SLURM, of output_dir outside it; None if there is none.
    --resume PATH: that run folder (or the one holding PATH), refused unless this script can
    continue it."""
    if resume is None:
        return None
    if resume != "auto":
        return check_resumable(spec, Path(resume))
    found = []
    tag = job_tag()
    for folder in Path(output_dir).glob(f"{spec.prefix}_*"):
        match = re.fullmatch(re.escape(spec.prefix) + RUN_NAME, folder.name)
        if not match or (tag is not None and match["tag"] != tag):
            continue
        if run_state(spec, folder) != "resumable":
            continue
        if is_held(folder):
            log(f"resume: skipped {folder}: another process is training it")
            continue
        found.append((match["stamp"], int(match["clash"] or 1), folder))
    if not found:
        return None
    return max(found)[2]


def check_resumable(spec: RunSpec, path: Path) -> Path:
    """The run folder at (or above) path, if this script can continue it; else a UserError."""
    run_dir = next((p for p in (path, *path.parents[:2]) if (p / RUN_RECORD).is_file()), None)
    if run_dir is None:
        raise UserError(f"--resume {path}: no run folder there (no {RUN_RECORD})")
    record = read_run_record(run_dir)  # a damaged one says so
    problems = {
        "missing": f"{RUN_RECORD} names no script: not a run folder of this project",
        "foreign": f"that run was not made by {spec.script}; resume it with its own script",
        "finished": "that run is finished (metrics.json) and is never reopened: start a new run",
        "unstarted": "that run stopped before its first checkpoint: start a new run",
    }
    state = run_state(spec, run_dir)
    if state in problems:
        raise UserError(f"--resume {path}: {problems[state]}")
    if record.get("dry_run"):
        raise UserError(f"--resume {path}: that is a --dry-run; start a real run")
    return run_dir


def clean_unstarted_runs(spec: RunSpec, output_dir: str | Path) -> int:
    """Remove the temporary files that killed writes left in this script's unstarted runs in
    output_dir (a run killed while writing its first checkpoint is never resumed, and its
    half-written checkpoint would stay forever); a run that a process holds is left alone."""
    removed = 0
    for folder in Path(output_dir).glob(f"{spec.prefix}*_*"):
        if folder.is_dir() and run_state(spec, folder) == "unstarted" and not is_held(folder):
            removed += remove_stale_temp_files(folder)
    return removed


# --------------------------------------------------------------------------------------------
# Reproducibility: random state and the data a run was trained on
# --------------------------------------------------------------------------------------------


def capture_rng_state() -> dict:
    """The CPU generators only: every shuffle and initialisation draws from them, none from a
    GPU's, so a checkpoint resumes on any number and kind of GPU."""
    return {"python": random.getstate(), "torch": torch.get_rng_state()}


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])


HASHED_BYTES = 16 * 2**20  # data files up to this size (the label files) are hashed


def data_fingerprint(files: list[Path]) -> dict[str, dict]:
    """What identifies a run's data: each file's size, and the sha256 of those small enough to
    hash in a blink (the label files; the image files are hundreds of MB)."""
    fingerprint = {}
    for path in files:
        size = path.stat().st_size
        digest = None
        if size <= HASHED_BYTES:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        fingerprint[path.name] = {"bytes": size, "sha256": digest}
    return fingerprint


def check_same_data(recorded: dict | None, current: dict[str, dict], data_dir) -> None:
    """Refuse to resume on data other than the run's own (the folder may move; the files not)."""
    if not isinstance(recorded, dict):
        return  # a run made before fingerprints were recorded
    differing = sorted(name for name in current if recorded.get(name) != current[name])
    if differing:
        names = ", ".join(differing)
        raise UserError(
            f"the data in {data_dir} differ from what this run was trained on ({names}: other "
            "sizes or contents); resume with the run's own data, or start a new run"
        )


# --------------------------------------------------------------------------------------------
# Seed summaries (--summarize)
# --------------------------------------------------------------------------------------------

# The per-seed table's columns: the last part of a metric's name, and its heading.
SEED_COLUMNS = {
    "test_accuracy": "accuracy (%)",
    "macro_f1": "macro F1 (%)",
    "test_loss": "loss",
    "train_time_s": "train time (s)",
}


def is_percentage(key: str) -> bool:
    """Accuracies and F1 scores: fractions in .json/.csv, percentages where people read them."""
    return key.endswith(("accuracy", "f1"))


def metric_text(key: str, value: float) -> str:
    """A summary number with one precision per kind: 98.62 (%), 0.0431 (loss), 141.2 (s),
    13,819 (counts and rates)."""
    if is_percentage(key):
        return f"{100 * value:.2f}"
    if key.endswith("loss"):
        return f"{value:.4f}"
    if key.endswith("time_s"):
        return f"{value:,.1f}"
    if value == int(value) or abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.4g}"


def read_finished_run(spec: RunSpec, run_dir: Path) -> dict:
    """A finished run's config.json and its metrics as flat numbers, or a UserError naming the
    damaged file."""
    record = read_run_record(run_dir)
    if record.get("dry_run"):
        raise UserError(f"--summarize: {run_dir} is a --dry-run (synthetic data): leave it out")
    if "seed" not in record["args"]:
        raise UserError(f"--summarize: {run_dir / RUN_RECORD} is damaged (no seed in its args)")
    metrics = read_json_or_none(run_dir / FINISHED_RECORD)
    if not isinstance(metrics, dict):
        raise UserError(f"--summarize: {run_dir / FINISHED_RECORD} is damaged (not a JSON object)")
    numbers = flat_numbers(metrics)
    if not any(key.split(".")[-1] == "test_accuracy" for key in numbers):
        raise UserError(f"--summarize: {run_dir / FINISHED_RECORD} has no test_accuracy")
    return {"run": run_dir, "record": record, "numbers": numbers}


def distinct_runs(run_dirs: list[str]) -> list[Path]:
    """The run folders named, each once: a run named twice (a relative and an absolute path,
    say) is one run, and the log says so."""
    seen = {}
    for name in run_dirs:
        resolved = Path(name).resolve()
        if resolved in seen:
            log(f"--summarize: {name} and {seen[resolved]} are the same run: counted once")
        else:
            seen[resolved] = Path(name)
    return list(seen.values())


def spread(column: list[float]) -> dict:
    """Mean, sample standard deviation (n - 1; 0 for one value), min, max and n."""
    return {
        "mean": statistics.fmean(column),
        "std": statistics.stdev(column) if len(column) > 1 else 0.0,
        "min": min(column),
        "max": max(column),
        "n": len(column),
    }


def summarize_runs(spec: RunSpec, run_dirs: list[str], output_dir: str | Path) -> Path:
    """Mean, std, min, max and n of each number in the finished runs' metrics.json, and one row
    per seed, written to a new <prefix>_summary_<stamp> folder; the runs may differ only in the
    seed. Unfinished runs are left out (and listed); damaged or foreign ones are refused."""
    states = {path: run_state(spec, path) for path in distinct_runs(run_dirs)}
    foreign = [str(path) for path, state in states.items() if state in ("foreign", "missing")]
    if foreign:
        raise UserError(f"--summarize: not runs of {spec.script}: {', '.join(foreign)}")
    runs = [read_finished_run(spec, path) for path, state in states.items() if state == "finished"]
    if not runs:
        raise UserError("--summarize: none of these runs is finished (no metrics.json yet)")
    settings = [
        {key: value for key, value in run["record"]["args"].items() if key not in NOT_SETTINGS}
        for run in runs
    ]
    differing = sorted({key for s in settings for key in s if s.get(key) != settings[0].get(key)})
    if differing:
        raise UserError(
            f"--summarize: these runs differ in more than the seed ({', '.join(differing)}); "
            "summarise runs made with the same settings"
        )
    unfinished = [str(path) for path, state in states.items() if state != "finished"]
    for path in unfinished:
        log(f"--summarize: left out {path}: not finished (no {FINISHED_RECORD})")
    common = [key for key in runs[0]["numbers"] if all(key in run["numbers"] for run in runs)]
    seeds = [run["record"]["args"]["seed"] for run in runs]
    summary = {
        "script": spec.script,
        "runs": [str(run["run"]) for run in runs],
        "seeds": seeds,
        "left_out_unfinished": unfinished,
        "settings": settings[0],
        "per_seed": [{"seed": seed, **run["numbers"]} for seed, run in zip(seeds, runs)],
        "metrics": {key: spread([run["numbers"][key] for run in runs]) for key in common},
        "units": "accuracies and F1 as fractions (summary.md shows percentages)",
    }
    folder = make_run_dir(output_dir, f"{spec.prefix}_summary")
    atomic_write(folder / "summary.json", summary)
    atomic_write(folder / "summary.md", summary_markdown(summary))
    plot_seed_curves(spec, [run["run"] for run in runs], seeds, folder / "summary.png")
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
    """The settings, one row per seed, then each metric's mean ± std, min and max."""
    count = len(summary["runs"])
    runs = "1 run" if count == 1 else f"{count} runs"
    lines = [f"# {summary['script']}: {runs}", ""]
    settings = ", ".join(f"{key} {value}" for key, value in summary["settings"].items())
    lines += [f"Settings of every run: {settings}.", ""]
    lines += ["Accuracy and F1 in percent; loss: mean test cross-entropy; time in seconds.", ""]
    columns = [
        key for name in SEED_COLUMNS for key in summary["metrics"] if key.split(".")[-1] == name
    ]
    headings = [
        (key.rsplit(".", 1)[0] + " " if "." in key else "") + SEED_COLUMNS[key.split(".")[-1]]
        for key in columns
    ]
    lines.append("| seed | " + " | ".join(headings) + " |")
    lines.append("|---:|" + "---:|" * len(columns))
    for row in summary["per_seed"]:
        cells = " | ".join(metric_text(key, row[key]) for key in columns)
        lines.append(f"| {row['seed']} | {cells} |")
    lines.append("")
    if count > 1:
        lines += ["| metric | mean ± std | min | max | n |", "|---|---:|---:|---:|---:|"]
    else:
        lines += ["| metric | value |", "|---|---:|"]
    for key, values in summary["metrics"].items():
        unit = " (%)" if is_percentage(key) else ""
        mean = metric_text(key, values["mean"])
        if count == 1:
            lines.append(f"| {key}{unit} | {mean} |")
        elif values["min"] == values["max"]:  # the same in every run: no spread to show
            lines.append(f"| {key}{unit} | {mean} (every run) | | | {values['n']} |")
        else:
            spread = f"{mean} ± {metric_text(key, values['std'])}"
            low = metric_text(key, values["min"])
            high = metric_text(key, values["max"])
            lines.append(f"| {key}{unit} | {spread} | {low} | {high} | {values['n']} |")
    if summary["left_out_unfinished"]:
        lines += ["", "Left out (unfinished): " + ", ".join(summary["left_out_unfinished"])]
    return "\n".join(lines) + "\n"


def plot_seed_curves(spec: RunSpec, run_dirs: list[Path], seeds: list, path: Path) -> None:
    """Every run's validation accuracy per epoch, overlaid: one panel per history file that some
    run has (a linear_probe-only ResNet run has no partial_unfreeze panel)."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = [name for name in spec.history_files if any((d / name).is_file() for d in run_dirs)]
    panels = panels or list(spec.history_files[:1])
    figure, axes = plt.subplots(
        1, len(panels), figsize=(6.5 * len(panels), 4.2), squeeze=False, layout="constrained"
    )
    for axis, name in zip(axes[0], panels):
        for run_dir, seed in zip(run_dirs, seeds):
            rows = read_history(run_dir / name)
            epochs = [int(row["epoch"]) for row in rows]
            accuracy = [100 * float(row["val_accuracy"]) for row in rows]
            axis.plot(epochs, accuracy, "o-", label=f"seed {seed}")
        regime = Path(name).parent.name  # "" for the CNN's one history.csv
        axis.set(xlabel="epoch", ylabel="validation accuracy (%)", title=regime)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:  # beside the panels, never over the points
        figure.legend(handles, labels, loc="outside right center")
    figure.suptitle(f"{spec.script}: validation accuracy per epoch, {len(run_dirs)} seeds")
    save_figure(figure, path)


def read_history(path: Path) -> list[dict]:
    """A history.csv's rows ([] when there is none); a damaged one is a UserError."""
    if not path.is_file():
        return []
    try:
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
        if not rows:
            raise ValueError("no epochs in it")
        for row in rows:
            int(row["epoch"])
            float(row["val_accuracy"])
    except (OSError, KeyError, TypeError, ValueError, csv.Error) as error:
        raise UserError(f"--summarize: {path} is damaged ({error_text(error)})") from None
    return rows


# --------------------------------------------------------------------------------------------
# Device and environment
# --------------------------------------------------------------------------------------------


def select_device(name: str) -> torch.device:
    """--device as a torch.device: auto is cuda, else mps, else cpu; but in a SLURM job given
    GPUs that torch cannot use (a torch build whose CUDA the driver does not support, say),
    an error that names what torch and nvidia-smi see, never a silent fall back to the CPU."""
    cuda = torch.cuda.is_available()
    mps = torch.backends.mps.is_available()
    gpu_variables = ("CUDA_VISIBLE_DEVICES", "SLURM_GPUS", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS")
    allocated = {v.strip() for k, v in os.environ.items() if k.startswith(gpu_variables)}
    given_gpus = "SLURM_JOB_ID" in os.environ and bool(allocated - {"", "NoDevFiles"})
    if name == "auto":
        if cuda or given_gpus:
            name = "cuda"
        elif mps:
            name = "mps"
        else:
            name = "cpu"
    if name == "cuda" and not cuda:
        built = f"CUDA {torch.version.cuda}" if torch.version.cuda else "the CPU only"
        raise UserError(
            f"this job was given GPUs (or --device cuda), but torch {torch.__version__}, built "
            f"for {built}, cannot use them; {nvidia_smi_report()}. Install a torch whose CUDA "
            "build this driver supports (nvidia-smi's header shows the highest CUDA it runs), "
            "or pass --device cpu to train on the CPU"
        )
    if name == "mps" and not mps:
        raise UserError("--device mps was asked for but MPS is not available; use --device cpu")
    return torch.device(name)


def nvidia_smi_report() -> str:
    """What nvidia-smi says of the GPUs, for an error message."""
    query = ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"]
    try:
        smi = subprocess.run(query, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as error:
        return f"nvidia-smi does not run here ({first_line(error)})"
    lines = [line.strip() for line in (smi.stdout or smi.stderr).splitlines() if line.strip()]
    return f"nvidia-smi reports {'; '.join(lines) or 'nothing'}"


def cpu_model() -> str:
    """The CPU's model name ("AMD EPYC 9654 96-Core Processor"), for logs and benchmarks."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        found = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.MULTILINE)
        if found:
            return found[1].strip()
    return platform.processor() or platform.machine()


def environment_summary(device: torch.device) -> dict:
    """What ran where: versions, host, device and SLURM job, for the log and config.json."""
    git = ["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "HEAD"]
    try:
        commit = subprocess.run(git, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "host": socket.gethostname(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu": cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "git_commit": commit or None,
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT"),
    }
