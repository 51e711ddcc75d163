"""`ImageClassifier`: a LightningModule training any logits network on Fashion-MNIST, as Lightning's docs write one."""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from omegaconf import Container, OmegaConf
from torch import Tensor, nn
from torchmetrics import MaxMetric, MeanMetric

from fashion_lightning.errors import UserError
from fashion_lightning.nets.tutorial import keras_init_, summary

if TYPE_CHECKING:
    from torch.onnx import ONNXProgram

SCHEDULES = ("constant", "onecycle", "cosine")
CHECKPOINT_KEY = "fashion_lightning_class"
"""Checkpoint entry naming the module's class, so that a checkpoint alone rebuilds its model."""
Batch = tuple[Tensor, Tensor]
ADAM_SETTINGS = ("lr", "betas", "eps", "weight_decay", "decoupled_weight_decay")
"""The flat arguments that configure the default Adam; an ``optimizer`` given replaces them."""


def onnx_options(output: str) -> dict[str, Any]:
    """``torch.onnx.export``'s settings for a network of images (N, 1, 28, 28) to ``output`` (N, 10): named input and
    output, the batch dimension dynamic, the TorchScript-based exporter (no onnxscript needed, exact for these
    layers)."""
    return {"input_names": ["images"], "output_names": [output],
            "dynamic_axes": {"images": {0: "batch"}, output: {0: "batch"}}, "dynamo": False}


def to_plain(value: Any) -> Any:
    """``value`` with OmegaConf containers as plain dicts and lists, and tuples as lists, recursively: what a
    weights-only ``torch.load`` reads back, whatever container a config or a caller gave."""
    if isinstance(value, Container):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, Mapping):
        return {key: to_plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [to_plain(item) for item in value]
    return value


def _is_plain(value: Any) -> bool:
    if isinstance(value, dict):
        return all(isinstance(key, str) and _is_plain(item) for key, item in value.items())
    if isinstance(value, list):
        return all(_is_plain(item) for item in value)
    return value is None or isinstance(value, str | int | float | bool)


def partial_config(factory: Callable[..., Any] | Mapping[str, Any] | None) -> dict[str, Any] | None:
    """``factory`` as plain data: a Hydra ``_partial_: true`` config naming its class or function and its keyword
    values, for a class or function importable by name or a ``functools.partial`` of one with keyword arguments only
    (what Hydra's ``_partial_: true`` makes); a config given stays as it is. None for any other callable, which
    cannot be written down (a lambda, LightningCLI's partial of its instantiator)."""
    if factory is None or isinstance(factory, Mapping):
        return to_plain(factory)
    func, keywords = ((factory.func, factory.keywords) if isinstance(factory, functools.partial) and not factory.args
                      else (factory, {}))
    keywords = to_plain(keywords)
    if not (inspect.isclass(func) or inspect.isfunction(func)) or "<" in func.__qualname__ or not _is_plain(keywords):
        return None
    return {"_target_": f"{func.__module__}.{func.__qualname__}", "_partial_": True, **keywords}


def _factory(spec: Callable[..., Any] | Mapping[str, Any]) -> Callable[..., Any]:
    """The callable ``spec`` stands for: itself, or the partial its Hydra config instantiates (imported only now:
    rebuilding a module from a checkpoint for inference imports nothing the checkpoint names)."""
    return spec if callable(spec) else instantiate(spec, _partial_=True)


def cosine_with_warmup(optimizer: torch.optim.Optimizer, total_steps: int,
                       warmup_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """The rate rises linearly over ``warmup_steps`` optimizer steps, then follows a cosine down to 0 at
    ``total_steps``."""
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps - warmup_steps, 1))
    if not warmup_steps:
        return cosine
    warm = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1 / (warmup_steps + 1), total_iters=warmup_steps)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [warm, cosine], milestones=[warmup_steps])


