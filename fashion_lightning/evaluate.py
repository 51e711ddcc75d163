"""Evaluate a checkpoint on the official test set and write its report: ``python -m fashion_lightning.evaluate``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fashion_lightning.errors import UserError, reported_as_one_line
from fashion_lightning.module import ImageClassifier, model_from_checkpoint, read_checkpoint
from fashion_lightning.report import METRICS_CSV, write_report
from fashion_lightning.train import CONFIG_DIR


def load_trained(cfg: DictConfig, command: str) -> tuple[Path, ImageClassifier, bool]:
    """For the apps that use a trained model: ``cfg.ckpt_path`` (required), its model on the CPU in eval mode,
    and whether it was trained on pixels / 255 (``scale``, read from the checkpoint's datamodule settings)."""
    if OmegaConf.is_missing(cfg, "ckpt_path") or not cfg.ckpt_path:
        raise UserError(f"ckpt_path is required: python -m fashion_lightning.{command} ckpt_path=path/to/best.ckpt")
    path = Path(cfg.ckpt_path).expanduser()
    checkpoint = read_checkpoint(path)
    scale = checkpoint.get("datamodule_hyper_parameters", {}).get("scale", True)
    return path, model_from_checkpoint(checkpoint), bool(scale)


def run_dir_of(ckpt_path: Path) -> Path:
    """The run directory a checkpoint belongs to (the parent of its ``checkpoints/`` folder)."""
    parent = ckpt_path.resolve().parent
    return parent.parent if parent.name == "checkpoints" else parent


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Write the report of ``cfg.ckpt_path`` and return its summary; pixels are scaled as in training."""
    ckpt_path, model, scale = load_trained(cfg, "evaluate")
    datamodule = instantiate(cfg.data, scale=scale)
    run_dir = run_dir_of(ckpt_path)
    out = Path(cfg.report_dir) if cfg.report_dir else run_dir / "report"
    summary = write_report(model, datamodule, out, metrics_csv=run_dir / METRICS_CSV)
    print(f"test accuracy {summary['test_acc']:.4f}, loss {summary['test_loss']:.4f}; report: {out / 'report.md'}")
    return summary


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> None:
    with reported_as_one_line():
        evaluate(cfg)


if __name__ == "__main__":
    main()
