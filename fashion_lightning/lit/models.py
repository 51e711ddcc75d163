"""The tutorial's two models as LightningModules: `CNN` and `DenseBaseline`, each an `ImageClassifier` of its network.

``fused=True`` picks the network with fused CPU kernels (`fashion_lightning.nets.fused`), the same function with the
same parameter names: a choice of network, not of training loop, so checkpoints of either load into the other.
"""

from __future__ import annotations

from typing import Any

from fashion_lightning.lit.classifier import ImageClassifier
from fashion_lightning.nets.fused import FusedConvNet, FusedDenseNet
from fashion_lightning.nets.tutorial import ConvNet, DenseNet


class CNN(ImageClassifier):
    """The tutorial's CNN (`ConvNet`) as a LightningModule; 804,554 parameters with the defaults.

    Args:
        filters: convolution filters.
        kernel_size: convolution kernel size (any size keeps the 28x28 map).
        hidden: width of the hidden dense layer.
        fused: `FusedConvNet`, the same network through fused kernels, instead of `ConvNet`.
        **optim: `ImageClassifier`'s optimizer, schedule and init settings (lr, betas, eps, ..., or optimizer and
            scheduler partials).
    """

    def __init__(self, filters: int = 32, kernel_size: int = 3, hidden: int = 128, fused: bool = False,
                 **optim: Any) -> None:
        fused = bool(optim.pop("fast", fused))  # checkpoints of 0.1 name it fast
        super().__init__((FusedConvNet if fused else ConvNet)(filters, kernel_size, hidden), **optim)


class DenseBaseline(ImageClassifier):
    """The tutorial's dense baseline (`DenseNet`) as a LightningModule; 29,898 parameters with the defaults.

    Args:
        hidden1: width of the first per-row dense layer.
        hidden2: width of the second per-row dense layer.
        fused: `FusedDenseNet`, the same network through fused kernels, instead of `DenseNet`.
        **optim: `ImageClassifier`'s optimizer, schedule and init settings (lr, betas, eps, ..., or optimizer and
            scheduler partials).
    """

    def __init__(self, hidden1: int = 128, hidden2: int = 64, fused: bool = False, **optim: Any) -> None:
        fused = bool(optim.pop("fast", fused))  # checkpoints of 0.1 name it fast
        super().__init__((FusedDenseNet if fused else DenseNet)(hidden1, hidden2), **optim)
