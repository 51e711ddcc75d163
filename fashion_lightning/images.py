"""Images from outside the dataset, made to look like Fashion-MNIST, and a model's ranked answer for them.

Shared by ``predict`` (files on disk) and ``serve`` (uploaded bytes).
"""

from __future__ import annotations

from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from fashion_lightning.data import CLASS_NAMES, to_input
from fashion_lightning.errors import UserError
from fashion_lightning.module import ImageClassifier

INVERT = ("auto", "always", "never")
MAX_SIDE = 4096  # pixels; a larger image is refused before it is decoded


class ImageError(ValueError):
    """An input that is not a usable image: corrupt or truncated; the subclasses below for the other reasons.
    The message says why, e.g. ``corrupt image (image file is truncated)``."""


class NotAnImage(ImageError):
    """A file in no image format Pillow reads."""


class ImageTooLarge(ImageError):
    """An image wider or taller than allowed."""


def to_fashion_mnist(image: Image.Image, invert: str = "auto") -> Tensor:
    """Any image -> (28, 28) uint8 like Fashion-MNIST: grayscale, light object on a dark background, the
    object's bounding box padded to a square and resized to fill the frame.

    ``invert``: ``auto`` inverts when the border is lighter than the middle (a photo of dark-on-light),
    ``always`` or ``never`` force it.
    """
    if invert not in INVERT:
        raise UserError(f"invert must be one of {', '.join(INVERT)}, got {invert!r}")
    gray = torch.from_numpy(np.asarray(image.convert("L"), dtype=np.float32).copy())
    h, w = gray.shape
    border = torch.cat([gray[0], gray[-1], gray[:, 0], gray[:, -1]]).mean()
    middle = gray[h // 4 : h - h // 4, w // 4 : w - w // 4].mean()
    if invert == "always" or (invert == "auto" and border > middle):
        gray = 255.0 - gray
    gray = (gray - gray.min()).clamp(min=0)  # the background becomes 0
    rows, cols = (gray > 0.1 * gray.max()).nonzero(as_tuple=True)
    if len(rows):
        gray = gray[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    h, w = gray.shape
    side = max(h, w)
    square = torch.zeros(side, side)
    square[(side - h) // 2 : (side - h) // 2 + h, (side - w) // 2 : (side - w) // 2 + w] = gray
    small = torch.nn.functional.interpolate(square[None, None], size=(28, 28), mode="area")[0, 0]
    return (small * (255.0 / max(float(small.max()), 1e-6))).round().clamp(0, 255).to(torch.uint8)


def open_image(source: str | Path | IO[bytes], invert: str = "auto", max_side: int = MAX_SIDE) -> Tensor:
    """An image file (a path or a binary file object: PNG, JPEG, any format Pillow reads) -> (28, 28) uint8 via
    `to_fashion_mnist`. Raises `ImageError` for a non-image, a corrupt or truncated file, or one wider or taller
    than ``max_side`` pixels (checked from its header, before decoding): `NotAnImage`, `ImageTooLarge`, or else
    `ImageError` (corrupt)."""
    try:
        with Image.open(source) as image:
            width, height = image.size
            if max(width, height) > max_side:
                raise ImageTooLarge(f"image too large ({width}x{height} pixels; at most {max_side} a side)")
            image.load()
            return to_fashion_mnist(image, invert)
    except UnidentifiedImageError:
        raise NotAnImage("not an image (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        if isinstance(err, ImageError | UserError):
            raise
        raise ImageError(f"corrupt image ({err})") from None


@torch.inference_mode()
def probabilities(model: ImageClassifier, pixels: Tensor, scale: bool) -> Tensor:
    """Class probabilities (N, 10) for uint8 images (N, 28, 28), pixels scaled as the model was trained."""
    return model.predict_step(to_input(pixels, scale))[0]


def ranked(probs: Tensor, top_k: int) -> dict[str, Any]:
    """One image's answer: the predicted class, its probability and the ``top_k`` classes, best first."""
    top = probs.topk(min(top_k, len(CLASS_NAMES)))
    return {"prediction": CLASS_NAMES[int(top.indices[0])], "probability": float(top.values[0]),
            "top": [{"class": CLASS_NAMES[int(i)], "probability": float(v)}
                    for v, i in zip(top.values, top.indices, strict=True)]}
