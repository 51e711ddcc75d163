"""The fast option's training loop: several batches per Lightning training step, each still one optimizer step.

`ImageClassifier(fast=True)` hands its training to a `FastLoop` when a fit starts on a single device. One
Lightning training step then takes ``batches_per_step`` batches (`GroupedBatches`) and, for each, computes loss
and gradients (through the fused kernels where they apply, see `networks`) and steps the optimizer directly: the
same math as one batch per step, with Lightning's per-step machinery paid once per list. ``global_step``,
schedulers, ``max_steps``, ``log_every_n_steps`` and the loggers' step still count optimizer steps.

What that cannot honour is refused when training starts, in one line naming the setting and the way out (the
textbook path, ``fast=False``); under DDP or any other multi-device strategy the loop steps aside and the
textbook path runs.
"""

from __future__ import annotations

import warnings

import torch
from lightning import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import (
    Callback,
    GradientAccumulationScheduler,
    LearningRateMonitor,
    ModelCheckpoint,
    OnExceptionCheckpoint,
    ProgressBar,
    StochasticWeightAveraging,
    Timer,
)
from lightning.pytorch.plugins.precision import DoublePrecision, HalfPrecision, Precision
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor, nn

from fashion_lightning.errors import UserError
from fashion_lightning.fast import networks, private
from fashion_lightning.fast.batches import GroupedBatches
from fashion_lightning.fast.runtime import tune_process

STEP_HOOKS = ("on_before_backward", "on_after_backward", "on_before_optimizer_step", "on_before_zero_grad")
"""Hooks around backward and the optimizer step: the fast loop calls neither ``manual_backward`` nor
``LightningOptimizer.step`` (their dispatch costs more than a dense step's arithmetic here), so they never run."""
BATCH_HOOKS = ("on_train_batch_start", "on_train_batch_end")
"""Hooks that see each training step's batch: with several batches per step they would see a list."""
TRANSFER_HOOKS = ("on_before_batch_transfer", "transfer_batch_to_device", "on_after_batch_transfer")
"""Module and datamodule hooks that receive each training step's batch: a list, with several per step."""
MODULE_METHODS = ("training_step", "backward", "optimizer_step", "optimizer_zero_grad", "configure_gradient_clipping")
"""Methods of the module the fast loop does not call."""
PRECISIONS = (Precision, HalfPrecision, DoublePrecision)
"""Precision plugins without autocast around the step or a gradient scaler in backward."""
TEXTBOOK = "use the textbook path: fast=False (speed=reference in the app)"


def takes_batch_lists(callback: Callback) -> bool:
    """Whether ``callback``'s batch hooks stay right when a training step holds a list of batches: progress bars
    (they count steps), ``Timer`` (``max_time``: checked after each step), a ``ModelCheckpoint`` that saves by
    epoch, a ``LearningRateMonitor`` by epoch, and callbacks that say so with ``takes_batch_lists = True``."""
    if isinstance(callback, LearningRateMonitor):
        return callback.logging_interval == "epoch"
    return (isinstance(callback, ProgressBar | Timer | ModelCheckpoint)
            or getattr(callback, "takes_batch_lists", False))


def setup_refusal(trainer: Trainer, module: LightningModule, base: type) -> str | None:
    """What the fast loop cannot honour that is known when it engages (``setup("fit")``), before anything reads
    ``automatic_optimization``: the module's own optimization, methods and step hooks; callbacks that need automatic
    optimization."""
    name = type(module).__name__
    if not LightningModule.automatic_optimization.fget(module):
        return f"{name} sets automatic_optimization=False (its own optimization); {TEXTBOOK}"
    for method in (*MODULE_METHODS, *STEP_HOOKS):
        if is_overridden(method, module, parent=base):
            return f"{name}.{method}, which the fast loop does not run as written; {TEXTBOOK}"
    for callback in trainer.callbacks:
        if isinstance(callback, GradientAccumulationScheduler):
            return f"callback {type(callback).__name__} (accumulation); {TEXTBOOK}"
    return None


