"""Where the fused kernels stand in for the tutorial's networks, and where they step aside.

`logits(net, x)` is ``net(x)``; `loss_and_grads(net, x, y)` is cross entropy + ``backward``. Each takes a kernel
only for an unmodified `ConvNet` or `DenseNet` (exactly these classes, their submodules of the original types and
settings: a swapped or subclassed layer runs as itself), float32 on a CPU, eager (not traced, scripted or
compiled, no ``forward`` replaced), without autocast and without any hook on the network or its parameters.
Anywhere else they call the network itself.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fashion_lightning.fast import private
from fashion_lightning.fast.kernels import ConvPoolReLU, dense_loss_and_grads, linear_relu
from fashion_lightning.models import ConvNet, DenseNet


def _plain_linear(layer: nn.Module) -> bool:
    return type(layer) is nn.Linear and layer.bias is not None


def _plain_flatten(layer: nn.Module) -> bool:
    return type(layer) is nn.Flatten and layer.start_dim == 1 and layer.end_dim == -1


def _plain_conv_net(net: ConvNet) -> bool:
    conv, pool = net.conv, net.pool
    return (type(conv) is nn.Conv2d and conv.in_channels == 1 and conv.padding == "same"
            and conv.kernel_size[0] == conv.kernel_size[1] and conv.stride == (1, 1) and conv.dilation == (1, 1)
            and conv.groups == 1 and conv.padding_mode == "zeros" and conv.bias is not None
            and type(pool) is nn.MaxPool2d and pool.kernel_size in (2, (2, 2)) and pool.stride in (2, (2, 2))
            and pool.padding in (0, (0, 0)) and pool.dilation in (1, (1, 1)) and not pool.ceil_mode
            and not pool.return_indices and _plain_flatten(net.flatten) and _plain_linear(net.fc)
            and _plain_linear(net.out))


def _plain_dense_net(net: DenseNet) -> bool:
    return (all(_plain_linear(layer) for layer in (net.row1, net.row2, net.out)) and net.row1.in_features == 28
            and _plain_flatten(net.flatten))


def _net_ok(net: nn.Module) -> bool:
    """The conditions every kernel needs (see the module docstring) on the network and torch's state, less the
    network's structure."""
    return (not (torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling())
            and not torch.is_autocast_enabled("cpu")
            and all(p.device.type == "cpu" and p.dtype == torch.float32 and p.layout == torch.strided
                    for p in net.parameters())
            and not private.hooked(net) and not private.rerouted(net))


def _input_ok(x: Tensor) -> bool:
    """The conditions every kernel needs on the input images."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.layout == torch.strided
            and tuple(x.shape[1:]) == (1, 28, 28))


EVAL_CHUNK = 50
"""Images per `ConvPoolReLU` call where no gradient is recorded (validation, test, prediction): its conv output,
(4, images * 196, filters) floats, then stays in the CPU's cache; for 1,000 images it would be 100 MB."""


def logits(net: nn.Module, x: Tensor) -> Tensor:
    """``net(x)``: through `ConvPoolReLU` and `LinearReLU` where they compute exactly that."""
    if type(net) is ConvNet and _plain_conv_net(net) and _input_ok(x) and _net_ok(net):
        h = _conv_pool_relu(net.conv, x)  # = flatten(pool(relu(conv(x))))
        return F.linear(linear_relu(net.fc, h), net.out.weight, net.out.bias)
    return net(x)


def _conv_pool_relu(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """`ConvPoolReLU` of ``x``; in chunks of `EVAL_CHUNK` images where autograd records nothing (each image's
    result depends on that image alone)."""
    if torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad or conv.bias.requires_grad):
        return ConvPoolReLU.apply(x, conv.weight, conv.bias)
    out = x.new_empty(x.shape[0], conv.out_channels * 196)
    for i in range(0, len(x), EVAL_CHUNK):
        out[i : i + EVAL_CHUNK] = ConvPoolReLU.apply(x[i : i + EVAL_CHUNK], conv.weight, conv.bias)
    return out


LossAndGrads = Callable[[Tensor, Tensor], "tuple[Tensor, Tensor] | None"]


def dense_step(net: nn.Module) -> LossAndGrads | None:
    """`DenseNet`'s cross entropy with every parameter's gradient set, written out without autograd
    (`dense_loss_and_grads`), as a function of a batch ``(x, y)`` returning the loss and logits; ``None`` wherever
    autograd must run instead: any other network, anything the kernels need missing, grad mode off, anomaly detection
    on, a frozen or hooked parameter. The function checks each batch's images too, and returns ``None`` for those it
    does not take (another shape, dtype or device, or images that need a gradient). It holds while nothing of the
    above changes: the fast loop asks once per training step.
    """
    applies = (type(net) is DenseNet and _plain_dense_net(net) and _net_ok(net) and torch.is_grad_enabled()
               and not torch.is_anomaly_enabled()
               and all(p.requires_grad and not private.tensor_hooked(p) for p in net.parameters()))
    if not applies:
        return None
    layers = (net.row1, net.row2, net.out)

    def step(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor] | None:
        return dense_loss_and_grads(layers, x, y) if _input_ok(x) and not x.requires_grad else None

    return step


def loss_and_grads(net: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor] | None:
    """`dense_step` for one batch: its loss and logits with the gradients set, or ``None`` where autograd must run."""
    step = dense_step(net)
    return step(x, y) if step is not None else None
