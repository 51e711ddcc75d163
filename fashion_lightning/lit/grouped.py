"""Grouped training steps, an opt-in: several batches per Lightning training step, one optimizer step each, the way
Keras has ``steps_per_execution`` (default 1). Lightning's per-step machinery (hooks, loops, logging, progress bar:
about 1 ms a step on a 2-core CPU) is then paid once per group, which matters where a step's arithmetic takes a few
ms. Everything of it is in this file, the module side and the loader side; nothing else in the package imports it.

Composed by the app (``steps_per_execution=64``) or by hand::

    model = GroupedCNN(fused=True)                     # CNN trained by manual optimization over lists of batches
    trainer.fit(model, datamodule=GroupedDataModule(FashionMNISTDataModule(), steps=64))

Another `ImageClassifier` subclass gets its grouped class the same way: ``class GroupedMine(GroupedSteps, Mine)``.

Inside a group every batch is one optimizer step through Lightning's optimizer (``self.optimizers().step()`` after
``self.manual_backward``), so ``global_step``, ``max_steps``, schedulers, the backward and optimizer-step hooks and
every row the loggers receive (the loss, the epoch metrics, the final test) count batches. What counts training
steps, each a group, is said in one warning when the fit starts: the progress bar, ``trainer.num_training_batches``
and ``estimated_stepping_batches``, the profiler's rows and callbacks' per-batch hooks (Keras says the same of its
callbacks and progress bar). Groups end where the textbook path would validate, checkpoint or stop
(`GroupedBatches`). What a group cannot honour is refused when the fit starts, in one line (`check_fit`). A grouped
model's checkpoints name the plain class and hold its hyperparameters: they load and fine-tune anywhere; a resume
under one batch a step is refused in one line (`ImageClassifier.on_train_start`: Lightning counts manual and
automatic optimizer steps apart).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import (
    Callback,
    LearningRateMonitor,
    ModelCheckpoint,
    ProgressBar,
    Timer,
)
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from fashion_lightning.data.datamodule import BatchLoader
from fashion_lightning.errors import UserError, check_positive_int
from fashion_lightning.lit.callbacks import EpochTimer, SaveOnInterrupt
from fashion_lightning.lit.classifier import CHECKPOINT_KEY, Batch, ImageClassifier
from fashion_lightning.lit.models import CNN, DenseBaseline

BATCH_HOOKS = ("on_train_batch_start", "on_train_batch_end")
TRANSFER_HOOKS = ("on_before_batch_transfer", "transfer_batch_to_device", "on_after_batch_transfer")
WAY_OUT = "set steps_per_execution=1 (one batch per training step)"


class GroupedBatches:
    """The batches of ``loader`` (a `BatchLoader`) in lists of up to ``steps`` consecutive ones, one list per
    Lightning training step, at most ``trainer.limit_train_batches`` (a count of batches) an epoch.

    Lists end at multiples of ``steps`` into the epoch (also in an epoch resumed mid-list) and at the epoch's end, so
    Lightning's count of steps per epoch holds. Where ``max_steps`` falls inside an epoch, a list ends there too, and
    never as the epoch's last list (Lightning validates after that one, the textbook path does not validate a cut
    epoch). Its state is the loader's, less the batches of the running list not yet applied.
    """

    def __init__(self, loader: BatchLoader, steps: int, trainer: L.Trainer) -> None:
        self.loader, self.steps, self.trainer = loader, steps, trainer
        limit = trainer.limit_train_batches
        self.num_batches = min(len(loader), limit) if isinstance(limit, int) else len(loader)
        self._running: tuple[int, int] = (0, 0)  # global_step when the running list was handed out, its length

    def __len__(self) -> int:
        return math.ceil(self.num_batches / self.steps)

    def ends(self, start: int, global_step: int) -> list[int]:
        """Where the lists of an epoch read from batch ``start`` end, ``global_step`` steps into the fit."""
        k, n, max_steps = self.steps, self.num_batches, self.trainer.max_steps
        ends = [*range((start // k + 1) * k, n, k), n]
        cut = start + max_steps - global_step if max_steps >= 0 else n
        if start < cut < n and cut not in ends:
            last = next(i for i, end in enumerate(ends) if end > cut)
            if last == len(ends) - 1:  # inside the last list: the list before it ends at the cut instead
                if last == 0:
                    raise UserError(f"trainer.max_steps={max_steps} stops inside the epoch's last group of "
                                    f"{n - start} batches, after which Lightning would validate (the textbook path "
                                    f"validates only whole epochs); choose another max_steps, or {WAY_OUT}")
                ends[last - 1] = cut
            else:
                ends.insert(last, cut)
        return ends

    def __iter__(self) -> Iterator[list[Batch]]:
        ends = iter(self.ends(self.loader.start(), self.trainer.global_step))
        end, group = next(ends), []
        for batch in self.loader:
            group.append(batch)
            if self.loader.position >= end:
                self._running = (self.trainer.global_step, len(group))
                yield group
                if end >= self.num_batches:
                    return
                end, group = next(ends), []

    def state_dict(self) -> dict[str, int]:
        """The loader's state, counting only the batches whose optimizer step ran (a list cut short by a crash
        resumes at its first unapplied batch)."""
        state = self.loader.state_dict()
        started, length = self._running
        unapplied = length - (self.trainer.global_step - started)
        return {**state, "position": state["position"] - max(unapplied, 0)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.loader.load_state_dict(state)


class GroupedDataModule(L.LightningDataModule):
    """``datamodule`` with its training batches grouped by ``steps`` (`GroupedBatches`); everything else is its own.
    Its hyperparameters are ``datamodule``'s, so checkpoints record the same data settings."""

    def __init__(self, datamodule: L.LightningDataModule, steps: int) -> None:
        super().__init__()
        self.datamodule, self.steps = datamodule, check_positive_int("steps_per_execution", steps)
        self.save_hyperparameters(dict(datamodule.hparams))

    def _inner(self) -> L.LightningDataModule:
        self.datamodule.trainer = self.trainer
        return self.datamodule

    def prepare_data(self) -> None:
        self._inner().prepare_data()

    def setup(self, stage: str) -> None:
        self._inner().setup(stage)

    def train_dataloader(self) -> GroupedBatches:
        return GroupedBatches(self._inner().train_dataloader(), self.steps, self.trainer)

    def val_dataloader(self) -> Any:
        return self._inner().val_dataloader()

    def test_dataloader(self) -> Any:
        return self._inner().test_dataloader()

    def predict_dataloader(self) -> Any:
        return self._inner().predict_dataloader()