def refusal(trainer: Trainer, module: LightningModule, base: type, per_step: int | None) -> str | None:
    """What in this fit the fast loop cannot honour, as one line, or None; ``per_step`` is None where the
    training loader hands over one batch a step."""
    if reason := setup_refusal(trainer, module, base):
        return reason
    name = type(module).__name__
    for method in BATCH_HOOKS + TRANSFER_HOOKS if per_step else ():
        if is_overridden(method, module, parent=base):
            return f"{name}.{method}, which the fast loop does not run as written; {TEXTBOOK}"
    by_epoch = [type(c.scheduler).__name__ for c in trainer.lr_scheduler_configs if c.interval == "epoch"]
    if by_epoch and is_overridden("on_train_batch_start", module, parent=base):
        return (f"{name}.on_train_batch_start with a {by_epoch[0]} stepped every epoch: where the hook returns -1, "
                f"Lightning ends the epoch early and steps it, the fast loop would not; {TEXTBOOK}")
    datamodule = trainer.datamodule
    for method in TRANSFER_HOOKS if per_step and datamodule is not None else ():
        if is_overridden(method, datamodule, parent=LightningDataModule):
            return (f"{type(datamodule).__name__}.{method}, which would receive lists of {per_step} batches; "
                    f"set batches_per_step=1, or {TEXTBOOK}")
    for callback in trainer.callbacks:
        cb = type(callback).__name__
        if hooks := [h for h in STEP_HOOKS if is_overridden(h, callback, parent=Callback)]:
            return f"callback {cb}'s {hooks[0]}, which the fast loop does not call; {TEXTBOOK}"
        if isinstance(callback, StochasticWeightAveraging):
            return f"callback {cb}, whose batch-norm epoch skips backward, which only automatic optimization does; " \
                   f"{TEXTBOOK}"
        if isinstance(callback, ModelCheckpoint) and private.checkpoints_within_epochs(callback):
            return f"callback {cb} saving every n training steps or every time interval; {TEXTBOOK}"
        if per_step and isinstance(callback, OnExceptionCheckpoint):
            return (f"callback {cb}: saved inside a step of {per_step} batches, it would resume past those the step "
                    f"had not applied (the app's SaveOnInterrupt takes them back); set batches_per_step=1, or "
                    f"{TEXTBOOK}")
        reads_batches = any(is_overridden(h, callback, parent=Callback) for h in BATCH_HOOKS)
        if per_step and reads_batches and not takes_batch_lists(callback):
            return (f"callback {cb}, which reads each training batch, while a training step here holds "
                    f"{per_step} batches; set batches_per_step=1, or {TEXTBOOK}")
    if trainer.gradient_clip_val:
        return f"Trainer(gradient_clip_val={trainer.gradient_clip_val}); {TEXTBOOK}"
    if trainer.accumulate_grad_batches != 1:
        return f"Trainer(accumulate_grad_batches={trainer.accumulate_grad_batches}); {TEXTBOOK}"
    plugin = trainer.precision_plugin
    if type(plugin) not in PRECISIONS:
        return f"Trainer(precision={trainer.precision!r}) ({type(plugin).__name__}); {TEXTBOOK}"
    return (per_step and count_refusal(trainer, per_step)) or optimizer_refusal(trainer, module, base, per_step)


def count_refusal(trainer: Trainer, per_step: int) -> str | None:
    """Trainer settings Lightning counts in training steps: whole numbers of batches to train on are honoured
    (`GroupedBatches` counts them in batches); fractions and validation intervals are not."""
    for setting in ("overfit_batches", "limit_train_batches", "val_check_interval"):
        value = getattr(trainer, setting, "a time interval")  # Lightning keeps a time interval elsewhere
        default = 0.0 if setting == "overfit_batches" else 1.0
        counted = isinstance(value, float) or setting == "val_check_interval"
        if counted and not (type(value) is float and value == default):
            return (f"Trainer({setting}={value!r}): Lightning would count it in training steps of {per_step} "
                    f"batches here; give limit_train_batches / overfit_batches as a number of batches, set "
                    f"batches_per_step=1, or {TEXTBOOK}")
    return None


