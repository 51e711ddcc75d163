"""What the command-line apps share: the shipped configs, paths, atomic writes, one-line errors, the trained model
of a checkpoint and its answers, Hydra callbacks (output root, sweep summary), and the process settings."""

from __future__ import annotations

import atexit
import copy
import csv
import ctypes
import errno
import gc
import io
import json
import os
import platform
import signal
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib.resources import files
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import torch
from filelock import FileLock
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import CompactHydraException, InstantiationException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from hydra.utils import get_original_cwd, to_absolute_path
from lightning.fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import Tensor
from tqdm import tqdm

from fashion_lightning.data.datamodule import CLASS_NAMES, to_input
from fashion_lightning.errors import UserError
from fashion_lightning.lit.callbacks import StoppedBySignal
from fashion_lightning.lit.checkpoints import trained_model, write_atomically

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from fashion_lightning.lit.classifier import ImageClassifier

CONFIG_DIR = str(files("fashion_lightning.conf"))
"""The shipped configs, the package ``fashion_lightning.conf``: ``conf/`` at the top of a source checkout (an
editable install maps it there), ``fashion_lightning/conf/`` in an installed one."""

DATA_PATHS = ("paths.data_dir", "data.data_dir", "data.source_dir")
"""The data's folders in the apps' configs (`with_launch_paths`)."""


def launch_path(path: str) -> str:
    """``path`` (``~`` expanded) as the folder the command was started from reads it, whatever ``hydra.job.chdir``:
    once Hydra has changed into a run directory, a relative path is joined to the launch folder (Hydra's
    ``to_absolute_path``); otherwise it is left as given."""
    path = os.path.expanduser(path)
    return to_absolute_path(path) if _in_hydra_run_dir() else path


def _in_hydra_run_dir() -> bool:
    """Whether Hydra changed into the run directory of the job running now (``hydra.job.chdir=true``); a job's
    HydraConfig left behind in the process by an earlier one does not count."""
    if not HydraConfig.initialized():
        return False
    here, runtime = os.path.realpath(os.getcwd()), HydraConfig.get().runtime
    return here == os.path.realpath(runtime.output_dir) != os.path.realpath(get_original_cwd())


def with_launch_paths(cfg: DictConfig, *keys: str) -> DictConfig:
    """A copy of ``cfg`` whose path settings ``keys`` (dotted; each a path or a list of paths) are `launch_path`s, so
    that the settings interpolating them follow; unset ones (absent, null, ``???``, empty) are left alone."""
    cfg = copy.deepcopy(cfg)
    for key in keys:
        value = OmegaConf.select(cfg, key, throw_on_missing=False)
        given = list(value) if isinstance(value, ListConfig) else value
        if given is None or given == "":
            continue
        read = [launch_path(str(v)) for v in given] if isinstance(given, list) else launch_path(str(given))
        if read != given:
            OmegaConf.update(cfg, key, read, merge=False)
    return cfg


def write_text(path: Path, text: str) -> None:
    """Write a text file atomically (`write_atomically`): its name holds the old file or the whole new one."""
    write_atomically(path, text.encode())


def write_figure(fig: Figure, path: Path) -> None:
    """Save a matplotlib figure atomically, in the format its suffix names (``.png``)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format=path.suffix.lstrip("."))
    write_atomically(path, buffer.getbuffer())


def write_json(path: Path, data: Any) -> None:
    """`write_text` of ``data`` as indented JSON."""
    write_text(path, json.dumps(data, indent=2) + "\n")


def as_list(value: Any) -> list[str]:
    """A config value given as a list or as one item (``runs=outputs`` as well as ``runs=[a,b]``), as strings."""
    return [str(v) for v in value] if isinstance(value, ListConfig | list) else [str(value)]


class AppError(CompactHydraException):
    """A `UserError` inside a Hydra multirun: Hydra reports the job's failure as this one message."""


DISK_ERRORS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.EPERM}
PATH_ERRORS = {errno.EEXIST: "a file where a folder is needed", errno.ENOTDIR: "a file where a folder is needed",
               errno.EISDIR: "a folder where a file is needed"}


def _as_user_error(err: BaseException) -> UserError | None:
    """The `UserError` an exception stands for: itself, one inside a Hydra instantiation, Lightning's refusal of a
    setting, or a disk or path error; None for anything else (a bug, which keeps its traceback)."""
    if isinstance(err, InstantiationException) and err.__cause__ is not None:
        return _as_user_error(err.__cause__)
    if isinstance(err, UserError):
        return err
    if isinstance(err, MisconfigurationException):
        return UserError(str(err).strip().replace("\n", " "))
    if isinstance(err, OSError) and err.errno in PATH_ERRORS:
        return UserError(f"cannot use {err.filename or 'a path'}: {err.strerror} ({PATH_ERRORS[err.errno]}); "
                         "choose another path")
    if isinstance(err, OSError) and err.errno in DISK_ERRORS:
        return UserError(f"cannot use {err.filename or 'a file'}: {err.strerror} (a full or read-only disk, or no "
                         "permission?); free space, or choose paths you can write to")
    return None


