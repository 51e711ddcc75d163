"""The app's own Lightning callbacks: the weights' moving average is what validation, checkpoints and the test
evaluate; an interrupted fit saves where it stood; the best checkpoint's record survives a resume."""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint

from conftest import compose_train, fit_model, quick_overrides
from fashion_lightning import CNN, DenseBaseline, FashionMNISTDataModule
from fashion_lightning.lit.callbacks import EMA, FiniteLoss, RunCheckpoint, SaveOnInterrupt, TrainingDiverged
from fashion_lightning.train import train


def test_ema_weights_are_validated_checkpointed_and_tested(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    overrides = [o for o in quick_overrides(data_dir, out) if not o.startswith("+trainer.limit_val")]
    results = train(compose_train("callbacks=ema", "callbacks.ema.decay=0.9", "model=dense", "model.fused=false",
                                  *overrides, "+trainer.limit_val_batches=2", "+trainer.limit_test_batches=3"))
    assert results["tested"].endswith("best.ckpt")
    checkpoint = torch.load(out / "checkpoints" / "best.ckpt", weights_only=False)
    averaged, raw = checkpoint["state_dict"], checkpoint["current_model_state"]
    assert not torch.equal(averaged["net.out.weight"], raw["net.out.weight"])  # the average differs from the raw

    def loss_of(weights: dict, split: str, batches: int) -> float:
        model = DenseBaseline()
        model.load_state_dict(weights)
        dm = FashionMNISTDataModule(data_dir=str(data_dir), download=False, seed=42)  # the app's split
        pairs = list(itertools.islice(getattr(dm, f"{split}_dataloader")(), batches))
        with torch.no_grad():
            return float(F.cross_entropy(model(torch.cat([x for x, _ in pairs])), torch.cat([y for _, y in pairs])))

    assert results["val_loss"] == pytest.approx(loss_of(averaged, "val", 2), rel=1e-5)  # validated: the average
    assert results["test_loss"] == pytest.approx(loss_of(averaged, "test", 3), rel=1e-5)  # tested: the average
    assert results["test_loss"] != pytest.approx(loss_of(raw, "test", 3), rel=1e-4)


def test_a_validation_after_the_fit_evaluates_the_checkpoint_it_loads(data_dir: Path, tmp_path: Path) -> None:
    """Not the fit's last average, which Lightning's callback keeps attached and would swap in."""
    every_epoch = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{epoch}", save_top_k=-1)
    torch.manual_seed(0)
    trainer = fit_model(DenseBaseline(), data_dir, tmp_path, callbacks=(EMA(decay=0.9), every_epoch), max_epochs=2,
                        limit_train_batches=10, enable_checkpointing=True)
    (metrics,) = trainer.validate(trainer.lightning_module, datamodule=trainer.datamodule,
                                  ckpt_path=str(tmp_path / "ckpt" / "epoch=0.ckpt"), verbose=False)
    model = DenseBaseline()
    model.load_state_dict(torch.load(tmp_path / "ckpt" / "epoch=0.ckpt", weights_only=False)["state_dict"])
    x, y = next(iter(trainer.datamodule.val_dataloader()))
    with torch.no_grad():
        assert metrics["val/loss"] == pytest.approx(float(F.cross_entropy(model(x), y)), rel=1e-5)


def test_the_fused_cnn_averages_as_the_plain_one(data_dir: Path, tmp_path: Path) -> None:
    weights = []
    for fused in (False, True):
        torch.manual_seed(0)
        model = CNN(fused=fused)
        fit_model(model, data_dir, tmp_path, callbacks=(EMA(decay=0.8),), max_steps=6)
        weights.append(model.net.out.weight.detach())  # the average, copied in when training ends
    torch.testing.assert_close(weights[0], weights[1], rtol=1e-4, atol=1e-6)


class CrashInTest(L.Callback):
    def on_test_batch_start(self, *args: object) -> None:
        raise RuntimeError("crash in the test")


def test_an_exception_outside_fit_saves_no_interrupted_checkpoint(data_dir: Path, tmp_path: Path) -> None:
    """A test after the fit may run other weights (best.ckpt's) than the loops' counters: no resumable checkpoint."""
    save = SaveOnInterrupt(str(tmp_path / "checkpoints"))
    trainer = fit_model(DenseBaseline(), data_dir, tmp_path, callbacks=(save, CrashInTest()), max_steps=2)
    assert trainer.global_step == 2
    with pytest.raises(RuntimeError, match="crash in the test"):
        trainer.test(trainer.lightning_module, datamodule=trainer.datamodule, verbose=False)
    assert not save.ckpt_path.exists()


class NaNFromStep(DenseBaseline):
    """A dense baseline whose training loss is NaN from optimizer step ``nan_step`` on."""

    def __init__(self, nan_step: int, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.nan_step = nan_step

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step >= self.nan_step else loss


class StepsSeen(L.Callback):
    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        self.steps.append(trainer.global_step)


@pytest.mark.parametrize(("every", "nan_step", "last_step", "kept"), [
    (4, 6, 7, "step=6"),  # looked at every 4 steps: after steps 4-7, as step 7 begins
    (1, 6, 6, "step=6"),  # every step: before step 6's optimizer step
    (50, 5, 5, "step=4"),  # the checkpoint due after step 5 looks first, and is not written
])
def test_a_non_finite_loss_stops_the_fit_within_every_steps_and_saves_no_weights_it_trained(
        every: int, nan_step: int, last_step: int, kept: str, data_dir: Path, tmp_path: Path) -> None:
    seen, save = StepsSeen(), SaveOnInterrupt(str(tmp_path / "checkpoints"))
    periodic = ModelCheckpoint(dirpath=tmp_path / "checkpoints", every_n_train_steps=2)
    with pytest.raises(TrainingDiverged, match=rf"^the training loss became nan at epoch 0, step {nan_step}: "
                                               r"training diverged; lower the learning rate \(model.lr=0.001\)$"):
        fit_model(NaNFromStep(nan_step), data_dir, tmp_path, callbacks=(FiniteLoss(every=every), seen, save, periodic),
                  max_steps=40, enable_checkpointing=True)
    assert seen.steps[-1] == last_step
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [f"epoch=0-{kept}.ckpt"]  # no interrupted.ckpt


def test_a_diverged_fit_names_the_learning_rate_an_optimizer_config_sets(data_dir: Path, tmp_path: Path) -> None:
    sgd = {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.05}
    with pytest.raises(TrainingDiverged, match=r"lower the learning rate \(model.optimizer.lr=0.05\)$"):
        fit_model(NaNFromStep(0, optimizer=sgd), data_dir, tmp_path, callbacks=(FiniteLoss(every=1),), max_steps=3)


@pytest.mark.parametrize("earlier_file", ["kept", "deleted"])
def test_the_best_checkpoint_record_moves_to_a_new_directory_while_its_file_exists(earlier_file: str,
                                                                                  tmp_path: Path) -> None:
    earlier = tmp_path / "earlier" / "best.ckpt"
    earlier.parent.mkdir()
    if earlier_file == "kept":
        earlier.write_bytes(b"a checkpoint")
    saved = ModelCheckpoint(dirpath=earlier.parent, monitor="val/acc", mode="max")
    saved.best_model_path, saved.best_model_score = str(earlier), torch.tensor(0.9)
    saved.best_k_models, saved.kth_best_model_path = {str(earlier): torch.tensor(0.9)}, str(earlier)
    resumed = RunCheckpoint(dirpath=tmp_path / "new", monitor="val/acc", mode="max")
    assert resumed.state_key == saved.state_key  # checkpoints of either class resume with the other
    resumed.load_state_dict(saved.state_dict())
    if earlier_file == "kept":
        assert resumed.best_model_score == 0.9 and resumed.best_k_models == {str(earlier): 0.9}
    else:  # nothing to test against: a fresh record, as Lightning keeps across directories
        assert resumed.best_model_score is None and resumed.best_k_models == {} and resumed.best_model_path == ""


def test_the_run_checkpoints_work_out_their_state_key_once_a_fit(monkeypatch: pytest.MonkeyPatch, data_dir: Path,
                                                                 tmp_path: Path) -> None:
    """Lightning reads every callback's state key at each hook call (six a step); ModelCheckpoint's is a repr."""
    made: Counter[int] = Counter()
    generate = ModelCheckpoint._generate_state_key

    def counted(self: ModelCheckpoint, **kwargs: object) -> str:
        made[id(self)] += 1
        return generate(self, **kwargs)

    monkeypatch.setattr(ModelCheckpoint, "_generate_state_key", counted)
    best = RunCheckpoint(dirpath=tmp_path / "checkpoints", filename="best", monitor="val/acc", mode="max")
    last = RunCheckpoint(dirpath=tmp_path / "checkpoints", filename="last")
    plain = ModelCheckpoint(dirpath=tmp_path / "plain", every_n_epochs=2)  # a key of its own
    fit_model(DenseBaseline(), data_dir, tmp_path, callbacks=(best, last, plain), max_epochs=1,
              limit_train_batches=10, enable_checkpointing=True)
    assert made[id(best)] == made[id(last)] == 1 and made[id(plain)] > 60  # Lightning's own: at every hook call
    assert {p.name for p in (tmp_path / "checkpoints").iterdir()} == {"best.ckpt", "last.ckpt"}

