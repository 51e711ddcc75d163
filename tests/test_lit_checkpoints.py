"""Checkpoint reading: the model rebuilt from the file alone, one clear error for a bad, damaged, unsafe or
mismatched file, and nothing in a file ever runs code."""

from __future__ import annotations

import os
import shlex
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from conftest import compose_train, fit_model, one_line_error, quick_overrides
from fashion_lightning import CNN, ConvNet, DenseBaseline, FusedConvNet, UserError
from fashion_lightning.app import CONFIG_DIR
from fashion_lightning.lit.checkpoints import SafeCheckpointIO, check_compatible, load_model, read_checkpoint
from fashion_lightning.lit.classifier import CHECKPOINT_KEY


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


class RunsAShellCommand:
    """Unpickled, runs ``touch marker`` (what ``weights_only=False`` would do with it)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


class CreatesAFile(RunsAShellCommand):
    """Unpickled, creates ``marker`` with ``open``."""

    def __reduce__(self) -> tuple:
        return open, (str(self.marker), "w")


def crafted(path: Path, payload: object) -> Path:
    """A checkpoint looking like ours (a CNN's key and weights) that also holds ``payload``."""
    torch.save({CHECKPOINT_KEY: "fashion_lightning.classifiers:CNN", "state_dict": CNN().state_dict(),
                "hyper_parameters": {}, "payload": payload}, path)
    return path


def compose_app(app: str, ckpt: Path, *overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(app, overrides=[f"ckpt_path={ckpt}", *overrides])


def evaluate_app(ckpt: Path, data_dir: Path, tmp_path: Path) -> None:
    from fashion_lightning.evaluate import evaluate

    evaluate(compose_app("evaluate", ckpt, f"paths.data_dir={data_dir}", f"report_dir={tmp_path / 'report'}"))


def predict_app(ckpt: Path, data_dir: Path, tmp_path: Path) -> None:
    from fashion_lightning.predict import predict

    predict(compose_app("predict", ckpt, f"paths.data_dir={data_dir}", "inputs=[test:0]"))


def export_app(ckpt: Path, data_dir: Path, tmp_path: Path) -> None:
    from fashion_lightning.export import export

    export(compose_app("export", ckpt, f"paths.data_dir={data_dir}", "format=torchscript",
                       f"output={tmp_path / 'model.pt'}"))


def serve_app(ckpt: Path, data_dir: Path, tmp_path: Path) -> None:
    serve = pytest.importorskip("fashion_lightning.serve", reason="needs the serve extra: pip install -e '.[serve]'")
    serve.build_server(compose_app("serve", ckpt))


def train_resume(ckpt: Path, data_dir: Path, tmp_path: Path) -> None:
    from fashion_lightning.train import train

    train(compose_train(*quick_overrides(data_dir, tmp_path / "run"), f"ckpt_path={ckpt}"))


def lightning_resume(ckpt: Path, data_dir: Path, tmp_path: Path) -> None:
    """The Trainer's own load (``fit(ckpt_path=...)``), with the plugin the apps' Trainer uses, not the app's check."""
    fit_model(CNN(), data_dir, tmp_path, ckpt_path=ckpt, max_steps=1, plugins=[SafeCheckpointIO()])


READERS: dict[str, Callable[[Path, Path, Path], object]] = {
    "read_checkpoint": lambda ckpt, *_: read_checkpoint(ckpt), "load_model": lambda ckpt, *_: load_model(ckpt),
    "evaluate": evaluate_app, "predict": predict_app, "export": export_app, "serve": serve_app,
    "train resume": train_resume, "Trainer.fit resume": lightning_resume}
"""Every way a checkpoint file is read: the library, each app's loading, a resume through the app or Lightning."""


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize(("payload", "named"), [(RunsAShellCommand, "posix.system"), (CreatesAFile, "io.open")])
def test_a_crafted_checkpoint_is_refused_by_every_reader_and_its_payload_never_runs(
        reader: str, payload: type, named: str, data_dir: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    ckpt = crafted(tmp_path / "evil.ckpt", payload(marker))
    with pytest.raises(UserError) as refused:
        READERS[reader](ckpt, data_dir, tmp_path)
    message = str(refused.value)
    assert f"{str(ckpt)!r} holds {named}, which no fashion_lightning checkpoint holds" in message, message
    assert "\n" not in message and not marker.exists()


def test_a_crafted_checkpoint_is_one_line_in_the_apps(data_dir: Path, tmp_path: Path, capsys) -> None:
    ckpt = crafted(tmp_path / "evil.ckpt", RunsAShellCommand(tmp_path / "pwned"))
    err = one_line_error(lambda: evaluate_app(ckpt, data_dir, tmp_path), capsys)
    assert "holds posix.system" in err and "refused" in err and not (tmp_path / "pwned").exists()


def test_only_our_classes_are_rebuilt_whatever_class_the_checkpoint_names(tmp_path: Path) -> None:
    """The class a checkpoint names is looked up among ours by name, never imported and called."""
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "calls.ckpt"
    torch.save({CHECKPOINT_KEY: "os:system", "state_dict": {},
                "hyper_parameters": {"command": f"touch {shlex.quote(str(marker))}"}}, ckpt)
    with pytest.raises(UserError, match=r"holds a 'os:system' model, not one of fashion_lightning's CNN, "
                                        r"DenseBaseline; load it with system\.load_from_checkpoint"):
        load_model(ckpt)
    assert not marker.exists()
    older = tmp_path / "older.ckpt"  # the module path checkpoints recorded before the classes moved
    torch.save({CHECKPOINT_KEY: "fashion_lightning.module:DenseBaseline",
                "state_dict": DenseBaseline().state_dict(), "hyper_parameters": {}}, older)
    assert isinstance(load_model(older), DenseBaseline)


@pytest.mark.parametrize("fast", [True, False])
def test_a_checkpoint_naming_the_fused_network_fast_loads_it(fast: bool, tmp_path: Path) -> None:
    """Checkpoints of 0.1 record ``fast`` where ``fused`` stands now."""
    path = tmp_path / "old.ckpt"
    torch.save({CHECKPOINT_KEY: "fashion_lightning.classifiers:CNN", "state_dict": CNN().state_dict(),
                "hyper_parameters": {"fast": fast, "lr": 0.002}, "pytorch-lightning_version": "2.6.6"}, path)
    for model in (load_model(path), CNN.load_from_checkpoint(path)):
        assert type(model.net) is (FusedConvNet if fast else ConvNet) and model.hparams.fused is fast
        assert "fast" not in model.hparams and model.hparams.lr == 0.002


def test_a_checkpoint_holding_accuracy_counts_loads_them_as_the_same_running_accuracy(tmp_path: Path) -> None:
    """Earlier checkpoints hold ``train_acc`` as MulticlassAccuracy's micro counts: 90 of 120 images right."""
    state = {k: v for k, v in CNN().state_dict().items() if not k.startswith("train_acc.")}
    state |= {"train_acc.tp": torch.tensor(90), "train_acc.fp": torch.tensor(30), "train_acc.tn": torch.tensor(1050),
              "train_acc.fn": torch.tensor(30)}
    path = tmp_path / "counts.ckpt"
    torch.save({CHECKPOINT_KEY: "fashion_lightning.classifiers:CNN", "state_dict": state, "hyper_parameters": {},
                "pytorch-lightning_version": "2.6.6"}, path)
    for model in (load_model(path), CNN.load_from_checkpoint(path)):
        model.train_acc.update(torch.tensor([True, False]))  # the epoch goes on: 91 of 122
        assert float(model.train_acc.compute()) == pytest.approx(91 / 122)


def test_a_checkpoint_of_a_python_callers_path_settings_loads(tmp_path: Path) -> None:
    """``FashionMNISTDataModule(data_dir=Path(...))`` from Python: Lightning saves the PosixPath as given."""
    path = tmp_path / "path.ckpt"
    torch.save({CHECKPOINT_KEY: "fashion_lightning.classifiers:DenseBaseline", "hyper_parameters": {},
                "state_dict": DenseBaseline().state_dict(), "datamodule_hyper_parameters": {"data_dir": tmp_path}},
               path)
    assert read_checkpoint(path)["datamodule_hyper_parameters"]["data_dir"] == tmp_path


def damaged_copy(original: Path, folder: Path) -> Path:
    """``original`` with 64 KB in the middle of its tensor data overwritten: the zip's own CRC check fails."""
    path = folder / "damaged.ckpt"
    shutil.copy(original, path)
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        f.write(os.urandom(64 * 1024))
    assert zipfile.ZipFile(path).testzip() is not None
    return path


def test_a_damaged_checkpoint_is_one_clear_error(trained_run: Path, data_dir: Path, tmp_path: Path,
                                                 capsys) -> None:
    """torch's zip reader checks no CRC: the damaged weights loaded, and evaluate reported chance accuracy."""
    ckpt = damaged_copy(trained_run / "checkpoints" / "best.ckpt", tmp_path)
    with pytest.raises(UserError, match=r"is damaged: archive/data/\d+ fails the archive's own CRC check"):
        read_checkpoint(ckpt)
    err = one_line_error(lambda: evaluate_app(ckpt, data_dir, tmp_path), capsys)
    assert f"{str(ckpt)!r} is damaged" in err and not (tmp_path / "report").exists()
    with pytest.raises(UserError, match="is damaged"):
        lightning_resume(ckpt, data_dir, tmp_path)