ACCEPTED_CALLBACKS = (ProgressBar, Timer, EpochTimer, SaveOnInterrupt)
"""Callbacks whose batch hooks stay right when a training step is a group: they count steps, time them, or stop
after one (``Timer``'s ``max_time`` and `SaveOnInterrupt` stop after the whole group)."""


def check_fit(trainer: L.Trainer, module: L.LightningModule) -> None:
    """Refuse, in one line, what a fit of grouped steps cannot do as the textbook path does."""
    name, plain = type(module).__name__, textbook_class(type(module))
    for hook in BATCH_HOOKS + TRANSFER_HOOKS:
        if getattr(type(module), hook) is not getattr(plain, hook):
            raise UserError(f"{name}.{hook} would receive lists of batches; {WAY_OUT}")
    datamodule = trainer.datamodule
    inner = getattr(datamodule, "datamodule", datamodule)
    for hook in TRANSFER_HOOKS if inner is not None else ():
        if getattr(type(inner), hook) is not getattr(L.LightningDataModule, hook):
            raise UserError(f"{type(inner).__name__}.{hook} would receive lists of batches; {WAY_OUT}")
    for callback in trainer.callbacks:
        if not _accepted(callback):
            raise UserError(f"callback {type(callback).__name__} acts on each training batch, and a training step "
                            f"here is a group of batches; {WAY_OUT}")
    if isinstance(trainer.limit_train_batches, float) and trainer.limit_train_batches != 1.0:
        raise UserError(f"Trainer(limit_train_batches={trainer.limit_train_batches!r}) would be counted in groups "
                        f"of batches; give it as a number of batches, or {WAY_OUT}")
    if trainer.val_check_interval != 1.0:
        raise UserError(f"Trainer(val_check_interval={trainer.val_check_interval!r}) would count groups of "
                        f"batches; {WAY_OUT}")
    if len(trainer.optimizers) != 1:
        raise UserError(f"{len(trainer.optimizers)} optimizers; {WAY_OUT}")
    for config in trainer.lr_scheduler_configs:
        if config.reduce_on_plateau or (config.interval == "step" and config.frequency != 1):
            raise UserError(f"a {type(config.scheduler).__name__} scheduler (interval={config.interval}, "
                            f"frequency={config.frequency}); {WAY_OUT}")
    loader = trainer.train_dataloader
    if isinstance(loader, GroupedBatches):  # fails now, not at the cut, where max_steps cannot be honoured
        start, steps, epoch = loader.loader.start(), trainer.global_step, trainer.current_epoch
        while steps < trainer.max_steps and (trainer.max_epochs < 0 or epoch < trainer.max_epochs):
            loader.ends(start, steps)
            steps, start, epoch = steps + loader.num_batches - start, 0, epoch + 1


def _accepted(callback: Callback) -> bool:
    if isinstance(callback, ModelCheckpoint):  # saving by epoch (its public state key names its triggers)
        key = callback.state_key
        return "'every_n_train_steps': 0" in key and "'train_time_interval': None" in key
    if isinstance(callback, LearningRateMonitor):
        return callback.logging_interval == "epoch"
    if isinstance(callback, ACCEPTED_CALLBACKS):
        return True
    return all(getattr(type(callback), hook) is getattr(Callback, hook) for hook in BATCH_HOOKS)


