"""The fast option's loop: the textbook path's results with several batches per step, or a clear refusal."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import (
    GradientAccumulationScheduler,
    LearningRateMonitor,
    ModelCheckpoint,
    OnExceptionCheckpoint,
    StochasticWeightAveraging,
)
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.tuner import Tuner
from torch import nn

from conftest import fit_model
from fashion_lightning import CNN, DenseBaseline, FashionMNISTDataModule, UserError
from fashion_lightning.callbacks import BatchProgressBar
from fashion_lightning.fast import networks, private


class Mode(L.Callback):
    """Records, at each epoch start, whether Lightning's automatic optimization was on."""

    def __init__(self) -> None:
        self.automatic: list[bool] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.automatic.append(pl_module.automatic_optimization)


def train(cls: type, fast: bool, data_dir: Path, tmp_path: Path, per_step: int = 7, model_kwargs: dict | None = None,
          **trainer_kwargs: Any) -> tuple[L.Trainer, L.LightningModule, Mode]:
    torch.manual_seed(0)
    model = cls(fast=fast, batches_per_step=per_step, keras_init=True, **(model_kwargs or {}))
    mode = Mode()
    settings = {"max_epochs": 2, "limit_train_batches": 21, **trainer_kwargs}
    callbacks = (mode, *settings.pop("callbacks", ()))
    return fit_model(model, data_dir, tmp_path, callbacks=callbacks, **settings), model, mode


