"""The fast option: everything that exists only for speed, behind one switch, ``ImageClassifier(fast=True)``
(``speed=fast`` in the app).

- `loop`: several batches per Lightning training step, each one optimizer step; refuses at fit start what it
  cannot honour, steps aside (to the textbook path) under DDP;
- `networks` and `kernels`: fused CPU kernels standing in for the unmodified tutorial networks, with the same
  outputs and gradients, and the dense net's loss and gradients written out without autograd;
- `batches`: the lists of batches; `runtime`: process-wide allocator and NVML settings;
- `private`: every private torch and Lightning API these use, each checked, with its fallback.

The textbook files (`models`, `module`, `data`) never need any of it to be right.
"""

from fashion_lightning.fast.batches import GroupedBatches
from fashion_lightning.fast.loop import FastLoop
from fashion_lightning.fast.runtime import tune_process

__all__ = ["FastLoop", "GroupedBatches", "tune_process"]