def optimizer_refusal(trainer: Trainer, module: LightningModule, base: type, per_step: int | None) -> str | None:
    """One optimizer; schedulers stepped by interval and frequency, and sized by Lightning's own count."""
    if len(trainer.optimizers) != 1:
        return f"{len(trainer.optimizers)} optimizers; {TEXTBOOK}"
    for config in trainer.lr_scheduler_configs:
        scheduler = type(config.scheduler).__name__
        if isinstance(config.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            return f"a {scheduler} scheduler; {TEXTBOOK}"
        if per_step and config.interval == "step" and is_overridden("configure_optimizers", module, parent=base):
            return (f"a {scheduler} stepped every step from {type(module).__name__}.configure_optimizers: "
                    f"trainer.estimated_stepping_batches counts training steps of {per_step} batches here; set "
                    f"batches_per_step=1, or {TEXTBOOK}")
    return None


class FastLoop:
    """The fast training of one `ImageClassifier`; ``trainer`` is the one whose fit it runs, None when it runs none."""

    def __init__(self, batches_per_step: int, base: type[LightningModule]) -> None:
        self.batches_per_step = batches_per_step
        self.base = base  # the class whose methods this loop stands in for
        self.trainer: Trainer | None = None
        self.checked = False  # whether this fit passed `refusal`
        self._quiet: tuple | None = None

    def setup(self, module: LightningModule) -> None:
        """At the module's ``setup("fit")``: run this fit, or step aside to the textbook path."""
        self.trainer = None
        trainer = module.trainer
        if not isinstance(trainer.strategy, SingleDeviceStrategy):
            rank_zero_info(f"fast=True steps aside under {type(trainer.strategy).__name__}: the textbook path runs "
                           "(DDP averages gradients in hooks that only autograd's backward fires)")
            return
        if missing := private.lightning_counters_missing(trainer):
            rank_zero_warn(f"fast=True steps aside: this Lightning has no {missing}; the textbook path runs")
            return
        if reason := setup_refusal(trainer, module, self.base):
            raise UserError(f"fast=True cannot honour {reason}")
        tune_process()
        self.trainer, self.checked = trainer, False
        if self.batches_per_step > 1:  # Lightning compares log_every_n_steps with lists: this loop logs per batch
            warnings.filterwarnings("ignore", message="The number of training batches .* logging interval")
            self._quiet = warnings.filters[0]

    def on_train_start(self, module: LightningModule) -> None:
        """Refuse, as training starts, what this fit asks that the loop cannot honour (the optimizers and the
        training loader exist now, and a tuner may have swapped the callbacks)."""
        if self._quiet in warnings.filters:
            warnings.filters.remove(self._quiet)
        trainer = module.trainer
        loader = trainer.train_dataloader
        per_step = loader.per_step if isinstance(loader, GroupedBatches) else None
        if reason := refusal(trainer, module, self.base, per_step):
            raise UserError(f"fast=True cannot honour {reason}")
        self.checked = True

    def train_batches(self, loader: object, trainer: Trainer) -> object:
        """The training loader a step of this loop reads: ``loader``'s batches grouped by ``batches_per_step``,
        ``limit_train_batches`` (or ``overfit_batches``) counted in batches."""
        if self.batches_per_step == 1:
            return loader
        if reason := count_refusal(trainer, self.batches_per_step):  # before Lightning applies them to the lists
            raise UserError(f"fast=True cannot honour {reason}")
        limit = trainer.limit_train_batches
        return GroupedBatches(loader, self.batches_per_step, limit if isinstance(limit, int) else None)

    def optimizer_steps(self, trainer: Trainer) -> int | float:
        """The optimizer steps of the whole fit, as ``trainer.estimated_stepping_batches`` counts them unfused."""
        steps = trainer.estimated_stepping_batches  # loads the training loader, as Lightning does
        loader = trainer.train_dataloader
        if not isinstance(loader, GroupedBatches):
            return steps
        total = loader.num_batches * max(trainer.max_epochs, 1) if trainer.max_epochs != -1 else float("inf")
        return min(total, trainer.max_steps) if trainer.max_steps != -1 else total

    def logits(self, module: LightningModule, x: Tensor) -> Tensor:
        """``module(x)``, through the fused kernels where they compute exactly that (see `networks`)."""
        return networks.logits(module.net, x) if self._net_stands_for(module) else module(x)

    def _net_stands_for(self, module: LightningModule) -> bool:
        """Whether ``module(x)`` is ``module.net(x)`` run as written (forward neither overridden, replaced nor
        compiled; no hook on the module) and the kernels may run (no multi-device strategy)."""
        if type(module).forward is not self.base.forward or private.hooked(module) or private.rerouted(module):
            return False
        try:
            return isinstance(module.trainer.strategy, SingleDeviceStrategy)
        except RuntimeError:  # not attached to a trainer: a plain call
            return True

    def training_step(self, module: LightningModule, batch: object, batch_idx: int) -> Tensor | None:
        """One optimizer step per batch of ``batch`` (a list of batches, or one), in order; the last loss."""
        if not self.checked:  # a subclass's on_train_start that does not call super()'s: check here, before any step
            self.on_train_start(module)
        trainer = module.trainer
        loader = trainer.train_dataloader
        grouped = isinstance(loader, GroupedBatches)
        batches = batch if grouped else [batch]
        first = loader.loader.position - len(batches) if grouped else batch_idx  # the epoch's index of the first batch
        cut = max(len(batches) - max(trainer.max_steps - trainer.global_step, 0), 0) if trainer.max_steps >= 0 else 0
        batches = batches[: len(batches) - cut]  # stop exactly at max_steps, inside a list if need be
        optimizer = module.optimizers(use_pl_optimizer=False)
        net = module.net if self._net_stands_for(module) else None  # None: module(x) must run as written
        plain_loss = type(module).training_loss is self.base.training_loss and not module.hparams.get("label_smoothing")
        by_hand = networks.dense_step(net) if net is not None and plain_loss else None
        logits, losses = [], []
        for i, (x, y) in enumerate(batches):
            step = trainer.global_step
            loss, out = self._loss_and_grads(module, net, by_hand, x, y, optimizer)
            if not private.fused_adam_step(optimizer):  # the same kernel calls as optimizer.step(), where it can
                optimizer.step()
            private.count_optimizer_step(trainer)
            self._step_schedulers(module, trainer, "step", first + i + 1)
            logits.append(out.detach())
            losses.append(loss.detach())
            if i + 1 < len(batches):
                self._log_step_loss(trainer, step, loss)
        if not batches:
            return None
        labels = torch.cat([y for _, y in batches])
        sizes = torch.tensor([len(y) for _, y in batches], dtype=losses[0].dtype, device=losses[0].device)
        module.update_metrics("train", torch.cat(logits), labels, torch.stack(losses), sizes)
        if not cut and batch_idx + 1 >= trainer.num_training_batches:
            self._step_schedulers(module, trainer, "epoch", trainer.current_epoch + 1)
        private.set_logger_step(trainer, trainer.global_step)  # Lightning logs the last batch's loss at its step
        module.log("train/loss_step", losses[-1], prog_bar=True)
        return losses[-1]

    @staticmethod
    def _log_step_loss(trainer: Trainer, step: int, loss: Tensor) -> None:
        """A batch's loss to the loggers where Lightning would log ``self.log("train/loss_step", loss)`` of a step
        of its own: every ``log_every_n_steps``, and at each step once training is to stop."""
        every = trainer.log_every_n_steps
        if every and ((step + 1) % every == 0 or trainer.should_stop):
            for logger in trainer.loggers:
                logger.log_metrics({"train/loss_step": loss.item(), "epoch": trainer.current_epoch}, step=step)
                logger.save()

    @staticmethod
    def _loss_and_grads(module: LightningModule, net: nn.Module | None, by_hand: networks.LossAndGrads | None,
                        x: Tensor, y: Tensor, optimizer: torch.optim.Optimizer) -> tuple[Tensor, Tensor]:
        """What ``module.training_loss(module(x), y)``, ``zero_grad`` and ``backward`` compute: by hand where it can
        (``by_hand``: the plain cross entropy, `networks.dense_step`), through ``net``'s kernels, or ``module(x)``
        itself where ``net`` is None."""
        if by_hand is not None and (result := by_hand(x, y)) is not None:
            return result
        logits = module(x) if net is None else networks.logits(net, x)
        loss = module.training_loss(logits, y)
        optimizer.zero_grad()
        loss.backward()
        return loss, logits

    @staticmethod
    def _step_schedulers(module: LightningModule, trainer: Trainer, interval: str, index: int) -> None:
        """Step the schedulers of ``interval`` whose frequency divides ``index``, as Lightning's automatic
        optimization does (``index``: the batch within the epoch, or the epoch, counted from 1)."""
        for config in trainer.lr_scheduler_configs:
            if config.interval == interval and index % config.frequency == 0:
                module.lr_scheduler_step(config.scheduler, None)
