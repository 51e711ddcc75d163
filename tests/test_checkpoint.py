"""Checkpoint reading: the model rebuilt from the file alone, one clear error for a bad or mismatched file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import fit_model
from fashion_lightning import CNN, DenseBaseline, UserError
from fashion_lightning.checkpoint import check_compatible, load_model, read_checkpoint


def test_load_model_rebuilds_the_trained_model_whatever_its_class(data_dir: Path, tmp_path: Path) -> None:
    model = CNN(kernel_size=5, hidden=64)
    trainer = fit_model(model, data_dir, tmp_path, max_steps=3)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    reloaded = load_model(path)
    x = torch.rand(4, 1, 28, 28)
    assert isinstance(reloaded, CNN) and not reloaded.training
    assert torch.equal(reloaded(x), model.eval()(x))


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
    trainer = fit_model(CNN(kernel_size=5), data_dir, tmp_path, max_steps=1)
    path = tmp_path / "k5.ckpt"
    trainer.save_checkpoint(path)
    check_compatible(read_checkpoint(path), CNN(kernel_size=5), path)
    with pytest.raises(UserError, match=r"holds a CNN \{'filters': 32, 'kernel_size': 5, 'hidden': 128\}, another "
                                        r"architecture than the configured CNN \{'filters': 32, 'kernel_size': 3"):
        check_compatible(read_checkpoint(path), CNN(kernel_size=3), path)
    with pytest.raises(UserError, match="another architecture than the configured DenseBaseline"):
        check_compatible(read_checkpoint(path), DenseBaseline(), path)
