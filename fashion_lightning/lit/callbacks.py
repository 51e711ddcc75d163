"""Lightning callbacks of the training app."""

from __future__ import annotations

import functools
import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging, ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor

from fashion_lightning.errors import UserError, check_positive_int


class StoppedBySignal(SystemExit):
    """A run stopped by SIGINT or SIGTERM after saving what it could (`SaveOnInterrupt`): it exits with code
    ``128 + signum``, as a shell reports a process that signal ended, so a scheduler never records a success."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum


class SaveOnInterrupt(Callback):
    """Nothing lost on Ctrl-C, SIGTERM or a crash: ``<dirpath>/interrupted.ckpt`` holds where training stood.

    The first SIGINT or SIGTERM during ``fit`` stops training at the end of the current step (under DDP, every
    process after the same step; during the fit's validation, at the next step or the fit's end), so the checkpoint
    sits exactly between two steps and a resumed run continues as if never stopped; the fit then raises
    `StoppedBySignal` (exit code 128 + the signal). A second signal interrupts at once. Any other exception during
    ``fit`` also saves the checkpoint; where it struck inside a training step, the loader takes back the batches the
    step had not applied, which Lightning runs again on resume. One raised before the first optimizer step (bad
    data, bad config) saves nothing, so no checkpoint looks like a result.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, dirpath: str, filename: str = "interrupted") -> None:
        self.ckpt_path = Path(dirpath) / f"{filename}.ckpt"
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        self._step_start: int | None = None  # global_step when the running training step began

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._step_start = trainer.global_step

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.received = None
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self._step_start = None
        received = self.received or 0
        if trainer.world_size > 1:  # every process stops after the same step, or the others would wait forever
            signals = torch.tensor(received, device=trainer.strategy.root_device)
            received = int(trainer.strategy.reduce(signals, reduce_op="max"))  # by the signal one of them received
        if received:
            raise StoppedBySignal(received)

    def _restore_handlers(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handlers()
        if self.received is not None:  # it came during the last validation: stop before anything else runs
            raise StoppedBySignal(self.received)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()
        if trainer.state.fn != TrainerFn.FITTING or trainer.global_step == 0 or isinstance(exception, TrainingDiverged):
            return  # not training (a test after the fit, say: its weights need not be the loops'), nothing trained,
                    # or weights trained on a non-finite loss
        loader = trainer.train_dataloader
        if self._step_start == trainer.global_step and hasattr(loader, "give_back"):
            loader.give_back(1)  # the step's batch was not applied: Lightning runs this step again on resume
        trainer.save_checkpoint(self.ckpt_path)


class TrainingDiverged(UserError):
    """The training loss became NaN or infinite (`FiniteLoss`)."""


def learning_rate_setting(pl_module: L.LightningModule) -> str:
    """`` (model.lr=0.001)``, or `` (model.optimizer.lr=0.05)`` where an optimizer config replaces the flat settings:
    the setting that sets the module's learning rate, as an app's override names it; empty where none does."""
    hparams = getattr(pl_module, "hparams", {})
    optimizer = hparams.get("optimizer")
    name, lr = ("model.optimizer.lr", optimizer.get("lr")) if isinstance(optimizer, dict) else ("model.lr",
                                                                                               hparams.get("lr"))
    return f" ({name}={lr:g})" if isinstance(lr, int | float) and not isinstance(lr, bool) else ""


class FiniteLoss(Callback):
    """Stops a fit within ``every`` training steps of the first whose loss is not finite: one clear error naming
    the epoch, the step and the likely cause, instead of a run that trains on NaN and reports its chance accuracy.

    The losses stay on their device and are looked at together every ``every`` steps (default: the trainer's
    ``log_every_n_steps``), and before any validation or checkpoint: the host waits for the device once a window, not
    at every step (on a GPU a wait per step keeps a small network launch-bound), and no checkpoint is written of
    weights trained on a non-finite loss (the error stops the save; `SaveOnInterrupt` saves nothing for it).
    (Lightning's own checks act later or cost more: ``EarlyStopping(check_finite=True)`` looks at a metric once an
    epoch and stops as if the run had finished; ``Trainer(detect_anomaly=True)`` slows every backward.)
    """

    def __init__(self, every: int | None = None) -> None:
        self.every = every if every is None else check_positive_int("FiniteLoss.every", every)
        self._pending: list[tuple[Tensor, int, int]] = []  # (loss, epoch, step) of the steps not looked at yet

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._pending = []

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        self._pending.append((loss.detach(), trainer.current_epoch, trainer.global_step))
        if (trainer.global_step + 1) % (self.every or trainer.log_every_n_steps or 50) == 0:  # where the logs wait too
            self.check(pl_module)

    def check(self, pl_module: L.LightningModule) -> None:
        """Raise `TrainingDiverged` for the first pending loss that is not finite; forget them all."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        finite = torch.isfinite(torch.stack([loss.float().reshape(()) for loss, _, _ in pending]))
        if bool(finite.all()):  # the one wait for the device
            return
        loss, epoch, step = pending[int((~finite).nonzero()[0])]
        raise TrainingDiverged(f"the training loss became {float(loss):g} at epoch {epoch}, step {step}: training "
                               f"diverged; lower the learning rate{learning_rate_setting(pl_module)}")

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.check(pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.check(pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.check(pl_module)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        self.check(pl_module)


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` for the app's run directories: its record of the checkpoints it saved survives a
    resume into another directory, and its state key is worked out once.

    Every run of the app writes into a directory of its own, also a resumed one, and Lightning forgets the best score
    where ``dirpath`` changed: the first validation after the resume would become "best", however it compares with
    the epochs before. Here the resumed fit keeps comparing with them, and ``best_model_path`` stays the earlier
    run's file (while it exists) until a better one is saved. Lightning never deletes a checkpoint outside
    ``dirpath``.

    Lightning puts every callback's ``state_key`` into a profiler label at each hook call, six a training step, with or
    without a profiler (``lightning.pytorch.trainer.call._call_callback_hooks``; no upstream issue found), and
    ``ModelCheckpoint``'s key is a ``repr`` of its settings: about 40 µs a step each on a 2-core CPU
    (``benchmarks/step_parts.py``). The settings it names are fixed at ``__init__``, so the key is made once.
    """

    @functools.cached_property
    def state_key(self) -> str:
        """``ModelCheckpoint``'s key: checkpoints written with either class resume with the other."""
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        best = state_dict.get("best_model_path")
        if best and not Path(best).is_file():  # the earlier run's folder was moved or deleted: start afresh
            super().load_state_dict(state_dict)
            self.best_model_path = ""
            return
        super().load_state_dict({**state_dict, "dirpath": self.dirpath})


class EpochTimer(Callback):
    """Wall time of each training epoch's steps (validation excluded): ``times``, logged as ``train/epoch_time_s``."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = self._last = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = self._last = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self._last = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.times.append(self._last - self._start)
        pl_module.log("train/epoch_time_s", self.times[-1], sync_dist=True)


class EMA(EMAWeightAveraging):
    """Lightning's `EMAWeightAveraging`: an exponential moving average of the weights, updated after every optimizer
    step, is what validation evaluates, what checkpoints hold as ``state_dict`` and what the model holds when
    training ends.

    One change: Lightning's callback, still holding its average after ``fit``, answers a later
    ``trainer.test(ckpt_path=...)`` by loading the checkpoint's raw (not averaged) weights into the model, so the
    test would silently evaluate other weights than validation chose, and it swaps the fit's last average in for a
    later ``trainer.validate(ckpt_path=...)``. Here a checkpoint restores the raw weights and the average only when
    a fit resumes, and only a fit's validation swaps; a test, validation or prediction evaluates its averaged
    weights.
    """

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING:  # a later validate() evaluates its own checkpoint's average
            super().on_validation_epoch_start(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_validation_epoch_end(trainer, pl_module)
