"""Where the fused kernels stand in for the networks: the same function and gradients, or the network itself."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fashion_lightning import ConvNet, DenseNet, keras_init_
from fashion_lightning.fast import networks


def graph_ops(t: torch.Tensor) -> set[str]:
    """The names of the autograd nodes behind ``t``."""
    names, seen, todo = set(), set(), [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            names.add(type(node).__name__)
            todo += [n for n, _ in node.next_functions]
    return names


def fused(net: nn.Module, x: torch.Tensor) -> bool:
    """Whether `networks.logits` took the fused conv kernel for ``net`` on ``x``."""
    return "ConvPoolReLUBackward" in graph_ops(networks.logits(net, x))


def logits_and_grads(net: nn.Module, forward: Callable, x: torch.Tensor) -> list[torch.Tensor]:
    """Logits, the input gradient and every parameter gradient of a cross-entropy loss through ``forward``."""
    net.zero_grad()
    x = x.clone().requires_grad_()
    logits = forward(net, x)
    F.cross_entropy(logits, torch.arange(len(x)) % 10).backward()
    return [logits.detach(), x.grad, *(p.grad.clone() for p in net.parameters())]


@pytest.mark.parametrize("cls", [ConvNet, DenseNet])
def test_fast_logits_are_the_networks_own_with_every_gradient(cls: type) -> None:
    torch.manual_seed(0)
    net = keras_init_(cls())
    x = torch.rand(8, 1, 28, 28) * (torch.rand(8, 1, 28, 28) > 0.4)
    fast, plain = (logits_and_grads(net, f, x) for f in (networks.logits, lambda n, x: n(x)))
    for name, a, b in zip(["logits", "input", *(n for n, _ in net.named_parameters())], fast, plain, strict=True):
        assert torch.allclose(a, b, atol=1e-5 * max(1.0, b.abs().max()), rtol=1e-5), name
    assert fused(net, x) == (cls is ConvNet)


@pytest.mark.parametrize("mode", [torch.inference_mode, torch.no_grad])
def test_the_kernel_runs_without_autograd_too_in_chunks(mode: Callable, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    net = ConvNet()
    x = torch.rand(2 * networks.EVAL_CHUNK + 7, 1, 28, 28)
    with mode():
        whole = networks.ConvPoolReLU.apply(x, net.conv.weight, net.conv.bias)
        calls = []
        apply = networks.ConvPoolReLU.apply
        monkeypatch.setattr(networks.ConvPoolReLU, "apply", lambda *a: calls.append(len(a[0])) or apply(*a))
        out = networks.logits(net, x)
        assert calls == [networks.EVAL_CHUNK, networks.EVAL_CHUNK, 7]
        assert torch.allclose(networks._conv_pool_relu(net.conv, x), whole, rtol=0, atol=1e-6)
        assert torch.allclose(out, net(x), atol=1e-5)


HOOKS: dict[str, Callable[[nn.Module, list], object]] = {
    "forward hook": lambda m, calls: m.register_forward_hook(lambda *_: calls.append(1)),
    "forward pre-hook": lambda m, calls: m.register_forward_pre_hook(lambda *_: calls.append(1)),
    "full backward hook": lambda m, calls: m.register_full_backward_hook(lambda *_: calls.append(1)),
    "backward pre-hook": lambda m, calls: m.register_full_backward_pre_hook(lambda *_: calls.append(1)),
}


@pytest.mark.parametrize("hook", sorted(HOOKS))
@pytest.mark.parametrize("where", ["conv", "pool", "flatten", "fc", "out", ""])
def test_a_hook_on_any_submodule_is_called(hook: str, where: str) -> None:
    net, calls = ConvNet(), []
    HOOKS[hook](net.get_submodule(where), calls)
    x = torch.rand(2, 1, 28, 28)
    assert not fused(net, x)  # stepped aside: the hooked module runs as itself
    networks.logits(net, x).sum().backward()
    assert calls


def test_a_global_module_hook_makes_the_kernels_step_aside() -> None:
    calls = []
    handle = nn.modules.module.register_module_forward_hook(lambda *_: calls.append(1))
    try:
        assert not fused(ConvNet(), torch.rand(2, 1, 28, 28)) and calls
    finally:
        handle.remove()


class Shifted(ConvNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + 1.0


SWAPS: dict[str, Callable[[ConvNet], None]] = {
    "fc with dropout": lambda n: setattr(n, "fc", nn.Sequential(nn.Linear(6272, 128), nn.Dropout(0.0))),
    "average pool": lambda n: setattr(n, "pool", nn.AvgPool2d(2)),
    "numeric padding": lambda n: setattr(n, "conv", nn.Conv2d(1, 32, 3, padding=1)),
    "strided conv": lambda n: setattr(n, "conv", nn.Conv2d(1, 32, 3, padding=1, stride=1, dilation=1, bias=False)),
    "GELU flatten": lambda n: setattr(n, "flatten", nn.Sequential(nn.Flatten(), nn.GELU())),
    "spectral norm": lambda n: nn.utils.parametrizations.spectral_norm(n.fc),
}


@pytest.mark.parametrize("swap", sorted(SWAPS))
def test_a_swapped_submodule_runs_as_itself(swap: str) -> None:
    torch.manual_seed(0)
    net = ConvNet()
    SWAPS[swap](net)
    x = torch.rand(3, 1, 28, 28)
    assert not fused(net, x)
    net.eval()
    assert torch.allclose(networks.logits(net, x), net(x))


def test_a_subclass_overriding_forward_runs_as_itself() -> None:
    net, x = Shifted(), torch.rand(2, 1, 28, 28)
    assert not fused(net, x) and torch.allclose(networks.logits(net, x), net(x))


CONTEXTS: dict[str, Callable[[ConvNet, torch.Tensor], torch.Tensor]] = {
    "float64": lambda n, x: networks.logits(n.double(), x.double()),
    "bf16 autocast": lambda n, x: _under_autocast(n, x),
    "jit trace": lambda n, x: torch.jit.trace(Fast(n), x)(x),
    "compile": lambda n, x: torch.compile(lambda t: networks.logits(n, t), backend="aot_eager")(x),
}


class Fast(nn.Module):
    """``networks.logits`` as a module, to trace."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return networks.logits(self.net, x)


