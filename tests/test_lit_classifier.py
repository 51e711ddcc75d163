"""The LightningModules by default: they learn, reload, and every Trainer feature works as Lightning documents it."""

from __future__ import annotations

import csv
import functools
import itertools
import json
import math
import re
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.tuner import Tuner
from test_train import run_cli

from conftest import compose_train, fit_model, quick_overrides
from fashion_lightning import CNN, DenseBaseline, FashionMNISTDataModule, UserError
from fashion_lightning.lit.checkpoints import SafeCheckpointIO, load_checkpoint_file, load_model


@pytest.mark.parametrize("cls", [CNN, DenseBaseline])
def test_training_learns_the_synthetic_classes(cls: type, data_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = cls()
    dm = FashionMNISTDataModule(data_dir=str(data_dir), download=False)
    trainer = L.Trainer(max_steps=60, limit_val_batches=1, default_root_dir=tmp_path, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    (before,) = trainer.test(model, datamodule=dm, verbose=False)
    trainer.fit(model, datamodule=dm)
    (after,) = trainer.test(model, datamodule=dm, verbose=False)
    assert model.automatic_optimization and trainer.global_step == 60
    assert before["test/acc"] < 0.3
    assert after["test/acc"] >= 0.9 and after["test/loss"] < before["test/loss"]


def test_checkpoint_reloads_with_load_from_checkpoint_alone(data_dir: Path, tmp_path: Path) -> None:
    model = CNN(kernel_size=5, hidden=64, lr=2e-3, eps=1e-7, keras_init=True)
    trainer = fit_model(model, data_dir, tmp_path, max_steps=5)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    reloaded = CNN.load_from_checkpoint(path)
    assert reloaded.hparams.kernel_size == 5 and reloaded.hparams.hidden == 64 and reloaded.hparams.eps == 1e-7
    assert reloaded.hparams.lr == 2e-3
    x = torch.rand(4, 1, 28, 28)
    assert torch.equal(reloaded.eval()(x), model.eval()(x))


def test_val_acc_best_tracks_the_maximum(data_dir: Path, tmp_path: Path) -> None:
    seen = []
    spy = type("Spy", (L.Callback,), {"on_validation_end": lambda self, t, m: seen.append(
        (float(t.callback_metrics["val/acc"]), float(t.callback_metrics["val/acc_best"])))})()
    fit_model(DenseBaseline(), data_dir, tmp_path, callbacks=(spy,), max_epochs=3, limit_train_batches=3,
              limit_val_batches=2)
    assert len(seen) == 3
    assert [best for _, best in seen] == [max(acc for acc, _ in seen[: i + 1]) for i in range(len(seen))]


def test_predict_step_returns_probabilities_and_classes() -> None:
    model = CNN().eval()
    probs, classes = model.predict_step((torch.rand(6, 1, 28, 28), torch.zeros(6)), 0)
    assert probs.shape == (6, 10) and torch.allclose(probs.sum(1), torch.ones(6))
    assert torch.equal(classes, probs.argmax(1))


def test_onecycle_runs_to_its_end_over_the_fit(data_dir: Path, tmp_path: Path) -> None:
    model = CNN(schedule="onecycle", lr=0.01)
    trainer = fit_model(model, data_dir, tmp_path, max_epochs=2, limit_train_batches=6)
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert trainer.global_step == scheduler.total_steps == scheduler.last_epoch == 12
    assert trainer.optimizers[0].param_groups[0]["lr"] < 0.01 / 10  # annealed down from the peak at the end


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"lr": 0}, "model.lr must be a positive number, got 0"),
    ({"lr": -1e-3}, "model.lr must be a positive number, got -0.001"),
    ({"eps": "big"}, "model.eps must be a positive number, got 'big'"),
    ({"schedule": "step"}, "model.schedule must be one of constant, onecycle, cosine, got 'step'"),
    ({"warmup": 1.0}, r"model.warmup must be a number in \[0, 1.0\), got 1.0"),
    ({"label_smoothing": -0.1}, r"model.label_smoothing must be a number in \[0, 1.0\), got -0.1"),
    ({"weight_decay": -1}, r"model.weight_decay must be a number in \[0, inf\), got -1"),
    ({"betas": (0.9, 1.0)}, r"model.betas must be two numbers in \[0, 1\), got \[0.9, 1.0\]"),
    ({"betas": [0.9]}, r"model.betas must be two numbers in \[0, 1\), got \[0.9\]"),
    ({"betas": 0.9}, r"model.betas must be two numbers in \[0, 1\), got 0.9"),
    ({"lr": 0.01, "optimizer": functools.partial(torch.optim.SGD, lr=0.05)},
     "^model.optimizer replaces model.lr=0.01: set that in model.optimizer, or drop model.optimizer$"),
    ({"betas": [0.8, 0.99], "eps": 1e-7, "optimizer": functools.partial(torch.optim.Adam)},
     r"^model.optimizer replaces model.betas=\[0.8, 0.99\], model.eps=1e-07: set that in model.optimizer"),
    ({"schedule": "cosine", "scheduler": functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1)},
     "^model.scheduler replaces model.schedule='cosine': set that in model.scheduler, or drop model.scheduler$"),
    ({"optimizer": "sgd"}, r"^model.optimizer must be a callable taking the parameters \(a Hydra config with "
                           r"_partial_: true, a functools.partial\) or null, got 'sgd'$"),
    ({"scheduler": {"step_size": 1}}, "^model.scheduler must be a callable taking the optimizer .* got {'step_size'"),
])
def test_bad_optimizer_settings(kwargs: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        CNN(**kwargs)


class Textbook(DenseBaseline):
    """A subclass written the way Lightning's documentation writes a training step."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("my_loss", loss)
        return loss


def test_a_subclass_with_a_textbook_training_step_trains(data_dir: Path, tmp_path: Path) -> None:
    model = Textbook()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = fit_model(model, data_dir, tmp_path, max_steps=8)
    assert trainer.global_step == 8 and "my_loss" in trainer.callback_metrics
    assert "train/acc" not in trainer.callback_metrics  # its step keeps no accuracy: none is reported
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


class GradientsAtStep(L.Callback):
    """Records the gradients the optimizer stepped with (after Lightning's clipping), through a step post-hook."""

    def __init__(self) -> None:
        self.grads: list[list[torch.Tensor]] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.optimizers[0].register_step_post_hook(lambda opt, *_: self.grads.append(
            [p.grad.clone() for group in opt.param_groups for p in group["params"]]))


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_gradient_clipping_clips(algorithm: str, data_dir: Path, tmp_path: Path) -> None:
    clipped, free = GradientsAtStep(), GradientsAtStep()
    for spy, clip in ((clipped, 0.05), (free, None)):
        torch.manual_seed(0)
        fit_model(DenseBaseline(), data_dir, tmp_path, callbacks=(spy,), max_steps=4, gradient_clip_val=clip,
                  gradient_clip_algorithm=algorithm)

    def size(grads: list[torch.Tensor]) -> float:
        flat = torch.cat([g.flatten() for g in grads])
        return float(flat.norm() if algorithm == "norm" else flat.abs().max())

    assert len(clipped.grads) == 4
    assert all(size(g) <= 0.05 * (1 + 1e-5) for g in clipped.grads)
    assert all(size(g) > 0.05 for g in free.grads)  # unclipped they are larger: the clip took effect


def test_gradient_accumulation_steps_once_per_group_of_batches(data_dir: Path, tmp_path: Path) -> None:
    weights = []
    for batch_size, accumulate, batches in ((8, 4, 8), (32, 1, 2)):  # 4 batches of 8 = one of 32, the same samples
        torch.manual_seed(0)
        model = DenseBaseline()
        trainer = fit_model(model, data_dir, tmp_path, max_epochs=1, limit_train_batches=batches,
                            accumulate_grad_batches=accumulate, data={"batch_size": batch_size})
        assert trainer.global_step == 2
        weights.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*weights, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


HOOKS = ("on_before_backward", "on_after_backward", "on_before_optimizer_step", "on_before_zero_grad",
         "on_train_batch_start", "on_train_batch_end")


class CountHooks(L.Callback):
    def __init__(self) -> None:
        self.calls = dict.fromkeys(HOOKS, 0)
        self.grad_norms: list[float] = []

    def __getattribute__(self, name: str) -> Any:
        if name in HOOKS:
            def hook(trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
                self.calls[name] += 1
                if name == "on_after_backward":
                    self.grad_norms.append(float(torch.cat([p.grad.flatten() for p in pl_module.parameters()]).norm()))
            return hook
        return super().__getattribute__(name)


class HookedModule(DenseBaseline):
    def __init__(self) -> None:
        super().__init__()
        self.module_calls = dict.fromkeys(HOOKS[:4], 0)

    def on_before_backward(self, loss: torch.Tensor) -> None:
        self.module_calls["on_before_backward"] += 1

    def on_after_backward(self) -> None:
        self.module_calls["on_after_backward"] += 1

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.module_calls["on_before_optimizer_step"] += 1

    def on_before_zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        self.module_calls["on_before_zero_grad"] += 1


def test_every_backward_and_optimizer_hook_is_called(data_dir: Path, tmp_path: Path) -> None:
    spy, model = CountHooks(), HookedModule()
    for hook in HOOKS:  # Lightning dispatches a hook only where it is overridden
        setattr(CountHooks, hook, lambda *args: None)
    try:
        fit_model(model, data_dir, tmp_path, callbacks=(spy,), max_steps=5)
    finally:
        for hook in HOOKS:
            delattr(CountHooks, hook)
    assert spy.calls == dict.fromkeys(HOOKS, 5) and model.module_calls == dict.fromkeys(HOOKS[:4], 5)
    assert len(spy.grad_norms) == 5 and all(n > 0 for n in spy.grad_norms)  # grad-norm logging gets gradients


class Scheduled(DenseBaseline):
    """A subclass with its own optimizer and scheduler configuration."""

    def __init__(self, interval: str, frequency: int, plateau: bool = False) -> None:
        super().__init__()
        self.interval, self.frequency, self.plateau = interval, frequency, plateau

    def configure_optimizers(self) -> dict:
        optimizer = torch.optim.SGD(self.parameters(), lr=1.0)
        scheduler = (torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=0, threshold=1e9) if self.plateau
                     else torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5))
        config = {"scheduler": scheduler, "interval": self.interval, "frequency": self.frequency}
        return {"optimizer": optimizer, "lr_scheduler": {**config, "monitor": "val/loss"} if self.plateau else config}


SCHEDULES = [("epoch", 1, 3), ("epoch", 2, 1), ("step", 1, 12), ("step", 3, 3), ("step", 5, 0)]


@pytest.mark.parametrize(("interval", "frequency", "expected"), SCHEDULES)
def test_schedulers_step_by_their_interval_and_frequency(interval: str, frequency: int, expected: int, data_dir: Path,
                                                          tmp_path: Path) -> None:
    model = Scheduled(interval, frequency)
    trainer = fit_model(model, data_dir, tmp_path, max_epochs=3, limit_train_batches=4)
    assert trainer.global_step == 12  # 3 epochs of 4 batches; a "step" frequency counts batches within an epoch
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == expected
    assert trainer.optimizers[0].param_groups[0]["lr"] == 0.5**expected


def test_a_plateau_scheduler_reads_its_monitored_metric(data_dir: Path, tmp_path: Path) -> None:
    trainer = fit_model(Scheduled("epoch", 1, plateau=True), data_dir, tmp_path, max_epochs=3, limit_train_batches=2)
    assert trainer.optimizers[0].param_groups[0]["lr"] < 1.0  # an impossible threshold: reduced after each epoch


def test_lr_find_suggests_and_applies_a_learning_rate(data_dir: Path, tmp_path: Path) -> None:
    model = DenseBaseline()
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path)
    finder = Tuner(trainer).lr_find(model, datamodule=FashionMNISTDataModule(data_dir=str(data_dir), download=False),
                                    num_training=30, min_lr=1e-5, max_lr=1.0, early_stop_threshold=None)
    suggestion = finder.suggestion()
    assert isinstance(suggestion, float) and 1e-5 < suggestion < 1.0
    assert len(finder.results["loss"]) == 30 and model.hparams.lr == suggestion  # update_attr applied it


