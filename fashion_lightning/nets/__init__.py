"""The networks: plain ``torch.nn`` modules, images (N, 1, 28, 28) in, logits (N, 10) out.

- `tutorial`: the tutorial's `DenseNet` and `ConvNet`, as Keras builds them (start here);
- `fused`: `FusedDenseNet` and `FusedConvNet`, the same functions with the same parameters through the fused CPU
  kernels of `kernels` (plain autograd: every Lightning feature works with them).
"""

from fashion_lightning.nets.fused import FusedConvNet, FusedDenseNet
from fashion_lightning.nets.tutorial import ConvNet, DenseNet, keras_init_, summary

__all__ = ["ConvNet", "DenseNet", "FusedConvNet", "FusedDenseNet", "keras_init_", "summary"]
