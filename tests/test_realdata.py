"""The real Fashion-MNIST (Debian package dataset-fashion-mnist): facts from REFERENCE.md, and one epoch learns it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import compose_train
from fashion_lightning import FashionMNISTDataModule
from fashion_lightning.train import train

REAL = Path("/usr/share/datasets/fashion-mnist")
pytestmark = pytest.mark.skipif(not (REAL / "train-images-idx3-ubyte.gz").is_file(),
                                reason=f"real data absent: apt-get install dataset-fashion-mnist (gives {REAL})")


@pytest.fixture(scope="module")
def real_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("real")
    FashionMNISTDataModule(data_dir=str(folder), source_dir=str(REAL), download=False).prepare_data()
    return folder


def test_real_files_decode_to_the_known_facts(real_data_dir: Path) -> None:
    dm = FashionMNISTDataModule(data_dir=str(real_data_dir), val_split=0, download=False)
    dm.setup()
    images, labels = dm.train_set
    assert images.shape == (60_000, 28, 28) and labels[:3].tolist() == [9, 0, 0] and labels[-3:].tolist() == [3, 0, 5]
    assert torch.bincount(labels).tolist() == [6000] * 10
    scaled = images.float() / 255
    assert abs(scaled.mean().item() - 0.2860) < 5e-4 and abs(scaled.std().item() - 0.3530) < 5e-4


def test_one_epoch_of_the_cnn_reaches_87_percent(real_data_dir: Path, tmp_path: Path) -> None:
    cfg = compose_train(f"paths.data_dir={real_data_dir}", f"paths.output_dir={tmp_path}",
                        f"paths.output_root={tmp_path}", "trainer=cpu", "trainer.max_epochs=1", "report=false",
                        "~callbacks.progress_bar", "+trainer.enable_progress_bar=false", "data.download=false")
    results = train(cfg)
    assert results["test_acc"] >= 0.87, results