def test_per_step_train_loss_reaches_the_logger_every_n_steps(data_dir: Path, tmp_path: Path) -> None:
    fit_model(CNN(), data_dir, tmp_path, logger=CSVLogger(tmp_path, name="logs", version=""), max_epochs=2,
              limit_train_batches=12, log_every_n_steps=5)
    rows = list(csv.DictReader(open(tmp_path / "logs" / "metrics.csv")))
    step_rows = [int(r["step"]) for r in rows if r["train/loss_step"]]
    assert step_rows == [4, 9, 14, 19]  # Lightning logs at (step + 1) % 5 == 0, 24 steps
    epoch_rows = [(int(r["epoch"]), int(r["step"])) for r in rows if r["train/acc"]]
    assert epoch_rows == [(0, 11), (1, 23)]


def test_fast_dev_run_limits_and_val_check_interval(data_dir: Path, tmp_path: Path) -> None:
    validations = []
    spy = type("Spy", (L.Callback,), {"on_validation_start": lambda self, t, m: validations.append(t.global_step)})()
    trainer = fit_model(DenseBaseline(), data_dir, tmp_path, callbacks=(spy,), fast_dev_run=2)
    assert trainer.global_step == 2 and validations == [2]
    validations.clear()
    trainer = fit_model(DenseBaseline(), data_dir, tmp_path, callbacks=(spy,), max_epochs=1, limit_train_batches=12,
                        val_check_interval=4)
    assert trainer.global_step == 12 and validations == [4, 8, 12]
    validations.clear()
    trainer = fit_model(DenseBaseline(), data_dir, tmp_path, callbacks=(spy,), max_epochs=1, limit_train_batches=0.01)
    assert trainer.global_step == trainer.num_training_batches == int(1719 * 0.01)


