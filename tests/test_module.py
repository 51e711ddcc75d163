"""The LightningModules: they learn, reload from a checkpoint alone, predict probabilities, reject bad settings."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from fashion_lightning import CNN, DenseBaseline, FashionMNISTDataModule, UserError
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
