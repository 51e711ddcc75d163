"""Training-batch augmentation on the device: every image of a batch gets its own random shift, flip and erasure.

torchvision's v2 transforms draw one set of random parameters per call, so on a batched tensor the whole batch
would move together; these draw per image, in a few tensor operations on the batch's own device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from fashion_lightning.errors import UserError


class BatchAugment:
    """Random translation (a ``shift``-pixel crop of the zero-padded image), horizontal flip (clothes are
    left-right symmetric) and random erasing (torchvision's ``RandomErasing`` defaults: 2-33 % of the image,
    aspect ratio 0.3-3.3, filled with 0), drawn independently for each image.

    Args:
        shift: largest translation in pixels, each axis (0: none).
        flip: flip half of the images left-right.
        erase: the probability that an image gets a rectangle erased (0: none).
    """

    def __init__(self, shift: int = 0, flip: bool = False, erase: float = 0.0) -> None:
        if isinstance(shift, bool) or not isinstance(shift, int) or not 0 <= shift < 28:
            raise UserError(f"data.augment.shift must be a whole number of pixels in 0..27, got {shift!r}")
        if not isinstance(flip, bool):
            raise UserError(f"data.augment.flip must be true or false, got {flip!r}")
        if isinstance(erase, bool) or not isinstance(erase, int | float) or not 0 <= erase <= 1:
            raise UserError(f"data.augment.erase must be a probability in [0, 1], got {erase!r}")
        self.shift, self.flip, self.erase = shift, flip, float(erase)

    def __repr__(self) -> str:
        return f"BatchAugment(shift={self.shift}, flip={self.flip}, erase={self.erase})"

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """Augment images ``x`` (N, C, H, W), drawing from ``generator`` (on ``x``'s device)."""
        if self.shift:
            x = self._translate(x, generator)
        if self.flip:
            flipped = torch.rand(len(x), device=x.device, generator=generator) < 0.5
            x = torch.where(flipped[:, None, None, None], x.flip(3), x)
        if self.erase:
            x = self._erase(x, generator)
        return x

    def _translate(self, x: Tensor, generator: torch.Generator) -> Tensor:
        n, _, h, w = x.shape
        s = self.shift
        offsets = torch.randint(0, 2 * s + 1, (2, n), device=x.device, generator=generator)
        rows = offsets[0, :, None] + torch.arange(h, device=x.device)  # (N, H): rows of the padded image
        cols = offsets[1, :, None] + torch.arange(w, device=x.device)
        padded = F.pad(x, (s, s, s, s))
        batch = torch.arange(n, device=x.device)[:, None, None, None]
        channel = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]

    def _erase(self, x: Tensor, generator: torch.Generator) -> Tensor:
        n, _, h, w = x.shape
        u = torch.rand(5, n, device=x.device, generator=generator)
        area = h * w * (0.02 + u[0] * (0.33 - 0.02))
        ratio = torch.exp(math.log(0.3) + u[1] * (math.log(3.3) - math.log(0.3)))
        eh = torch.sqrt(area * ratio).round().clamp(1, h)
        ew = torch.sqrt(area / ratio).round().clamp(1, w)
        top = (u[2] * (h - eh + 1)).floor()
        left = (u[3] * (w - ew + 1)).floor()
        rows = torch.arange(h, device=x.device)[None, :]
        cols = torch.arange(w, device=x.device)[None, :]
        in_rows = (rows >= top[:, None]) & (rows < (top + eh)[:, None])  # (N, H)
        in_cols = (cols >= left[:, None]) & (cols < (left + ew)[:, None])  # (N, W)
        erased = in_rows[:, :, None] & in_cols[:, None, :] & (u[4] < self.erase)[:, None, None]
        return x.masked_fill(erased[:, None], 0.0)
