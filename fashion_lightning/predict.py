"""Classify image files or test-set items with a trained checkpoint: ``python -m fashion_lightning.predict``."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from fashion_lightning.checkpoint import load_trained
from fashion_lightning.data import CLASS_NAMES, to_input
from fashion_lightning.errors import UserError, reported_as_one_line
from fashion_lightning.train import CONFIG_DIR

INVERT = ("auto", "always", "never")


@dataclass
class Item:
    """One input: its name, the 28x28 uint8 image (light on dark) or the reason it could not be read."""

    name: str
    pixels: Tensor | None = None
    label: int | None = None
    error: str | None = None


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


def read_image(path: str, invert: str) -> Item:
    """An image file as an `Item`; unreadable files become an `Item` with the reason."""
    file = Path(path).expanduser()
    if not file.is_file():
        return Item(path, error="no such file")
    try:
        with Image.open(file) as image:
            image.load()
            return Item(path, to_fashion_mnist(image, invert))
    except UnidentifiedImageError:
        return Item(path, error="not an image (unrecognised format)")
    except (OSError, SyntaxError, ValueError) as err:
        return Item(path, error=f"corrupt image ({err})")


def parse_test_items(spec: str) -> list[int]:
    """``test:7`` or ``test:0-15`` (inclusive) -> indices into the 10,000 test images."""
    body = spec.removeprefix("test:")
    try:
        first, _, last = body.partition("-")
        start, stop = int(first), int(last or first)
    except ValueError:
        raise UserError(f"bad test-set input {spec!r}: use test:N or test:A-B with 0 <= A <= B <= 9999") from None
    if not 0 <= start <= stop <= 9999:
        raise UserError(f"bad test-set input {spec!r}: use test:N or test:A-B with 0 <= A <= B <= 9999")
    return list(range(start, stop + 1))


def gather_items(inputs: list[str], invert: str, cfg: DictConfig) -> list[Item]:
    """Image files and ``test:`` items in the order given."""
    items: list[Item] = []
    test_set = None
    for spec in inputs:
        if spec.startswith("test:"):
            indices = parse_test_items(spec)
            if test_set is None:
                datamodule = instantiate(cfg.data)
                datamodule.setup("test")
                test_set = datamodule.test_set
            items += [Item(f"test:{i}", test_set[0][i], int(test_set[1][i])) for i in indices]
        else:
            items.append(read_image(spec, invert))
    return items


def predict(cfg: DictConfig) -> list[dict[str, Any]]:
    """Predict every input of ``cfg.inputs``; print a table or JSON; return one dict per input."""
    _, model, scale = load_trained(cfg, "predict")
    inputs = list(cfg.inputs) if isinstance(cfg.inputs, ListConfig | list) else [str(cfg.inputs)]
    items = gather_items([str(i) for i in inputs], cfg.invert, cfg)
    good = [item for item in items if item.error is None]
    probs = iter(())
    if good:
        x = to_input(torch.stack([item.pixels for item in good]), scale)
        with torch.inference_mode():
            probs = iter(model.predict_step(x)[0])
    results, k = [], min(int(cfg.top_k), len(CLASS_NAMES))
    for item in items:
        if item.error is not None:
            results.append({"input": item.name, "error": item.error})
            continue
        top = next(probs).topk(k)
        row = {"input": item.name, "prediction": CLASS_NAMES[int(top.indices[0])], "probability": float(top.values[0]),
               "top": [{"class": CLASS_NAMES[int(i)], "probability": float(v)}
                       for v, i in zip(top.values, top.indices, strict=True)]}
        if item.label is not None:
            row["label"] = CLASS_NAMES[item.label]
        results.append(row)
    print(json.dumps(results, indent=2) if cfg.format == "json" else table(results))
    return results


def table(results: list[dict[str, Any]]) -> str:
    """A plain-text table: input, prediction, probability, top-k (and the true label of test items)."""
    lines = [f"{'input':<32} {'prediction':<12} {'prob':>6}  top"]
    for r in results:
        if "error" in r:
            lines.append(f"{r['input']:<32} error: {r['error']}")
            continue
        top = ", ".join(f"{t['class']} {t['probability']:.3f}" for t in r["top"])
        label = f"  (true: {r['label']})" if "label" in r else ""
        lines.append(f"{r['input']:<32} {r['prediction']:<12} {r['probability']:>6.3f}  {top}{label}")
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="predict")
def main(cfg: DictConfig) -> None:
    with reported_as_one_line():
        if cfg.format not in ("table", "json"):
            raise UserError(f"format must be table or json, got {cfg.format!r}")
        results = predict(cfg)
    if any("error" in r for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
