"""Classify image files or test-set items with a trained checkpoint: ``python -m fashion_lightning.predict``."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from fashion_lightning.app import (
    CONFIG_DIR,
    DATA_PATHS,
    as_list,
    launch_path,
    load_trained,
    probabilities,
    ranked,
    reported_as_one_line,
    set_up_process,
    with_launch_paths,
)
from fashion_lightning.data.datamodule import CLASS_NAMES
from fashion_lightning.data.images import INVERT, ImageError, open_image
from fashion_lightning.errors import UserError, check_positive_int


@dataclass
class Item:
    """One input: its name, the 28x28 uint8 image (light on dark) or the reason it could not be read."""

    name: str
    pixels: Tensor | None = None
    label: int | None = None
    error: str | None = None


def read_image(path: str, invert: str) -> Item:
    """An image file as an `Item`; unreadable files become an `Item` with the reason."""
    file = Path(launch_path(path))
    if not file.is_file():
        return Item(path, error="no such file")
    try:
        return Item(path, open_image(file, invert))
    except ImageError as err:
        return Item(path, error=str(err))


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
            items += [Item(f"test:{i}", test_set.images[i], int(test_set.labels[i])) for i in indices]
        else:
            items.append(read_image(spec, invert))
    return items


def predict(cfg: DictConfig) -> list[dict[str, Any]]:
    """Predict every input of ``cfg.inputs``; print a table or JSON; return one dict per input."""
    cfg = with_launch_paths(cfg, "ckpt_path", *DATA_PATHS)
    check_positive_int("top_k", cfg.top_k)
    if cfg.invert not in INVERT:
        raise UserError(f"invert must be one of {', '.join(INVERT)}, got {cfg.invert!r}")
    if cfg.format not in ("table", "json"):
        raise UserError(f"format must be table or json, got {cfg.format!r}")
    inputs = [] if OmegaConf.is_missing(cfg, "inputs") else as_list(cfg.inputs)
    if not inputs:
        raise UserError("inputs names no image: give image files or test-set items, e.g. inputs=[shirt.png,test:0-15]")
    _, model, scale = load_trained(cfg, "predict")
    items = gather_items(inputs, cfg.invert, cfg)
    good = [item for item in items if item.error is None]
    probs = iter(probabilities(model, torch.stack([item.pixels for item in good]), scale) if good else ())
    results = []
    for item in items:
        if item.error is not None:
            results.append({"input": item.name, "error": item.error})
            continue
        row = {"input": item.name, **ranked(next(probs), cfg.top_k)}
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
    set_up_process()
    main()
