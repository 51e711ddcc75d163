"""The app's default run is the library a user imports: `CNN` with automatic optimization, one batch a step, so the
flags, callbacks and loggers a Lightning user adds do what Lightning documents (each was silently wrong or refused
while the default trained grouped steps)."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from conftest import compose_train, quick_overrides
from fashion_lightning import CNN, FashionMNISTDataModule
from fashion_lightning.lit.profilers import NoProfiler
from fashion_lightning.train import train

BATCHES, EPOCHS = 130, 2


def default_run(data_dir: Path, out: Path, *extra: str, callbacks: tuple = (),
                limit: int | float = BATCHES) -> dict[str, Any]:
    """The app's defaults on the synthetic data: ``limit`` training batches an epoch (130), 2 epochs, the CSV
    logger."""
    base = [o for o in quick_overrides(data_dir, out) if "limit_train_batches" not in o and "max_epochs" not in o]
    return train(compose_train(*base, f"+trainer.limit_train_batches={limit}", f"trainer.max_epochs={EPOCHS}",
                               *extra), callbacks=callbacks)


class Seen(L.Callback):
    """What a user's callback sees of the trainer at the fit's start, and the trainer itself."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.trainer, self.module = trainer, pl_module
        self.num_training_batches = trainer.num_training_batches
        self.estimated_stepping_batches = trainer.estimated_stepping_batches
        bar = trainer.progress_bar_callback
        self.bar_total = bar.total_train_batches if bar is not None else None