class GroupedSteps:
    """Mixin for an `ImageClassifier` subclass: ``training_step`` takes a list of batches and, for each, takes one
    optimizer step with Lightning's manual optimization (loss as ``training_loss``, metrics as the textbook step)."""

    trainer: L.Trainer

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False

    def on_train_start(self) -> None:
        check_fit(self.trainer, self)
        steps = getattr(self.trainer.train_dataloader, "steps", "several")
        rank_zero_warn(f"steps_per_execution={steps}: a training step is a group of up to {steps} batches, one "
                       "optimizer step each; the loggers' steps, global_step, max_steps and schedulers count "
                       "batches, while the progress bar, trainer.num_training_batches, estimated_stepping_batches, "
                       "the profiler's rows and callbacks' per-batch hooks count groups")
        super().on_train_start()

    def total_optimizer_steps(self: Any) -> int:
        """Optimizer steps in the whole fit: batches, where Lightning's estimate counts groups."""
        super().total_optimizer_steps()  # checks the run is finite; loads the training loader
        trainer, loader = self.trainer, self.trainer.train_dataloader
        total = loader.num_batches * trainer.max_epochs if trainer.max_epochs >= 0 else trainer.max_steps
        return min(total, trainer.max_steps) if trainer.max_steps >= 0 else total

    def training_step(self: Any, batch: list[Batch], batch_idx: int) -> Tensor | None:
        trainer, optimizer = self.trainer, self.optimizers()
        outputs: list[tuple[Tensor, Tensor, Tensor]] = []
        for x, y in batch:
            if 0 <= trainer.max_steps <= trainer.global_step:
                break
            step = trainer.global_step
            logits = self(x)
            loss = self.training_loss(logits, y)
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()
            for config in trainer.lr_scheduler_configs:
                if config.interval == "step":
                    self.lr_scheduler_step(config.scheduler, None)
            outputs.append((logits.detach(), y, loss.detach()))
            self._log_loss(step, loss)
        if not outputs:
            return None
        logits, labels, losses = zip(*outputs, strict=True)  # the metrics updated once a group: the same means
        sizes = torch.tensor([len(y) for y in labels], dtype=losses[0].dtype, device=losses[0].device)
        self.update_metrics("train", torch.cat(logits), torch.cat(labels), torch.stack(losses), sizes)
        return losses[-1]

    def _log_loss(self: Any, step: int, loss: Tensor) -> None:
        """The batch's loss to the loggers, where the textbook step's ``self.log("train/loss_step", loss)`` logs it:
        every ``log_every_n_steps`` optimizer steps, at that step."""
        every = self.trainer.log_every_n_steps
        if every and (step + 1) % every == 0:
            for logger in self.loggers:
                logger.log_metrics({"train/loss_step": loss.item(), "epoch": self.current_epoch}, step=step)

    def on_train_epoch_end(self: Any) -> None:
        super().on_train_epoch_end()
        self._log_step(self.global_step - 1)
        for config in self.trainer.lr_scheduler_configs:
            if config.interval == "epoch" and (self.current_epoch + 1) % config.frequency == 0:
                self.lr_scheduler_step(config.scheduler, None)

    def on_validation_epoch_end(self: Any) -> None:
        super().on_validation_epoch_end()
        if not self.trainer.sanity_checking and self.trainer.state.fn == "fit":
            self._log_step(self.global_step - 1)

    def on_test_epoch_end(self: Any) -> None:
        super().on_test_epoch_end()
        if self.global_step:  # after a fit: the test row at the textbook path's step, not at the count of groups
            self._log_step(self.global_step)

    def _log_step(self: Any, step: int) -> None:
        """Have this hook's metrics logged at ``step``, the textbook path's, with its epoch (Lightning's loggers take
        a logged ``step`` as their x-axis, and then add no ``epoch`` of their own)."""
        self.log_dict({"step": step, "epoch": self.current_epoch})

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        plain = textbook_class(type(self))
        checkpoint[CHECKPOINT_KEY] = f"{plain.__module__}:{plain.__qualname__}"


def textbook_class(cls: type) -> type:
    """The class a grouped class stands for: the first `ImageClassifier` in its MRO that is not grouped."""
    return next(c for c in cls.__mro__ if issubclass(c, ImageClassifier) and not issubclass(c, GroupedSteps))


class GroupedCNN(GroupedSteps, CNN):
    """`CNN` trained in grouped steps."""


class GroupedDenseBaseline(GroupedSteps, DenseBaseline):
    """`DenseBaseline` trained in grouped steps."""


GROUPED_CLASSES: dict[type, type] = {CNN: GroupedCNN, DenseBaseline: GroupedDenseBaseline}


def grouped(cls: type[ImageClassifier]) -> type[ImageClassifier]:
    """The grouped-steps class of `CNN` or `DenseBaseline` (itself for a grouped class); one line for any other."""
    if issubclass(cls, GroupedSteps):
        return cls
    if cls not in GROUPED_CLASSES:
        raise UserError(f"steps_per_execution > 1 has grouped classes for CNN and DenseBaseline only, not "
                        f"{cls.__name__}; define class Grouped{cls.__name__}(GroupedSteps, {cls.__name__}), or "
                        f"{WAY_OUT}")
    return GROUPED_CLASSES[cls]