def test_checkpoints_every_n_training_steps(data_dir: Path, tmp_path: Path) -> None:
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}", every_n_train_steps=3, save_top_k=-1)
    fit_model(DenseBaseline(), data_dir, tmp_path, callbacks=(checkpoint,), enable_checkpointing=True, max_steps=9)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step=3.ckpt", "step=6.ckpt", "step=9.ckpt"]


def fp16_with_a_scaler() -> MixedPrecision:
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))


@pytest.mark.parametrize(("precision", "dtype"), [("bf16-mixed", torch.float32), ("64-true", torch.float64),
                                                  (fp16_with_a_scaler, torch.float32)])
def test_precision_plugins_train(precision: Any, dtype: torch.dtype, data_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = DenseBaseline()
    before = [p.detach().clone() for p in model.parameters()]
    setting = {"plugins": [precision()]} if callable(precision) else {"precision": precision}
    trainer = fit_model(model, data_dir, tmp_path, max_steps=6, **setting)
    assert trainer.global_step == 6 and all(p.dtype == dtype for p in model.parameters())
    assert all(not torch.equal(a.to(dtype), b) for a, b in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize("cls", [CNN, DenseBaseline])
def test_double_precision_fits_with_lightnings_model_summary(cls: type, data_dir: Path, tmp_path: Path) -> None:
    """ModelSummary runs ``example_input_array`` through the float64 model: it follows the module's dtype."""
    model = cls()
    trainer = fit_model(model, data_dir, tmp_path, max_steps=2, precision="64-true", enable_model_summary=True)
    assert trainer.global_step == 2 and model.dtype == torch.float64
    assert model.example_input_array.dtype == torch.float64 and "Total params" in model.summary()
    assert model.float().example_input_array.dtype == torch.float32


def test_the_app_trains_in_double_precision(data_dir: Path, tmp_path: Path) -> None:
    overrides = [o for o in quick_overrides(data_dir, tmp_path)
                 if not o.startswith(("paths.output", "+trainer.enable_model_summary"))]
    done = run_cli(*overrides, "trainer.precision=64-true", "paths.output_root=outs", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    (run_dir,) = (tmp_path / "outs" / "runs").iterdir()
    assert json.loads((run_dir / "results.json").read_text())["steps"] == 20
    assert "Total Flops" in (run_dir / "train.log").read_text()  # the model summary ran the example input
    weights = load_checkpoint_file(run_dir / "checkpoints" / "best.ckpt")["state_dict"]
    assert weights["net.out.weight"].dtype == torch.float64


def documented_checkpoint(doc: Path) -> ModelCheckpoint:
    """The ``checkpoint`` that the Python block of ``doc`` about metric names with a ``/`` makes, run as written."""
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", doc.read_text(), re.S) if "auto_insert_metric_name" in b]
    namespace: dict[str, Any] = {}
    exec(block, namespace)
    return namespace["checkpoint"]


@pytest.mark.parametrize("plugins", [[], [SafeCheckpointIO()]], ids=["lightning", "SafeCheckpointIO"])
def test_the_documented_checkpoint_names_for_val_acc_are_flat_files(plugins: list, data_dir: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    checkpoint = documented_checkpoint(Path(__file__).parents[1] / "docs" / "api.md")
    fit_model(DenseBaseline(lr=0.01), data_dir, tmp_path, callbacks=(checkpoint,), enable_checkpointing=True,
              max_epochs=4, limit_train_batches=3, limit_val_batches=2, plugins=plugins)
    files = sorted((tmp_path / "checkpoints").iterdir())
    assert len(files) == checkpoint.save_top_k == 2  # two of four kept: two pruned, and no folder made or left
    assert all(f.is_file() and re.fullmatch(r"epoch=\d-val_acc=\d\.\d{3}\.ckpt", f.name) for f in files)
    assert Path(checkpoint.best_model_path).resolve() in [f.resolve() for f in files]


def test_gradient_clipping_clips_under_a_gradient_scaler(data_dir: Path, tmp_path: Path) -> None:
    """16-mixed: Lightning unscales the gradients before the hooks and clipping (a fused Adam would do it itself)."""
    spy = GradientsAtStep()
    torch.manual_seed(0)
    trainer = fit_model(DenseBaseline(), data_dir, tmp_path, callbacks=(spy,), max_steps=6, gradient_clip_val=0.05,
                        plugins=[fp16_with_a_scaler()])
    assert trainer.global_step == 6 and spy.grads  # the scaler skips the steps whose scaled gradients overflowed
    assert all(torch.cat([g.flatten() for g in grads]).norm() <= 0.05 * (1 + 1e-3) for grads in spy.grads)


class LearningRates(L.Callback):
    """Records the learning rate each training step runs with."""

    def __init__(self) -> None:
        self.rates: list[float] = []

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self.rates.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_cosine_warms_up_linearly_then_decays_to_zero(data_dir: Path, tmp_path: Path) -> None:
    spy = LearningRates()
    model = CNN(schedule="cosine", warmup=0.25, lr=0.01)
    trainer = fit_model(model, data_dir, tmp_path, callbacks=(spy,), max_epochs=2, limit_train_batches=8)
    rates = spy.rates
    assert len(rates) == trainer.global_step == 16
    assert rates[:5] == pytest.approx([0.01 * k / 5 for k in range(1, 6)])  # 4 warm-up steps, then the peak
    assert all(a > b for a, b in itertools.pairwise(rates[4:]))  # then down all the way
    assert rates[-1] == pytest.approx(0.01 * (1 - math.cos(math.pi / 12)) / 2)  # the cosine's last step before 0
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_the_fused_cnn_steps_the_cosine_schedule_alike(data_dir: Path, tmp_path: Path) -> None:
    finals = []
    for fused in (False, True):
        torch.manual_seed(0)
        model = CNN(schedule="cosine", warmup=0.1, lr=0.01, fused=fused)
        trainer = fit_model(model, data_dir, tmp_path, max_epochs=2, limit_train_batches=8)
        scheduler = trainer.lr_scheduler_configs[0].scheduler
        finals.append((scheduler.last_epoch, trainer.optimizers[0].param_groups[0]["lr"], model.net.out.weight))
    assert finals[0][:2] == finals[1][:2] == (16, pytest.approx(0.0, abs=1e-12))
    torch.testing.assert_close(finals[0][2], finals[1][2], rtol=1e-4, atol=1e-5)


def test_decoupled_weight_decay_shrinks_the_weights_as_adamw() -> None:
    torch.manual_seed(0)
    for decoupled in (False, True):
        model = DenseBaseline(lr=0.01, weight_decay=0.1, decoupled_weight_decay=decoupled)
        optimizer = model.configure_optimizers()
        before = [p.detach().clone() for p in model.parameters()]
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()
        weight, after = before[0], next(model.parameters()).detach()
        if decoupled:  # AdamW: p <- p * (1 - lr * wd), the gradient (zero) apart
            torch.testing.assert_close(after, weight * (1 - 0.01 * 0.1))
        else:  # Adam's L2: the decay enters the gradient, so each weight moves by about lr
            torch.testing.assert_close((after - weight).abs(), torch.full_like(weight, 0.01), rtol=2e-2, atol=0)


@pytest.mark.parametrize("fused", [False, True])
def test_label_smoothing_changes_the_training_loss_as_cross_entropy_does(fused: bool, data_dir: Path,
                                                                         tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = CNN(label_smoothing=0.2, fused=fused)
    initial = CNN()
    initial.load_state_dict(model.state_dict())
    dm = FashionMNISTDataModule(data_dir=str(data_dir), download=False, seed=0)
    seen = []
    spy = type("Spy", (L.Callback,), {"on_train_batch_start":
                                       lambda self, trainer, module, batch, i: seen.append(batch)})()
    trainer = L.Trainer(max_steps=1, limit_val_batches=1, num_sanity_val_steps=0, logger=False, callbacks=[spy],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", default_root_dir=tmp_path, log_every_n_steps=1)
    trainer.fit(model, datamodule=dm)
    ((x, y),) = seen
    logits = initial(x)
    logged = float(trainer.callback_metrics["train/loss_step"])
    assert logged == pytest.approx(float(F.cross_entropy(logits, y, label_smoothing=0.2)), rel=1e-5)
    assert logged != pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-3)
    (metrics,) = trainer.validate(model, datamodule=dm, verbose=False)
    xv, yv = next(iter(dm.val_dataloader()))  # validation reports the plain cross entropy
    assert metrics["val/loss"] == pytest.approx(
        float(F.cross_entropy(model.eval()(xv), yv)), rel=1e-5)


@pytest.mark.parametrize("fused", [False, True])
def test_eval_flip_averages_the_logits_of_each_image_and_its_mirror(fused: bool, data_dir: Path,
                                                                      tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = CNN(eval_flip=True, fused=fused)
    dm = FashionMNISTDataModule(data_dir=str(data_dir), download=False)
    trainer = fit_model(model, data_dir, tmp_path, max_steps=5)
    (metrics,) = trainer.test(model, datamodule=dm, verbose=False)
    model.eval()
    with torch.no_grad():
        batches = list(dm.test_dataloader())
        logits = torch.cat([(model.net(x) + model.net(x.flip(3))) / 2 for x, _ in batches])
        labels = torch.cat([y for _, y in batches])
        probs, _ = model.predict_step(batches[0][0])
        plain = torch.cat([model.net(x) for x, _ in batches])
    assert metrics["test/loss"] == pytest.approx(float(F.cross_entropy(logits, labels)), rel=1e-5)
    assert metrics["test/loss"] != pytest.approx(float(F.cross_entropy(plain, labels)), rel=1e-4)
    torch.testing.assert_close(probs, logits[: len(probs)].softmax(1), rtol=1e-5, atol=1e-6)


class BatchLosses(L.Callback):
    """Records each training batch's loss and size."""

    def __init__(self) -> None:
        self.seen: list[tuple[float, int]] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.seen.append((float(outputs["loss"]), len(batch[1])))


def test_logged_losses_are_means_over_samples_whatever_the_batch_sizes(data_dir: Path, tmp_path: Path) -> None:
    """Batches of unequal sizes (each split's last one partial) weigh by their samples: train/loss, val/loss and
    test/loss are sample means, not means of batch means (torchmetrics issue #3434)."""
    torch.manual_seed(0)
    model, spy = DenseBaseline(lr=0.01), BatchLosses()
    data = {"val_split": 0.9, "batch_size": 2500, "eval_batch_size": 5300}  # 6,000 training images
    trainer = fit_model(model, data_dir, tmp_path, callbacks=(spy,), max_epochs=1, data=data)
    assert [n for _, n in spy.seen] == [2500, 2500, 1000]
    train_loss = sum(loss * n for loss, n in spy.seen) / 6000
    assert float(trainer.callback_metrics["train/loss"]) == pytest.approx(train_loss, rel=1e-5)
    dm = FashionMNISTDataModule(data_dir=str(data_dir), download=False, **data)
    evaluator = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                          default_root_dir=tmp_path)
    for split, run, sizes in (("val", evaluator.validate, [5300] * 10 + [1000]),
                              ("test", evaluator.test, [5300, 4700])):
        (metrics,) = run(model, datamodule=dm, verbose=False)
        with torch.no_grad():
            batches = [(model(x), y) for x, y in getattr(dm, f"{split}_dataloader")()]
        assert [len(y) for _, y in batches] == sizes
        sample_mean = F.cross_entropy(torch.cat([logits for logits, _ in batches]), torch.cat([y for _, y in batches]))
        assert metrics[f"{split}/loss"] == pytest.approx(float(sample_mean), rel=1e-5)


def test_a_nan_loss_shows_as_nan(data_dir: Path, tmp_path: Path) -> None:
    model = DenseBaseline()
    with torch.no_grad():
        next(model.parameters()).fill_(math.nan)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, limit_val_batches=2)
    (metrics,) = trainer.validate(model, datamodule=FashionMNISTDataModule(data_dir=str(data_dir), download=False),
                                  verbose=False)
    assert math.isnan(metrics["val/loss"])


@pytest.mark.parametrize("override", ["model.betas=[0.8,0.99]",
                                      "model.optimizer={_target_:torch.optim.Adam,_partial_:true,betas:[0.8,0.99]}"])
def test_a_model_from_a_config_without_convert_writes_checkpoints_that_load(override: str, data_dir: Path,
                                                                           tmp_path: Path) -> None:
    """Hydra hands a config without ``_convert_`` its lists as ``ListConfig``s: the hyperparameters hold plain
    lists, so that checkpoints load weights-only (in ``load_model``, the apps, ``load_from_checkpoint``)."""
    cfg = compose_train("model=dense", "~model._convert_", override)
    model = instantiate(cfg.model)
    betas = model.hparams.betas if "optimizer" not in override else model.hparams.optimizer["betas"]
    assert type(betas) is list and betas == [0.8, 0.99]
    trainer = fit_model(model, data_dir, tmp_path, max_steps=2)
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    loaded = load_model(tmp_path / "model.ckpt")
    assert dict(loaded.hparams) == dict(model.hparams)
    x = torch.rand(4, 1, 28, 28)
    assert torch.equal(loaded(x), model.eval()(x))
    assert CNN(betas=(0.8, 0.99)).hparams.betas == [0.8, 0.99]  # a tuple too


def test_an_optimizer_and_a_scheduler_given_as_partials(data_dir: Path, tmp_path: Path) -> None:
    """As lightning-hydra-template's configs give them (``_partial_: true``); checkpoints record them as plain
    Hydra configs, which ``load_from_checkpoint`` rebuilds."""
    model = CNN(optimizer=functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9),
                scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5))
    trainer = fit_model(model, data_dir, tmp_path, max_epochs=2, limit_train_batches=3)
    (optimizer,), (config,) = trainer.optimizers, trainer.lr_scheduler_configs
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["momentum"] == 0.9
    assert config.interval == "epoch" and optimizer.param_groups[0]["lr"] == pytest.approx(0.05 / 4)  # 2 epochs
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    loaded = load_model(tmp_path / "model.ckpt")  # weights-only
    assert loaded.hparams.optimizer == {"_target_": "torch.optim.sgd.SGD", "_partial_": True, "lr": 0.05,
                                        "momentum": 0.9}
    x = torch.rand(4, 1, 28, 28)
    assert torch.equal(loaded(x), model.eval()(x))
    rebuilt = CNN.load_from_checkpoint(tmp_path / "model.ckpt").configure_optimizers()
    assert isinstance(rebuilt["optimizer"], torch.optim.SGD) and rebuilt["optimizer"].defaults["lr"] == 0.05
    assert isinstance(rebuilt["lr_scheduler"]["scheduler"], torch.optim.lr_scheduler.StepLR)


def test_a_plateau_scheduler_given_as_a_partial_reads_val_loss(data_dir: Path, tmp_path: Path) -> None:
    plateau = functools.partial(torch.optim.lr_scheduler.ReduceLROnPlateau, patience=0, threshold=1e9)
    trainer = fit_model(DenseBaseline(scheduler=plateau), data_dir, tmp_path, max_epochs=2, limit_train_batches=2)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-3 * 0.1**2)  # reduced after each epoch


def instantiate_class(cls: type, *args: Any, **kwargs: Any) -> Any:
    return cls(*args, **kwargs)


def test_an_optimizer_callable_that_cannot_be_written_down_trains_and_its_checkpoints_load(data_dir: Path,
                                                                                           tmp_path: Path) -> None:
    """LightningCLI's ``OptimizerCallable`` is a partial of its instantiator: the module trains with it, records
    None in its place, and its checkpoints load for inference."""
    model = DenseBaseline(optimizer=functools.partial(instantiate_class, torch.optim.SGD, lr=0.05))
    trainer = fit_model(model, data_dir, tmp_path, max_steps=2)
    assert isinstance(trainer.optimizers[0], torch.optim.SGD) and model.hparams.optimizer is None
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    x = torch.rand(4, 1, 28, 28)
    assert torch.equal(load_model(tmp_path / "model.ckpt")(x), model.eval()(x))
