"""Images from outside the dataset made to look like Fashion-MNIST (shared by predict and serve)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import huge_png, save_variants
from fashion_lightning import UserError
from fashion_lightning.data.images import (
    ImageError,
    ImageTooLarge,
    NotAnImage,
    open_image,
    pixel_count,
    to_fashion_mnist,
)


def encoded(image: Image.Image, fmt: str = "PNG", **kwargs: object) -> io.BytesIO:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    buffer.seek(0)
    return buffer


def test_every_form_of_an_image_converts_alike(tmp_path: Path) -> None:
    converted = [to_fashion_mnist(Image.open(tmp_path / name)).float() for name in save_variants(tmp_path)]
    for other in converted[1:]:
        assert (other - converted[0]).abs().mean() < 8  # JPEG and resampling noise only (of 255)


def test_conversion_gives_light_on_dark_28x28() -> None:
    yy, xx = np.mgrid[:120, :160]
    disk = ((yy - 60) ** 2 + (xx - 90) ** 2 < 40**2)
    photo = Image.fromarray(np.where(disk, 30, 240).astype(np.uint8)).convert("RGB")  # dark disk on white, off-centre
    x = to_fashion_mnist(photo)
    assert x.shape == (28, 28) and x.dtype == torch.uint8
    corners = torch.stack([x[0, 0], x[0, -1], x[-1, 0], x[-1, -1]]).float()
    assert corners.max() < 40 and x[14, 14] > 200 and x[14, 0] > 100  # the disk fills the frame, light on dark
    assert to_fashion_mnist(photo, "never")[14, 14] < 40  # forced: left as it was, a dark object
    with pytest.raises(UserError, match="invert must be one of auto, always, never, got 'maybe'"):
        to_fashion_mnist(photo, "maybe")


def test_sixteen_bit_images_keep_their_contrast() -> None:
    photo = np.full((60, 60), 60000, np.uint16)
    photo[15:45, 20:40] = 3000  # a dark object on a light background, 16 bits a pixel
    x = open_image(encoded(Image.fromarray(photo)))
    assert x[0, 0] == 0 and x[14, 14] == 255  # inverted, filling the frame (not clipped to white everywhere)


def test_exif_orientation_is_applied() -> None:
    image = Image.new("L", (40, 20))
    image.paste(255, (0, 0, 10, 20))  # a light bar on the left: taller than wide once turned upright
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    upright = open_image(encoded(image, "JPEG", exif=exif.tobytes(), quality=95))
    plain = open_image(encoded(image.transpose(Image.Transpose.ROTATE_270), "JPEG", quality=95))
    assert (upright.float() - plain.float()).abs().mean() < 4


def test_a_large_image_converts_like_a_small_one() -> None:
    small = Image.fromarray(np.kron(np.eye(7, dtype=np.uint8) * 200, np.ones((20, 20), np.uint8)))  # 140x140
    large = small.resize((4000, 4000), Image.Resampling.NEAREST)
    assert (open_image(encoded(large)).float() - open_image(encoded(small)).float()).abs().mean() < 3


def test_what_cannot_be_read_is_said() -> None:
    with pytest.raises(NotAnImage, match="not an image"):
        open_image(io.BytesIO(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"))  # EPS: not opened
    wide = encoded(Image.new("L", (5000, 8))).getvalue()
    with pytest.raises(ImageTooLarge, match="image too large \\(5000x8 pixels; at most 4096 a side\\)"):
        open_image(io.BytesIO(wide))
    data = encoded(Image.fromarray(np.arange(784, dtype=np.uint8).reshape(28, 28))).getvalue()
    with pytest.raises(ImageError, match="corrupt image"):
        open_image(io.BytesIO(data[: len(data) // 2]))
    assert pixel_count(encoded(Image.new("L", (300, 200))).getvalue()) == 60_000
    assert pixel_count(b"not an image") == 0
    assert pixel_count(wide) == 0  # too large a side: open_image says so, not the count of pixels


def test_a_decompression_bomb_is_too_large_too() -> None:
    """Over Pillow's limit: refused as too large from its header, as a smaller image over 4096 a side is."""
    with pytest.raises(ImageTooLarge, match=r"^image too large \(over \d+ pixels; at most 4096 a side\)$"):
        open_image(io.BytesIO(huge_png()))
    with pytest.raises(ImageTooLarge, match=r"image too large \(10000x10000 pixels; at most 4096 a side\)"):
        open_image(io.BytesIO(huge_png(10_000, 10_000)))  # past Pillow's warning: no warning, the side is checked
    assert pixel_count(huge_png()) == 0
