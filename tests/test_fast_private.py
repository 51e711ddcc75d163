"""Every private torch and Lightning API the fast option uses, pinned: a release that changes one fails here."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from conftest import fit_model
from fashion_lightning import DenseBaseline
from fashion_lightning.fast import private


def test_onednn_fused_linear_exists_and_computes_linear_relu() -> None:
    assert private.ONEDNN_LINEAR == torch.backends.mkldnn.is_available()
    x, w, b = torch.randn(6, 5), torch.randn(3, 5), torch.randn(3)
    assert torch.allclose(private.onednn_linear(x, w, b, relu=False), x @ w.T + b, atol=1e-5)


def adam_runs(make: Callable[[list[nn.Parameter]], torch.optim.Optimizer], direct: bool,
              steps: int = 4) -> tuple[list[torch.Tensor], dict, list[bool]]:
    """Parameters and optimizer state after ``steps`` steps on fixed gradients, each step taken directly where
    ``direct`` and `direct_adam_step` takes it (else by ``optimizer.step()``); and which steps it took."""
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(5, 3)), nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(4))]
    optimizer = make(params)
    taken = []
    for i in range(steps):
        for j, p in enumerate(params[:2] if i == 2 else params):  # a step where one parameter has no gradient
            p.grad = torch.linspace(-1, 1, p.numel()).view_as(p) * (i + 1) * (j + 1)
        if i == 2:
            params[2].grad = None
        taken.append(direct and private.direct_adam_step(optimizer))
        if not taken[-1]:
            optimizer.step()
    return [p.detach().clone() for p in params], optimizer.state_dict(), taken


ADAMS = {
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.01, eps=1e-7, fused=True),
    "adamw amsgrad": lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1, amsgrad=True, fused=True),
    "adam decay maximize": lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=0.1, maximize=True, fused=True),
    "tensor lr": lambda ps: torch.optim.Adam(ps, lr=torch.tensor(0.01), fused=True),
    "two groups": lambda ps: torch.optim.Adam([{"params": ps[:1]}, {"params": ps[1:], "lr": 0.1, "betas": (0.8, 0.9)}],
                                              lr=0.01, fused=True),
}


@pytest.mark.parametrize("name", sorted(ADAMS))
def test_the_direct_adam_step_is_adams_own(name: str) -> None:
    assert private.fused_adam_works()
    reference, direct = adam_runs(ADAMS[name], direct=False), adam_runs(ADAMS[name], direct=True)
    assert direct[2] == [False, True, True, True]  # the first step creates the state
    for a, b in zip(reference[0], direct[0], strict=True):
        assert torch.equal(a, b)
    for key, state in reference[1]["state"].items():
        for field, value in state.items():
            assert torch.equal(value, direct[1]["state"][key][field]), field


@pytest.mark.parametrize("stand_in", ["declines", "does nothing"])
def test_the_adam_probe_fails_unless_the_direct_steps_run_and_match(stand_in: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(private, "direct_adam_step", lambda optimizer: stand_in == "does nothing")
    assert not private.fused_adam_works.__wrapped__()  # the uncached probe
    monkeypatch.undo()
    assert private.fused_adam_works.__wrapped__()


def test_the_direct_adam_step_takes_an_lr_schedulers_step_tracking() -> None:
    optimizer = torch.optim.Adam([nn.Parameter(torch.ones(2))], fused=True)
    torch.optim.lr_scheduler.StepLR(optimizer, 1)  # wraps optimizer.step to record that it was called
    optimizer.param_groups[0]["params"][0].grad = torch.ones(2)
    optimizer.step()
    optimizer._opt_called = False
    assert private.direct_adam_step(optimizer) and optimizer._opt_called


REFUSED = {
    "not fused": lambda ps: torch.optim.Adam(ps),
    "foreach": lambda ps: torch.optim.Adam(ps, foreach=True),
    "a subclass": lambda ps: type("MyAdam", (torch.optim.Adam,), {})(ps, fused=True),
    "another optimizer": lambda ps: torch.optim.SGD(ps, lr=0.1),
    "tensor betas": lambda ps: torch.optim.Adam(ps, betas=(torch.tensor(0.9), torch.tensor(0.99)), fused=True),
    "a step hook": lambda ps: _hooked(torch.optim.Adam(ps, fused=True)),
    "step replaced": lambda ps: _replaced(torch.optim.Adam(ps, fused=True)),
    "float64": lambda ps: torch.optim.Adam([nn.Parameter(p.detach().double()) for p in ps], fused=True),
}


def _hooked(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    optimizer.register_step_post_hook(lambda *_: None)
    return optimizer


def _replaced(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    optimizer.step = lambda closure=None: torch.optim.Adam.step(optimizer, closure)
    return optimizer


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_the_direct_adam_step_leaves_to_step_what_it_would_not_do_alike(name: str) -> None:
    params = [nn.Parameter(torch.randn(3))]
    optimizer = REFUSED[name](params)
    for p in (p for group in optimizer.param_groups for p in group["params"]):
        p.grad = torch.ones_like(p)
    assert not private.direct_adam_step(optimizer)  # no state yet
    optimizer.step()
    before = [p.detach().clone() for group in optimizer.param_groups for p in group["params"]]
    assert not private.direct_adam_step(optimizer)
    after = [p.detach() for group in optimizer.param_groups for p in group["params"]]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))  # nothing done


def test_a_global_step_hook_leaves_the_step_to_the_optimizer() -> None:
    optimizer = torch.optim.Adam([nn.Parameter(torch.ones(2))], fused=True)
    optimizer.param_groups[0]["params"][0].grad = torch.ones(2)
    optimizer.step()
    handle = register_optimizer_step_pre_hook(lambda *_: None)
    try:
        assert not private.direct_adam_step(optimizer)
    finally:
        handle.remove()
    assert private.direct_adam_step(optimizer)


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
