"""docs/template.md: the wiring of fashion_lightning into ashleve/lightning-hydra-template, composed from the exact
files the doc shows and run with the template's own test settings and overrides."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig

from fashion_lightning import CNN, FashionMNISTDataModule
from fashion_lightning.lit.checkpoints import load_model

DOCS = Path(__file__).parents[1] / "docs"
CONFIGS = DOCS / "template" / "configs"


def compose_template(*overrides: str) -> DictConfig:
    """The template's ``model`` and ``data`` groups as the doc's files give them."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(overrides=["+model=fashion_cnn", "+data=fashion_mnist", *overrides])


def test_the_doc_shows_the_files_the_tests_compose() -> None:
    doc = (DOCS / "template.md").read_text()
    files = sorted(CONFIGS.rglob("*.yaml"))
    assert [f.relative_to(CONFIGS).as_posix() for f in files] == ["data/fashion_mnist.yaml", "model/fashion_cnn.yaml"]
    for file in files:
        assert f"```yaml\n# configs/{file.relative_to(CONFIGS).as_posix()}" in doc
        assert file.read_text() in doc, f"docs/template.md does not show {file} as it is"


def test_the_template_wiring_trains_and_tests_with_its_test_settings(data_dir: Path, tmp_path: Path) -> None:
    """The template's tests' trainer (1 epoch, limit_train_batches=0.01, limit_val_batches=0.1,
    limit_test_batches=0.1, its checkpoint callback), an SGD partial, and an Optuna trial's override of
    ``model.optimizer.lr``, on a config without ``_convert_``: the template's ``train.py`` instantiates as here."""
    cfg = compose_template(f"+paths.data_dir={data_dir}", "+data.download=false",
                           "model.optimizer._target_=torch.optim.SGD", "model.optimizer.lr=0.0123")
    datamodule, model = instantiate(cfg.data), instantiate(cfg.model)
    assert isinstance(datamodule, FashionMNISTDataModule) and isinstance(model, CNN)
    assert datamodule.num_classes == 10
    datamodule.setup()
    assert len(datamodule.train_set) + len(datamodule.val_set) + len(datamodule.test_set) == 70_000
    x, y = next(iter(datamodule.train_dataloader()))
    assert len(x) == len(y) == 128 and x.dtype == torch.float32 and y.dtype == torch.int64

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "checkpoints", monitor="val/acc", mode="max", save_last=True)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=0.01, limit_val_batches=0.1, limit_test_batches=0.1,
                        accelerator="cpu", devices=1, logger=False, callbacks=[checkpoint], enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=datamodule)
    (optimizer,), (scheduler,) = trainer.optimizers, trainer.lr_scheduler_configs
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.param_groups[0]["lr"] == pytest.approx(0.0123)
    assert isinstance(scheduler.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    assert trainer.global_step == 4 and trainer.num_val_batches == [2]  # 430 training batches of 128; 20 of 250
    (metrics,) = trainer.test(model, datamodule=datamodule, ckpt_path="best", verbose=False)
    assert trainer.num_test_batches == [4] and {"test/acc", "test/loss"} <= metrics.keys()
    loaded = load_model(checkpoint.best_model_path)  # weights-only
    assert loaded.hparams.optimizer == {"_target_": "torch.optim.sgd.SGD", "_partial_": True, "lr": 0.0123,
                                        "weight_decay": 0.0}
