"""Process-wide settings that make small-batch training fast without changing any result (the fast option's)."""

from __future__ import annotations

import ctypes
import os
import platform

import torch

from fashion_lightning.fast import private

MMAP_THRESHOLD = 32 << 20
"""Blocks up to this size come from malloc's heap, not from fresh pages mapped for each allocation."""
TRIM_THRESHOLD = 2**31 - 1
"""Free memory at the top of the heap is kept for reuse until it exceeds this many bytes."""
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers


def tune_process() -> dict[str, bool]:
    """Apply the two settings below (again: no harm) and say which took effect.

    ``heap``: glibc's malloc keeps freed blocks for reuse. A training step allocates and frees several
    MB of activations and gradients; by default each block above 128 KiB is mapped fresh and returned to the
    kernel on free, so every step pays page faults on first touch. The cost: the process keeps its peak heap.

    ``nvml``: Lightning sets ``PYTORCH_NVML_BASED_CUDA_CHECK=1`` so that CUDA checks do not poison forks.
    On a CUDA build of torch without a working NVML (a machine without an NVIDIA driver), every check then
    tries NVML, fails, and falls back to the CUDA runtime anyway, and ``torch.optim`` checks on every
    ``step()``. Only there is the variable unset; it protected nothing.
    """
    return {"heap": _keep_heap(), "nvml": _skip_failing_nvml_check()}


def _keep_heap() -> bool:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL("libc.so.6").mallopt
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def _skip_failing_nvml_check() -> bool:
    if os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK") != "1" or not torch.backends.cuda.is_built():
        return False
    if private.nvml_device_count() >= 0:  # NVML works (or we cannot tell): the check does its job
        return False
    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "0"
    return True
