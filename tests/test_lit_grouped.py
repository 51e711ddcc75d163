"""Grouped steps: the textbook path's training, validation, checkpoints, logs and stops, or a one-line refusal."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from conftest import compose_train, one_line_error, quick_overrides
from fashion_lightning import CNN, DenseBaseline, FashionMNISTDataModule, UserError
from fashion_lightning.lit.callbacks import SaveOnInterrupt
from fashion_lightning.lit.checkpoints import CHECKPOINT_KEY
from fashion_lightning.lit.grouped import GroupedCNN, GroupedDataModule, grouped
from fashion_lightning.train import train


def fit(cls: type, steps: int, data_dir: Path, tmp_path: Path, *, model: dict | None = None,
        callbacks: tuple = (), ckpt_path: Path | None = None, seed: int = 0, **trainer_kwargs: Any) -> tuple:
    """Fit ``cls`` (grouped by ``steps``, or textbook where ``steps`` is 0) on the synthetic data; the trainer and
    the model."""
    torch.manual_seed(seed)
    module = (grouped(cls) if steps else cls)(keras_init=True, **(model or {}))
    data = FashionMNISTDataModule(data_dir=str(data_dir), download=False)
    settings = {"accelerator": "cpu", "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
                "enable_model_summary": False, "default_root_dir": tmp_path, "limit_val_batches": 1,
                "num_sanity_val_steps": 0, "max_epochs": 2, "limit_train_batches": 21, **trainer_kwargs}
    trainer = L.Trainer(callbacks=list(callbacks), **settings)
    trainer.fit(module, datamodule=GroupedDataModule(data, steps) if steps else data, ckpt_path=ckpt_path)
    return trainer, module


def assert_same_weights(a: L.LightningModule, b: L.LightningModule, atol: float = 1e-5) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=atol, rtol=1e-4, msg=name)


@pytest.mark.parametrize("cls", [CNN, DenseBaseline])
@pytest.mark.parametrize("steps", [1, 4, 7])  # 4 does not divide the 21 batches: a short last group
def test_grouped_steps_train_as_the_textbook_path(cls: type, steps: int, data_dir: Path, tmp_path: Path) -> None:
    model = {"schedule": "onecycle"}
    (g_trainer, g_model), (t_trainer, t_model) = (fit(cls, s, data_dir, tmp_path, model=model) for s in (steps, 0))
    assert not g_model.automatic_optimization and t_model.automatic_optimization
    assert g_trainer.global_step == t_trainer.global_step == 42 and g_trainer.num_training_batches == -(-21 // steps)
    assert g_trainer.lr_scheduler_configs[0].scheduler.last_epoch == 42  # the schedule stepped every batch, to its end
    assert torch.equal(g_trainer.callback_metrics["train/acc"], t_trainer.callback_metrics["train/acc"])
    torch.testing.assert_close(g_trainer.callback_metrics["train/loss"], t_trainer.callback_metrics["train/loss"])
    assert_same_weights(g_model, t_model)


def test_the_fused_cnn_in_groups_stays_close_to_the_textbook_path_over_hundreds_of_steps(data_dir: Path,
                                                                                        tmp_path: Path) -> None:
    runs = [fit(CNN, s, data_dir, tmp_path, model={"fused": f}, max_epochs=1, limit_train_batches=300)
            for s, f in ((64, True), (0, False))]
    (g_trainer, g_model), (t_trainer, t_model) = runs
    assert g_trainer.global_step == t_trainer.global_step == 300
    # float32 rounding of two kernels, amplified by Adam over 300 steps: close, not equal
    assert_same_weights(g_model, t_model, atol=1e-4)  # measured: 1e-6 on AVX2, with either kernel set
    assert abs(float(g_trainer.callback_metrics["train/acc"] - t_trainer.callback_metrics["train/acc"])) < 0.01


def logged(folder: Path) -> list[dict[str, str]]:
    (path,) = folder.rglob("metrics.csv")
    with path.open() as f:
        return list(csv.DictReader(f))


def steps_of(rows: list[dict[str, str]], key: str) -> list[tuple[int, float]]:
    return [(int(r["step"]), round(float(r[key]), 4)) for r in rows if r.get(key)]


@pytest.mark.parametrize(("limit", "max_steps"), [(21, 30), (22, 43), (21, 42)])  # inside a group; inside an
def test_validation_checkpoints_logs_and_stops_land_where_the_textbook_path_puts_them(  # epoch's last group; its end
        limit: int, max_steps: int, data_dir: Path, tmp_path: Path) -> None:
    results = []
    for steps in (4, 0):
        out = tmp_path / str(steps)
        best = ModelCheckpoint(dirpath=out / "ckpt", monitor="val/acc", mode="max", filename="best")
        trainer, model = fit(DenseBaseline, steps, data_dir, tmp_path, callbacks=(best,), max_epochs=3,
                             limit_train_batches=limit, max_steps=max_steps, log_every_n_steps=5,
                             logger=CSVLogger(out), enable_checkpointing=True)
        results.append((trainer.global_step, logged(out), torch.load(best.best_model_path, weights_only=False)))
    (g_steps, g_rows, g_best), (t_steps, t_rows, t_best) = results
    assert g_steps == t_steps == max_steps
    for key in ("val/acc", "train/acc", "train/loss_step"):
        assert steps_of(g_rows, key) == steps_of(t_rows, key), key
    assert g_best["global_step"] == t_best["global_step"]


def test_max_steps_inside_the_only_group_of_an_epoch_is_refused_at_fit_start(data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"max_steps=14 .*steps_per_execution=1"):
        fit(DenseBaseline, 64, data_dir, tmp_path, limit_train_batches=10, max_steps=14)


class CrashAt(GroupedCNN):
    """Fails inside a group, at a given optimizer step, once."""

    crash_at: int | None = None

    def training_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.trainer.global_step == self.crash_at:
            self.crash_at = None
            raise RuntimeError("boom")
        return super().training_loss(logits, labels)


def test_a_crash_inside_a_group_resumes_at_its_first_unapplied_batch(data_dir: Path, tmp_path: Path) -> None:
    _, whole = fit(CNN, 4, data_dir, tmp_path)
    torch.manual_seed(0)
    crashing = CrashAt(keras_init=True)
    crashing.crash_at = 26  # the third batch of the second epoch's second group
    data = GroupedDataModule(FashionMNISTDataModule(data_dir=str(data_dir), download=False), 4)
    settings = {"accelerator": "cpu", "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
                "enable_model_summary": False, "limit_val_batches": 1, "num_sanity_val_steps": 0, "max_epochs": 2,
                "limit_train_batches": 21, "default_root_dir": tmp_path}
    with pytest.raises(RuntimeError, match="boom"):
        L.Trainer(callbacks=[SaveOnInterrupt(str(tmp_path))], **settings).fit(crashing, datamodule=data)
    saved = torch.load(tmp_path / "interrupted.ckpt", weights_only=False)
    assert saved["global_step"] == 26
    _, resumed = fit(CNN, 4, data_dir, tmp_path, ckpt_path=tmp_path / "interrupted.ckpt")
    assert_same_weights(resumed, whole)


def test_a_grouped_checkpoint_is_a_plain_one_that_fine_tunes_anywhere(data_dir: Path, tmp_path: Path) -> None:
    trainer, model = fit(CNN, 4, data_dir, tmp_path, model={"fused": True}, max_epochs=1)
    trainer.save_checkpoint(tmp_path / "grouped.ckpt")
    checkpoint = torch.load(tmp_path / "grouped.ckpt", weights_only=False)
    assert checkpoint[CHECKPOINT_KEY].endswith(":CNN") and "steps" not in str(checkpoint["hyper_parameters"])
    plain = CNN.load_from_checkpoint(tmp_path / "grouped.ckpt")
    assert plain.automatic_optimization and plain.hparams.fused
    clipped = L.Trainer(accelerator="cpu", max_steps=3, gradient_clip_val=0.5, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=1, num_sanity_val_steps=0, default_root_dir=tmp_path)
    clipped.fit(plain, datamodule=FashionMNISTDataModule(data_dir=str(data_dir), download=False))
    assert clipped.global_step == 3


def test_a_resume_under_the_other_optimization_is_refused_in_one_line(data_dir: Path, tmp_path: Path) -> None:
    for steps, other in ((4, 0), (0, 4)):
        trainer, _ = fit(CNN, steps, data_dir, tmp_path, max_steps=6)
        trainer.save_checkpoint(tmp_path / f"{steps}.ckpt")
        with pytest.raises(UserError, match=r"written after 6 optimizer steps.*resumed at step 0"):
            fit(CNN, other, data_dir, tmp_path, ckpt_path=tmp_path / f"{steps}.ckpt")
        _, resumed = fit(CNN, steps, data_dir, tmp_path, ckpt_path=tmp_path / f"{steps}.ckpt", max_steps=10)
        assert resumed.trainer.global_step == 10


class BatchHooked(GroupedCNN):
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)


REFUSED: dict[str, tuple[dict, str]] = {
    "EMA": ({"callbacks": (EMAWeightAveraging(),)}, "callback EMAWeightAveraging acts on each training batch"),
    "val_check_interval": ({"val_check_interval": 0.5}, r"val_check_interval=0.5"),
    "fraction of batches": ({"limit_train_batches": 0.5}, r"limit_train_batches=0.5"),
    "checkpoints every n steps": ({"callbacks": (ModelCheckpoint(every_n_train_steps=5),),
                                   "enable_checkpointing": True},
                                  "callback ModelCheckpoint acts on each training batch"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_what_groups_cannot_honour_is_refused_at_fit_start(case: str, data_dir: Path, tmp_path: Path) -> None:
    settings, message = REFUSED[case]
    with pytest.raises(UserError, match=message + ".*steps_per_execution=1"):
        fit(CNN, 4, data_dir, tmp_path, **settings)


def test_a_module_batch_hook_is_refused(data_dir: Path, tmp_path: Path) -> None:
    data = GroupedDataModule(FashionMNISTDataModule(data_dir=str(data_dir), download=False), 4)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(UserError, match="BatchHooked.on_train_batch_start would receive lists of batches"):
        trainer.fit(BatchHooked(), datamodule=data)


def test_the_app_refuses_what_manual_optimization_cannot_do_in_one_line(data_dir: Path, tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    cfg = compose_train(*quick_overrides(data_dir, tmp_path / "run"), "+trainer.gradient_clip_val=1.0",
                        "steps_per_execution=64")
    err = one_line_error(lambda: train(cfg), capsys)
    assert "gradient_clip_val" in err and "set steps_per_execution=1" in err
    default = compose_train(*quick_overrides(data_dir, tmp_path / "default"), "+trainer.gradient_clip_val=1.0")
    assert train(default)["steps"] == 20


def test_the_fit_start_says_in_one_warning_what_counts_groups(data_dir: Path, tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match=r"steps_per_execution=4: .*loggers' steps.* count batches, while the "
                                         r"progress bar, trainer.num_training_batches.* count groups") as seen:
        fit(DenseBaseline, 4, data_dir, tmp_path, max_epochs=1)
    assert sum("steps_per_execution" in str(w.message) for w in seen) == 1


def test_every_row_a_logger_receives_counts_batches_the_test_row_included(data_dir: Path, tmp_path: Path) -> None:
    rows = {}
    for steps in (4, 0):
        out = tmp_path / str(steps)
        trainer, model = fit(DenseBaseline, steps, data_dir, tmp_path, log_every_n_steps=5, logger=CSVLogger(out))
        trainer.test(model, datamodule=FashionMNISTDataModule(data_dir=str(data_dir), download=False), verbose=False)
        trainer.logger.save()
        rows[steps] = logged(out)
    for key in ("train/loss_step", "train/acc", "val/acc", "test/acc"):
        assert steps_of(rows[4], key) == steps_of(rows[0], key), key
    assert [step for step, _ in steps_of(rows[4], "test/acc")] == [42]
    assert [float(r["epoch"]) for r in rows[4] if r.get("test/acc")] == [2.0]


def test_only_the_tutorials_two_models_have_grouped_classes_made_by_no_one_at_run_time() -> None:
    assert grouped(CNN) is GroupedCNN and grouped(GroupedCNN) is GroupedCNN

    class Mine(CNN):
        pass

    with pytest.raises(UserError, match=r"define class GroupedMine\(GroupedSteps, Mine\)"):
        grouped(Mine)