@contextmanager
def reported_as_one_line() -> Iterator[None]:
    """In a command-line app, print a user's mistake (`_as_user_error`) as one ``error: ...`` line on stderr and exit
    with code 1. In a multirun it is raised as an `AppError` instead, so the sweep records that job's one-line error.
    Any other exception (a bug) keeps its traceback."""
    try:
        yield
    except Exception as err:
        cause = _as_user_error(err)
        if cause is None:
            raise
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            raise AppError(str(cause)) from err
        tqdm.write(f"error: {cause}", file=sys.stderr)  # on a line of its own, below any open progress bar
        sys.exit(1)


@contextmanager
def stopped_by_signals(saved: Callable[[], str]) -> Iterator[None]:
    """In a command-line app: SIGINT and SIGTERM stop the run wherever it is (a fit's training stops after its step,
    `SaveOnInterrupt`), and the app exits with code 128 + the signal after one line saying what ``saved()`` says was
    saved and how to resume. Without it a signal outside the training steps (data loading, the sanity check, the
    test, the report) ended the run with code 0, or Lightning's own handler let it run on."""

    def stop(signum: int, frame: FrameType | None) -> None:
        raise StoppedBySignal(signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    except StoppedBySignal as stopped:
        for sig in previous:  # a second signal while the line is written ends the process as usual
            signal.signal(sig, signal.SIG_DFL)
        tqdm.write(f"stopped by {signal.Signals(stopped.signum).name}: {saved()}", file=sys.stderr)
        sys.exit(stopped.code)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def set_up_process() -> None:
    """Process-wide settings for an app's own process (never a library import), each changing speed, not results:

    - at exit, freeze every object still alive, so that Python's finalization does not walk the half million objects
      of torch and Lightning to collect reference cycles the operating system frees anyway (about 0.5 s);
    - on a machine without NVIDIA's driver, turn off Lightning's ``PYTORCH_NVML_BASED_CUDA_CHECK=1``: with it, every
      ``optimizer.step()`` tries to load NVML, fails and falls back (about 0.4 ms a step on a 2-core CPU);
    - glibc's malloc keeps freed blocks for reuse (up to 32 MB each) instead of mapping fresh pages for every
      activation and gradient of a training step.
    """
    atexit.register(gc.freeze)
    if os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK") == "1":
        try:
            ctypes.CDLL("libnvidia-ml.so.1")  # what torch's check loads
        except OSError:
            os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "0"
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        mallopt = ctypes.CDLL("libc.so.6").mallopt
        mallopt(M_MMAP_THRESHOLD, 32 << 20)
        mallopt(M_TRIM_THRESHOLD, 2**31 - 1)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
"""glibc's ``mallopt`` parameter numbers (malloc.h)."""


def load_trained(cfg: DictConfig, command: str) -> tuple[Path, ImageClassifier, bool]:
    """For the apps that use a trained model: ``cfg.ckpt_path`` (required) and its `trained_model`."""
    if OmegaConf.is_missing(cfg, "ckpt_path") or not cfg.ckpt_path:
        raise UserError(f"ckpt_path is required: python -m fashion_lightning.{command} ckpt_path=path/to/best.ckpt")
    path = Path(cfg.ckpt_path).expanduser()
    return (path, *trained_model(path))


def run_dir_of(ckpt_path: Path) -> Path:
    """The run directory a checkpoint belongs to (the parent of its ``checkpoints/`` folder)."""
    parent = ckpt_path.resolve().parent
    return parent.parent if parent.name == "checkpoints" else parent


@torch.inference_mode()
def probabilities(model: ImageClassifier, pixels: Tensor, scale: bool) -> Tensor:
    """Class probabilities (N, 10) for uint8 images (N, 28, 28), pixels scaled as the model was trained."""
    return model.predict_step(to_input(pixels, scale))[0]


def ranked(probs: Tensor, top_k: int) -> dict[str, Any]:
    """One image's answer: the predicted class, its probability and the ``top_k`` classes, best first."""
    top = probs.topk(min(top_k, len(CLASS_NAMES)))
    return {"prediction": CLASS_NAMES[int(top.indices[0])], "probability": float(top.values[0]),
            "top": [{"class": CLASS_NAMES[int(i)], "probability": float(v)}
                    for v, i in zip(top.values, top.indices, strict=True)]}

COLUMNS = ("job", "overrides", "status", "val_acc_best", "test_acc", "params", "wall_time_s", "error")


class CheckOutputRoot(Callback):
    """Before any run directory is made: ``paths.output_root`` must be a writable folder, else one clear error."""

    def _check(self, config: DictConfig) -> None:
        value = config.paths.output_root
        if not isinstance(value, str) or not value.strip() or "\0" in value:  # "" would make /runs/ at the root
            print(f"error: paths.output_root must be a folder path, got {value!r}", file=sys.stderr)
            sys.exit(1)
        root = Path(value)
        probe = root / f".write-test-{uuid.uuid4().hex}"
        try:
            root.mkdir(parents=True, exist_ok=True)
            try:
                probe.write_bytes(b"0" * 4096)
            finally:
                probe.unlink(missing_ok=True)
        except OSError as err:  # Hydra turns a callback's exception into a warning, so end the app here
            print(f"error: paths.output_root={str(root)!r} is not writable ({err.strerror}); "
                  "choose a folder on a writable disk with free space", file=sys.stderr)
            sys.exit(1)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config)


