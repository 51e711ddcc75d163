"""The tutorial's networks with fused kernels: `FusedConvNet` and `FusedDenseNet` compute the same function as
`ConvNet` and `DenseNet`, with the same parameters under the same names (their checkpoints interchange).

Their ``forward`` runs the kernels of `kernels` where those compute exactly the plain function: float32 CPU
tensors, eager mode (not traced, scripted, compiled or exported), no autocast, the layers still the original
modules, and no hook on any of them. Anywhere else it runs the plain network's ``forward``. Everything is
autograd, so every Lightning feature (clipping, accumulation, AMP, DDP, hooks, SWA, the tuner) works unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fashion_lightning.nets.kernels import ConvPoolReLU, TwoLinearReLU, linear_relu
from fashion_lightning.nets.tutorial import ConvNet, DenseNet

HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
"""Where ``nn.Module`` keeps the hooks registered on it (no public API lists them): a hook on a layer the kernels
replace would not run, so a hooked network takes its plain ``forward``. Where torch keeps them elsewhere, every
network counts as hooked (always correct, never fused); ``tests/test_nets_fused.py`` pins that hooks are seen."""


def _hooked(net: nn.Module) -> bool:
    """Whether a hook is registered on a submodule of ``net`` (or on every module, globally), or it cannot tell."""
    registries = [getattr(torch.nn.modules.module, f"_global{name}", None) for name in HOOK_DICTS]
    registries += [getattr(m, name, None) for m in net.children() for name in HOOK_DICTS]
    return any(r is None or len(r) > 0 for r in registries)


def _plain_linear(layer: nn.Module) -> bool:
    return type(layer) is nn.Linear and layer.bias is not None


def _eager_float32_cpu(net: nn.Module, x: Tensor) -> bool:
    """The conditions every kernel needs on torch's mode, the parameters and the input images."""
    return (not (torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling())
            and not torch.is_autocast_enabled("cpu")
            and x.device.type == "cpu" and x.dtype == torch.float32 and x.layout == torch.strided
            and tuple(x.shape[1:]) == (1, 28, 28)
            and all(p.device.type == "cpu" and p.dtype == torch.float32 for p in net.parameters())
            and not _hooked(net))


EVAL_CHUNK = 50
"""Images per `ConvPoolReLU` call where no gradient is recorded (validation, test, prediction): its conv output,
(4, images * 196, filters) floats, then stays in the CPU's cache; for 1,000 images it would be 100 MB."""


class FusedConvNet(ConvNet):
    """`ConvNet` whose conv + ReLU + max-pool run as one `ConvPoolReLU` and whose hidden layer as `LinearReLU`."""

    def _fusable(self, x: Tensor) -> bool:
        conv, pool = self.conv, self.pool
        return (type(conv) is nn.Conv2d and conv.in_channels == 1 and conv.padding == "same"
                and conv.kernel_size[0] == conv.kernel_size[1] and conv.stride == (1, 1)
                and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
                and conv.bias is not None and type(pool) is nn.MaxPool2d and pool.kernel_size in (2, (2, 2))
                and pool.stride in (2, (2, 2)) and pool.padding in (0, (0, 0)) and pool.dilation in (1, (1, 1))
                and not pool.ceil_mode and type(self.flatten) is nn.Flatten and self.flatten.start_dim == 1
                and self.flatten.end_dim == -1 and _plain_linear(self.fc) and _eager_float32_cpu(self, x))

    def forward(self, x: Tensor) -> Tensor:
        if not self._fusable(x):
            return super().forward(x)
        h = self._conv_pool_relu(x)  # = flatten(pool(relu(conv(x))))
        return self.out(linear_relu(self.fc, h))  # = out(relu(fc(h)))

    def _conv_pool_relu(self, x: Tensor) -> Tensor:
        """`ConvPoolReLU` of ``x``; in chunks of `EVAL_CHUNK` images where autograd records nothing (each image's
        result depends on that image alone)."""
        conv = self.conv
        if torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad or conv.bias.requires_grad):
            return ConvPoolReLU.apply(x, conv.weight, conv.bias)
        out = x.new_empty(x.shape[0], conv.out_channels * 196)
        for i in range(0, len(x), EVAL_CHUNK):
            out[i : i + EVAL_CHUNK] = ConvPoolReLU.apply(x[i : i + EVAL_CHUNK], conv.weight, conv.bias)
        return out

    def __prepare_scriptable__(self) -> ConvNet:
        """TorchScript compiles the plain network, sharing these layers."""
        return _plain_twin(self, ConvNet)


class FusedDenseNet(DenseNet):
    """`DenseNet` whose two per-row hidden layers run as one `TwoLinearReLU`."""

    def _fusable(self, x: Tensor) -> bool:
        return (_plain_linear(self.row1) and _plain_linear(self.row2) and type(self.flatten) is nn.Flatten
                and _eager_float32_cpu(self, x))

    def forward(self, x: Tensor) -> Tensor:
        if not self._fusable(x):
            return super().forward(x)
        row1, row2 = self.row1, self.row2
        h = TwoLinearReLU.apply(x.reshape(-1, 28), row1.weight, row1.bias, row2.weight, row2.bias)
        return self.out(h.view(x.shape[0], -1))  # = out(flatten(relu(row2(relu(row1(rows))))))

    def __prepare_scriptable__(self) -> DenseNet:
        """TorchScript compiles the plain network, sharing these layers."""
        return _plain_twin(self, DenseNet)


def _plain_twin(net: nn.Module, plain: type[nn.Module]) -> nn.Module:
    """A ``plain`` network holding ``net``'s layers (the same parameter objects)."""
    twin = plain.__new__(plain)
    nn.Module.__init__(twin)
    for name, child in net.named_children():
        twin.add_module(name, child)
    return twin.train(net.training)
