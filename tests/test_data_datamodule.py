"""FashionMNISTDataModule and BatchLoader: splits, batches, shards, resumable order, Lightning's data features."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from test_train import run_cli

from conftest import quick_overrides
from fashion_lightning import CLASS_NAMES, BatchLoader, DenseBaseline, FashionMNISTDataModule, UserError


@pytest.fixture(scope="module")
def datamodule(data_dir: Path) -> FashionMNISTDataModule:
    dm = FashionMNISTDataModule(data_dir=str(data_dir), download=False)
    dm.setup()
    return dm


def test_splits_sizes_disjoint_and_test_untouched(datamodule: FashionMNISTDataModule) -> None:
    (train_x, train_y), (val_x, val_y), (test_x, test_y) = ((split.images, split.labels) for split in (
        datamodule.train_set, datamodule.val_set, datamodule.test_set))
    assert (len(datamodule.train_set), len(datamodule.val_set), len(datamodule.test_set)) == (55_000, 5_000, 10_000)
    assert train_x.shape == (55_000, 28, 28) and train_x.dtype == torch.uint8 and train_y.dtype == torch.int64
    train_rows = {bytes(r) for r in train_x[:3000].reshape(3000, -1).numpy()}
    assert not any(bytes(r) in train_rows for r in val_x.reshape(5000, -1).numpy())
    assert not torch.equal(val_x[:100], test_x[:100])


def test_split_is_seeded(data_dir: Path, datamodule: FashionMNISTDataModule) -> None:
    same = FashionMNISTDataModule(data_dir=str(data_dir), download=False)
    other = FashionMNISTDataModule(data_dir=str(data_dir), download=False, seed=1)
    same.setup()
    other.setup()
    assert torch.equal(same.val_set.images, datamodule.val_set.images)
    assert not torch.equal(other.val_set.images, datamodule.val_set.images)


@pytest.mark.parametrize("scale", [True, False])
def test_splits_are_datasets_of_the_batches_items(data_dir: Path, scale: bool) -> None:
    """What torchvision's datasets and the Lightning template's datamodules give: ``Dataset``s with ``len()`` and
    items (image, label), read as a ``DataLoader`` reads them; and ``num_classes``."""
    dm = FashionMNISTDataModule(data_dir=str(data_dir), download=False, scale=scale)
    dm.setup()
    assert dm.num_classes == len(CLASS_NAMES) == 10
    assert all(isinstance(s, torch.utils.data.Dataset) for s in (dm.train_set, dm.val_set, dm.test_set))
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (55_000, 5_000, 10_000)
    image, label = dm.test_set[3]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32 and label.dtype == torch.int64
    assert torch.equal(image, dm.test_set.images[3][None].float() / (255 if scale else 1))
    loader = torch.utils.data.DataLoader(dm.val_set, batch_size=dm.hparams.eval_batch_size)
    for (x, y), (bx, by) in zip(loader, dm.val_dataloader(), strict=True):
        assert torch.equal(x, bx) and torch.equal(y, by)
    with pytest.raises(IndexError):
        dm.test_set[10_000]


def test_a_fraction_of_the_validation_batches_reads_some(data_dir: Path, tmp_path: Path) -> None:
    """``limit_val_batches=0.1``, as Lightning users and lightning-hydra-template's tests set it: at least one
    batch with the default evaluation batch size."""
    dm = FashionMNISTDataModule(data_dir=str(data_dir), download=False)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, limit_val_batches=0.1, limit_test_batches=0.1)
    (metrics,) = trainer.validate(DenseBaseline(), datamodule=dm, verbose=False)
    assert trainer.num_val_batches == [2] and 0 <= metrics["val/acc"] <= 1  # 10 % of 20 batches of 250
    trainer.test(DenseBaseline(), datamodule=dm, verbose=False)
    assert trainer.num_test_batches == [4]


def test_setup_is_idempotent(datamodule: FashionMNISTDataModule) -> None:
    before = datamodule.train_set
    datamodule.setup("fit")
    datamodule.setup("test")
    assert datamodule.train_set is before


@pytest.mark.parametrize(("val_split", "n_val"), [(0.1, 6000), (1234, 1234), (0, 10_000)])
def test_val_split_count_fraction_or_test_set(data_dir: Path, val_split: float, n_val: int) -> None:
    dm = FashionMNISTDataModule(data_dir=str(data_dir), val_split=val_split, download=False)
    dm.setup()
    assert len(dm.val_set) == n_val
    assert len(dm.train_set) == (60_000 if val_split == 0 else 60_000 - n_val)
    if val_split == 0:
        assert dm.val_set is dm.test_set


@pytest.mark.parametrize("val_split", [-1, 60_000, 1.0, 1.5, "half", True, 12.5, 5000.0, 0.99999999, 1e-9])
def test_bad_val_split(val_split: object) -> None:
    with pytest.raises(UserError, match=f"data.val_split must be .* got {val_split!r}"):
        FashionMNISTDataModule(val_split=val_split)


@pytest.mark.parametrize("batch_size", [0, -32, 2.5])
def test_bad_batch_size(batch_size: object) -> None:
    with pytest.raises(UserError, match=f"data.batch_size must be a positive integer, got {batch_size!r}"):
        FashionMNISTDataModule(batch_size=batch_size)


def test_batches_scaled_float_in_unit_range(datamodule: FashionMNISTDataModule) -> None:
    x, y = next(iter(datamodule.train_dataloader()))
    assert x.shape == (32, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.5
    assert len(datamodule.train_dataloader()) == 1719  # ceil(55000 / 32), the last batch partial as in Keras
    assert datamodule.classes == CLASS_NAMES and len(CLASS_NAMES) == 10 and CLASS_NAMES[9] == "Ankle boot"


def test_unscaled_pixels_are_raw_0_255(data_dir: Path) -> None:
    dm = FashionMNISTDataModule(data_dir=str(data_dir), scale=False, download=False)
    x, _ = next(iter(dm.test_dataloader()))
    assert x.dtype == torch.float32 and x.max() > 1.0 and torch.equal(x, x.round())


def make_loader(batch_size: int = 10, **kwargs) -> BatchLoader:
    images = torch.arange(103, dtype=torch.uint8).view(103, 1, 1).expand(103, 28, 28)
    return BatchLoader(images, torch.arange(103), batch_size, **kwargs)


def test_loader_epochs_cover_everything_in_new_orders() -> None:
    loader = make_loader(shuffle=True, seed=3)
    first = torch.cat([y for _, y in loader])
    second = torch.cat([y for _, y in loader])
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(103))
    assert not torch.equal(first, second)
    assert torch.equal(first, torch.cat([y for _, y in make_loader(shuffle=True, seed=3)]))


def test_loader_shards_ranks_like_distributed_sampler() -> None:
    train = [make_loader(shuffle=True, rank=r, world_size=2) for r in range(2)]
    assert len(train[0]) == len(train[1]) == 6
    seen = torch.cat([y for loader in train for _, y in loader])
    assert len(seen) == 104 and set(seen.tolist()) == set(range(103))  # padded by one, like DistributedSampler
    evaluation = [make_loader(rank=r, world_size=2) for r in range(2)]
    counted = torch.cat([y for loader in evaluation for _, y in loader])
    assert sorted(counted.tolist()) == list(range(103))  # every item exactly once


def test_loader_resumes_mid_epoch() -> None:
    reference = make_loader(shuffle=True)
    next(iter(reference))  # epoch 0
    expected = [y for _, y in reference]  # epoch 1
    loader = make_loader(shuffle=True)
    list(loader)
    it = iter(loader)
    head = [next(it)[1] for _ in range(4)]
    state = loader.state_dict()
    resumed = make_loader(shuffle=True, epoch_of=lambda: 1)  # the trainer's restored epoch
    resumed.load_state_dict(state)
    rest = [y for _, y in resumed]
    assert all(torch.equal(a, b) for a, b in zip(head + rest, expected, strict=True))


def test_a_position_within_an_epoch_resumes_only_with_its_batch_size() -> None:
    loader = make_loader(shuffle=True)
    it = iter(loader)
    for _ in range(4):
        next(it)
    within, ended = loader.state_dict(), {**loader.state_dict(), "position": len(loader)}
    other = make_loader(shuffle=True, batch_size=loader.batch_size * 2)
    with pytest.raises(UserError, match=f"stopped 4 batches of {loader.batch_size} into an epoch; resume it with "
                                        f"data.batch_size={loader.batch_size}"):
        other.load_state_dict(within)
    other.load_state_dict(ended)  # an epoch's end: the next epoch starts at 0 whatever the batch size
    make_loader(shuffle=True).load_state_dict(within)


def test_new_train_loaders_outside_a_trainer_read_the_next_epochs(data_dir: Path) -> None:
    """As a DataLoader(shuffle=True) in a plain loop: every pass a new order, reproducibly."""
    dm = FashionMNISTDataModule(data_dir=str(data_dir), download=False, batch_size=5000)
    epochs = [torch.cat([y for _, y in dm.train_dataloader()]) for _ in range(3)]  # a new loader each epoch
    dm.setup()
    reference = BatchLoader(dm.train_set.images, dm.train_set.labels, 5000, shuffle=True)  # counts its own passes
    assert all(torch.equal(e, torch.cat([y for _, y in reference])) for e in epochs)
    assert not torch.equal(epochs[0], epochs[1]) and not torch.equal(epochs[1], epochs[2])
    again = FashionMNISTDataModule(data_dir=str(data_dir), download=False, batch_size=5000)
    loader = again.train_dataloader()
    first, second = (torch.cat([y for _, y in loader]) for _ in range(2))  # one loader twice, then a new one
    third = torch.cat([y for _, y in again.train_dataloader()])
    assert torch.equal(first, epochs[0]) and torch.equal(second, epochs[1]) and torch.equal(third, epochs[2])


def test_loader_follows_the_trainers_epoch() -> None:
    loader = make_loader(shuffle=True, epoch_of=lambda: 4)
    fourth = torch.cat([y for _, y in loader])
    reference = make_loader(shuffle=True)
    for _ in range(4):
        list(reference)
    assert torch.equal(fourth, torch.cat([y for _, y in reference]))


class FirstBatches(L.Callback):
    """Records the labels of every training batch, per epoch."""

    def __init__(self) -> None:
        self.labels: dict[int, list[torch.Tensor]] = {}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: object,
                             batch_idx: int) -> None:
        self.labels.setdefault(trainer.current_epoch, []).append(batch[1].clone())


def fit(dm: FashionMNISTDataModule, tmp_path: Path, **trainer_kwargs: object) -> tuple[L.Trainer, FirstBatches]:
    spy = FirstBatches()
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", default_root_dir=tmp_path, callbacks=[spy], **trainer_kwargs)
    trainer.fit(DenseBaseline(), datamodule=dm)
    return trainer, spy


def test_a_datamodule_reused_by_a_new_trainer_starts_at_its_epoch_0(data_dir: Path, tmp_path: Path) -> None:
    dm = FashionMNISTDataModule(data_dir=str(data_dir), download=False)
    (_, first), (_, again) = (fit(dm, tmp_path, max_epochs=epochs, limit_train_batches=2, limit_val_batches=1)
                              for epochs in (2, 1))
    assert not torch.equal(first.labels[0][0], first.labels[1][0])  # each epoch its own order
    assert torch.equal(again.labels[0][0], first.labels[0][0])  # the second trainer's epoch 0 is epoch 0


def test_overfit_batches_repeats_the_same_unshuffled_batches(data_dir: Path, tmp_path: Path) -> None:
    dm = FashionMNISTDataModule(data_dir=str(data_dir), download=False)
    trainer, spy = fit(dm, tmp_path, max_epochs=3, overfit_batches=2)
    assert trainer.num_training_batches == 2 and sorted(spy.labels) == [0, 1, 2]
    for epoch in (1, 2):
        assert all(torch.equal(a, b) for a, b in zip(spy.labels[epoch], spy.labels[0], strict=True))
    dm.setup()
    assert torch.equal(spy.labels[0][0], dm.train_set.labels[:32])  # in the data's own order, as Lightning does


def test_scale_batch_size_finds_a_size_and_trains_with_it(data_dir: Path, tmp_path: Path) -> None:
    from lightning.pytorch.tuner import Tuner

    dm = FashionMNISTDataModule(data_dir=str(data_dir), download=False, batch_size=2)
    spy = FirstBatches()
    trainer = L.Trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=1, logger=False, accelerator="cpu",
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, callbacks=[spy])
    model = DenseBaseline()
    found = Tuner(trainer).scale_batch_size(model, datamodule=dm, mode="power", steps_per_trial=1, init_val=4,
                                            max_trials=3)
    assert found == 16 and dm.hparams.batch_size == 16  # trials of 4, 8, 16: no memory error on this CPU
    trainer.fit(model, datamodule=dm)
    assert [len(labels) for labels in spy.labels[0]] == [16, 16, 16]  # the size found is the size fed


def test_num_workers_and_pin_memory_are_accepted_with_a_warning_and_change_nothing(data_dir: Path) -> None:
    with pytest.warns(UserWarning, match=r"^data.num_workers=2 and data.pin_memory=True have no effect: the images "
                                         r"are held in memory"):
        dm = FashionMNISTDataModule(data_dir=str(data_dir), download=False, num_workers=2, pin_memory=True)
    plain = FashionMNISTDataModule(data_dir=str(data_dir), download=False)
    assert "num_workers" not in dm.hparams and dict(dm.hparams) == dict(plain.hparams)
    (x, y), (px, py) = next(iter(dm.train_dataloader())), next(iter(plain.train_dataloader()))
    assert torch.equal(x, px) and torch.equal(y, py)
    with pytest.warns(UserWarning, match=r"^data.num_workers=4 has no effect"):
        FashionMNISTDataModule(num_workers=4)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"num_workers": -1}, "data.num_workers must be an integer >= 0, got -1"),
    ({"num_workers": 2.5}, "data.num_workers must be an integer >= 0, got 2.5"),
    ({"num_workers": True}, "data.num_workers must be an integer >= 0, got True"),
    ({"pin_memory": "yes"}, "data.pin_memory must be true or false, got 'yes'"),
])
def test_bad_num_workers_or_pin_memory(kwargs: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        FashionMNISTDataModule(**kwargs)


def test_the_app_trains_with_num_workers_given_and_says_it_has_no_effect(data_dir: Path, tmp_path: Path) -> None:
    overrides = [o for o in quick_overrides(data_dir, tmp_path) if not o.startswith("paths.output")]
    done = run_cli(*overrides, "model=dense", "data.num_workers=2", "paths.output_root=outs", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    (run_dir,) = (tmp_path / "outs" / "runs").iterdir()
    assert json.loads((run_dir / "results.json").read_text())["steps"] == 20
    log = (run_dir / "train.log").read_text()
    assert log.count("data.num_workers=2 has no effect: the images are held in memory") == 1
