"""Evaluate a checkpoint on the official test set and write its report: ``python -m fashion_lightning.evaluate``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fashion_lightning.errors import UserError, reported_as_one_line
from fashion_lightning.module import model_from_checkpoint, read_checkpoint
from fashion_lightning.report import METRICS_CSV, write_report
from fashion_lightning.train import CONFIG_DIR


def required_ckpt_path(cfg: DictConfig, command: str) -> Path:
    """``cfg.ckpt_path`` as a path, or a `UserError` that shows how to pass it."""
    if OmegaConf.is_missing(cfg, "ckpt_path") or not cfg.ckpt_path:
        raise UserError(f"ckpt_path is required: python -m fashion_lightning.{command} ckpt_path=path/to/best.ckpt")
    return Path(cfg.ckpt_path).expanduser()


def run_dir_of(ckpt_path: Path) -> Path:
    """The run directory a checkpoint belongs to (the parent of its ``checkpoints/`` folder)."""
    parent = ckpt_path.resolve().parent
    return parent.parent if parent.name == "checkpoints" else parent


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Write the report of ``cfg.ckpt_path`` and return its summary; pixels are scaled as in training."""
    ckpt_path = required_ckpt_path(cfg, "evaluate")
    checkpoint = read_checkpoint(ckpt_path)
    model = model_from_checkpoint(checkpoint)
    scale = checkpoint.get("datamodule_hyper_parameters", {}).get("scale", cfg.data.scale)
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
