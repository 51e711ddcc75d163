"""The tutorial's two networks as plain ``torch.nn`` modules (logits out), Keras-style init and summary."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fashion_lightning.errors import check_positive_int


class DenseNet(nn.Module):
    """The dense baseline: Dense(128, relu) and Dense(64, relu) on each of the 28 image rows, flatten, Dense(10).

    Keras applies ``Dense`` to the last axis of a (28, 28) image, i.e. to every row; so does ``nn.Linear``.
    29,898 parameters with the defaults. Each row layer and its ReLU run through `linear_relu`.
    """

    def __init__(self, hidden1: int = 128, hidden2: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        for name, value in (("hidden1", hidden1), ("hidden2", hidden2), ("num_classes", num_classes)):
            check_positive_int(f"model.{name}", value)
        self.row1 = nn.Linear(28, hidden1)
        self.row2 = nn.Linear(hidden1, hidden2)
        self.flatten = nn.Flatten()
        self.out = nn.Linear(28 * hidden2, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """(N, 1, 28, 28) images -> (N, num_classes) logits."""
        h = linear_relu(self.row2, linear_relu(self.row1, x.view(-1, 28, 28)))
        return self.out(self.flatten(h))

    def loss_and_grads(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor] | None:
        """Mean cross entropy of images ``x`` against labels ``y``, and the logits, with every parameter's
        ``grad`` set to the loss's gradient; ``None`` where it does not apply, and autograd is the way.

        What ``zero_grad``, this forward pass, ``F.cross_entropy`` and ``backward`` compute, written out for an
        eager float32 CPU with oneDNN (see `_onednn_applies`; every parameter trainable, grad mode on). A batch-32
        step of this small net spends about a fifth of its time building and running autograd's graph.
        """
        layers = (self.row1, self.row2, self.out)
        if not (torch.is_grad_enabled() and all(p.requires_grad for p in self.parameters())
                and _onednn_applies(x, *layers) and _fast_path(x, self.flatten)):
            return None
        n = x.shape[0]
        with torch.no_grad():
            rows = x.reshape(n * 28, 28)
            h1 = _linear(rows, self.row1.weight, self.row1.bias, relu=True)
            h2 = _linear(h1, self.row2.weight, self.row2.bias, relu=True)
            flat = h2.view(n, -1)
            logits = torch.addmm(self.out.bias, flat, self.out.weight.t())
            log_p = torch.log_softmax(logits, 1)
            loss = F.nll_loss(log_p, y)
            grad = log_p.exp_()  # d loss / d logits = (softmax - one-hot) / n
            grad[torch.arange(n, device=y.device), y] -= 1.0
            grad /= n
            self.out.weight.grad, self.out.bias.grad = torch.mm(grad.t(), flat), grad.sum(0)
            g_h1, self.row2.weight.grad, self.row2.bias.grad = _linear_relu_grads(
                torch.mm(grad, self.out.weight).view_as(h2), h1, self.row2.weight, h2)
            _, self.row1.weight.grad, self.row1.bias.grad = _linear_relu_grads(
                g_h1, rows, self.row1.weight, h1, (False, True, True))
        return loss, logits


def _fast_path(x: Tensor, *modules: nn.Module) -> bool:
    """Whether a fused function may stand in for ``modules``: on a CPU, eager (not traced for export, not
    compiled: the compiler fuses the standard modules itself), no hook watching them."""
    hooked = any(m._forward_hooks or m._forward_pre_hooks for m in modules)
    traced = torch.jit.is_tracing() or torch.compiler.is_compiling()
    return x.device.type == "cpu" and not hooked and not traced


def _onednn_linear() -> bool:
    """Whether this torch has oneDNN's fused linear op (CPU builds with MKLDNN, which all x86/ARM wheels are)."""
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