def assert_same_training(a: tuple, b: tuple) -> None:
    (trainer_a, model_a, _), (trainer_b, model_b, _) = a, b
    assert trainer_a.global_step == trainer_b.global_step
    metrics_a, metrics_b = trainer_a.callback_metrics, trainer_b.callback_metrics
    assert torch.equal(metrics_a["train/acc"], metrics_b["train/acc"])
    assert torch.allclose(metrics_a["train/loss"], metrics_b["train/loss"], rtol=1e-5)
    for (name, p), q in zip(model_a.named_parameters(), model_b.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("cls", [CNN, DenseBaseline])
@pytest.mark.parametrize("per_step", [1, 4, 7])  # 4 does not divide the 21 batches: a short last list
def test_fast_trains_exactly_as_the_textbook_path(cls: type, per_step: int, data_dir: Path, tmp_path: Path) -> None:
    check_fast_against_textbook(cls, per_step, data_dir, tmp_path)


def test_the_dense_step_by_hand_trains_exactly_as_the_textbook_path(backend: bool, data_dir: Path,
                                                                    tmp_path: Path) -> None:
    check_fast_against_textbook(DenseBaseline, 7, data_dir, tmp_path)


def check_fast_against_textbook(cls: type, per_step: int, data_dir: Path, tmp_path: Path) -> None:
    kwargs = {"model_kwargs": {"schedule": "onecycle"}, "per_step": per_step}
    fast, textbook = (train(cls, f, data_dir, tmp_path, **kwargs) for f in (True, False))
    assert fast[2].automatic == [False, False] and textbook[2].automatic == [True, True]
    assert fast[0].global_step == 42 and fast[0].num_training_batches == -(-21 // per_step)
    assert fast[0].lr_scheduler_configs[0].scheduler.last_epoch == 42  # the schedule stepped every batch
    assert_same_training(fast, textbook)


def test_a_cleared_fast_loop_leaves_the_textbook_path_alone(data_dir: Path, tmp_path: Path) -> None:
    _, model, mode = train(CNN, False, data_dir, tmp_path, max_epochs=1)
    assert model.fast_loop is None and mode.automatic == [True]


def test_max_steps_stops_inside_a_list_of_batches(data_dir: Path, tmp_path: Path) -> None:
    trainer, model, _ = train(CNN, True, data_dir, tmp_path, per_step=4, model_kwargs={"schedule": "onecycle"},
                              max_steps=10, limit_train_batches=None)
    assert trainer.global_step == 10 and trainer.lr_scheduler_configs[0].scheduler.total_steps == 10


@pytest.mark.parametrize("max_steps", [5, 9])  # inside the second list of 4; inside the epoch's last list (of 2)
def test_a_fit_cut_inside_a_list_resumes_as_the_textbook_path_does(max_steps: int, data_dir: Path,
                                                                   tmp_path: Path) -> None:
    runs = []
    for fast in (True, False):
        kwargs = {"per_step": 4, "max_epochs": 2, "limit_train_batches": 10,
                  "model_kwargs": {"interval": "epoch", "frequency": 1}}  # lists of 4, 4, 2 an epoch
        trainer, model, _ = train(Scheduled, fast, data_dir, tmp_path, **kwargs, max_steps=max_steps)
        assert trainer.global_step == max_steps and trainer.lr_scheduler_configs[0].scheduler.last_epoch == 0
        trainer.save_checkpoint(tmp_path / "cut.ckpt")
        resumed = fit_model(model, data_dir, tmp_path, ckpt_path=tmp_path / "cut.ckpt", max_epochs=2,
                            limit_train_batches=10)  # Lightning counts a fit ended by max_steps as a finished epoch
        runs.append((resumed, model))
    (fast, fast_model), (textbook, textbook_model) = runs
    assert fast.global_step == textbook.global_step == max_steps + 10
    assert fast.lr_scheduler_configs[0].scheduler.last_epoch == textbook.lr_scheduler_configs[0].scheduler.last_epoch
    for p, q in zip(fast_model.parameters(), textbook_model.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-5)


@pytest.mark.parametrize("setting", [{"limit_train_batches": 10}, {"overfit_batches": 10}, {"fast_dev_run": 10}])
def test_whole_batch_counts_count_batches(setting: dict, data_dir: Path, tmp_path: Path) -> None:
    fast = train(DenseBaseline, True, data_dir, tmp_path, per_step=4, **{"limit_train_batches": None, **setting})
    textbook = train(DenseBaseline, False, data_dir, tmp_path, **{"limit_train_batches": None, **setting})
    assert textbook[0].global_step in (10, 20)  # fast_dev_run runs one epoch
    assert_same_training(fast, textbook)


def test_per_step_loss_and_epoch_rows_are_logged_at_the_textbook_steps(data_dir: Path, tmp_path: Path) -> None:
    rows = {}
    for fast in (True, False):
        logger = CSVLogger(tmp_path / str(fast), name="logs", version="")
        train(DenseBaseline, fast, data_dir, tmp_path, per_step=4, logger=logger, log_every_n_steps=5)
        table = list(csv.DictReader(open(tmp_path / str(fast) / "logs" / "metrics.csv")))
        rows[fast] = ([(int(r["step"]), round(float(r["train/loss_step"]), 4)) for r in table if r["train/loss_step"]],
                      [(int(r["epoch"]), int(r["step"])) for r in table if r["train/acc"]])
    assert rows[True][0] == rows[False][0] and [s for s, _ in rows[True][0]] == [4, 9, 14, 19, 24, 29, 34, 39]
    assert rows[True][1] == rows[False][1] == [(0, 20), (1, 41)]


class Scheduled(DenseBaseline):
    def __init__(self, interval: str, frequency: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.interval, self.frequency = interval, frequency

    def configure_optimizers(self) -> dict:
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": self.interval,
                                                         "frequency": self.frequency}}


@pytest.mark.parametrize(("interval", "frequency"), [("epoch", 1), ("epoch", 2), ("step", 1), ("step", 3)])
def test_schedulers_step_as_in_automatic_optimization(interval: str, frequency: int, data_dir: Path,
                                                      tmp_path: Path) -> None:
    per_step = 1 if interval == "step" else 4  # with lists, a step-interval schedule of its own is refused
    fast, textbook = (train(Scheduled, f, data_dir, tmp_path, per_step=per_step, max_epochs=3, limit_train_batches=10,
                            model_kwargs={"interval": interval, "frequency": frequency}) for f in (True, False))
    steps = [t.lr_scheduler_configs[0].scheduler.last_epoch for t, _, _ in (fast, textbook)]
    assert steps[0] == steps[1] > 0
    assert_same_training(fast, textbook)


def test_a_hooked_or_swapped_submodule_is_honoured(data_dir: Path, tmp_path: Path) -> None:
    calls = []

    class Swapped(CNN):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.net.fc = nn.Sequential(nn.Linear(6272, 128), nn.Dropout(0.0))
            self.net.conv.register_forward_hook(lambda *_: calls.append(1))

    fast, textbook = (train(Swapped, f, data_dir, tmp_path, per_step=4, max_epochs=1) for f in (True, False))
    assert len(calls) == 2 * (21 + 1)  # 21 training and 1 validation batch a fit
    assert isinstance(fast[1].net.fc, nn.Sequential)
    assert_same_training(fast, textbook)


def compile_eagerly(monkeypatch: pytest.MonkeyPatch) -> None:
    """``nn.Module.compile`` with dynamo's eager backend: compiled, without inductor's minutes of code generation."""
    original = nn.Module.compile
    monkeypatch.setattr(nn.Module, "compile", lambda self, **kwargs: original(self, backend="eager"))


def test_a_compiled_network_runs_compiled(data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    compile_eagerly(monkeypatch)
    kernels = []
    original = networks.logits
    monkeypatch.setattr(networks, "logits", lambda *args: kernels.append(1) or original(*args))
    fast = train(CNN, True, data_dir, tmp_path, per_step=4, max_epochs=1, model_kwargs={"compile": True})
    assert fast[1].net._compiled_call_impl is not None and not kernels  # module(x) ran: the compiled network
    textbook = train(CNN, False, data_dir, tmp_path, per_step=4, max_epochs=1)
    assert_same_training(fast, textbook)


def test_a_forward_override_is_honoured(data_dir: Path, tmp_path: Path) -> None:
    class Scaled(CNN):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 0.5 * super().forward(x)

    fast, textbook = (train(Scaled, f, data_dir, tmp_path, per_step=4, max_epochs=1) for f in (True, False))
    assert_same_training(fast, textbook)


def test_predictions_use_the_kernels_and_equal_the_textbook_ones(data_dir: Path, tmp_path: Path) -> None:
    model = CNN(fast=True).eval()
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    dm = FashionMNISTDataModule(data_dir=str(data_dir), download=False)
    fast = trainer.predict(model, datamodule=dm)
    model.fast_loop = None
    textbook = trainer.predict(model, datamodule=dm)
    for (p, c), (q, d) in zip(fast, textbook, strict=True):
        assert torch.allclose(p, q, atol=1e-5) and torch.equal(c, d)


def test_ddp_makes_the_fast_loop_step_aside(data_dir: Path, tmp_path: Path) -> None:
    environ = dict(os.environ)
    try:
        trainer, model, mode = train(DenseBaseline, True, data_dir, tmp_path, max_epochs=1, strategy="ddp", devices=1)
    finally:  # DDP leaves LOCAL_RANK, MASTER_PORT... and its process group: later runs would think themselves ranks
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(environ)
    assert mode.automatic == [True] and not model.fast_engaged and trainer.global_step == 21


def test_a_fast_module_fit_again_under_ddp_takes_the_textbook_path(data_dir: Path, tmp_path: Path) -> None:
    _, model, _ = train(DenseBaseline, True, data_dir, tmp_path, max_epochs=1)
    environ = dict(os.environ)
    try:
        trainer = fit_model(model, data_dir, tmp_path, max_epochs=1, limit_train_batches=5, strategy="ddp",
                            devices=1, gradient_clip_val=0.5)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(environ)
    assert trainer.global_step == 5 and not model.fast_engaged and model.automatic_optimization


def test_a_compiled_module_trains_through_its_compiled_forward(data_dir: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    kernels = []
    original = networks.logits
    monkeypatch.setattr(networks, "logits", lambda *args: kernels.append(1) or original(*args))
    torch.manual_seed(0)
    model = CNN(fast=True, batches_per_step=4, keras_init=True)
    trainer = fit_model(torch.compile(model, backend="eager"), data_dir, tmp_path, max_epochs=1, limit_train_batches=21)
    assert trainer.global_step == 21 and model.fast_engaged and not kernels  # Lightning's compiled forward ran
    textbook = train(CNN, False, data_dir, tmp_path, max_epochs=1)
    assert_same_training((trainer, model, None), textbook)


class ReadsBatches(L.Callback):
    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        pass


class StepHook(L.Callback):
    def on_before_optimizer_step(self, trainer: L.Trainer, *args: Any) -> None:
        pass


class BackwardHook(L.Callback):
    def on_after_backward(self, trainer: L.Trainer, *args: Any) -> None:
        pass


class ZeroGradHook(L.Callback):
    def on_before_zero_grad(self, trainer: L.Trainer, *args: Any) -> None:
        pass


class OwnStep(DenseBaseline):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(self(batch[0]), batch[1])


class OwnOptimizerStep(DenseBaseline):
    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)


class OwnGradientHook(DenseBaseline):
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        pass


class OwnBatchHook(DenseBaseline):
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        pass


class BatchHookEpochSchedule(OwnBatchHook):
    def configure_optimizers(self) -> dict:
        optimizer = torch.optim.Adam(self.parameters(), fused=True)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 1)}


