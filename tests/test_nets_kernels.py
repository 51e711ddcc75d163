"""The fused kernels against the plain math they replace: outputs and every gradient (input, weight, bias)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fashion_lightning import keras_init_
from fashion_lightning.nets.kernels import ConvPoolReLU, LinearReLU, linear_relu


def tie_heavy_images(n: int) -> torch.Tensor:
    """Images with black background and saturated blocks: many windows whose maxima tie exactly."""
    x = torch.rand(n, 1, 28, 28) * (torch.rand(n, 1, 28, 28) > 0.5)
    x[:, :, 4:12, 4:20] = 1.0
    x[:, :, 20:, :] = 0.0
    return x


def grads(f, *inputs: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``f(*inputs)`` and the gradients of a fixed weighting of its output w.r.t. every input."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    y = f(*leaves)
    (y * torch.linspace(-1, 1, y.numel()).view(y.shape)).sum().backward()
    return y.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("k", range(1, 8))
@pytest.mark.parametrize("keras", [True, False])
def test_conv_pool_relu_is_conv_relu_maxpool(k: int, keras: bool) -> None:
    torch.manual_seed(k)
    conv = nn.Conv2d(1, 32, k, padding="same")
    if keras:
        keras_init_(conv)  # zero biases: exact zeros (ReLU ties) wherever a patch is black
    x = tie_heavy_images(16)

    def plain(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(F.relu(F.conv2d(x, w, b, padding="same")), 2).flatten(1)

    (fused, fused_grads), (ref, ref_grads) = (grads(f, x, conv.weight, conv.bias) for f in (ConvPoolReLU.apply, plain))
    assert torch.allclose(fused, ref, atol=1e-6)
    for name, a, b in zip(("input", "weight", "bias"), fused_grads, ref_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-5 * b.abs().max(), rtol=1e-5), name  # sums of ~6,000 terms


def test_conv_pool_relu_skips_the_input_gradient_nobody_asked_for() -> None:
    conv = nn.Conv2d(1, 4, 3, padding="same")
    y = ConvPoolReLU.apply(torch.rand(2, 1, 28, 28), conv.weight, conv.bias)
    y.sum().backward()
    assert conv.weight.grad is not None and conv.bias.grad is not None


@pytest.mark.parametrize("shape", [(7, 28), (3, 28, 28)])
def test_linear_relu_is_linear_then_relu(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(28, 16)
    with torch.no_grad():
        layer.bias[:4] = 0.0  # with the zero rows of x below: exact zeros, where ReLU passes no gradient
    x = torch.randn(shape)
    x[..., :2, :] = 0.0
    (fused, fused_grads), (ref, ref_grads) = (
        grads(f, x, layer.weight, layer.bias)
        for f in (lambda x, w, b: LinearReLU.apply(x.reshape(-1, 28), w, b).view(*shape[:-1], 16),
                  lambda x, w, b: F.relu(F.linear(x, w, b))))
    assert fused.shape == (*shape[:-1], 16) and torch.allclose(fused, ref, atol=1e-6)
    for name, a, b in zip(("input", "weight", "bias"), fused_grads, ref_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-6), name


def test_linear_relu_of_a_frozen_layer_computes_no_weight_gradient() -> None:
    layer = nn.Linear(28, 16)
    layer.weight.requires_grad_(False)
    x = torch.rand(5, 28, requires_grad=True)
    y = linear_relu(layer, x)
    y.sum().backward()
    assert layer.weight.grad is None and x.grad is not None
    assert torch.allclose(layer.bias.grad, (y > 0).sum(0).float())
