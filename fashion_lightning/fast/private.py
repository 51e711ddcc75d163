"""Every private torch and Lightning API the fast option touches, in one place, each checked before use.

Tested with torch 2.14 and Lightning 2.6 (the ranges ``pyproject.toml`` declares); ``tests/test_fast_private.py``
pins each one, so a release that changes any of them fails loudly there. Where a check fails at run time, the
fast option falls back to public APIs (the standard modules, autograd) or steps aside to the textbook path.
"""

from __future__ import annotations

import functools

import lightning as L
import torch
from torch import Tensor, nn
from torch.nn.modules import module as torch_module
from torch.optim import optimizer as torch_optimizer

# --- torch: oneDNN's fused linear (+ ReLU), the op inductor's CPU lowering calls --------------------------------


def _onednn_linear_works() -> bool:
    """Whether ``torch.ops.mkldnn._linear_pointwise`` exists and computes ``relu(x @ w.T + b)`` here."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        x, w = torch.linspace(-1, 1, 15).view(3, 5), torch.linspace(1, -1, 20).view(4, 5)  # no random draws at import
        b = torch.linspace(-0.5, 0.5, 4)
        y = torch.ops.mkldnn._linear_pointwise(x, w, b, "relu", [], "")
        return bool(torch.allclose(y, torch.relu(x @ w.T + b), atol=1e-5))
    except (AttributeError, RuntimeError, TypeError):
        return False


ONEDNN_LINEAR = _onednn_linear_works()


def onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None, relu: bool) -> Tensor:
    """``x @ weight.T (+ bias)``, ReLU'd if ``relu``, as one oneDNN call (2-D float32 CPU tensors)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "relu" if relu else "none", [], "")


# --- torch: Adam's fused kernel, called as Adam.step calls it ---------------------------------------------------

ADAMS = (torch.optim.Adam, torch.optim.AdamW)


