"""LightningModules: the shared training logic and the tutorial's two models."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import SingleDeviceStrategy
from torch import Tensor, nn
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from fashion_lightning.data import CLASS_NAMES, batches_in_steps
from fashion_lightning.errors import UserError
from fashion_lightning.models import ConvNet, DenseNet, keras_init_, summary

SCHEDULES = ("constant", "onecycle")
Batch = tuple[Tensor, Tensor]


class ImageClassifier(L.LightningModule):
    """Trains a logits network with cross entropy (softmax + sparse categorical crossentropy) and Adam.

    Accuracy and sample-weighted mean loss on train/val/test come from torchmetrics, plus the best
    validation accuracy so far. Training metrics are running means over the epoch, as Keras reports them.
    Use a subclass (`CNN`, `DenseBaseline`), which saves its hyperparameters for ``load_from_checkpoint``.

    Optimization is manual, one Adam step per batch. A training step may receive a list of batches (the
    datamodule's ``batches_per_step``) and then takes one optimizer step per batch, in order: the same math as
    one batch per step, with Lightning's per-step machinery paid once per list. ``trainer.global_step``
    counts optimizer steps. The hot loop calls backward and the optimizer directly, so callbacks'
    ``on_before_backward``, ``on_after_backward`` and ``on_before_optimizer_step`` hooks do not run (with a
    gradient scaler, ``precision=16-mixed``, the full Lightning path runs instead); Lightning's
    ``gradient_clip_val`` and ``accumulate_grad_batches`` do not apply to manual optimization. A network with
    a ``loss_and_grads(x, y)`` method (`DenseNet`) computes loss and gradients itself there, without autograd,
    wherever that method applies (it returns ``None`` elsewhere); never with ``compile`` or under DDP.

    Args:
        net: the network, (N, 1, 28, 28) -> (N, 10) logits.
        lr: Adam's learning rate (the peak rate with the ``onecycle`` schedule).
        betas: Adam's betas.
        eps: Adam's epsilon (Keras uses 1e-7, torch 1e-8).
        weight_decay: L2 penalty added by Adam.
        schedule: ``constant`` or ``onecycle`` (per step, over the whole run).
        keras_init: glorot-uniform weights and zero biases, as Keras initialises.
        compile: run the network through ``torch.compile``.
    """

    def __init__(self, net: nn.Module, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, schedule: str = "constant", keras_init: bool = False,
                 compile: bool = False) -> None:
        super().__init__()
        for name, value in (("lr", lr), ("eps", eps)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise UserError(f"model.{name} must be a positive number, got {value!r}")
        if schedule not in SCHEDULES:
            raise UserError(f"model.schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
        self.save_hyperparameters(ignore=["net"])
        self.automatic_optimization = False
        self.net = keras_init_(net) if keras_init else net
        n = len(CLASS_NAMES)
        self.train_acc, self.val_acc, self.test_acc = (MulticlassAccuracy(n, average="micro", validate_args=False)
                                                        for _ in range(3))
        self.train_loss, self.val_loss, self.test_loss = MeanMetric(), MeanMetric(), MeanMetric()
        self.val_acc_best = MaxMetric()
        for metric in (self.train_acc, self.train_loss, self.val_acc_best):
            metric.persistent(True)  # a mid-epoch checkpoint resumes the running means and the best so far

    def forward(self, x: Tensor) -> Tensor:
        """Images (N, 1, 28, 28) -> logits (N, 10)."""
        return self.net(x)

    def __setattr__(self, name: str, value: Any) -> None:
        # Lightning sets this plain attribute around every hook call, ~44 times a training step; nn.Module's
        # __setattr__ bookkeeping for it costs ~40 us a step, over 1 % of a CNN step on a 2-core CPU.
        if name == "_current_fx_name":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def setup(self, stage: str) -> None:
        if self.hparams.compile:
            self.net.compile()

    def _update(self, batch: tuple[Tensor, Tensor], split: str) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        getattr(self, f"{split}_acc").update(logits.detach(), y)
        getattr(self, f"{split}_loss").update(loss.detach(), len(y))
        return loss

    def _log_epoch(self, split: str) -> Tensor:
        acc, loss = getattr(self, f"{split}_acc"), getattr(self, f"{split}_loss")
        value = acc.compute()
        # values computed by torchmetrics are already reduced across ranks; sync_dist only averages equal copies
        self.log_dict({f"{split}/acc": value, f"{split}/loss": loss.compute()}, prog_bar=split != "test",
                      sync_dist=True)
        acc.reset()
        loss.reset()
        return value

    def training_step(self, batch: Batch | list[Batch], batch_idx: int) -> None:
        """One Adam step per batch: ``batch`` is one ``(images, labels)`` pair or a list of them."""
        trainer, optimizer, scheduler = self.trainer, self.optimizers(), self.lr_schedulers()
        batches = [batch] if isinstance(batch[0], Tensor) else batch
        if trainer.max_steps >= 0:  # stop exactly at max_steps, inside a list if need be
            batches = batches[: max(trainer.max_steps - trainer.global_step, 0)]
        if not batches:
            return
        progress = trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
        direct = getattr(trainer.precision_plugin, "scaler", None) is None
        # DDP averages gradients in hooks that autograd's backward fires: there, autograd it is
        by_hand = isinstance(trainer.strategy, SingleDeviceStrategy) and not self.hparams.compile
        logits, losses = [], []
        for x, y in batches:
            if direct:  # what LightningOptimizer.step does, less the hook dispatch (the hot path)
                loss, out = loss_and_grads(self.net, x, y, optimizer.optimizer, by_hand=by_hand)
                progress.increment_ready()
                optimizer.optimizer.step()
                progress.increment_completed()
            else:
                out = self(x)
                loss = F.cross_entropy(out, y)
                optimizer.zero_grad()
                self.manual_backward(loss)
                optimizer.step()
            if scheduler is not None:
                scheduler.step()
            logits.append(out.detach())
            losses.append(loss.detach())
        sizes = torch.tensor([len(y) for _, y in batches], dtype=losses[0].dtype, device=losses[0].device)
        self.train_acc.update(torch.cat(logits), torch.cat([y for _, y in batches]))
        self.train_loss.update(torch.stack(losses), sizes)
        interval = trainer.log_every_n_steps if len(batches) == 1 else 1
        if interval and batch_idx % interval == 0:  # running means for the progress bar, not every step
            self.log_dict({"acc": self.train_acc.compute(), "loss": self.train_loss.compute()},
                          prog_bar=True, logger=False)

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._update(batch, "val")

    def on_validation_epoch_end(self) -> None:
        acc = self._log_epoch("val")
        if not self.trainer.sanity_checking:
            self.val_acc_best.update(acc)
            self.log("val/acc_best", self.val_acc_best.compute(), prog_bar=True, sync_dist=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._update(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def predict_step(self, batch: Tensor | tuple[Tensor, Tensor], batch_idx: int = 0) -> tuple[Tensor, Tensor]:
        """Class probabilities (N, 10) and predicted classes (N,) for a batch of images (labels ignored)."""
        x = batch[0] if isinstance(batch, list | tuple) else batch
        probs = self(x).softmax(dim=1)
        return probs, probs.argmax(dim=1)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        optimizer = torch.optim.Adam(self.parameters(), lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps,
                                     weight_decay=hp.weight_decay, fused=True)
        if hp.schedule == "constant":
            return optimizer
        total = self._total_steps()
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=hp.lr, total_steps=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _total_steps(self) -> int:
        """Optimizer steps in the whole run: every batch of every epoch, capped by ``max_steps``."""
        trainer = self.trainer
        if trainer.max_epochs == -1 and trainer.max_steps == -1:
            raise UserError("model.schedule=onecycle needs a finite run: set trainer.max_epochs or trainer.max_steps")
        trainer.estimated_stepping_batches  # noqa: B018 - loads the train loader, as Lightning does
        per_epoch = batches_in_steps(trainer.train_dataloader, trainer.num_training_batches)
        total = per_epoch * max(trainer.max_epochs, 1) if trainer.max_epochs != -1 else trainer.max_steps
        return int(min(total, trainer.max_steps) if trainer.max_steps != -1 else total)

    def summary(self) -> str:
        """A Keras-like table of the network's layers, output shapes and parameter counts."""
        return summary(self.net)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = f"{type(self).__module__}:{type(self).__qualname__}"


CHECKPOINT_KEY = "fashion_lightning_class"


def loss_and_grads(net: nn.Module, x: Tensor, y: Tensor, optimizer: torch.optim.Optimizer,
                   by_hand: bool = True) -> tuple[Tensor, Tensor]:
    """A batch's mean cross entropy and logits, with ``net``'s gradients set for ``optimizer.step()``.

    By the network's own ``loss_and_grads(x, y)`` where it has one that applies (`DenseNet`, on a CPU) and
    ``by_hand``; else ``optimizer.zero_grad()``, the forward pass and ``backward``. `ImageClassifier`'s
    training step and the benchmarks' plain loops both use it.
    """
    result = net.loss_and_grads(x, y) if by_hand and hasattr(net, "loss_and_grads") else None
    if result is not None:
        return result
    logits = net(x)
    loss = F.cross_entropy(logits, y)
    optimizer.zero_grad()
    loss.backward()
    return loss, logits


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint file on the CPU, with one clear error if it is missing, corrupt or not ours."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"ckpt_path={str(path)!r} does not exist; pass a .ckpt file written by fashion_lightning")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - pickle, zip and torch errors all mean "not a checkpoint"
        raise UserError(f"ckpt_path={str(path)!r} is not a readable checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(checkpoint, dict) or CHECKPOINT_KEY not in checkpoint:
        raise UserError(f"ckpt_path={str(path)!r} is not a fashion_lightning checkpoint (no {CHECKPOINT_KEY!r})")
    return checkpoint


def check_compatible(checkpoint: dict[str, Any], model: ImageClassifier, path: str | Path) -> None:
    """Raise a `UserError` unless the checkpoint's weights fit ``model``'s architecture exactly."""
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in checkpoint.get("state_dict", {}).items()}
    if ours != theirs:
        def arch(hparams: dict[str, Any]) -> dict[str, Any]:
            return {k: v for k, v in hparams.items() if k in ("filters", "kernel_size", "hidden", "hidden1", "hidden2")}

        saved = checkpoint[CHECKPOINT_KEY].split(":")[-1]
        raise UserError(f"ckpt_path={str(path)!r} holds a {saved} {arch(checkpoint.get('hyper_parameters', {}))}, "
                        f"another architecture than the configured {type(model).__name__} {arch(model.hparams)}; "
                        "pass the model config it was trained with")


def load_model(path: str | Path) -> ImageClassifier:
    """Rebuild the trained model saved in a fashion_lightning checkpoint file (on the CPU, in eval mode)."""
    return model_from_checkpoint(read_checkpoint(path))


def model_from_checkpoint(checkpoint: dict[str, Any]) -> ImageClassifier:
    """Rebuild the model of a checkpoint already read with `read_checkpoint` (on the CPU, in eval mode)."""
    module_name, _, class_name = checkpoint[CHECKPOINT_KEY].partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    model = cls(**checkpoint.get("hyper_parameters", {}))
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval()


class CNN(ImageClassifier):
    """The tutorial's CNN (`ConvNet`) as a LightningModule; 804,554 parameters with the defaults.

    Args:
        filters: convolution filters.
        kernel_size: convolution kernel size (any size keeps the 28x28 map).
        hidden: width of the hidden dense layer.
        **optim: `ImageClassifier`'s optimizer and init settings (lr, betas, eps, ...).
    """

    def __init__(self, filters: int = 32, kernel_size: int = 3, hidden: int = 128, **optim: Any) -> None:
        super().__init__(ConvNet(filters, kernel_size, hidden), **optim)


class DenseBaseline(ImageClassifier):
    """The tutorial's dense baseline (`DenseNet`) as a LightningModule; 29,898 parameters with the defaults.

    Args:
        hidden1: width of the first per-row dense layer.
        hidden2: width of the second per-row dense layer.
        **optim: `ImageClassifier`'s optimizer and init settings (lr, betas, eps, ...).
    """

    def __init__(self, hidden1: int = 128, hidden2: int = 64, **optim: Any) -> None:
        super().__init__(DenseNet(hidden1, hidden2), **optim)