def _under_autocast(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return networks.logits(net, x)


@pytest.mark.parametrize("context", sorted(CONTEXTS))
def test_the_standard_modules_run_where_the_kernels_do_not_apply(context: str) -> None:
    torch.manual_seed(0)
    net, x = ConvNet(), torch.rand(2, 1, 28, 28, requires_grad=True)
    out = CONTEXTS[context](net, x)
    assert "ConvPoolReLUBackward" not in graph_ops(out)
    reference = _under_autocast(ConvNet(), x) if context == "bf16 autocast" else None
    assert out.dtype == (torch.float64 if context == "float64" else torch.bfloat16 if reference is not None
                         else torch.float32)


def test_dense_loss_and_grads_by_hand_where_it_applies_and_not_elsewhere() -> None:
    net = DenseNet()
    x, y = torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,))
    assert networks.loss_and_grads(net, x, y) is not None
    assert networks.loss_and_grads(ConvNet(), x, y) is None
    assert networks.loss_and_grads(net.double(), x.double(), y) is None
    net.float()
    with torch.no_grad():
        assert networks.loss_and_grads(net, x, y) is None
    with torch.autograd.detect_anomaly():
        assert networks.loss_and_grads(net, x, y) is None
    assert networks.loss_and_grads(net, x.clone().requires_grad_(), y) is None
    net.out.bias.requires_grad_(False)
    assert networks.loss_and_grads(net, x, y) is None
    net.out.bias.requires_grad_(True)
    handle = net.row1.weight.register_hook(lambda g: g)
    assert networks.loss_and_grads(net, x, y) is None
    handle.remove()
    assert networks.loss_and_grads(net, x, y) is not None
    net.flatten.register_forward_hook(lambda *_: None)
    assert networks.loss_and_grads(net, x, y) is None