class SweepSummary(Callback):
    """After every job of a multirun, rewrite ``summary.csv`` and ``summary.md`` at the sweep root.

    Rows are sorted by best validation accuracy; a failed job is listed with its error (kept in the job
    directory's ``error.json``), so the summary is complete even when a failure ends the sweep with exit 1. Jobs
    that end at once (a parallel launcher: joblib, submitit) take turns, so the last one lists them all.
    """

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        if job_return.status == JobStatus.FAILED:
            error = job_return._return_value
            message = str(error) if isinstance(error, ValueError | AppError) else f"{type(error).__name__}: {error}"
            write_json(Path(config.hydra.runtime.output_dir) / "error.json", {"error": message})
        sweep_dir = Path(launch_path(config.hydra.sweep.dir))  # also where hydra.job.chdir=true moved this job
        with FileLock(sweep_dir / ".summary.lock"):
            write_summary(sweep_dir)


def collect_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job directory of a sweep: its overrides, status, metrics or error."""
    rows = []
    for job_dir in sorted((d for d in sweep_dir.iterdir() if d.name.isdigit()), key=lambda d: int(d.name)):
        overrides_file = job_dir / ".hydra" / "overrides.yaml"
        overrides = OmegaConf.to_container(OmegaConf.load(overrides_file)) if overrides_file.exists() else []
        row: dict[str, Any] = {"job": int(job_dir.name), "overrides": " ".join(overrides), "status": "running"}
        if (job_dir / "results.json").exists():
            results = json.loads((job_dir / "results.json").read_text())
            row.update({key: results.get(key) for key in COLUMNS[3:7]}, status="ok")
        elif (job_dir / "error.json").exists():
            row.update(status="failed", error=json.loads((job_dir / "error.json").read_text())["error"])
        rows.append(row)
    return sorted(rows, key=lambda r: (r.get("val_acc_best") is None, -(r.get("val_acc_best") or 0), r["job"]))


def write_summary(sweep_dir: Path) -> list[dict[str, Any]]:
    """Write ``summary.csv`` and ``summary.md`` for the sweep in ``sweep_dir``; return the rows."""
    rows = collect_rows(sweep_dir)
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    write_text(sweep_dir / "summary.csv", table.getvalue())

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4f}" if value < 10 else f"{value:.1f}"
        return "" if value is None else str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in COLUMNS) + " |" for row in rows]
    if plot_sweep(rows, sweep_dir / "summary.png"):
        lines += ["", "![accuracy against the swept value](summary.png)"]
    write_text(sweep_dir / "summary.md", f"# Sweep {sweep_dir.name}\n\n" + "\n".join(lines) + "\n")
    return rows


def plot_sweep(rows: list[dict[str, Any]], path: Path) -> bool:
    """Validation and test accuracy against the swept value, when one numeric key was swept; True if drawn."""
    points = []
    for row in rows:
        overrides = dict(o.split("=", 1) for o in row["overrides"].split() if "=" in o)
        if row.get("val_acc_best") is not None:
            points.append((overrides, row["val_acc_best"], row.get("test_acc")))
    keys = {key for overrides, _, _ in points for key in overrides}
    swept = [k for k in keys if len({o.get(k) for o, _, _ in points}) > 1]
    if len(swept) != 1:
        return False
    try:
        data = sorted((float(o[swept[0]]), val, test) for o, val, test in points)
    except (KeyError, ValueError):
        return False
    from matplotlib.figure import Figure  # here: only a sweep's end draws

    fig = Figure(figsize=(7, 4.5), dpi=100)
    ax = fig.subplots()
    ax.plot([d[0] for d in data], [d[1] for d in data], marker="o", label="best validation accuracy")
    ax.plot([d[0] for d in data], [d[2] for d in data], marker="s", label="test accuracy")
    ax.set_xlabel(swept[0])
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    write_figure(fig, path)
    return True