def metrics_rows(out: Path) -> list[dict[str, str]]:
    with (out / "logs" / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def test_the_default_trains_the_cnn_with_automatic_optimization_one_batch_a_step(data_dir: Path,
                                                                                 tmp_path: Path) -> None:
    seen = Seen()
    results = default_run(data_dir, tmp_path / "run", callbacks=(seen,))
    assert type(seen.module) is CNN and seen.module.automatic_optimization
    assert results["model"] == "fashion_lightning.CNN" and results["steps"] == BATCHES * EPOCHS
    assert seen.num_training_batches == BATCHES and seen.estimated_stepping_batches == BATCHES * EPOCHS


def test_the_progress_bar_counts_batches(data_dir: Path, tmp_path: Path) -> None:
    """Lightning's bars (tqdm's and Rich's alike) take their total from ``trainer.num_training_batches``."""
    seen = Seen()
    default_run(data_dir, tmp_path / "run", "trainer.max_epochs=1", "trainer.enable_progress_bar=true",
                "+callbacks.progress_bar._target_=lightning.pytorch.callbacks.TQDMProgressBar", callbacks=(seen,))
    assert seen.bar_total == seen.num_training_batches == BATCHES


def test_the_test_row_and_learning_rates_land_at_the_batch_steps(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    default_run(data_dir, out, "+callbacks.lr._target_=lightning.pytorch.callbacks.LearningRateMonitor")
    rows = metrics_rows(out)
    assert [int(r["step"]) for r in rows if r.get("test/acc")] == [BATCHES * EPOCHS]
    lr_steps = [int(r["step"]) for r in rows if r.get("lr-Adam")]
    assert lr_steps == [0, 49, 99, 130, 149, 199, 249]  # as Lightning logs them: counted in batches


def test_the_simple_profiler_counts_every_training_batch(data_dir: Path, tmp_path: Path) -> None:
    seen = Seen()
    default_run(data_dir, tmp_path / "run", "+trainer.profiler=simple", callbacks=(seen,))
    durations = seen.trainer.profiler.recorded_durations
    (step_key,) = [k for k in durations if k.endswith("training_step")]
    assert len(durations[step_key]) == BATCHES * EPOCHS


def test_without_a_profiler_the_default_run_profiles_nothing_at_less_cost(data_dir: Path, tmp_path: Path) -> None:
    seen = Seen()
    default_run(data_dir, tmp_path / "run", "trainer.max_epochs=1", callbacks=(seen,))
    assert type(seen.trainer.profiler) is NoProfiler and seen.trainer.profiler.summary() == ""


def test_a_checkpoint_of_the_app_resumes_in_a_plain_trainer_to_the_right_step(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    default_run(data_dir, out, "trainer.max_epochs=1")
    ckpt = out / "checkpoints" / "last.ckpt"
    model = CNN.load_from_checkpoint(ckpt)
    trainer = L.Trainer(accelerator="cpu", max_epochs=2, limit_train_batches=BATCHES, limit_val_batches=2,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=FashionMNISTDataModule(data_dir=str(data_dir), download=False), ckpt_path=ckpt)
    assert trainer.global_step == BATCHES * EPOCHS


WORKING: dict[str, tuple[tuple[str, ...], int, int | float]] = {  # settings the grouped default refused;
    # the steps they train, with that many training batches an epoch
    "gradient clipping": (("+trainer.gradient_clip_val=0.5",), BATCHES * EPOCHS, BATCHES),
    "accumulation": (("+trainer.accumulate_grad_batches=2",), BATCHES * EPOCHS // 2, BATCHES),
    "validation twice an epoch": (("+trainer.val_check_interval=0.5",), BATCHES * EPOCHS, BATCHES),
    "LearningRateMonitor": (("+callbacks.lr._target_=lightning.pytorch.callbacks.LearningRateMonitor",),
                            BATCHES * EPOCHS, BATCHES),
    "checkpoints every 50 steps": (("+callbacks.every._target_=lightning.pytorch.callbacks.ModelCheckpoint",
                                    "+callbacks.every.every_n_train_steps=50", "+callbacks.every.save_top_k=-1",
                                    "+callbacks.every.dirpath=${paths.output_dir}/steps"),
                                   BATCHES * EPOCHS, BATCHES),
    "max_steps inside what was a group": (("+trainer.max_steps=70",), 70, BATCHES),
    "a fraction of the training batches": ((), 85 * EPOCHS, 0.05),  # 5 % of 1719 batches
    "EMA": (("callbacks=ema",), BATCHES * EPOCHS, BATCHES),
}


@pytest.mark.parametrize("case", sorted(WORKING))
def test_what_the_grouped_default_refused_now_works(case: str, data_dir: Path, tmp_path: Path) -> None:
    extra, steps, limit = WORKING[case]
    results = default_run(data_dir, tmp_path / "run", *extra, limit=limit)
    assert results["steps"] == steps and results["test_acc"] > 0.3
    if case == "checkpoints every 50 steps":
        saved = sorted(int(p.stem.rpartition("=")[2]) for p in (tmp_path / "run" / "steps").glob("*.ckpt"))
        assert saved == [50, 100, 150, 200, 250]


def test_the_default_runs_report_names_the_cnn(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    default_run(data_dir, out, "trainer.max_epochs=1", "report=true", "+trainer.limit_test_batches=2")
    title = (out / "report" / "report.md").read_text().splitlines()[0]
    assert title == "# Evaluation report: CNN"


@contextmanager
def syncs_by_step(steps: dict[int, int], seen: Seen) -> Iterator[None]:
    """Count calls that make the host wait for a tensor's value (``item``, ``bool``, ``float``, ``int``, ``tolist``)
    during the fit's training, by the optimizer step they fall in."""
    names = ("item", "__bool__", "__float__", "__int__", "tolist")
    originals = {name: getattr(torch.Tensor, name) for name in names}

    def counting(original: Any) -> Any:
        def wrapper(self: torch.Tensor, *args: Any) -> Any:
            trainer = getattr(seen, "trainer", None)
            if trainer is not None and trainer.training and not trainer.sanity_checking:
                steps[trainer.global_step] = steps.get(trainer.global_step, 0) + 1
            return original(self, *args)
        return wrapper

    for name, original in originals.items():
        setattr(torch.Tensor, name, counting(original))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def test_no_host_sync_between_logging_steps(data_dir: Path, tmp_path: Path) -> None:
    seen, steps = Seen(), {}
    with syncs_by_step(steps, seen):
        default_run(data_dir, tmp_path / "run", "trainer.log_every_n_steps=50", callbacks=(seen,))
    logging_steps = {s for s in range(BATCHES * EPOCHS) if (s + 1) % 50 == 0}
    logged_after = {s + 1 for s in logging_steps}  # the logger reads the values after the step's optimizer step
    epoch_ends = {BATCHES * e for e in range(1, EPOCHS + 1)}  # the epoch's metrics, validation and checkpoints
    assert steps, "the counting saw no sync at all: it counts nothing"
    assert set(steps) <= logging_steps | logged_after | epoch_ends, sorted(steps)