def _accuracy_counts_as_mean(module: nn.Module, state_dict: dict[str, Tensor], prefix: str, *args: Any) -> None:
    """A ``load_state_dict`` pre-hook: a checkpoint written before the accuracies became means (before 2026-12-07)
    holds ``train_acc`` as MulticlassAccuracy's micro counts, ``tp`` (the correct images) and ``fn`` (the others), with
    ``fp`` and ``tn``; they become the running mean's sum and count, the same accuracy."""
    counts = {name: state_dict.pop(f"{prefix}train_acc.{name}", None) for name in ("tp", "fp", "tn", "fn")}
    if counts["tp"] is not None and counts["fn"] is not None:
        state_dict[f"{prefix}train_acc.mean_value"] = counts["tp"].sum().to(torch.get_default_dtype())
        state_dict[f"{prefix}train_acc.weight"] = (counts["tp"] + counts["fn"]).sum().to(torch.get_default_dtype())


class ImageClassifier(L.LightningModule):
    """Trains a logits network with cross entropy (softmax + sparse categorical crossentropy) and Adam, or the
    optimizer and scheduler given as partials.

    By default a LightningModule as Lightning's documentation writes one: automatic optimization, a
    ``training_step`` that returns the loss of one batch, so every Trainer flag, hook, callback, tuner and
    strategy applies as documented. The per-step train loss is logged as ``train/loss_step`` (every
    ``log_every_n_steps``); accuracy and sample-weighted mean loss per epoch on train/val/test come from
    torchmetrics (``train/acc``, ``val/loss``, ...; training ones are running means over the epoch, as Keras
    reports them), plus ``val/acc_best``. Use a subclass (`CNN`, `DenseBaseline`), which saves its
    hyperparameters for ``load_from_checkpoint``: as plain Python values (config lists and tuples as lists), so that
    checkpoints load weights-only.

    The optimizer is Adam configured by the flat arguments (``lr``, ``betas``, ...) unless ``optimizer`` is given: a
    callable taking the parameters, as Hydra's ``{_target_: torch.optim.SGD, _partial_: true, lr: 0.05}`` or
    LightningCLI's ``OptimizerCallable`` give it. ``scheduler``, a callable taking the optimizer, is stepped once an
    epoch, reading ``val/loss`` where it monitors a metric (``ReduceLROnPlateau``), as lightning-hydra-template's
    modules step it; ``schedule`` steps its built-in schedules every optimizer step. The hyperparameters record a
    callable given as its Hydra config (plain data, for a class or a ``functools.partial`` of one with keyword
    arguments; None for other callables): ``load_from_checkpoint`` rebuilds the module with it, importing its class
    only when a fit configures the optimizer.

    Args:
        net: the network, (N, 1, 28, 28) -> (N, 10) logits.
        lr: Adam's learning rate (the peak rate with the ``onecycle`` schedule).
        betas: Adam's betas.
        eps: Adam's epsilon (Keras uses 1e-7, torch 1e-8).
        weight_decay: L2 penalty added by Adam (or, with ``decoupled_weight_decay``, AdamW's decay).
        decoupled_weight_decay: decay the weights apart from the gradient, as AdamW.
        schedule: ``constant``, ``onecycle`` or ``cosine`` (cosine decay to 0 after a linear ``warmup``), stepped
            every optimizer step over the whole fit.
        warmup: with ``cosine``, the fraction of the fit's optimizer steps spent warming up linearly from 0.
        label_smoothing: the training loss's label smoothing, as ``F.cross_entropy(label_smoothing=...)``;
            ``val/loss`` and ``test/loss`` stay the plain cross entropy.
        eval_flip: test-time augmentation: validation, test and prediction average the logits of each image and of
            its left-right mirror.
        keras_init: glorot-uniform weights and zero biases, as Keras initialises.
        compile: run the network through ``torch.compile``.
        optimizer: a callable making the optimizer from the parameters (or its Hydra ``_partial_`` config), in place
            of Adam and the flat settings, which must then keep their defaults.
        scheduler: a callable making a learning-rate scheduler from the optimizer (or its Hydra ``_partial_``
            config), stepped every epoch; ``schedule`` must then stay ``constant``.
    """

    def __init__(self, net: nn.Module, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, decoupled_weight_decay: bool = False, schedule: str = "constant",
                 warmup: float = 0.0, label_smoothing: float = 0.0, eval_flip: bool = False,
                 keras_init: bool = False, compile: bool = False,
                 optimizer: OptimizerCallable | Mapping[str, Any] | None = None,
                 scheduler: LRSchedulerCallable | Mapping[str, Any] | None = None) -> None:
        super().__init__()
        for name, value in (("lr", lr), ("eps", eps)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise UserError(f"model.{name} must be a positive number, got {value!r}")
        for name, value, top in (("weight_decay", weight_decay, math.inf), ("warmup", warmup, 1.0),
                                 ("label_smoothing", label_smoothing, 1.0)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < top:
                raise UserError(f"model.{name} must be a number in [0, {top}), got {value!r}")
        pair = list(betas) if isinstance(betas, Sequence) and not isinstance(betas, str) else []
        if len(pair) != 2 or not all(type(b) in (int, float) and 0 <= b < 1 for b in pair):
            raise UserError(f"model.betas must be two numbers in [0, 1), got {pair or betas!r}")
        if schedule not in SCHEDULES:
            raise UserError(f"model.schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler"])
        self._check_factories(optimizer, scheduler)
        self._optimizer, self._scheduler = optimizer, scheduler
        self.save_hyperparameters({**to_plain(dict(self.hparams)), "optimizer": partial_config(optimizer),
                                   "scheduler": partial_config(scheduler)})
        self.net = keras_init_(net) if keras_init else net
        # accuracy: the mean of each image's correctness (its logits' argmax is its label), which is what
        # MulticlassAccuracy(average="micro") counts, at 40 % of its update's cost in a training step
        # (benchmarks/step_parts.py); checkpoints holding MulticlassAccuracy's counts load (_accuracy_counts_as_mean)
        self.train_acc, self.val_acc, self.test_acc = (MeanMetric(nan_strategy="disable") for _ in range(3))
        # a NaN loss shows as a NaN mean (torchmetrics' default drops it with a warning, and checks every step);
        # update_metrics gives them one value per sample, as "disable" drops weights (torchmetrics issue #3434)
        self.train_loss, self.val_loss, self.test_loss = (MeanMetric(nan_strategy="disable") for _ in range(3))
        self.register_load_state_dict_pre_hook(_accuracy_counts_as_mean)
        self.val_acc_best = MaxMetric()
        self._resumed_step: int | None = None  # the optimizer steps of a checkpoint a fit resumes
        for metric in (self.train_acc, self.train_loss, self.val_acc_best):
            metric.persistent(True)  # a mid-epoch checkpoint resumes the running means and the best so far

    def _check_factories(self, optimizer: Any, scheduler: Any) -> None:
        """Refuse, in one line, an ``optimizer`` or ``scheduler`` that is neither None, a callable nor a Hydra config
        (a mapping with ``_target_``), or one given with a flat setting it replaces changed from its default."""
        for name, factory, takes in (("optimizer", optimizer, "the parameters"), ("scheduler", scheduler,
                                                                                   "the optimizer")):
            if not (factory is None or callable(factory) or (isinstance(factory, Mapping) and "_target_" in factory)):
                raise UserError(f"model.{name} must be a callable taking {takes} (a Hydra config with _partial_: "
                                f"true, a functools.partial) or null, got {factory!r}")
        defaults = inspect.signature(ImageClassifier.__init__).parameters
        changed = {name: self.hparams[name] for name in (*ADAM_SETTINGS, "schedule", "warmup")
                   if to_plain(self.hparams[name]) != to_plain(defaults[name].default)}
        for name, factory, replaces in (("optimizer", optimizer, ADAM_SETTINGS), ("scheduler", scheduler,
                                                                                  ("schedule", "warmup"))):
            clash = [f"model.{key}={changed[key]!r}" for key in replaces if key in changed]
            if factory is not None and clash:
                raise UserError(f"model.{name} replaces {', '.join(clash)}: set that in model.{name}, or drop "
                                f"model.{name}")

    @property
    def example_input_array(self) -> Tensor:
        """One zero image in the module's dtype: the model summary's shapes and FLOPs, ``to_onnx``'s and
        ``to_torchscript(method="trace")``'s input.

        A property so that it follows the module's dtype: under ``precision="64-true"`` Lightning's ModelSummary feeds
        ``example_input_array`` to the float64 model unconverted (the precision plugin's ``convert_input`` converts
        batches only), which fails. That is Lightning's bug, to report upstream (no issue for it found; related:
        Lightning-AI/pytorch-lightning#2286, on the summary and the example input's dtype).
        """
        return torch.zeros(1, 1, 28, 28, dtype=self.dtype)

    def forward(self, x: Tensor) -> Tensor:
        """Images (N, 1, 28, 28) -> logits (N, 10)."""
        return self.net(x)

    def evaluate(self, x: Tensor) -> Tensor:
        """The logits validation, test and prediction use: ``self(x)``, averaged with those of the mirrored images
        when ``eval_flip``."""
        logits = self(x)
        return (logits + self(x.flip(3))) / 2 if self.hparams.get("eval_flip") else logits

    def training_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Cross entropy, with ``label_smoothing``."""
        return F.cross_entropy(logits, labels, label_smoothing=self.hparams.get("label_smoothing", 0.0))

    def setup(self, stage: str) -> None:
        if self.hparams.compile:
            self.net.compile()

    def update_metrics(self, split: str, logits: Tensor, labels: Tensor, loss: Tensor, weight: Tensor | int) -> None:
        """Accumulate ``split``'s accuracy and mean loss (``loss`` a batch mean of ``weight`` samples; or one per
        batch, with their sizes), so that the loss reported is the mean over samples, whatever the batch sizes.

        The mean metric receives each batch's loss once per sample rather than as a weight: with
        ``nan_strategy="disable"`` torchmetrics 1.9 replaces the weights by ones (torchmetrics issue #3434, fixed
        by its PR #3433), which would make it a mean of batch means."""
        getattr(self, f"{split}_acc").update(logits.detach().argmax(dim=1) == labels)
        if isinstance(weight, int):  # one batch: its mean, once per sample (a view, no copy)
            per_sample = loss.detach().expand(weight)
        else:
            repeats = weight.to(loss.device).long().reshape(-1)
            per_sample = loss.detach().reshape(-1).repeat_interleave(repeats, output_size=len(labels))
        getattr(self, f"{split}_loss").update(per_sample)

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = self.training_loss(logits, y)
        self.update_metrics("train", logits, y, loss, len(y))
        if self.logs_this_step():  # for the loggers; not the progress bar, which reads it back at every step
            self.log("train/loss_step", loss)
        return loss

    def logs_this_step(self) -> bool:
        """Whether this training step's loss is logged: where a logger writes it (every ``log_every_n_steps``
        optimizer steps, as Lightning writes logs), and at every step where a callback monitors it. ``self.log``
        costs about 0.5 ms a call on a CPU (a third of a dense step), for a value nothing else reads."""
        every = self.trainer.log_every_n_steps
        if every > 0 and (self.global_step + 1) % every == 0:
            return True
        return any(getattr(callback, "monitor", None) == "train/loss_step" for callback in self.trainer.callbacks)

    def _log_epoch(self, split: str) -> Tensor | None:
        acc, loss = getattr(self, f"{split}_acc"), getattr(self, f"{split}_loss")
        if not acc.update_count:  # e.g. a subclass's own training_step that keeps no metrics: nothing to report
            return None
        value = acc.compute()
        # values computed by torchmetrics are already reduced across ranks; sync_dist only averages equal copies
        self.log_dict({f"{split}/acc": value, f"{split}/loss": loss.compute()}, prog_bar=split != "test",
                      sync_dist=True)
        acc.reset()
        loss.reset()
        return value

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if batch_idx == 0:  # an epoch's start; a checkpoint saved at the last step of the one before restores its
            self.train_acc.reset()  # whole running means, which Lightning then never ends: they must not carry over
            self.train_loss.reset()

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train")

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        x, y = batch
        logits = self.evaluate(x)
        self.update_metrics("val", logits, y, F.cross_entropy(logits, y), len(y))

    def on_validation_epoch_end(self) -> None:
        acc = self._log_epoch("val")
        if acc is not None and not self.trainer.sanity_checking:
            self.val_acc_best.update(acc)
            self.log("val/acc_best", self.val_acc_best.compute(), prog_bar=True, sync_dist=True)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        x, y = batch
        logits = self.evaluate(x)
        self.update_metrics("test", logits, y, F.cross_entropy(logits, y), len(y))

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def predict_step(self, batch: Tensor | Batch, batch_idx: int = 0) -> tuple[Tensor, Tensor]:
        """Class probabilities (N, 10) and predicted classes (N,) for a batch of images (labels ignored)."""
        x = batch[0] if isinstance(batch, list | tuple) else batch
        probs = self.evaluate(x).softmax(dim=1)
        return probs, probs.argmax(dim=1)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        if self._optimizer is not None:
            optimizer = _factory(self._optimizer)(self.parameters())
        else:
            optimizer = torch.optim.Adam(self.parameters(), lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps,
                                         weight_decay=hp.weight_decay,
                                         decoupled_weight_decay=hp.get("decoupled_weight_decay", False),
                                         fused=not self._gradients_scaled() or None)
        if self._scheduler is not None:  # as lightning-hydra-template's modules schedule: every epoch
            scheduler = _factory(self._scheduler)(optimizer)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": "val/loss",
                                                             "interval": "epoch", "frequency": 1}}
        if hp.schedule == "constant":
            return optimizer
        total = self.total_optimizer_steps()
        if hp.schedule == "onecycle":
            scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=hp.lr, total_steps=total)
        else:
            scheduler = cosine_with_warmup(optimizer, total, round(hp.get("warmup", 0.0) * total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _gradients_scaled(self) -> bool:
        """Whether AMP's gradient scaler runs (16-mixed). Adam then takes torch's default implementation, not the fused
        kernel (the same update, in one pass): a fused Adam unscales the gradients inside its step, so Lightning could
        neither unscale them before ``on_before_optimizer_step`` nor clip them."""
        try:
            return getattr(self.trainer.precision_plugin, "scaler", None) is not None
        except RuntimeError:  # not attached to a trainer
            return False

    def total_optimizer_steps(self) -> int:
        """Optimizer steps in the whole fit, which the schedules span (``trainer.estimated_stepping_batches``)."""
        trainer = self.trainer
        if trainer.max_epochs == -1 and trainer.max_steps == -1:
            raise UserError(f"model.schedule={self.hparams.schedule} needs a finite run: set trainer.max_epochs or "
                            "trainer.max_steps")
        return int(trainer.estimated_stepping_batches)

    def to_onnx(self, file_path: str | Path | BytesIO | None = None, input_sample: Any = None,
                **kwargs: Any) -> ONNXProgram | None:
        """Lightning's ``to_onnx``, exporting as ``python -m fashion_lightning.export`` does (`onnx_options`): input
        ``images`` (N, 1, 28, 28), output ``logits`` (N, 10), any batch size. ``kwargs`` override these settings."""
        return super().to_onnx(file_path, input_sample, **{**onnx_options("logits"), **kwargs})

    def summary(self) -> str:
        """A Keras-like table of the network's layers, output shapes and parameter counts."""
        return summary(self.net)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = f"{type(self).__module__}:{type(self).__qualname__}"

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        try:  # a fit's resume; not load_from_checkpoint, test or validate
            fitting = self.trainer.state.fn == "fit"
        except RuntimeError:  # not attached to a trainer
            fitting = False
        self._resumed_step = checkpoint.get("global_step") if fitting else None

    def on_train_start(self) -> None:
        """Refuse a resume whose optimizer steps Lightning did not restore. Lightning counts automatic and manual
        optimization apart: a checkpoint of grouped steps (``steps_per_execution`` > 1, manual optimization) resumed
        one batch a step would start again from step 0 and stop late or never, without a word."""
        saved, self._resumed_step = self._resumed_step, None
        if saved is not None and saved != self.trainer.global_step:
            raise UserError(f"the checkpoint was written after {saved} optimizer steps, but this fit resumed at step "
                            f"{self.trainer.global_step}: it was trained with another steps_per_execution (grouped "
                            "steps use manual optimization); resume it with the setting it was written with, or "
                            "load its weights into a new fit")
