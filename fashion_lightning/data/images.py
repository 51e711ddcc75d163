"""Images from outside the dataset (files, uploads), made to look like Fashion-MNIST.

Shared by ``predict`` (files on disk) and ``serve`` (uploaded bytes).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from fashion_lightning.errors import UserError

INVERT = ("auto", "always", "never")
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")  # what is opened; Pillow's other plugins are not
MAX_SIDE = 4096  # pixels; a larger image is refused before it is decoded
WORKING_SIDE = 1024  # a larger image is averaged down to about this size first: the result is 28x28 anyway


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
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # 16-bit PNG or TIFF, 0-65535 (L would clip at 255)
        gray = torch.from_numpy(np.asarray(image, dtype=np.float32) / 257.0).clamp(0, 255)
    else:
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


@contextmanager
def opened(source: str | Path | IO[bytes], max_side: int = MAX_SIDE) -> Iterator[Image.Image]:
    """The image in ``source`` with only its header read, closed on exit. Raises `NotAnImage` for a file in none of
    `FORMATS`, and `ImageTooLarge` for one wider or taller than ``max_side`` pixels or one Pillow refuses to open as
    a decompression bomb (more than twice ``Image.MAX_IMAGE_PIXELS`` pixels: by default, a side over 13,000)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the side is checked below
            image = Image.open(source, formats=FORMATS)
    except UnidentifiedImageError:
        raise NotAnImage(f"not an image (unrecognised format; {', '.join(FORMATS)} are read)") from None
    except Image.DecompressionBombError:
        raise ImageTooLarge(f"image too large (over {2 * Image.MAX_IMAGE_PIXELS} pixels; at most {max_side} a side)"
                            ) from None
    with image:
        width, height = image.size
        if max(width, height) > max_side:
            raise ImageTooLarge(f"image too large ({width}x{height} pixels; at most {max_side} a side)")
        yield image


def open_image(source: str | Path | IO[bytes], invert: str = "auto", max_side: int = MAX_SIDE) -> Tensor:
    """An image file (a path or a binary file object; PNG, JPEG, GIF (its first frame), BMP, WebP or TIFF) ->
    (28, 28) uint8 via `to_fashion_mnist`, turned upright as its EXIF orientation says. Raises `NotAnImage` for
    a file in none of these formats, `ImageTooLarge` for one wider or taller than ``max_side`` pixels (read from
    its header, before decoding: `opened`), and `ImageError` for a corrupt or truncated one."""
    try:
        with opened(source, max_side) as image:
            image.draft("L", (WORKING_SIDE, WORKING_SIDE))  # JPEG: decode at a reduced scale where that suffices
            image.load()
            ImageOps.exif_transpose(image, in_place=True)
            return to_fashion_mnist(shrunk(image), invert)
    except (ImageError, UserError):
        raise
    except Exception as err:  # noqa: BLE001 - whatever a malformed file makes a decoder raise
        raise ImageError(f"corrupt image ({type(err).__name__}: {err})") from None


def pixel_count(data: bytes) -> int:
    """Width x height from an image file's header (nothing decoded); 0 for what `open_image` will refuse at its
    header (then it says why: too large a side, not an image)."""
    try:
        with opened(io.BytesIO(data)) as image:
            return image.size[0] * image.size[1]
    except Exception:  # noqa: BLE001 - open_image says what is wrong with it
        return 0


def shrunk(image: Image.Image) -> Image.Image:
    """A large image averaged down by a whole factor to about ``WORKING_SIDE`` a side (the result is 28x28 anyway,
    and the float work on every pixel of a 4096x4096 image would cost ~10x its decoding)."""
    factor = -(-max(image.size) // WORKING_SIDE)
    if factor == 1:
        return image
    if image.mode not in ("L", "LA", "RGB", "RGBA", "CMYK", "I", "F"):  # the modes Pillow's reduce() takes
        image = image.convert("I" if image.mode.startswith("I;16") else "L")
    return image.reduce(factor)
