"""The plain torch.nn networks: exact sizes, the commuted pool/ReLU, Keras init and summary."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from fashion_lightning import ConvNet, DenseNet, UserError, keras_init_, summary
from fashion_lightning.models import linear_relu


def reference_cnn(net: ConvNet, x: torch.Tensor) -> torch.Tensor:
    """The CNN exactly as the tutorial writes it: ReLU, then the 2x2 max-pool."""
    h = F.max_pool2d(F.relu(net.conv(x)), 2)
    return net.out(F.relu(net.fc(h.flatten(1))))


def test_dense_baseline_has_the_tutorials_29898_parameters() -> None:
    net = DenseNet()
    assert [p.numel() for p in net.parameters()] == [3584, 128, 8192, 64, 17920, 10]
    assert sum(p.numel() for p in net.parameters()) == 29_898
    assert net(torch.rand(5, 1, 28, 28)).shape == (5, 10)


def reference_dense(net: DenseNet, x: torch.Tensor) -> torch.Tensor:
    """The dense net as the tutorial writes it: Dense(128, relu) and Dense(64, relu) on each row, flatten, Dense(10)."""
    rows = F.relu(net.row2(F.relu(net.row1(x[:, 0]))))
    return net.out(rows.reshape(len(x), 28 * 64))


def logits_and_grads(net: torch.nn.Module, forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                     y: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``forward``'s logits and the cross-entropy gradients it leaves on ``net``'s parameters."""
    net.zero_grad()
    logits = forward(x)
    F.cross_entropy(logits, y).backward()
    return logits.detach(), [p.grad.clone() for p in net.parameters()]


def test_dense_applies_the_first_layers_to_each_row() -> None:
    torch.manual_seed(0)
    net = keras_init_(DenseNet())  # zero biases: black rows give exact-zero pre-activations (ReLU ties)
    x, y = tie_heavy_images(16) * 255, torch.randint(0, 10, (16,))  # raw pixels, as seed_dense trains
    (out_fast, g_fast), (out_ref, g_ref) = (logits_and_grads(net, forward, x, y)
                                            for forward in (net, lambda inputs: reference_dense(net, inputs)))
    assert torch.allclose(out_fast, out_ref, rtol=1e-5, atol=1e-3)
    for a, b in zip(g_fast, g_ref, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scale", [255.0, 1.0])
def test_dense_loss_and_grads_by_hand_equal_autograds(scale: float) -> None:
    torch.manual_seed(0)
    net = keras_init_(DenseNet())
    x, y = tie_heavy_images(32) * scale, torch.randint(0, 10, (32,))
    out_ref, g_ref = logits_and_grads(net, net, x, y)
    loss_ref = F.cross_entropy(out_ref, y)
    for p in net.parameters():
        p.grad = torch.full_like(p, 7.0)  # set, not accumulated: what zero_grad + backward leave
    loss, logits = net.loss_and_grads(x, y)
    assert not loss.requires_grad and not logits.requires_grad
    assert torch.allclose(loss, loss_ref, rtol=1e-6) and torch.allclose(logits, out_ref, rtol=1e-5, atol=1e-3)
    for p, b in zip(net.parameters(), g_ref, strict=True):
        assert torch.allclose(p.grad, b, rtol=1e-5, atol=1e-7 * b.abs().max())


def test_dense_loss_and_grads_declines_where_autograd_is_needed() -> None:
    net = DenseNet()
    x, y = torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,))
    assert net.loss_and_grads(x, y) is not None
    assert net.double().loss_and_grads(x.double(), y) is None
    net.float()
    with torch.no_grad():
        assert net.loss_and_grads(x, y) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert net.loss_and_grads(x, y) is None
    net.out.bias.requires_grad_(False)
    assert net.loss_and_grads(x, y) is None
    net.out.bias.requires_grad_(True)
    net.flatten.register_forward_hook(lambda *_: None)
    assert net.loss_and_grads(x, y) is None


