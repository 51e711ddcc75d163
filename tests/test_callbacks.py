"""The app's own Lightning callbacks: the progress bar counts batches, not training steps."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest

from conftest import N_TRAIN
from fashion_lightning import DenseBaseline, FashionMNISTDataModule
from fashion_lightning.callbacks import BatchProgressBar

EPOCH = math.ceil((N_TRAIN - 5000) / 32)  # batches of 32 in an epoch after the default 5000 validation images


@pytest.mark.parametrize(("per_step", "limit", "total"), [(1, 5, 5), (4, 3, 12), (32, None, EPOCH)])
def test_progress_bar_counts_batches(per_step: int, limit: int | None, total: int, data_dir: Path,
                                     tmp_path: Path) -> None:
    bar = BatchProgressBar()
    seen: list[tuple[int, int]] = []
    spy = type("Spy", (L.Callback,), {"on_train_batch_end": lambda self, t, *args: seen.append(
        (bar.train_progress_bar.n, bar.train_progress_bar.total))})()
    trainer = L.Trainer(max_epochs=1, limit_train_batches=limit, limit_val_batches=1, default_root_dir=tmp_path,
                        logger=False, enable_checkpointing=False, enable_model_summary=False, accelerator="cpu",
                        callbacks=[bar, spy])
    trainer.fit(DenseBaseline(), datamodule=FashionMNISTDataModule(data_dir=str(data_dir), download=False,
                                                                   batches_per_step=per_step))
    steps = math.ceil(total / per_step)  # the last step of a whole epoch takes the remaining batches
    assert seen == [(min((i + 1) * per_step, total), total) for i in range(steps)]
