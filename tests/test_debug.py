"""The debug group: Lightning's debugging flags as train options (debug=fdr, overfit, profiler, limit)."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L

from conftest import compose_train, quick_overrides
from fashion_lightning.train import train


class EvalCounter(L.Callback):
    """Counts the validation batches (not the sanity check's) and the test batches."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def on_validation_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.counts["val"] += 0 if trainer.sanity_checking else 1

    def on_test_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.counts["test"] += 1


class TrainLabels(L.Callback):
    """The labels of each epoch's training batches (a per-batch callback)."""

    def __init__(self) -> None:
        self.epochs: list[list[int]] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.epochs.append([])

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, *args: Any) -> None:
        self.epochs[-1] += batch[1].tolist()


def debug_run(option: str, data_dir: Path, out: Path, *overrides: str,
              callbacks: tuple[L.Callback, ...] = ()) -> dict[str, Any]:
    """The results of a run with ``debug=option`` on the synthetic data, into ``out``."""
    plain = [o for o in quick_overrides(data_dir, out) if not o.startswith(("+trainer.limit_", "trainer.max_epochs"))]
    return train(compose_train(*plain, f"debug={option}", "data.eval_batch_size=100", *overrides), callbacks=callbacks)


def test_fdr_runs_one_batch_each_and_writes_nothing(data_dir: Path, tmp_path: Path) -> None:
    evals, labels = EvalCounter(), TrainLabels()
    results = debug_run("fdr", data_dir, tmp_path / "run", "model.fused=false", callbacks=(evals, labels))
    assert results["steps"] == 1 and evals.counts == {"val": 1, "test": 1} and len(labels.epochs[0]) == 32
    assert results["tested"] == "final weights" and 0 <= results["test_acc"] <= 1
    assert not (tmp_path / "run").exists()  # no checkpoint, log, report or results.json, as Lightning's fast_dev_run


def test_overfit_trains_and_validates_on_the_same_few_batches(data_dir: Path, tmp_path: Path) -> None:
    evals, labels = EvalCounter(), TrainLabels()
    results = debug_run("overfit", data_dir, tmp_path / "run", "model=dense", "model.fused=false",
                        "trainer.max_epochs=8", "+trainer.limit_test_batches=1", callbacks=(evals, labels))
    assert results["steps"] == 8 * 3 and evals.counts["val"] == 8 * 3 and results["recipe"] == "debug"
    assert len(labels.epochs[0]) == 3 * 32 and all(epoch == labels.epochs[0] for epoch in labels.epochs)
    rows = [row for row in csv.DictReader(open(tmp_path / "run" / "logs" / "metrics.csv")) if row["train/loss"]]
    losses = [float(row["train/loss"]) for row in rows]
    assert len(losses) == 8 and losses[-1] < losses[0] / 2 and float(rows[-1]["train/acc"]) > 0.9


def test_profiler_writes_its_report_into_the_run_directory(data_dir: Path, tmp_path: Path) -> None:
    results = debug_run("profiler", data_dir, tmp_path / "run", "+trainer.limit_train_batches=5",
                        "+trainer.limit_val_batches=1", "+trainer.limit_test_batches=1")
    assert results["epochs"] == 1 and results["steps"] == 5
    fit = (tmp_path / "run" / "fit-profile.txt").read_text()
    assert "FIT Profiler Report" in fit and "run_training_epoch" in fit
    (optimizer_steps,) = [line.split("|")[3].strip() for line in fit.splitlines() if "CNN.optimizer_step " in line]
    assert optimizer_steps == "5"  # one row per action: its mean and total time, and how often it ran
    assert "TEST Profiler Report" in (tmp_path / "run" / "test-profile.txt").read_text()


def test_limit_shortens_every_stage(data_dir: Path, tmp_path: Path) -> None:
    evals = EvalCounter()
    results = debug_run("limit", data_dir, tmp_path / "run", "model=dense", callbacks=(evals,))
    assert (results["epochs"], results["steps"], results["recipe"]) == (3, 3 * 20, "debug")
    assert evals.counts == {"val": 3 * 2, "test": 2} and (tmp_path / "run" / "results.json").is_file()
