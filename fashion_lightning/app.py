"""What the command-line apps share: the shipped configs, atomic writes, one-line errors, their process settings."""

from __future__ import annotations

import atexit
import copy
import ctypes
import errno
import gc
import io
import json
import os
import platform
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException, InstantiationException
from hydra.types import RunMode
from hydra.utils import get_original_cwd, to_absolute_path
from lightning.fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, ListConfig, OmegaConf

from fashion_lightning.checkpoint_io import write_atomically
from fashion_lightning.errors import UserError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

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
        print(f"error: {cause}", file=sys.stderr)
        sys.exit(1)


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