_ONEDNN_LINEAR = _onednn_linear()


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None, relu: bool) -> Tensor:
    """``x @ weight.T (+ bias)``, ReLU'd if ``relu``, as one oneDNN call: 2-D float32 CPU tensors."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "relu" if relu else "none", [], "")


def _linear_relu_grads(grad: Tensor, x: Tensor, weight: Tensor, y: Tensor,
                       needs: tuple[bool, bool, bool] = (True, True, True)) -> tuple[Tensor | None, ...]:
    """The x, weight and bias gradients of ``y = relu(x @ weight.T + bias)`` given ``y``'s (those in ``needs``)."""
    g = torch.ops.aten.threshold_backward(grad, y, 0)  # ReLU's own backward: no gradient where y == 0
    return (_linear(g, weight.t(), None, relu=False) if needs[0] else None,
            torch.mm(g.t(), x) if needs[1] else None, g.sum(0) if needs[2] else None)


def _onednn_applies(x: Tensor, *layers: nn.Linear) -> bool:
    """Whether `LinearReLU` and `DenseNet.loss_and_grads` may run: float32 eager on a CPU with oneDNN."""
    return (_ONEDNN_LINEAR and x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
            and all(m.weight.dtype == torch.float32 and m.bias is not None for m in layers) and _fast_path(x, *layers))


class LinearReLU(torch.autograd.Function):
    """relu(x @ weight.T + bias) for 2-D float32 CPU input, forward and input gradient each as one oneDNN call.

    The same function and gradients as ``nn.Linear`` + ReLU. torch's float32 CPU matmuls run in MKL, which takes
    AVX2 code on AMD CPUs; oneDNN's kernels use AVX-512 wherever the CPU has it, and the ReLU rides on the
    forward GEMM. The weight gradient (a reduction over the batch, whose transposed operands oneDNN would copy)
    stays with ``torch.mm``.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        y = _linear(x, weight, bias, relu=True)
        ctx.save_for_backward(x, weight, y)
        return y

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, y = ctx.saved_tensors
        return _linear_relu_grads(grad, x, weight, y, ctx.needs_input_grad)


def linear_relu(layer: nn.Linear, x: Tensor) -> Tensor:
    """``layer(x).relu()``, as one `LinearReLU` when eager float32 on a CPU with oneDNN (see `_fast_path`)."""
    if _onednn_applies(x, layer):
        y = LinearReLU.apply(x.reshape(-1, x.shape[-1]), layer.weight, layer.bias)
        return y.view(*x.shape[:-1], y.shape[-1])
    return layer(x).relu()


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


class ConvPoolReLU(torch.autograd.Function):
    """relu(max_pool2d(conv2d(x, weight, bias, padding='same'), 2)), flattened, for single-channel 28x28 input.

    The same function and the same gradients as the three PyTorch ops (max-pool routes each window's
    gradient to its first maximum in row-major order, ReLU passes none at 0), computed as two GEMMs over
    im2col patches with element-wise maxima: on a CPU this skips the slow ``max_pool2d_with_indices`` and
    ``convolution_backward`` kernels and the full-size ReLU passes. The conv output is laid out
    (window, image, position, channel), so that every element-wise pass reads contiguous memory and the GEMM
    writes long rows. Returns (N, filters * 196) in channel-major order, as ``Flatten`` of (N, filters, 14, 14).
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu", cast_inputs=torch.float32)  # under bf16 autocast it stays fp32
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        c, k, n = weight.shape[0], weight.shape[-1], x.shape[0]
        cols = _patches(x, k)
        weight_bias = torch.cat([weight.reshape(c, k * k), bias.reshape(c, 1)], 1)
        out = torch.mm(cols.t(), weight_bias.t()).view(4, n * 196, c)
        pooled = torch.maximum(torch.maximum(out[0], out[1]), torch.maximum(out[2], out[3]))
        ctx.save_for_backward(cols, out, pooled)
        relu = torch.empty(n, c, 196, dtype=pooled.dtype, device=pooled.device)
        return torch.clamp(pooled.view(n, 196, c).transpose(1, 2), min=0, out=relu).view(n, c * 196)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[None, Tensor, Tensor]:
        cols, out, pooled = ctx.saved_tensors
        c, n = out.shape[2], out.shape[1] // 196
        k = int(round((cols.shape[0] - 1) ** 0.5))
        mask = torch.gt(pooled, 0, out=torch.empty_like(pooled))  # float 0/1: much faster here than bool masks
        g = torch.mul(grad.view(n, c, 196).transpose(1, 2), mask.view(n, 196, c),
                      out=torch.empty(n, 196, c, dtype=grad.dtype, device=grad.device)).view(n * 196, c)
        routed = torch.empty_like(out)
        for w in range(4):  # the first window position holding the maximum takes the gradient
            torch.mul(g, torch.eq(out[w], pooled, out=mask), out=routed[w])
            if w < 3:
                g = g - routed[w]  # exact: leaves g where the position lost, 0 where it took it
        dw = torch.mm(cols, routed.view(-1, c)).t()
        return None, dw[:, :-1].reshape(c, 1, k, k), dw[:, -1].contiguous()


