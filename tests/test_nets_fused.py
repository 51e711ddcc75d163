"""`FusedConvNet` and `FusedDenseNet`: the plain networks' function, gradients and parameters, or the plain networks
themselves wherever the kernels do not apply."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fashion_lightning import CNN, ConvNet, DenseBaseline, DenseNet, keras_init_
from fashion_lightning.nets import fused as networks
from fashion_lightning.nets.fused import FusedConvNet, FusedDenseNet

PAIRS = [(FusedConvNet, ConvNet), (FusedDenseNet, DenseNet)]


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
    """Whether ``net(x)`` ran a fused kernel."""
    ops = graph_ops(net(x.clone().requires_grad_()))
    return "ConvPoolReLUBackward" in ops or "TwoLinearReLUBackward" in ops


def twins(fast: type, plain: type, seed: int = 0, **kwargs: int) -> tuple[nn.Module, nn.Module]:
    """A fused network and a plain one with the same weights (Keras init: zero biases, so exact ReLU ties)."""
    torch.manual_seed(seed)
    a = keras_init_(fast(**kwargs))
    b = plain(**kwargs)
    b.load_state_dict(a.state_dict())
    return a, b


def tie_heavy_images(n: int) -> torch.Tensor:
    x = torch.rand(n, 1, 28, 28) * (torch.rand(n, 1, 28, 28) > 0.5)
    x[:, :, 4:12, 4:20] = 1.0  # saturated blocks: max-pool windows whose maxima tie exactly
    x[:, :, 20:] = 0.0  # black rows: exact-zero pre-activations (ReLU ties)
    return x


def outputs_and_grads(net: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Logits, the input gradient and every parameter gradient of a cross-entropy loss."""
    net.zero_grad()
    x = x.clone().requires_grad_()
    logits = net(x)
    F.cross_entropy(logits, torch.arange(len(x)) % 10).backward()
    return [logits.detach(), x.grad, *(p.grad.clone() for p in net.parameters())]


@pytest.mark.parametrize(("fast", "plain", "kwargs"), [
    (FusedConvNet, ConvNet, {"kernel_size": k}) for k in (1, 2, 3, 4, 5, 7)] + [
    (FusedConvNet, ConvNet, {"filters": 5, "hidden": 17}), (FusedDenseNet, DenseNet, {}),
    (FusedDenseNet, DenseNet, {"hidden1": 9, "hidden2": 3})])
def test_the_same_function_and_every_gradient_input_included(fast: type, plain: type, kwargs: dict) -> None:
    a, b = twins(fast, plain, **kwargs)
    x = tie_heavy_images(16)
    assert fused(a, x) and not fused(b, x)
    names = ["logits", "input", *(n for n, _ in a.named_parameters())]
    for name, u, v in zip(names, outputs_and_grads(a, x), outputs_and_grads(b, x), strict=True):
        torch.testing.assert_close(u, v, atol=1e-5 * max(1.0, v.abs().max().item()), rtol=1e-5, msg=name)


@pytest.mark.parametrize(("fast", "plain"), PAIRS)
def test_the_same_parameters_under_the_same_names(fast: type, plain: type) -> None:
    a, b = fast(), plain()
    assert [(n, p.shape) for n, p in a.named_parameters()] == [(n, p.shape) for n, p in b.named_parameters()]
    b.load_state_dict(a.state_dict())  # strict: the checkpoints interchange
    a.load_state_dict(b.state_dict())


