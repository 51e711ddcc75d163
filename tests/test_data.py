"""FashionMNISTDataModule, BatchLoader and finding/validating the files."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from conftest import N_TEST, N_TRAIN, write_idx
from fashion_lightning import CLASS_NAMES, BatchLoader, DenseBaseline, FashionMNISTDataModule, UserError
from fashion_lightning.data import ensure_raw_files

RAW = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def copy_source(fmnist_source: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "source"
    shutil.copytree(fmnist_source, folder)
    return folder


@pytest.fixture(scope="module")
def datamodule(data_dir: Path) -> FashionMNISTDataModule:
    dm = FashionMNISTDataModule(data_dir=str(data_dir), download=False)
    dm.setup()
    return dm


def test_extracts_gz_source_into_torchvision_layout(fmnist_source: Path, tmp_path: Path) -> None:
    raw = ensure_raw_files(tmp_path / "data", str(fmnist_source), download=False)
    assert raw == tmp_path / "data" / "FashionMNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(RAW)
    assert (raw / "train-images-idx3-ubyte").stat().st_size == 16 + N_TRAIN * 784


def test_existing_layout_needs_no_source(data_dir: Path, tmp_path: Path) -> None:
    dm = FashionMNISTDataModule(data_dir=str(data_dir), source_dir=str(tmp_path / "nowhere"), download=False)
    dm.prepare_data()  # the explicit but absent source is never consulted: the files are already there
    dm.setup()
    assert len(dm.test_set[1]) == N_TEST


def test_source_from_environment_variable(fmnist_source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASHION_MNIST_DIR", str(fmnist_source))
    dm = FashionMNISTDataModule(data_dir=str(tmp_path / "data"), download=False)
    dm.prepare_data()
    assert (tmp_path / "data" / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte").is_file()


def test_environment_variable_pointing_nowhere_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match=r"\$FASHION_MNIST_DIR='.*nowhere' lacks the Fashion-MNIST files"):
        FashionMNISTDataModule(data_dir=str(tmp_path / "data"), download=False).prepare_data()


def test_missing_dataset_names_the_three_fixes(tmp_path: Path) -> None:
    with pytest.raises(UserError) as info:
        ensure_raw_files(tmp_path / "data", None, download=False)
    message = str(info.value)
    assert "(1) put torchvision's layout there" in message
    assert "apt-get install dataset-fashion-mnist" in message and "FASHION_MNIST_DIR" in message
    assert "(3) allow torchvision's download" in message


def test_uncompressed_source_files_work_too(fmnist_source: Path, tmp_path: Path) -> None:
    folder = tmp_path / "plain"
    folder.mkdir()
    for name in RAW:
        with gzip.open(fmnist_source / f"{name}.gz") as src:
            (folder / name).write_bytes(src.read())
    ensure_raw_files(tmp_path / "data", str(folder), download=False)
    assert (tmp_path / "data" / "FashionMNIST" / "raw" / RAW[0]).stat().st_size == 16 + N_TRAIN * 784


@pytest.mark.parametrize(
    ("name", "corrupt", "message"),
    [
        ("train-images-idx3-ubyte.gz", lambda p: p.write_bytes(p.read_bytes()[:5000]), "corrupt or truncated gzip"),
        ("t10k-labels-idx1-ubyte.gz", lambda p: p.write_bytes(b"not gzip at all"), "corrupt or truncated gzip"),
        ("t10k-images-idx3-ubyte.gz", lambda p: write_idx(p, np.zeros((N_TEST, 28, 28)), magic=2049),
         "wrong IDX magic number 2049, expected 2051"),
        ("t10k-images-idx3-ubyte.gz", lambda p: write_idx(p, np.zeros((N_TEST, 28, 27))),
         r"IDX shape \[10000, 28, 27\]"),
        ("t10k-labels-idx1-ubyte.gz", lambda p: write_idx(p, np.zeros(N_TEST - 1)), r"IDX shape \[9999\]"),
        ("t10k-labels-idx1-ubyte.gz", lambda p: p.write_bytes(gzip.compress(gzip.decompress(p.read_bytes())[:-3])),
         "10005 bytes, expected 10008"),
    ],
)
def test_bad_files_are_named_and_never_extracted(fmnist_source: Path, tmp_path: Path, name: str, corrupt,
                                                 message: str) -> None:
    source = copy_source(fmnist_source, tmp_path)
    corrupt(source / name)
    with pytest.raises(UserError, match=message) as info:
        ensure_raw_files(tmp_path / "data", str(source), download=False)
    assert name in str(info.value)
    raw = tmp_path / "data" / "FashionMNIST" / "raw"
    assert not (raw / name.removesuffix(".gz")).exists()
    assert not list(raw.glob("*.partial"))


def test_truncated_file_already_in_data_dir(data_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    labels = copy / "FashionMNIST" / "raw" / "train-labels-idx1-ubyte"
    labels.write_bytes(labels.read_bytes()[:-10])
    with pytest.raises(UserError, match="train-labels-idx1-ubyte: 59998 bytes, expected 60008"):
        FashionMNISTDataModule(data_dir=str(copy), download=False).setup()


def test_label_out_of_range(fmnist_source: Path, tmp_path: Path) -> None:
    source = copy_source(fmnist_source, tmp_path)
    write_idx(source / "t10k-labels-idx1-ubyte.gz", np.full(N_TEST, 12))
    with pytest.raises(UserError, match="t10k-labels-idx1-ubyte: label 12 outside 0..9"):
        FashionMNISTDataModule(data_dir=str(tmp_path / "data"), source_dir=str(source), download=False).setup()


def test_unwritable_data_dir(fmnist_source: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    with pytest.raises(UserError, match="is not writable"):
        ensure_raw_files(blocker / "data", str(fmnist_source), download=False)


def test_splits_sizes_disjoint_and_test_untouched(datamodule: FashionMNISTDataModule) -> None:
    (train_x, train_y), (val_x, val_y), (test_x, test_y) = datamodule.train_set, datamodule.val_set, datamodule.test_set
    assert (len(train_y), len(val_y), len(test_y)) == (55_000, 5_000, 10_000)
    assert train_x.shape == (55_000, 28, 28) and train_x.dtype == torch.uint8 and train_y.dtype == torch.int64
    train_rows = {bytes(r) for r in train_x[:3000].reshape(3000, -1).numpy()}
    assert not any(bytes(r) in train_rows for r in val_x.reshape(5000, -1).numpy())
    assert not torch.equal(val_x[:100], test_x[:100])


def test_split_is_seeded(data_dir: Path, datamodule: FashionMNISTDataModule) -> None:
    same = FashionMNISTDataModule(data_dir=str(data_dir), download=False)
    other = FashionMNISTDataModule(data_dir=str(data_dir), download=False, seed=1)
    same.setup()
    other.setup()
    assert torch.equal(same.val_set[0], datamodule.val_set[0])
    assert not torch.equal(other.val_set[0], datamodule.val_set[0])


def test_setup_is_idempotent(datamodule: FashionMNISTDataModule) -> None:
    before = datamodule.train_set
    datamodule.setup("fit")
    datamodule.setup("test")
    assert datamodule.train_set is before


@pytest.mark.parametrize(("val_split", "n_val"), [(0.1, 6000), (1234, 1234), (0, 10_000)])
def test_val_split_count_fraction_or_test_set(data_dir: Path, val_split: float, n_val: int) -> None:
    dm = FashionMNISTDataModule(data_dir=str(data_dir), val_split=val_split, download=False)
    dm.setup()
    assert len(dm.val_set[1]) == n_val
    assert len(dm.train_set[1]) == (60_000 if val_split == 0 else 60_000 - n_val)
    if val_split == 0:
        assert dm.val_set is dm.test_set


@pytest.mark.parametrize("val_split", [-1, 60_000, 1.5, "half", True, 12.5])
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


def make_loader(**kwargs) -> BatchLoader:
    images = torch.arange(103, dtype=torch.uint8).view(103, 1, 1).expand(103, 28, 28)
    return BatchLoader(images, torch.arange(103), 10, **kwargs)


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


def test_loader_follows_the_trainers_epoch() -> None:
    loader = make_loader(shuffle=True, epoch_of=lambda: 4)
    fourth = torch.cat([y for _, y in loader])
    reference = make_loader(shuffle=True)
    for _ in range(4):
        list(reference)
    assert torch.equal(fourth, torch.cat([y for _, y in reference]))


def test_grouped_loader_hands_out_the_same_batches_in_lists() -> None:
    single = [(x, y) for x, y in make_loader(shuffle=True, seed=5)]
    grouped = make_loader(shuffle=True, seed=5, batches_per_step=4)
    lists = list(grouped)
    assert len(grouped) == len(lists) == 3 and grouped.num_batches == 11
    assert [len(group) for group in lists] == [4, 4, 3]  # 103 items: 10 full batches and one of 3
    flat = [batch for group in lists for batch in group]
    assert len(flat) == len(single)
    for (x, y), (gx, gy) in zip(single, flat, strict=True):
        assert torch.equal(x, gx) and torch.equal(y, gy)


def test_grouped_loader_resumes_after_the_last_list() -> None:
    expected = [y for group in make_loader(shuffle=True, batches_per_step=4) for _, y in group]
    loader = make_loader(shuffle=True, batches_per_step=4)
    it = iter(loader)
    head = [y for _, y in next(it)]
    resumed = make_loader(shuffle=True, batches_per_step=4, epoch_of=lambda: 0)
    resumed.load_state_dict(loader.state_dict())
    rest = [y for group in resumed for _, y in group]
    assert all(torch.equal(a, b) for a, b in zip(head + rest, expected, strict=True))


def test_grouping_is_for_training_on_one_device_only(data_dir: Path) -> None:
    dm = FashionMNISTDataModule(data_dir=str(data_dir), download=False, batches_per_step=8)
    assert dm.train_dataloader().batches_per_step == 8
    assert dm.val_dataloader().batches_per_step == dm.test_dataloader().batches_per_step == 1
    ddp = FashionMNISTDataModule(data_dir=str(data_dir), download=False, batches_per_step=8)
    ddp.trainer = L.Trainer(accelerator="cpu", strategy="ddp", devices=1, logger=False)
    assert ddp.train_dataloader().batches_per_step == 1  # DDP synchronises once per forward of its wrapper


def test_bad_batches_per_step() -> None:
    with pytest.raises(UserError, match="data.batches_per_step must be a positive integer, got 0"):
        FashionMNISTDataModule(batches_per_step=0)


def test_a_datamodule_reused_by_a_new_trainer_starts_at_its_epoch_0(data_dir: Path, tmp_path: Path) -> None:
    dm = FashionMNISTDataModule(data_dir=str(data_dir), download=False)
    for epochs in (2, 1):
        trainer = L.Trainer(max_epochs=epochs, limit_train_batches=2, limit_val_batches=1, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            accelerator="cpu", default_root_dir=tmp_path)
        trainer.fit(DenseBaseline(), datamodule=dm)
    assert dm.train_dataloader().state_dict()["epoch"] == 0  # the order of the second trainer's first epoch
