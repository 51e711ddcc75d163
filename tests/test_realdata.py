"""The real Fashion-MNIST (Debian package dataset-fashion-mnist): facts from REFERENCE.md, and one epoch learns it."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch
from test_data_idx_files import add_noise

from conftest import compose_train
from fashion_lightning import FashionMNISTDataModule, UserError
from fashion_lightning.data import idx_files as files
from fashion_lightning.data.idx_files import ensure_raw_files
from fashion_lightning.train import train

REAL = Path("/usr/share/datasets/fashion-mnist")
pytestmark = [pytest.mark.realdata,
              pytest.mark.skipif(not (REAL / "train-images-idx3-ubyte.gz").is_file(),
                                 reason=f"real data absent: apt-get install dataset-fashion-mnist (gives {REAL})")]


@pytest.fixture(scope="module")
def real_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("real")
    FashionMNISTDataModule(data_dir=str(folder), source_dir=str(REAL), download=False).prepare_data()
    return folder


def test_real_files_decode_to_the_known_facts(real_data_dir: Path) -> None:
    dm = FashionMNISTDataModule(data_dir=str(real_data_dir), val_split=0, download=False)
    dm.setup()
    images, labels = dm.train_set.images, dm.train_set.labels
    assert images.shape == (60_000, 28, 28) and labels[:3].tolist() == [9, 0, 0] and labels[-3:].tolist() == [3, 0, 5]
    assert torch.bincount(labels).tolist() == [6000] * 10
    scaled = images.float() / 255
    assert abs(scaled.mean().item() - 0.2860) < 5e-4 and abs(scaled.std().item() - 0.3530) < 5e-4


def test_real_files_are_the_originals(real_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = real_data_dir / "FashionMNIST" / "raw"
    for name, sha256 in files.ORIGINAL_SHA256.items():
        assert hashlib.sha256((raw / name).read_bytes()).hexdigest() == sha256, name
    monkeypatch.setattr(files, "DEFAULT_SOURCE_DIR", str(REAL))  # the Debian folder, which must hold the originals
    ensure_raw_files(tmp_path / "data", None, download=False)


def test_noise_in_the_real_train_images_is_named(real_data_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "real"
    shutil.copytree(real_data_dir, copy)
    images = copy / "FashionMNIST" / "raw" / "train-images-idx3-ubyte"
    add_noise(images)
    for record in (True, False):  # with the record of verification and without it (a first run of this version)
        if not record:
            (copy / "FashionMNIST" / files.STAMP).unlink()
        with pytest.raises(UserError, match=f"^{images}: content does not match the original Fashion-MNIST file"):
            FashionMNISTDataModule(data_dir=str(copy), download=False).setup()


def test_one_epoch_of_the_cnn_reaches_87_percent(real_data_dir: Path, tmp_path: Path) -> None:
    cfg = compose_train(f"paths.data_dir={real_data_dir}", f"paths.output_dir={tmp_path}",
                        f"paths.output_root={tmp_path}", "trainer=cpu", "trainer.max_epochs=1", "report=false",
                        "~callbacks.progress_bar", "+trainer.enable_progress_bar=false", "data.download=false")
    results = train(cfg)
    assert results["test_acc"] >= 0.87, results
