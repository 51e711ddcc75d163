"""Export a checkpoint with softmax outputs and verify it: ``python -m fashion_lightning.export``."""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import Tensor, nn

from fashion_lightning.app import (
    CONFIG_DIR,
    DATA_PATHS,
    load_trained,
    reported_as_one_line,
    run_dir_of,
    set_up_process,
    with_launch_paths,
)
from fashion_lightning.data.datamodule import CLASS_NAMES, to_input
from fashion_lightning.errors import UserError
from fashion_lightning.lit.checkpoints import write_atomically
from fashion_lightning.lit.classifier import onnx_options

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
TOLERANCE = 1e-5


class Probabilities(nn.Module):
    """A network's logits turned into class probabilities: what an exported model outputs. With ``flip`` (a model
    trained with ``eval_flip``), the logits are averaged with those of the mirrored images, as the model predicts."""

    def __init__(self, net: nn.Module, flip: bool = False) -> None:
        super().__init__()
        self.net, self.flip = net, flip

    def forward(self, images: Tensor) -> Tensor:
        """(N, 1, 28, 28) float images, scaled as in training -> (N, 10) probabilities."""
        logits = self.net(images)
        if self.flip:
            logits = (logits + self.net(images.flip(3))) / 2
        return logits.softmax(dim=1)


Exported = tuple[bytes, Callable[[Tensor], Tensor]]
"""An exported model's file content, and a function running that content loaded back."""


def to_onnx(model: nn.Module, example: Tensor) -> Exported:
    """ONNX with a dynamic batch dimension, run with onnxruntime."""
    try:
        import onnxruntime
    except ImportError:
        raise UserError('format=onnx needs the onnx extra: pip install "fashion_lightning[onnx]"') from None
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript-based exporter: no extra dependency, exact for these ops
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), buffer, **onnx_options("probabilities"))
    session = onnxruntime.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    return buffer.getvalue(), lambda x: torch.from_numpy(session.run(None, {"images": x.numpy()})[0])


def to_torchscript(model: nn.Module, example: Tensor) -> Exported:
    """A traced TorchScript module, serialized in memory: torch's own file writer aborts the process on a disk
    error (``c10::Error`` in a destructor), Python's raises an ``OSError``."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # torch.jit is deprecated in favour of torch.export, but still the portable format
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(model, example), buffer)
        buffer.seek(0)
        loaded = torch.jit.load(buffer)
    return buffer.getvalue(), lambda x: loaded(x)


def export(cfg: DictConfig) -> dict[str, Any]:
    """Export ``cfg.ckpt_path`` as ``cfg.format``, check it against PyTorch on 256 test images, return a summary.

    The file is written under its name only once its probabilities match PyTorch's within 1e-5, and atomically
    (`write_atomically`): an earlier export there is otherwise left whole, also by a full disk or a kill. A JSON file
    beside it records the class names and the input scaling.
    """
    if cfg.format not in FORMATS:
        raise UserError(f"format must be one of {', '.join(FORMATS)}, got {cfg.format!r}")
    cfg = with_launch_paths(cfg, "ckpt_path", "output", *DATA_PATHS)
    ckpt_path, trained, scale = load_trained(cfg, "export")
    model = Probabilities(trained.net, flip=bool(trained.hparams.get("eval_flip"))).eval()
    out = Path(cfg.output) if cfg.output else run_dir_of(ckpt_path) / "export" / f"model{FORMATS[cfg.format]}"
    out.parent.mkdir(parents=True, exist_ok=True)
    datamodule = instantiate(cfg.data)
    datamodule.setup("test")
    images = to_input(datamodule.test_set.images[:256], scale)
    with torch.no_grad():  # checked in memory, then written: never a half-written or unchecked model under the name
        content, run = (to_onnx if cfg.format == "onnx" else to_torchscript)(model, images[:2])
        expected = trained.predict_step(images)[0]  # what predict and serve answer
        difference = (run(images) - expected).abs().max().item()
    if not difference <= TOLERANCE:
        raise UserError(f"the exported {cfg.format} model differs from PyTorch by {difference:.2e} "
                        f"(> {TOLERANCE}) on 256 test images; nothing was written")
    info = {"file": str(out), "format": cfg.format, "input": "float32 (N, 1, 28, 28), "
            + ("pixels / 255" if scale else "raw 0-255 pixels"), "output": "probabilities (N, 10)",
            "classes": list(CLASS_NAMES), "max_abs_difference_vs_pytorch": difference}
    write_atomically(out, content)
    write_atomically(out.with_suffix(out.suffix + ".json"), (json.dumps(info, indent=2) + "\n").encode())
    print(f"wrote {out} ({cfg.format}); probabilities match PyTorch within {difference:.1e} on 256 test images")
    return info


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="export")
def main(cfg: DictConfig) -> None:
    with reported_as_one_line():
        export(cfg)


if __name__ == "__main__":
    set_up_process()
    main()