@pytest.mark.parametrize("mode", [torch.inference_mode, torch.no_grad])
def test_evaluation_runs_the_kernel_in_chunks(mode: Callable, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = twins(FusedConvNet, ConvNet)
    x = torch.rand(2 * networks.EVAL_CHUNK + 7, 1, 28, 28)
    calls = []
    apply = networks.ConvPoolReLU.apply
    monkeypatch.setattr(networks.ConvPoolReLU, "apply", lambda *t: calls.append(len(t[0])) or apply(*t))
    with mode():
        out = a(x)
    assert calls == [networks.EVAL_CHUNK, networks.EVAL_CHUNK, 7]
    torch.testing.assert_close(out, b(x), atol=1e-5, rtol=1e-5)


HOOKS: dict[str, Callable[[nn.Module, list], object]] = {
    "forward hook": lambda m, calls: m.register_forward_hook(lambda *_: calls.append(1)),
    "forward pre-hook": lambda m, calls: m.register_forward_pre_hook(lambda *_: calls.append(1)),
    "full backward hook": lambda m, calls: m.register_full_backward_hook(lambda *_: calls.append(1)),
    "backward pre-hook": lambda m, calls: m.register_full_backward_pre_hook(lambda *_: calls.append(1)),
}


@pytest.mark.parametrize("hook", sorted(HOOKS))
@pytest.mark.parametrize(("cls", "where"), [(FusedConvNet, w) for w in ("conv", "pool", "flatten", "fc", "out")]
                         + [(FusedDenseNet, w) for w in ("row1", "row2", "flatten", "out")])
def test_a_hook_on_a_layer_is_called(hook: str, cls: type, where: str) -> None:
    net, calls = cls(), []
    HOOKS[hook](net.get_submodule(where), calls)
    x = torch.rand(2, 1, 28, 28)
    assert not fused(net, x)  # the plain forward: the hooked layer runs as itself
    net(x).sum().backward()
    assert calls


def test_a_global_module_hook_is_called() -> None:
    calls = []
    handle = nn.modules.module.register_module_forward_hook(lambda *_: calls.append(1))
    try:
        assert not fused(FusedConvNet(), torch.rand(2, 1, 28, 28)) and calls
    finally:
        handle.remove()


def test_a_hook_on_the_whole_network_keeps_the_kernels() -> None:
    net, calls = FusedConvNet(), []
    net.register_forward_hook(lambda *_: calls.append(1))
    assert fused(net, torch.rand(2, 1, 28, 28)) and calls


SWAPS: dict[str, Callable[[nn.Module], None]] = {
    "fc with dropout": lambda n: setattr(n, "fc", nn.Sequential(nn.Linear(6272, 128), nn.Dropout(0.0))),
    "average pool": lambda n: setattr(n, "pool", nn.AvgPool2d(2)),
    "numeric padding": lambda n: setattr(n, "conv", nn.Conv2d(1, 32, 3, padding=1)),
    "conv without bias": lambda n: setattr(n, "conv", nn.Conv2d(1, 32, 3, padding="same", bias=False)),
    "GELU flatten": lambda n: setattr(n, "flatten", nn.Sequential(nn.Flatten(), nn.GELU())),
    "spectral norm": lambda n: nn.utils.parametrizations.spectral_norm(n.fc),
}


@pytest.mark.parametrize("swap", sorted(SWAPS))
def test_a_swapped_layer_runs_as_itself(swap: str) -> None:
    torch.manual_seed(0)
    net = FusedConvNet()
    SWAPS[swap](net)
    x = torch.rand(3, 1, 28, 28)
    assert not fused(net, x)
    net.eval()
    torch.testing.assert_close(net(x), ConvNet.forward(net, x))


def _under_autocast(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return net(x)


CONTEXTS: dict[str, Callable[[nn.Module, torch.Tensor], torch.Tensor]] = {
    "float64": lambda n, x: n.double()(x.double()),
    "bf16 autocast": _under_autocast,
    "jit trace": lambda n, x: torch.jit.trace(n, x)(x),
    "compile": lambda n, x: torch.compile(n, backend="aot_eager")(x),
}


@pytest.mark.parametrize("context", sorted(CONTEXTS))
@pytest.mark.parametrize(("fast", "plain"), PAIRS)
def test_the_plain_layers_run_where_the_kernels_do_not_apply(context: str, fast: type, plain: type) -> None:
    a, b = twins(fast, plain)
    x = torch.rand(2, 1, 28, 28, requires_grad=True)
    out, expected = CONTEXTS[context](a, x), CONTEXTS[context](b, x)
    assert not {"ConvPoolReLUBackward", "LinearReLUBackward", "TwoLinearReLUBackward"} & graph_ops(out)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize(("fast", "plain"), PAIRS)
def test_torchscript_compiles_the_plain_network_with_the_same_weights(fast: type, plain: type) -> None:
    a, b = twins(fast, plain)
    x = torch.rand(4, 1, 28, 28)
    scripted = torch.jit.script(a)
    torch.testing.assert_close(scripted(x), b(x))
    assert fused(a, x)  # the network itself is unchanged


@pytest.mark.parametrize(("cls", "net"), [(CNN, FusedConvNet), (DenseBaseline, FusedDenseNet)])
def test_fused_is_a_choice_of_network_whose_checkpoint_loads_into_either(cls: type, net: type) -> None:
    fused_module = cls(fused=True)
    assert type(fused_module.net) is net
    plain = cls()
    plain.load_state_dict(fused_module.state_dict())
    x = torch.rand(3, 1, 28, 28)
    torch.testing.assert_close(fused_module.eval()(x), plain.eval()(x), atol=1e-5, rtol=1e-5)
    assert pickle.loads(pickle.dumps(fused_module)).hparams["fused"] is True


CAPABILITIES = ("default", "avx2", "avx512")  # each a subset of the next


@pytest.mark.parametrize("capability", CAPABILITIES)
def test_the_same_function_with_each_cpu_kernel_set_this_cpu_runs(capability: str) -> None:
    """torch picks its CPU kernels by the CPU (AVX2 or AVX-512 on this machine kind), and ``ATEN_CPU_CAPABILITY``
    selects a lesser set: the test above runs the CPU's own set, this one each lesser set in a process of its own."""
    native = torch.backends.cpu.get_cpu_capability().lower()
    if native not in CAPABILITIES or CAPABILITIES.index(capability) >= CAPABILITIES.index(native):
        pytest.skip(f"{capability}: this CPU runs {native} (tested directly) and nothing above it")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         f"{__file__}::test_the_same_function_and_every_gradient_input_included"],
        env={**os.environ, "ATEN_CPU_CAPABILITY": capability}, capture_output=True, text=True,
        cwd=os.path.dirname(__file__))
    assert done.returncode == 0 and " passed" in done.stdout, done.stdout[-2000:]
