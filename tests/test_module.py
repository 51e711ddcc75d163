"""The LightningModules: they learn, reload from a checkpoint alone, predict probabilities, reject bad settings."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision

from fashion_lightning import CNN, DenseBaseline, DenseNet, FashionMNISTDataModule, UserError
from fashion_lightning.module import check_compatible, load_model, read_checkpoint


def fit_briefly(model: L.LightningModule, data_dir: Path, tmp_path: Path, steps: int = 60) -> L.Trainer:
    trainer = L.Trainer(max_steps=steps, limit_val_batches=1, default_root_dir=tmp_path, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(model, datamodule=FashionMNISTDataModule(data_dir=str(data_dir), download=False))
    return trainer


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
    assert before["test/acc"] < 0.3
    assert after["test/acc"] >= 0.9 and after["test/loss"] < before["test/loss"]


def test_checkpoint_reloads_with_load_from_checkpoint_alone(data_dir: Path, tmp_path: Path) -> None:
    model = CNN(kernel_size=5, hidden=64, lr=2e-3, eps=1e-7, keras_init=True)
    trainer = fit_briefly(model, data_dir, tmp_path, steps=5)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    reloaded = CNN.load_from_checkpoint(path)
    assert reloaded.hparams.kernel_size == 5 and reloaded.hparams.hidden == 64 and reloaded.hparams.eps == 1e-7
    assert reloaded.hparams.lr == 2e-3
    x = torch.rand(4, 1, 28, 28)
    model.eval()
    assert torch.equal(reloaded.eval()(x), model(x))
    assert torch.equal(load_model(path)(x), model(x))
    assert isinstance(load_model(path), CNN)


def test_val_acc_best_tracks_the_maximum(data_dir: Path, tmp_path: Path) -> None:
    model = DenseBaseline()
    trainer = L.Trainer(max_epochs=3, limit_train_batches=3, limit_val_batches=2, default_root_dir=tmp_path,
                        logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                        enable_checkpointing=False)
    seen = []
    trainer.callbacks.append(type("Spy", (L.Callback,), {"on_validation_end": lambda self, t, m: t.sanity_checking or
        seen.append((float(t.callback_metrics["val/acc"]), float(t.callback_metrics["val/acc_best"])))})())
    trainer.fit(model, datamodule=FashionMNISTDataModule(data_dir=str(data_dir), download=False))
    assert len(seen) == 3
    assert [best for _, best in seen] == [max(acc for acc, _ in seen[: i + 1]) for i in range(len(seen))]


def test_predict_step_returns_probabilities_and_classes() -> None:
    model = CNN().eval()
    probs, classes = model.predict_step((torch.rand(6, 1, 28, 28), torch.zeros(6)), 0)
    assert probs.shape == (6, 10) and torch.allclose(probs.sum(1), torch.ones(6))
    assert torch.equal(classes, probs.argmax(1))


def test_onecycle_schedule_steps_the_learning_rate(data_dir: Path, tmp_path: Path) -> None:
    model = CNN(schedule="onecycle", lr=0.01)
    trainer = fit_briefly(model, data_dir, tmp_path, steps=10)
    assert trainer.lr_scheduler_configs[0].interval == "step"
    assert trainer.optimizers[0].param_groups[0]["lr"] < 0.001


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"lr": 0}, "model.lr must be a positive number, got 0"),
    ({"lr": -1e-3}, "model.lr must be a positive number, got -0.001"),
    ({"eps": "big"}, "model.eps must be a positive number, got 'big'"),
    ({"schedule": "cosine"}, "model.schedule must be one of constant, onecycle, got 'cosine'"),
])
def test_bad_optimizer_settings(kwargs: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        CNN(**kwargs)


def test_checkpoint_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        read_checkpoint(tmp_path / "missing.ckpt")
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(UserError, match="is not a readable checkpoint"):
        read_checkpoint(corrupt)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(UserError, match="is not a fashion_lightning checkpoint"):
        read_checkpoint(foreign)


def test_checkpoint_of_another_architecture(data_dir: Path, tmp_path: Path) -> None:
    trainer = fit_briefly(CNN(kernel_size=5), data_dir, tmp_path, steps=1)
    path = tmp_path / "k5.ckpt"
    trainer.save_checkpoint(path)
    check_compatible(read_checkpoint(path), CNN(kernel_size=5), path)
    with pytest.raises(UserError, match=r"holds a CNN \{'filters': 32, 'kernel_size': 5, 'hidden': 128\}, another "
                                        r"architecture than the configured CNN \{'filters': 32, 'kernel_size': 3"):
        check_compatible(read_checkpoint(path), CNN(kernel_size=3), path)
    with pytest.raises(UserError, match="another architecture than the configured DenseBaseline"):
        check_compatible(read_checkpoint(path), DenseBaseline(), path)


def fit_grouped(model: L.LightningModule, data_dir: Path, tmp_path: Path, batches_per_step: int,
                **trainer_kwargs: object) -> L.Trainer:
    trainer = L.Trainer(limit_val_batches=1, default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, accelerator="cpu", **trainer_kwargs)
    trainer.fit(model, datamodule=FashionMNISTDataModule(data_dir=str(data_dir), download=False,
                                                         batches_per_step=batches_per_step))
    return trainer


@pytest.mark.parametrize("cls", [CNN, DenseBaseline])
def test_batches_per_step_is_the_same_math(cls: type, data_dir: Path, tmp_path: Path) -> None:
    results = []
    for per_step in (1, 7):  # 7 does not divide the 21 batches: the last list is shorter
        torch.manual_seed(0)
        model = cls(schedule="onecycle")
        trainer = fit_grouped(model, data_dir, tmp_path, per_step, max_epochs=2, limit_train_batches=21 // per_step)
        results.append((trainer.global_step, trainer.callback_metrics["train/acc"],
                        trainer.callback_metrics["train/loss"], model.state_dict()))
    (steps, acc, loss, weights), (steps7, acc7, loss7, weights7) = results
    assert steps == steps7 == 42  # global_step counts optimizer steps, one per batch
    assert torch.equal(acc, acc7) and torch.allclose(loss, loss7, rtol=1e-6)  # the mean sums in another order
    assert all(torch.equal(weights[k], weights7[k]) for k in weights)


def spy_on_the_dense_step_by_hand(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Record, for every call of `DenseNet.loss_and_grads`, whether it computed the step (not ``None``)."""
    by_hand, used = DenseNet.loss_and_grads, []

    def spy(net: DenseNet, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        result = by_hand(net, x, y)
        used.append(result is not None)
        return result

    monkeypatch.setattr(DenseNet, "loss_and_grads", spy)
    return used


def test_the_dense_net_trains_by_hand_as_autograd_would(data_dir: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    results, used = [], spy_on_the_dense_step_by_hand(monkeypatch)
    for autograd in (False, True):
        if autograd:
            monkeypatch.setattr(DenseNet, "loss_and_grads", lambda net, x, y: None)
        torch.manual_seed(0)
        model = DenseBaseline(keras_init=True, schedule="onecycle")
        trainer = fit_grouped(model, data_dir, tmp_path, 4, max_steps=12)
        results.append((trainer.callback_metrics["train/loss"], [p.detach().clone() for p in model.parameters()]))
    assert len(used) == 12 and all(used)  # the first run took every step by hand
    (loss, weights), (loss_ref, weights_ref) = results
    assert torch.allclose(loss, loss_ref, rtol=1e-5)
    for a, b in zip(weights, weights_ref, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_ddp_keeps_autograd_which_averages_its_gradients(data_dir: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    used = spy_on_the_dense_step_by_hand(monkeypatch)
    environ = dict(os.environ)
    try:
        trainer = fit_grouped(DenseBaseline(), data_dir, tmp_path, 1, max_steps=3, strategy="ddp", devices=1)
    finally:  # DDP leaves LOCAL_RANK, MASTER_PORT... and its process group: later runs would think themselves ranks
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(environ)
    assert trainer.global_step == 3 and not used


def test_onecycle_runs_to_its_end_over_grouped_batches(data_dir: Path, tmp_path: Path) -> None:
    model = CNN(schedule="onecycle", lr=0.01)
    trainer = fit_grouped(model, data_dir, tmp_path, 4, max_epochs=2, limit_train_batches=3)
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert trainer.global_step == scheduler.total_steps == scheduler.last_epoch == 24  # to its end, not cut short


def test_max_steps_stops_inside_a_list_of_batches(data_dir: Path, tmp_path: Path) -> None:
    trainer = fit_grouped(CNN(schedule="onecycle"), data_dir, tmp_path, 4, max_steps=10)
    assert trainer.global_step == 10 and trainer.lr_scheduler_configs[0].scheduler.total_steps == 10


def test_a_gradient_scaler_takes_lightnings_full_optimizer_path(data_dir: Path, tmp_path: Path) -> None:
    scaler = torch.amp.GradScaler("cpu")
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    model = DenseBaseline()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = fit_grouped(model, data_dir, tmp_path, 5, max_steps=12, plugins=[plugin])
    assert trainer.global_step == 12 and scaler._scale is not None  # the scaler scaled the losses
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