class ConvNet(nn.Module):
    """The CNN: Conv2d(filters, k, 'same') + ReLU, MaxPool 2x2, flatten, Dense(hidden, relu), Dense(10).

    Any kernel size keeps the 28x28 map ('same' padding, asymmetric for even k exactly as in Keras), so the
    flatten size is ``filters * 14 * 14`` (6272). 804,554 parameters with the defaults.

    On a CPU, conv, pool and ReLU run as one `ConvPoolReLU`, and fc with its ReLU as one `LinearReLU` (the same
    functions and gradients, measured by ``benchmarks/fused_layer.py``); on a GPU, while traced for export, or
    when a forward hook watches a module, the standard modules run (max-pool first: pool and ReLU commute).
    """

    def __init__(self, filters: int = 32, kernel_size: int = 3, hidden: int = 128, num_classes: int = 10) -> None:
        super().__init__()
        for name, value in (("filters", filters), ("kernel_size", kernel_size), ("hidden", hidden),
                            ("num_classes", num_classes)):
            check_positive_int(f"model.{name}", value)
        self.conv = nn.Conv2d(1, filters, kernel_size, padding="same")
        self.pool = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(filters * 14 * 14, hidden)
        self.out = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """(N, 1, 28, 28) images -> (N, num_classes) logits."""
        if _fast_path(x, self.conv, self.pool):
            h = ConvPoolReLU.apply(x, self.conv.weight, self.conv.bias)
        else:
            h = self.flatten(self.pool(self.conv(x)).relu())
        return self.out(linear_relu(self.fc, h))


def keras_init_(net: nn.Module) -> nn.Module:
    """Re-initialise like Keras: glorot-uniform weights, zero biases, for every Linear and Conv2d; in place."""
    for module in net.modules():
        if isinstance(module, nn.Linear | nn.Conv2d):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
    return net


def summary(net: nn.Module, input_shape: tuple[int, ...] = (1, 28, 28)) -> str:
    """A Keras-like table of the net's layers: output shape (batch as None) and parameter count, with totals."""
    rows: list[tuple[str, str, int]] = []
    hooks = [
        child.register_forward_hook(lambda m, _, out, name=name: rows.append(
            (f"{name} ({type(m).__name__})", str((None, *out.shape[1:])), sum(p.numel() for p in m.parameters()))))
        for name, child in net.named_children()
    ]
    try:
        with torch.no_grad():
            net(torch.zeros(1, *input_shape, device=next(net.parameters()).device))
    finally:
        for hook in hooks:
            hook.remove()
    total = sum(p.numel() for p in net.parameters())
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    line = "=" * 64
    body = [f"{layer:<28}{shape:<24}{params:>12,}" for layer, shape, params in rows]
    return "\n".join([f"Model: {type(net).__name__}", line, f"{'Layer (type)':<28}{'Output Shape':<24}{'Param #':>12}",
                      line, *body, line, f"Total params: {total:,}", f"Trainable params: {trainable:,}",
                      f"Non-trainable params: {total - trainable:,}"])