class SkipsStart(DenseBaseline):
    def on_train_start(self) -> None:  # as Lightning's docs write hooks: without super()
        pass


class SkipsStartOwnStep(OwnStep):
    def on_train_start(self) -> None:
        pass


class Manual(DenseBaseline):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False


class TwoOptimizers(DenseBaseline):
    def configure_optimizers(self) -> list:
        return [torch.optim.SGD(self.net.row1.parameters(), lr=0.1), torch.optim.SGD(self.net.out.parameters(), lr=0.1)]


class Plateau(DenseBaseline):
    def configure_optimizers(self) -> dict:
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)}


class OwnTransfer(FashionMNISTDataModule):
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return batch


class OwnSchedule(DenseBaseline):
    def configure_optimizers(self) -> dict:
        optimizer = torch.optim.Adam(self.parameters())
        total = self.trainer.estimated_stepping_batches  # Lightning's documented way: training steps, not batches
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


REFUSED: dict[str, tuple[type, dict[str, Any], str]] = {
    "gradient clipping": (DenseBaseline, {"gradient_clip_val": 1.0}, "Trainer(gradient_clip_val=1.0)"),
    "accumulation": (DenseBaseline, {"accumulate_grad_batches": 2}, "Trainer(accumulate_grad_batches=2)"),
    "a batch-reading callback": (DenseBaseline, {"callbacks": (ReadsBatches(),)}, "callback ReadsBatches, which reads"),
    "a checkpoint every n steps": (DenseBaseline, {"callbacks": (ModelCheckpoint(every_n_train_steps=5),),
                                                   "enable_checkpointing": True}, "callback ModelCheckpoint"),
    "a learning-rate monitor": (DenseBaseline, {"callbacks": (LearningRateMonitor(),), "logger": "csv"},
                                "callback LearningRateMonitor"),
    "an optimizer-step hook": (DenseBaseline, {"callbacks": (StepHook(),)}, "callback StepHook's on_before_optimizer"),
    "a backward hook": (DenseBaseline, {"callbacks": (BackwardHook(),)}, "callback BackwardHook's on_after_backward"),
    "a zero-grad hook": (DenseBaseline, {"callbacks": (ZeroGradHook(),)}, "callback ZeroGradHook's on_before_zero"),
    "an own training_step": (OwnStep, {}, "OwnStep.training_step"),
    "an own optimizer_step": (OwnOptimizerStep, {}, "OwnOptimizerStep.optimizer_step"),
    "a module hook": (OwnGradientHook, {}, "OwnGradientHook.on_before_optimizer_step"),
    "a module batch hook": (OwnBatchHook, {}, "OwnBatchHook.on_train_batch_start"),
    "a module batch hook and an epoch schedule, one batch a step": (
        BatchHookEpochSchedule, {"per_step": 1}, "BatchHookEpochSchedule.on_train_batch_start with a StepLR stepped "
                                                 "every epoch: where the hook returns -1"),
    "an on_train_start without super()": (SkipsStart, {"gradient_clip_val": 1.0}, "Trainer(gradient_clip_val=1.0)"),
    "an own training_step, on_train_start without super()": (SkipsStartOwnStep, {},
                                                              "SkipsStartOwnStep.training_step"),
    "an accumulation schedule": (DenseBaseline, {"callbacks": (GradientAccumulationScheduler({0: 2}),)},
                                 "callback GradientAccumulationScheduler (accumulation)"),
    "manual optimization": (Manual, {}, "Manual sets automatic_optimization=False"),
    "a fraction of batches": (DenseBaseline, {"limit_train_batches": 0.5}, "Trainer(limit_train_batches=0.5)"),
    "a fraction to overfit": (DenseBaseline, {"overfit_batches": 0.01, "limit_train_batches": None},
                              "Trainer(overfit_batches=0.01)"),
    "a validation interval": (DenseBaseline, {"val_check_interval": 5}, "Trainer(val_check_interval=5)"),
    "a validation fraction": (DenseBaseline, {"val_check_interval": 0.5}, "Trainer(val_check_interval=0.5)"),
    "a gradient scaler": (DenseBaseline, {"plugins": [MixedPrecision("16-mixed", "cpu",
                                                                    scaler=torch.amp.GradScaler("cpu"))]},
                          "Trainer(precision='16-mixed') (MixedPrecision)"),
    "bf16 autocast": (DenseBaseline, {"precision": "bf16-mixed"}, "Trainer(precision='bf16-mixed') (MixedPrecision)"),
    "a time interval to validate": (DenseBaseline, {"val_check_interval": "00:00:00:10"},
                                    "Trainer(val_check_interval='a time interval')"),
    "a checkpoint every n steps, one batch a step": (DenseBaseline, {"callbacks": (ModelCheckpoint(
        every_n_train_steps=5),), "enable_checkpointing": True, "per_step": 1}, "callback ModelCheckpoint saving"),
    "weight averaging": (DenseBaseline, {"callbacks": (StochasticWeightAveraging(1e-3),)},
                         "callback StochasticWeightAveraging"),
    "a datamodule transfer hook": (DenseBaseline, {"datamodule": OwnTransfer}, "OwnTransfer.on_after_batch_transfer"),
    "a schedule sized in steps": (OwnSchedule, {}, "a OneCycleLR stepped every step from OwnSchedule.configure_opt"),
    "two optimizers": (TwoOptimizers, {}, "2 optimizers"),
    "a plateau scheduler": (Plateau, {}, "a ReduceLROnPlateau scheduler"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_what_it_cannot_honour_is_refused_at_fit_start(case: str, data_dir: Path, tmp_path: Path) -> None:
    cls, settings, named = REFUSED[case]
    settings = {**settings, "callbacks": list(settings.get("callbacks", ()))}
    if settings.get("logger") == "csv":
        settings["logger"] = CSVLogger(tmp_path)
    model = cls(fast=True, batches_per_step=settings.pop("per_step", 64))
    before = [p.detach().clone() for p in model.parameters()]
    datamodule = settings.pop("datamodule", FashionMNISTDataModule)(data_dir=str(data_dir), download=False)
    trainer = L.Trainer(**{"max_epochs": 1, "accelerator": "cpu", "logger": False, "enable_checkpointing": False,
                           "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": tmp_path,
                           "limit_val_batches": 1, "num_sanity_val_steps": 0, **settings})
    with pytest.raises(UserError) as info:
        trainer.fit(model, datamodule=datamodule)
    message = str(info.value)
    assert message.startswith("fast=True cannot honour ") and named in message, message
    assert "fast=False (speed=reference in the app)" in message and "\n" not in message
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))  # nothing trained


