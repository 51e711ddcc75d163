"""The tutorial's two networks as plain ``torch.nn`` modules (logits out), with Keras' initialisation and summary.

The Keras original, for comparison::

    dense = Sequential([Dense(128, activation="relu", input_shape=(28, 28)), Dense(64, activation="relu"),
                        Flatten(), Dense(10, activation="softmax")])
    cnn = Sequential([Conv2D(32, (3, 3), padding="same", activation="relu", input_shape=(28, 28, 1)),
                      MaxPooling2D((2, 2)), Flatten(), Dense(128, activation="relu"), Dense(10, activation="softmax")])

The softmax lives in the loss (``F.cross_entropy`` on logits is Keras' sparse categorical crossentropy).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fashion_lightning.errors import check_positive_int


class DenseNet(nn.Module):
    """The dense baseline: Dense(128, relu) and Dense(64, relu) on each of the 28 image rows, flatten, Dense(10).

    Keras applies ``Dense`` to the last axis of a (28, 28) image, i.e. to every row; so does ``nn.Linear``.
    29,898 parameters with the defaults.
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
        rows = x.view(-1, 28, 28)  # (N, 28 rows, 28 pixels)
        h = F.relu(self.row1(rows))  # (N, 28, hidden1)
        h = F.relu(self.row2(h))  # (N, 28, hidden2)
        return self.out(self.flatten(h))


class ConvNet(nn.Module):
    """The CNN: Conv2d(filters, k, 'same') + ReLU, MaxPool 2x2, flatten, Dense(hidden, relu), Dense(10).

    Any kernel size keeps the 28x28 map ('same' padding, the extra pixel of an even kernel after, as in Keras),
    so the flatten size is ``filters * 14 * 14`` (6272). 804,554 parameters with the defaults.
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
        h = self.pool(F.relu(self.conv(x)))  # (N, filters, 14, 14)
        h = F.relu(self.fc(self.flatten(h)))  # (N, hidden)
        return self.out(h)


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
    weight = next(net.parameters())
    try:
        with torch.no_grad():  # an input of the parameters' device and dtype (float64 after precision="64-true")
            net(torch.zeros(1, *input_shape, device=weight.device, dtype=weight.dtype))
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