def _step_is_the_class_step(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step`` is its class's, or that wrapped only by an LR scheduler's call tracking."""
    step = vars(optimizer).get("step")
    return step is None or (getattr(step, "_wrapped_by_lr_sched", False)
                            and getattr(step, "__wrapped__", None) is type(optimizer).step)


def fused_adam_step(optimizer: torch.optim.Optimizer) -> bool:
    """`direct_adam_step` where this torch passes the check below (`fused_adam_works`)."""
    return fused_adam_works() and direct_adam_step(optimizer)


def direct_adam_step(optimizer: torch.optim.Optimizer) -> bool:
    """``optimizer.step()`` for a ``torch.optim.Adam`` or ``AdamW`` with ``fused=True`` on CPU float32 parameters, as
    the two kernel calls it makes (the step counts' ``_foreach_add_``, then ``torch._fused_adam_`` or
    ``_fused_adamw_`` with the group's settings), without its per-call bookkeeping. Returns False, having done nothing,
    wherever ``step()`` would do more or other: another class, a group not fused, differentiable, capturable or with
    tensor betas, AMP's gradient scale, a step hook (global or the optimizer's), ``step`` replaced on the instance
    (other than by an LR scheduler's tracking), a gradient without optimizer state yet, sparse, or not CPU float32.
    """
    if type(optimizer) not in ADAMS or torch.compiler.is_compiling():
        return False
    if (optimizer._optimizer_step_pre_hooks or optimizer._optimizer_step_post_hooks
            or torch_optimizer._global_optimizer_pre_hooks or torch_optimizer._global_optimizer_post_hooks
            or getattr(optimizer, "grad_scale", None) is not None or getattr(optimizer, "found_inf", None) is not None
            or not _step_is_the_class_step(optimizer)):
        return False
    groups = []
    for group in optimizer.param_groups:
        if (not group["fused"] or group["differentiable"] or group["capturable"]
                or any(isinstance(b, Tensor) for b in group["betas"])):
            return False
        params = [p for p in group["params"] if p.grad is not None]
        if not all(p.device.type == "cpu" and p.dtype == torch.float32 and not p.grad.is_sparse
                   and "step" in optimizer.state.get(p, ()) for p in params):
            return False
        groups.append((group, params))
    with torch.no_grad():
        for group, params in groups:
            if not params:
                continue
            state = [optimizer.state[p] for p in params]
            steps = [s["step"] for s in state]
            torch._foreach_add_(steps, 1)
            kernel = torch._fused_adamw_ if group["decoupled_weight_decay"] else torch._fused_adam_
            kernel(params, [p.grad for p in params], [s["exp_avg"] for s in state], [s["exp_avg_sq"] for s in state],
                   [s["max_exp_avg_sq"] for s in state] if group["amsgrad"] else [], steps,
                   amsgrad=group["amsgrad"], lr=group["lr"], beta1=group["betas"][0], beta2=group["betas"][1],
                   weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"],
                   grad_scale=None, found_inf=None)
    optimizer._opt_called = True  # what an LR scheduler's tracking records  # type: ignore[attr-defined]
    return True


@functools.cache
def fused_adam_works() -> bool:
    """Whether `direct_adam_step`'s calls exist here and step as ``Adam(fused=True).step()`` does; checked on first
    use (only the fast loop steps Adam), not when the package is imported."""
    try:
        if not all(hasattr(torch, k) for k in ("_fused_adam_", "_fused_adamw_")) or not all(
                hasattr(torch_optimizer, k) for k in ("_global_optimizer_pre_hooks", "_global_optimizer_post_hooks")):
            return False
        runs = []
        for direct in (False, True):
            p = nn.Parameter(torch.linspace(-1, 1, 8))
            optimizer = torch.optim.Adam([p], lr=0.1, fused=True)
            for i in range(3):
                p.grad = torch.linspace(1, -1, 8) * (i + 1)
                if not (direct and i):  # the first step makes the state; the direct run's next two skip step()
                    optimizer.step()
                elif not direct_adam_step(optimizer):
                    return False
            runs.append((p.detach(), optimizer.state[p]["step"], optimizer.state[p]["exp_avg_sq"]))
        return all(torch.equal(a, b) for a, b in zip(*runs, strict=True))
    except (AttributeError, KeyError, RuntimeError, TypeError):
        return False



# --- torch: hooks, which a fused kernel would skip --------------------------------------------------------------

MODULE_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                "_global_backward_pre_hooks")
TENSOR_HOOKS = ("_backward_hooks", "_post_accumulate_grad_hooks")


def _hook_registries_found() -> bool:
    probe, t = nn.Module(), torch.zeros(1, requires_grad=True)
    if not (all(hasattr(torch_module, name) for name in GLOBAL_HOOKS) and all(hasattr(probe, n) for n in MODULE_HOOKS)):
        return False
    probe.register_forward_hook(lambda *_: None)
    t.register_hook(lambda g: g)
    return bool(probe._forward_hooks) and bool(getattr(t, "_backward_hooks", None))


HOOK_REGISTRIES = _hook_registries_found()


def hooked(module: nn.Module) -> bool:
    """Whether a hook watches ``module`` or any submodule (or every module, globally); True if it cannot tell."""
    if not HOOK_REGISTRIES:
        return True
    return (any(getattr(torch_module, name) for name in GLOBAL_HOOKS)
            or any(getattr(m, name) for m in module.modules() for name in MODULE_HOOKS))


def rerouted(module: nn.Module) -> bool:
    """Whether ``module`` or a submodule runs other code than its class's ``forward``: compiled in place
    (``nn.Module.compile``) or given a ``forward`` of its own (``torch.compile``'d LightningModules get one)."""
    return any("forward" in vars(m) or getattr(m, "_compiled_call_impl", None) is not None for m in module.modules())


def tensor_hooked(t: Tensor) -> bool:
    """Whether a gradient hook sits on tensor ``t`` (``register_hook``, ``register_post_accumulate_grad_hook``)."""
    return not HOOK_REGISTRIES or any(getattr(t, name, None) for name in TENSOR_HOOKS)


# --- torch: NVML's device count (-1 where NVML does not work) ---------------------------------------------------


def nvml_device_count() -> int:
    """The GPUs NVML sees, -1 where NVML fails; 0 if this torch lacks the probe (then the check is left alone)."""
    probe = getattr(torch.cuda, "_device_count_nvml", None)
    return probe() if callable(probe) else 0


# --- Lightning: the fit loop's counters, for several optimizer steps in one training step -----------------------


def lightning_counters_missing(trainer: L.Trainer) -> str | None:
    """Why this Lightning's counters cannot be kept by the fast loop, or None when they can."""
    epoch_loop = getattr(trainer.fit_loop, "epoch_loop", None)
    progress = getattr(getattr(epoch_loop, "manual_optimization", None), "optim_step_progress", None)
    if not all(hasattr(progress, name) for name in ("increment_ready", "increment_completed")):
        return "fit_loop.epoch_loop.manual_optimization.optim_step_progress"
    if not isinstance(getattr(epoch_loop, "_batches_that_stepped", None), int):
        return "fit_loop.epoch_loop._batches_that_stepped"
    return None


def count_optimizer_step(trainer: L.Trainer) -> None:
    """Count one optimizer step in ``trainer.global_step``, as ``LightningOptimizer.step`` does in manual
    optimization, without the hook dispatch around it."""
    progress = trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
    progress.increment_ready()
    progress.increment_completed()


def set_logger_step(trainer: L.Trainer, steps_taken: int) -> None:
    """Make the loggers' step count optimizer steps: Lightning adds one per training step after the step ends."""
    trainer.fit_loop.epoch_loop._batches_that_stepped = steps_taken - 1


def checkpoints_within_epochs(callback: L.pytorch.callbacks.ModelCheckpoint) -> bool:
    """Whether a ``ModelCheckpoint`` saves every n training steps or every time interval (True if it cannot tell)."""
    steps, interval = (getattr(callback, name, None) for name in ("_every_n_train_steps", "_train_time_interval"))
    return not isinstance(steps, int) or steps > 0 or interval is not None