@pytest.mark.parametrize("per_step", [1, 4])
def test_a_checkpoint_on_exception_is_refused_only_with_lists_of_batches(per_step: int, data_dir: Path,
                                                                         tmp_path: Path) -> None:
    """Saved inside a step of several batches, Lightning's OnExceptionCheckpoint would resume past those not applied."""
    callback = OnExceptionCheckpoint(tmp_path)
    if per_step == 1:
        trainer, _, _ = train(DenseBaseline, True, data_dir, tmp_path, per_step=1, max_steps=3, callbacks=(callback,),
                                enable_checkpointing=True)
        assert trainer.global_step == 3
        return
    with pytest.raises(UserError, match="callback OnExceptionCheckpoint: saved inside a step of 4 batches"):
        train(DenseBaseline, True, data_dir, tmp_path, per_step=4, max_steps=3, callbacks=(callback,),
              enable_checkpointing=True)


def test_a_module_batch_hook_is_fine_with_one_batch_per_step_and_no_epoch_schedule(data_dir: Path,
                                                                                  tmp_path: Path) -> None:
    trainer, _, mode = train(OwnBatchHook, True, data_dir, tmp_path, per_step=1, max_epochs=1)
    assert mode.automatic == [False] and trainer.global_step == 21


def test_a_batch_reading_callback_is_fine_with_one_batch_per_step(data_dir: Path, tmp_path: Path) -> None:
    trainer, _, mode = train(DenseBaseline, True, data_dir, tmp_path, per_step=1, max_epochs=1,
                             callbacks=(ReadsBatches(),), val_check_interval=7)
    assert mode.automatic == [False] and trainer.global_step == 21


