"""Speed, apart from the textbook code: networks with fused CPU kernels, and grouped training steps.

- `networks`: `FastConvNet`, the tutorial's CNN computing the same function through the fused kernels of `kernels`
  (``CNN(fast=True)``): plain autograd, so every Lightning feature works with it;
- `grouped`: several batches per Lightning training step, one optimizer step each, the way Keras has
  ``steps_per_execution`` (the app's ``steps_per_execution``; ``speed=fast`` sets 64).
"""

from fashion_lightning.fast.networks import FastConvNet

__all__ = ["FastConvNet"]
