"""Every private torch and Lightning API the fast option uses, pinned: a release that changes one fails here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from conftest import fit_model
from fashion_lightning import DenseBaseline
from fashion_lightning.fast import private


def test_onednn_fused_linear_exists_and_computes_linear_relu() -> None:
    assert private.ONEDNN_LINEAR == torch.backends.mkldnn.is_available()
    x, w, b = torch.randn(6, 5), torch.randn(3, 5), torch.randn(3)
    assert torch.allclose(private.onednn_linear(x, w, b, relu=False), x @ w.T + b, atol=1e-5)


def test_hook_registries_are_where_the_fast_option_looks() -> None:
    assert private.HOOK_REGISTRIES
    layer = nn.Linear(2, 2)
    assert not private.hooked(layer) and not private.tensor_hooked(layer.weight)
    handle = layer.weight.register_post_accumulate_grad_hook(lambda p: None)
    assert private.tensor_hooked(layer.weight)
    handle.remove()
    for register in (layer.register_forward_hook, layer.register_forward_pre_hook, layer.register_full_backward_hook,
                     layer.register_full_backward_pre_hook):
        handle = register(lambda *_: None)
        assert private.hooked(nn.Sequential(layer))
        handle.remove()
    handle = nn.modules.module.register_module_full_backward_hook(lambda *_: None)
    assert private.hooked(nn.Linear(1, 1))
    handle.remove()


def test_nvml_probe_exists() -> None:
    assert callable(getattr(torch.cuda, "_device_count_nvml", None))
    assert isinstance(private.nvml_device_count(), int)


def test_lightning_counters_are_kept_by_the_fast_loop(data_dir: Path, tmp_path: Path) -> None:
    assert private.lightning_counters_missing(L.Trainer(logger=False)) is None
    trainer = fit_model(DenseBaseline(fast=True, batches_per_step=4), data_dir, tmp_path, max_epochs=1,
                        limit_train_batches=10)
    assert trainer.global_step == 10  # optimizer steps, counted by count_optimizer_step
    assert trainer.fit_loop.epoch_loop._batches_that_stepped == 10  # the loggers' step, set by set_logger_step


def test_model_checkpoint_schedule_is_read() -> None:
    assert not private.checkpoints_within_epochs(ModelCheckpoint())
    assert private.checkpoints_within_epochs(ModelCheckpoint(every_n_train_steps=5))
    assert private.checkpoints_within_epochs(ModelCheckpoint(train_time_interval=__import__("datetime").timedelta(1)))


def test_importing_the_package_draws_no_random_numbers() -> None:
    draw = "import torch; torch.manual_seed(0); {} print(torch.rand(1).item())"
    values = {subprocess.run([sys.executable, "-c", draw.format(extra)], check=True, capture_output=True,
                             text=True).stdout for extra in ("", "import fashion_lightning;")}
    assert len(values) == 1  # the import-time checks of private APIs use no random numbers
