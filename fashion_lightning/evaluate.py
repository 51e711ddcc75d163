"""Evaluate a checkpoint on the official test set and write its report: ``python -m fashion_lightning.evaluate``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from fashion_lightning.app import (
    CONFIG_DIR,
    DATA_PATHS,
    load_trained,
    reported_as_one_line,
    run_dir_of,
    set_up_process,
    with_launch_paths,
)
from fashion_lightning.report import METRICS_CSV, write_report


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Write the report of ``cfg.ckpt_path`` and return its summary; pixels are scaled as in training."""
    cfg = with_launch_paths(cfg, "ckpt_path", "report_dir", *DATA_PATHS)
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
    set_up_process()
    main()