def test_lr_find_is_refused_with_the_way_out(data_dir: Path, tmp_path: Path) -> None:
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        default_root_dir=tmp_path)
    with pytest.raises(UserError, match="callback _LRCallback, which reads each training batch"):
        Tuner(trainer).lr_find(DenseBaseline(fast=True), num_training=5,
                               datamodule=FashionMNISTDataModule(data_dir=str(data_dir), download=False))


def test_lr_find_works_with_one_batch_per_step(data_dir: Path, tmp_path: Path) -> None:
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        default_root_dir=tmp_path)
    model = DenseBaseline(fast=True, batches_per_step=1)
    finder = Tuner(trainer).lr_find(model, num_training=20, early_stop_threshold=None,
                                    datamodule=FashionMNISTDataModule(data_dir=str(data_dir), download=False))
    assert model.fast_engaged and len(finder.results["loss"]) == 20 and isinstance(finder.suggestion(), float)


def test_the_apps_callbacks_are_accepted(data_dir: Path, tmp_path: Path) -> None:
    from fashion_lightning.callbacks import EpochTimer, SaveOnInterrupt

    callbacks = (BatchProgressBar(), EpochTimer(), SaveOnInterrupt(str(tmp_path)), ModelCheckpoint(tmp_path, "last"),
                 LearningRateMonitor(logging_interval="epoch"))
    trainer, _, mode = train(DenseBaseline, True, data_dir, tmp_path, max_epochs=1, callbacks=callbacks,
                             enable_checkpointing=True, enable_progress_bar=True, logger=CSVLogger(tmp_path))
    assert mode.automatic == [False] and trainer.global_step == 21 and (tmp_path / "last.ckpt").is_file()


