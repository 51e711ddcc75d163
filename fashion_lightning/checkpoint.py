"""Reading fashion_lightning checkpoints: one clear error for a missing, damaged, unsafe, foreign or mismatched file.

Nothing in a checkpoint runs code: the file is unpickled weights-only (`checkpoint_io.load_checkpoint_file`), and the
model rebuilt is one of `TRAINED_CLASSES`, whatever the file names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fashion_lightning.checkpoint_io import load_checkpoint_file
from fashion_lightning.errors import UserError
from fashion_lightning.module import CHECKPOINT_KEY, ImageClassifier


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint file on the CPU, with one clear error if it is missing, damaged, unsafe or not ours."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"ckpt_path={str(path)!r} does not exist; pass a .ckpt file written by fashion_lightning")
    checkpoint = load_checkpoint_file(path, map_location="cpu")
    if not isinstance(checkpoint, dict) or CHECKPOINT_KEY not in checkpoint:
        raise UserError(f"ckpt_path={str(path)!r} is not a fashion_lightning checkpoint (no {CHECKPOINT_KEY!r})")
    return checkpoint


def check_compatible(checkpoint: dict[str, Any], model: ImageClassifier, path: str | Path) -> None:
    """Raise a `UserError` unless the checkpoint's weights fit ``model``'s architecture exactly."""
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in checkpoint.get("state_dict", {}).items()}
    if ours != theirs:
        def arch(hparams: dict[str, Any]) -> dict[str, Any]:
            return {k: v for k, v in hparams.items() if k in ("filters", "kernel_size", "hidden", "hidden1", "hidden2")}

        saved = checkpoint[CHECKPOINT_KEY].split(":")[-1]
        raise UserError(f"ckpt_path={str(path)!r} holds a {saved} {arch(checkpoint.get('hyper_parameters', {}))}, "
                        f"another architecture than the configured {type(model).__name__} {arch(model.hparams)}; "
                        "pass the model config it was trained with")


RESUMED_DATA = ("scale", "val_split", "seed")
"""The data settings a resumed fit must share with its checkpoint: what the pixels are (raw or / 255), which images
validate, the shuffling. (``batch_size`` too where it stopped within an epoch: `BatchLoader` checks that.)"""


def check_same_data(checkpoint: dict[str, Any], datamodule: Any, path: str | Path) -> None:
    """Raise a `UserError` naming every setting of `RESUMED_DATA` in which ``datamodule`` differs from the data the
    checkpoint was trained on (as far as the checkpoint records them)."""
    saved, ours = checkpoint.get("datamodule_hyper_parameters") or {}, getattr(datamodule, "hparams", {})
    differ = [f"data.{key}={ours[key]!r} (the checkpoint's {saved[key]!r})" for key in RESUMED_DATA
              if key in saved and key in ours and saved[key] != ours[key]]
    if differ:
        raise UserError(f"ckpt_path={str(path)!r} was trained on other data settings: {', '.join(differ)}; "
                        "resume with the checkpoint's (its experiment=...), or start a new run")


TRAINED_CLASSES = ("CNN", "DenseBaseline")
"""The classes `model_from_checkpoint` rebuilds, looked up by the class name a checkpoint records in the package's
top level (older checkpoints record another module path)."""


def model_from_checkpoint(checkpoint: dict[str, Any], path: str | Path) -> ImageClassifier:
    """Rebuild the model of a checkpoint already read from ``path`` with `read_checkpoint` (on the CPU, in eval
    mode): one of `TRAINED_CLASSES`, never an import the checkpoint names."""
    import fashion_lightning  # here, not above: the package imports the modules that import this one

    saved = str(checkpoint[CHECKPOINT_KEY])
    class_name = saved.rpartition(":")[2]
    if class_name not in TRAINED_CLASSES:
        raise UserError(f"ckpt_path={str(path)!r} holds a {saved!r} model, not one of fashion_lightning's "
                        f"{', '.join(TRAINED_CLASSES)}; load it with {class_name or 'its class'}"
                        ".load_from_checkpoint(ckpt_path) instead")
    model = getattr(fashion_lightning, class_name)(**checkpoint.get("hyper_parameters", {}))
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval()


def load_model(path: str | Path) -> ImageClassifier:
    """Rebuild the trained model saved in a fashion_lightning checkpoint file (on the CPU, in eval mode)."""
    return model_from_checkpoint(read_checkpoint(path), path)


def trained_model(path: str | Path) -> tuple[ImageClassifier, bool]:
    """The trained model of a checkpoint file (on the CPU, in eval mode) and whether it was trained on pixels / 255
    (``scale``, read from the checkpoint's datamodule settings)."""
    checkpoint = read_checkpoint(path)
    scale = checkpoint.get("datamodule_hyper_parameters", {}).get("scale", True)
    return model_from_checkpoint(checkpoint, path), bool(scale)


def load_trained(cfg: DictConfig, command: str) -> tuple[Path, ImageClassifier, bool]:
    """For the apps that use a trained model: ``cfg.ckpt_path`` (required) and its `trained_model`."""
    if OmegaConf.is_missing(cfg, "ckpt_path") or not cfg.ckpt_path:
        raise UserError(f"ckpt_path is required: python -m fashion_lightning.{command} ckpt_path=path/to/best.ckpt")
    path = Path(cfg.ckpt_path).expanduser()
    return (path, *trained_model(path))


def run_dir_of(ckpt_path: Path) -> Path:
    """The run directory a checkpoint belongs to (the parent of its ``checkpoints/`` folder)."""
    parent = ckpt_path.resolve().parent
    return parent.parent if parent.name == "checkpoints" else parent