def graph_ops(t: torch.Tensor) -> set[str]:
    """The names of the autograd nodes behind ``t``."""
    seen, todo = set(), [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and type(node).__name__ not in seen:
            seen.add(type(node).__name__)
            todo += [n for n, _ in node.next_functions]
    return seen


@pytest.mark.parametrize("shape", [(7, 28), (3, 28, 28)])
def test_linear_relu_matches_linear_then_relu(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    layer = torch.nn.Linear(28, 16)
    with torch.no_grad():
        layer.bias[:4] = 0.0  # with the zero rows of x below: exact zeros, where ReLU passes no gradient
    x = torch.randn(shape)
    x[..., :2, :] = 0.0
    grads = []
    for forward in (lambda inputs: linear_relu(layer, inputs), lambda inputs: layer(inputs).relu()):
        xi = x.clone().requires_grad_()
        layer.zero_grad()
        y = forward(xi)
        (y * torch.linspace(-1, 1, y.numel()).view(y.shape)).sum().backward()
        grads.append((y.detach(), xi.grad, layer.weight.grad.clone(), layer.bias.grad.clone(), graph_ops(y)))
    fast, ref = grads
    assert "LinearReLUBackward" in fast[-1] and "LinearReLUBackward" not in ref[-1]
    assert fast[0].shape == (*shape[:-1], 16)
    for a, b in zip(fast[:-1], ref[:-1], strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_linear_relu_takes_the_standard_modules_where_onednn_does_not_apply() -> None:
    layer = torch.nn.Linear(28, 16)
    x = torch.rand(5, 28, requires_grad=True)
    assert "LinearReLUBackward" in graph_ops(linear_relu(layer, x))
    assert "LinearReLUBackward" not in graph_ops(linear_relu(layer.double(), x.double()))
    layer.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast runs the layer in bf16, as it would unfused
        y = linear_relu(layer, x)
    assert y.dtype == torch.bfloat16 and "LinearReLUBackward" not in graph_ops(y)
    layer.weight.requires_grad_(False)  # a frozen layer: gradients for the input and bias only
    y = linear_relu(layer, x)
    y.sum().backward()
    assert "LinearReLUBackward" in graph_ops(y) and layer.weight.grad is None
    assert torch.allclose(layer.bias.grad, (y > 0).sum(0).float())
    layer.register_forward_hook(lambda *_: None)  # a hook (e.g. summary's) sees the module run
    assert "LinearReLUBackward" not in graph_ops(linear_relu(layer, x))


def test_cnn_has_the_tutorials_804554_parameters() -> None:
    net = ConvNet()
    assert [p.numel() for p in net.parameters()] == [288, 32, 802_816, 128, 1280, 10]
    assert sum(p.numel() for p in net.parameters()) == 804_554
    assert net(torch.rand(3, 1, 28, 28)).shape == (3, 10)


@pytest.mark.parametrize("k", range(1, 8))
def test_every_kernel_size_keeps_the_6272_flatten(k: int) -> None:
    net = ConvNet(kernel_size=k)
    assert net.fc.in_features == 6272
    assert net.pool(net.conv(torch.rand(2, 1, 28, 28))).flatten(1).shape == (2, 6272)
    assert sum(p.numel() for p in net.parameters()) == 32 * k * k + 32 + 802_944 + 1290


@pytest.mark.parametrize("k", [2, 3, 4, 5])
def test_same_padding_matches_keras_for_even_and_odd_kernels(k: int) -> None:
    net = ConvNet(kernel_size=k)
    x = torch.rand(1, 1, 28, 28)
    before = (k - 1) // 2  # Keras/TensorFlow 'same': the extra pixel of an even kernel goes after
    expected = F.conv2d(F.pad(x, (before, k - 1 - before, before, k - 1 - before)), net.conv.weight, net.conv.bias)
    assert torch.allclose(net.conv(x), expected, atol=1e-6)


def tie_heavy_images(n: int) -> torch.Tensor:
    """Images with black background and saturated blocks: many windows whose maxima tie exactly."""
    x = torch.rand(n, 1, 28, 28) * (torch.rand(n, 1, 28, 28) > 0.5)
    x[:, :, 4:12, 4:20] = 1.0
    x[:, :, 20:, :] = 0.0
    return x


@pytest.mark.parametrize("k", range(1, 8))
@pytest.mark.parametrize("keras", [True, False])
def test_fused_cnn_matches_the_tutorial_formulation(k: int, keras: bool) -> None:
    torch.manual_seed(k)
    net = ConvNet(kernel_size=k)
    if keras:
        keras_init_(net)  # zero conv biases: exact zeros (ReLU ties) wherever a patch is black
    x, y = tie_heavy_images(48), torch.randint(0, 10, (48,))
    (out_fast, g_fast), (out_ref, g_ref) = (logits_and_grads(net, forward, x, y)
                                            for forward in (net, lambda inputs: reference_cnn(net, inputs)))
    assert torch.allclose(out_fast, out_ref, atol=1e-5)
    for a, b in zip(g_fast, g_ref, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        assert torch.allclose(net(x), out_ref, atol=1e-5)
        traced = torch.jit.trace(net, x[:2])  # tracing (export) runs the standard modules: the same function
        assert torch.allclose(traced(x), out_ref, atol=1e-5)


def test_keras_init_gives_zero_biases_and_glorot_bounds() -> None:
    torch.manual_seed(0)
    net = keras_init_(ConvNet())
    for layer, fan_in, fan_out in ((net.conv, 9, 32 * 9), (net.fc, 6272, 128), (net.out, 128, 10)):
        assert torch.count_nonzero(layer.bias) == 0
        bound = math.sqrt(6 / (fan_in + fan_out))
        w = layer.weight.abs()
        assert w.max() <= bound and w.max() > 0.95 * bound  # uniform over the whole +-bound range
    default = ConvNet()
    assert torch.count_nonzero(default.fc.bias) > 0


@pytest.mark.parametrize(("kwargs", "name"), [({"kernel_size": 0}, "kernel_size"), ({"kernel_size": -3}, "kernel_size"),
                                              ({"kernel_size": 2.5}, "kernel_size"), ({"filters": 0}, "filters"),
                                              ({"hidden": 0}, "hidden")])
def test_bad_cnn_sizes(kwargs: dict, name: str) -> None:
    value = next(iter(kwargs.values()))
    with pytest.raises(UserError, match=f"model.{name} must be a positive integer, got {value!r}"):
        ConvNet(**kwargs)


def test_bad_dense_width() -> None:
    with pytest.raises(UserError, match="model.hidden1 must be a positive integer, got 0"):
        DenseNet(hidden1=0)


def test_summary_matches_the_tutorials_tables() -> None:
    cnn = summary(ConvNet())
    assert "conv (Conv2d)" in cnn and "(None, 32, 28, 28)" in cnn and "320" in cnn
    assert "pool (MaxPool2d)" in cnn and "(None, 32, 14, 14)" in cnn
    assert "(None, 6272)" in cnn and "802,944" in cnn and "1,290" in cnn
    assert "Total params: 804,554" in cnn
    dense = summary(DenseNet())
    for shape, params in (("(None, 28, 128)", "3,712"), ("(None, 28, 64)", "8,256"), ("(None, 1792)", "0"),
                          ("(None, 10)", "17,930")):
        assert any(shape in line and line.rstrip().endswith(params) for line in dense.splitlines())
    assert "Total params: 29,898" in dense


@pytest.mark.parametrize("cls", [ConvNet, DenseNet])
def test_compiled_networks_trace_the_standard_modules(cls: type) -> None:
    torch.manual_seed(0)
    net = cls()
    x = torch.rand(4, 1, 28, 28)
    compiled = torch.compile(net, backend="aot_eager")  # fake-tensor tracing, as inductor does, without codegen
    assert torch.allclose(compiled(x), net(x), atol=1e-5)