def test_a_checkpoint_resumes_only_with_the_option_that_wrote_it(data_dir: Path, tmp_path: Path) -> None:
    trainer, _, _ = train(DenseBaseline, False, data_dir, tmp_path, max_epochs=1)
    textbook_ckpt = tmp_path / "textbook.ckpt"
    trainer.save_checkpoint(textbook_ckpt)
    trainer, _, _ = train(DenseBaseline, True, data_dir, tmp_path, max_epochs=1)
    fast_ckpt = tmp_path / "fast.ckpt"
    trainer.save_checkpoint(fast_ckpt)
    assert torch.load(fast_ckpt, weights_only=False)["global_step"] == 21
    for fast, ckpt, runs in ((True, textbook_ckpt, "fast, 7 batches per step"), (False, fast_ckpt, "textbook")):
        with pytest.raises(UserError, match=f"this fit runs {runs}; resume it with the option it was written with"):
            fit_model(DenseBaseline(fast=fast, batches_per_step=7), data_dir, tmp_path, max_epochs=2,
                      limit_train_batches=21, ckpt_path=ckpt)
    resumed = fit_model(DenseBaseline(fast=True, batches_per_step=7), data_dir, tmp_path, max_epochs=2,
                        limit_train_batches=21, ckpt_path=fast_ckpt)
    assert resumed.global_step == 42


def test_the_kernels_run_in_the_fast_loop(data_dir: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    taken = []

    def spy(name: str, original: Any) -> Any:
        def call(*args: Any) -> Any:
            taken.append((name, original(*args)))
            return taken[-1][1]
        return call

    for name in ("logits", "dense_loss_and_grads"):
        monkeypatch.setattr(networks, name, spy(name, getattr(networks, name)))
    monkeypatch.setattr(private, "fused_adam_step", spy("adam", private.fused_adam_step))
    train(CNN, True, data_dir, tmp_path, max_epochs=1)
    train(DenseBaseline, True, data_dir, tmp_path, max_epochs=1)
    assert sum(n == "logits" for n, _ in taken) >= 21  # the CNN's training batches through its kernels
    assert sum(n == "dense_loss_and_grads" for n, _ in taken) == 21  # the dense steps by hand
    assert [r for n, r in taken if n == "adam"] == 2 * ([False] + 20 * [True])  # Adam's kernel called directly
