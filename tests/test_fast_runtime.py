"""Process-wide CPU settings: applied where they help, left alone where they would change anything."""

from __future__ import annotations

import os
import platform

import pytest
import torch

from fashion_lightning.fast.runtime import tune_process


@pytest.mark.parametrize(("nvml_devices", "unset"), [(-1, True), (0, False), (2, False)])
def test_nvml_check_is_unset_only_where_nvml_fails(nvml_devices: int, unset: bool,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # as `import lightning` sets it
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    monkeypatch.setattr(torch.cuda, "_device_count_nvml", lambda: nvml_devices)
    assert tune_process()["nvml"] is unset
    assert os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] == ("0" if unset else "1")


def test_nvml_variable_left_alone_when_not_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYTORCH_NVML_BASED_CUDA_CHECK", raising=False)
    assert tune_process()["nvml"] is False
    assert "PYTORCH_NVML_BASED_CUDA_CHECK" not in os.environ


def test_heap_setting_applies_on_glibc() -> None:
    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert tune_process()["heap"] is glibc
