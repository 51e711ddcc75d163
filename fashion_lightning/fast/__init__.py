"""Speed, apart from the textbook code: networks with fused CPU kernels, and grouped training steps.

- `networks`: `FastConvNet` and `FastDenseNet`, the tutorial's networks computing the same function through the
  fused kernels of `kernels` (``CNN(fast=True)``, ``DenseBaseline(fast=True)``): plain autograd, so every
  Lightning feature works with them;
- `grouped`: several batches per Lightning training step, one optimizer step each, the way Keras has
  ``steps_per_execution`` (the app's ``steps_per_execution``; ``speed=fast`` sets 64).
"""

from fashion_lightning.fast.networks import FastConvNet, FastDenseNet

__all__ = ["FastConvNet", "FastDenseNet"]
