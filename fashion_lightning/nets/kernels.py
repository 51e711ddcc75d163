"""Fused CPU kernels for the tutorial's layers: the same functions and gradients as the plain modules, faster.

Each kernel states the plain math it replaces; ``tests/test_nets_kernels.py`` checks outputs and every gradient
(input, weight, bias) against that math, exact ties included. They expect float32 CPU tensors; `fused`
decides where they apply.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LinearReLU(torch.autograd.Function):
    """``F.relu(F.linear(x, weight, bias))`` for 2-D ``x``: one autograd node, forward and input gradient one GEMM
    each, the ReLU applied in place on the GEMM's output and its backward read from that output."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        y = torch.addmm(bias, x, weight.t()).relu_()
        ctx.save_for_backward(x, weight, y)
        return y

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, y = ctx.saved_tensors
        needs = ctx.needs_input_grad
        g = torch.ops.aten.threshold_backward(grad, y, 0)  # ReLU's own backward: no gradient where y == 0
        return (torch.mm(g, weight) if needs[0] else None, torch.mm(g.t(), x) if needs[1] else None,
                g.sum(0) if needs[2] else None)


class TwoLinearReLU(torch.autograd.Function):
    """``F.relu(F.linear(F.relu(F.linear(x, w1, b1)), w2, b2))`` for 2-D ``x``: the dense baseline's two per-row
    hidden layers as one autograd node. Its weight gradients are the GEMMs ``x.T @ g`` (the long side, 28 rows per
    image, as their inner dimension), transposed: for these shapes about twice as fast as autograd's ``g.T @ x``."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor,
                b2: Tensor) -> Tensor:
        h1 = torch.addmm(b1, x, w1.t()).relu_()
        h2 = torch.addmm(b2, h1, w2.t()).relu_()
        ctx.save_for_backward(x, w1, h1, w2, h2)
        return h2

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, w1, h1, w2, h2 = ctx.saved_tensors
        g2 = torch.ops.aten.threshold_backward(grad, h2, 0)
        g1 = torch.ops.aten.threshold_backward(torch.mm(g2, w2), h1, 0)
        needs = ctx.needs_input_grad
        return (torch.mm(g1, w1) if needs[0] else None,
                torch.mm(x.t(), g1).t().contiguous() if needs[1] else None, g1.sum(0) if needs[2] else None,
                torch.mm(h1.t(), g2).t().contiguous() if needs[3] else None, g2.sum(0) if needs[4] else None)


def linear_relu(layer: nn.Linear, x: Tensor) -> Tensor:
    """``F.relu(layer(x))`` through `LinearReLU`, for any leading dimensions of ``x``."""
    y = LinearReLU.apply(x.reshape(-1, x.shape[-1]), layer.weight, layer.bias)
    return y.view(*x.shape[:-1], y.shape[-1])


def _patches(x: Tensor, k: int) -> Tensor:
    """Im2col for a 'same' k x k conv followed by a 2x2 pool: (N, 1, 28, 28) -> (k*k + 1, 4 * N * 196).

    Column ``w * N * 196 + n * 196 + p`` holds the k*k patch under pooled position ``p`` of image ``n`` at
    window offset ``w`` (row-major in the 2x2 window), plus a row of ones that carries the bias.
    """
    n, before = x.shape[0], (k - 1) // 2
    padded = F.pad(x.reshape(n, 28, 28), (before, k - 1 - before, before, k - 1 - before))
    width, stride_n = padded.shape[-1], padded.stride(0)
    # dims (di, dj, a, b, n, i, j): pixel (2i + a + di, 2j + b + dj) of image n
    view = padded.as_strided((k, k, 2, 2, n, 14, 14), (width, 1, width, 1, stride_n, 2 * width, 2))
    cols = x.new_empty(k * k + 1, 4, n, 196)
    cols[: k * k].view(k, k, 2, 2, n, 14, 14).copy_(view)
    cols[k * k] = 1.0
    return cols.view(k * k + 1, 4 * n * 196)


def _unpatch(grad_cols: Tensor, n: int, k: int) -> Tensor:
    """The adjoint of `_patches` (without its ones row): (4 * N * 196, k*k) -> the (N, 1, 28, 28) input gradient."""
    before = (k - 1) // 2
    padded = grad_cols.new_zeros(n, 28 + k - 1, 28 + k - 1)
    blocks = grad_cols.view(2, 2, n, 14, 14, k, k)  # (a, b, n, i, j, di, dj)
    for di in range(k):
        for dj in range(k):  # pixel (2i + a + di, 2j + b + dj): one 28x28 block per kernel offset
            padded[:, di : di + 28, dj : dj + 28] += blocks[..., di, dj].permute(2, 3, 0, 4, 1).reshape(n, 28, 28)
    return padded[:, before : before + 28, before : before + 28].reshape(n, 1, 28, 28)


class ConvPoolReLU(torch.autograd.Function):
    """``F.max_pool2d(F.relu(F.conv2d(x, weight, bias, padding="same")), 2)``, flattened, for (N, 1, 28, 28) input.

    The same function and gradients as those three ops (max-pool routes each window's gradient to its first
    maximum in row-major order, ReLU passes none at 0; ReLU and max commute, so it pools first), computed as
    GEMMs over im2col patches with element-wise maxima: on a CPU this skips the slow
    ``max_pool2d_with_indices`` and ``convolution_backward`` kernels and the full-size ReLU passes. The conv
    output is laid out (window, image, position, channel), so that every element-wise pass reads contiguous
    memory and the GEMM writes long rows. Returns (N, filters * 196) in channel-major order, as ``Flatten`` of
    (N, filters, 14, 14).
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        c, k, n = weight.shape[0], weight.shape[-1], x.shape[0]
        cols = _patches(x, k)
        weight_bias = torch.cat([weight.reshape(c, k * k), bias.reshape(c, 1)], 1)
        out = torch.mm(cols.t(), weight_bias.t()).view(4, n * 196, c)
        pooled = torch.maximum(torch.maximum(out[0], out[1]), torch.maximum(out[2], out[3]))
        ctx.save_for_backward(cols, out, pooled, weight)
        relu = torch.empty(n, c, 196, dtype=pooled.dtype, device=pooled.device)  # copy_ transposes in blocks
        return relu.copy_(pooled.view(n, 196, c).transpose(1, 2)).clamp_(min=0).view(n, c * 196)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:
        cols, out, pooled, weight = ctx.saved_tensors
        c, k, n = weight.shape[0], weight.shape[-1], out.shape[1] // 196
        mask = torch.gt(pooled, 0, out=torch.empty_like(pooled))  # float 0/1: much faster here than bool masks
        g = torch.empty(n, 196, c, dtype=grad.dtype, device=grad.device).copy_(grad.view(n, c, 196).transpose(1, 2))
        g = g.mul_(mask.view(n, 196, c)).view(n * 196, c)
        routed = torch.empty_like(out)
        for w in range(4):  # the first window position holding the maximum takes the gradient
            torch.mul(g, torch.eq(out[w], pooled, out=mask), out=routed[w])
            if w < 3:
                g = g - routed[w]  # exact: leaves g where the position lost, 0 where it took it
        routed = routed.view(-1, c)
        grad_x = _unpatch(torch.mm(routed, weight.reshape(c, k * k)), n, k) if ctx.needs_input_grad[0] else None
        dw = torch.mm(cols, routed).t()
        return grad_x, dw[:, :-1].reshape(c, 1, k, k), dw[:, -1].contiguous()
