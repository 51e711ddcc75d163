"""Export a checkpoint with softmax outputs and verify it: ``python -m fashion_lightning.export``."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import Tensor, nn

from fashion_lightning.checkpoint import load_trained, run_dir_of
from fashion_lightning.data import CLASS_NAMES, to_input
from fashion_lightning.app import CONFIG_DIR, reported_as_one_line, set_up_process
from fashion_lightning.errors import UserError

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


def write_onnx(model: nn.Module, example: Tensor, path: Path) -> Any:
    """Write ONNX with a dynamic batch dimension; return a function running it with onnxruntime."""
    try:
        import onnxruntime
    except ImportError:
        raise UserError('format=onnx needs the onnx extra: pip install "fashion_lightning[onnx]"') from None
    with warnings.catch_warnings():  # the TorchScript-based exporter: no extra dependency, exact for these ops
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), input_names=["images"], output_names=["probabilities"],
                          dynamic_axes={"images": {0: "batch"}, "probabilities": {0: "batch"}}, dynamo=False)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {"images": x.numpy()})[0])


def write_torchscript(model: nn.Module, example: Tensor, path: Path) -> Any:
    """Write a traced TorchScript module; return a function running the file loaded back."""
    with warnings.catch_warnings():  # torch.jit is deprecated in favour of torch.export, but still the portable format
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(model, example), str(path))
        loaded = torch.jit.load(str(path))
    return lambda x: loaded(x)


def export(cfg: DictConfig) -> dict[str, Any]:
    """Export ``cfg.ckpt_path`` as ``cfg.format``, check it against PyTorch on 256 test images, return a summary.

    The file is written under its name only once its probabilities match PyTorch's within 1e-5 (an earlier export
    there is otherwise left as it was); a JSON file beside it records the class names and the input scaling.
    """
    if cfg.format not in FORMATS:
        raise UserError(f"format must be one of {', '.join(FORMATS)}, got {cfg.format!r}")
    ckpt_path, trained, scale = load_trained(cfg, "export")
    model = Probabilities(trained.net, flip=bool(trained.hparams.get("eval_flip"))).eval()
    out = Path(cfg.output) if cfg.output else run_dir_of(ckpt_path) / "export" / f"model{FORMATS[cfg.format]}"
    out.parent.mkdir(parents=True, exist_ok=True)
    datamodule = instantiate(cfg.data)
    datamodule.setup("test")
    images = to_input(datamodule.test_set[0][:256], scale)
    sidecar = out.with_suffix(out.suffix + ".json")
    partial, partial_sidecar = (p.with_name(p.name + ".partial") for p in (out, sidecar))
    try:  # written beside, checked, then renamed: never a half-written or unchecked model under the name
        with torch.no_grad():
            run = (write_onnx if cfg.format == "onnx" else write_torchscript)(model, images[:2], partial)
            expected = trained.predict_step(images)[0]  # what predict and serve answer
            difference = (run(images) - expected).abs().max().item()
        if not difference <= TOLERANCE:
            raise UserError(f"the exported {cfg.format} model differs from PyTorch by {difference:.2e} "
                            f"(> {TOLERANCE}) on 256 test images; nothing was written")
        info = {"file": str(out), "format": cfg.format, "input": "float32 (N, 1, 28, 28), "
                + ("pixels / 255" if scale else "raw 0-255 pixels"), "output": "probabilities (N, 10)",
                "classes": list(CLASS_NAMES), "max_abs_difference_vs_pytorch": difference}
        partial_sidecar.write_text(json.dumps(info, indent=2) + "\n")
        partial.replace(out)
        partial_sidecar.replace(sidecar)
    finally:
        partial.unlink(missing_ok=True)
        partial_sidecar.unlink(missing_ok=True)
    print(f"wrote {out} ({cfg.format}); probabilities match PyTorch within {difference:.1e} on 256 test images")
    return info


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="export")
def main(cfg: DictConfig) -> None:
    with reported_as_one_line():
        export(cfg)


if __name__ == "__main__":
    set_up_process()
    main()
