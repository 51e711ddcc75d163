"""The app's own Lightning callbacks: the progress bar counts batches, whatever a training step holds."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest

from conftest import N_TRAIN, fit_model
from fashion_lightning import DenseBaseline
from fashion_lightning.callbacks import BatchProgressBar

EPOCH = math.ceil((N_TRAIN - 5000) / 32)  # batches of 32 in an epoch after the default 5000 validation images


@pytest.mark.parametrize(("fast", "per_step", "limit", "total"), [(False, 64, 5, 5), (True, 4, 10, 10),
                                                                  (True, 64, None, EPOCH)])
def test_progress_bar_counts_batches(fast: bool, per_step: int, limit: int | None, total: int, data_dir: Path,
                                     tmp_path: Path) -> None:
    bar = BatchProgressBar(refresh_rate=1)
    seen: list[tuple[int, int]] = []
    record = lambda self, t, *args: seen.append((bar.train_progress_bar.n, bar.train_progress_bar.total))  # noqa: E731
    spy = type("Spy", (L.Callback,), {"takes_batch_lists": True, "on_train_batch_end": record})()
    fit_model(DenseBaseline(fast=fast, batches_per_step=per_step), data_dir, tmp_path, callbacks=(bar, spy),
              max_epochs=1, limit_train_batches=limit, enable_progress_bar=True)
    steps = math.ceil(total / per_step) if fast else total  # the last step of an epoch takes the remaining batches
    step = per_step if fast else 1
    assert seen == [(min((i + 1) * step, total), total) for i in range(steps)]


def test_progress_bar_refreshes_every_refresh_rate_batches(data_dir: Path, tmp_path: Path) -> None:
    bar = BatchProgressBar(refresh_rate=4)
    seen: list[int] = []
    spy = type("Spy", (L.Callback,), {"on_train_batch_end": lambda self, t, *args: seen.append(
        bar.train_progress_bar.n)})()
    fit_model(DenseBaseline(), data_dir, tmp_path, callbacks=(bar, spy), max_epochs=1, limit_train_batches=10,
              enable_progress_bar=True)
    assert seen == [0, 0, 0, 4, 4, 4, 4, 8, 8, 10]  # every 4 batches and at the end
