"""`CNN(fused=True)` is a choice of network: every Lightning feature does with it what it does with `CNN()`."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import StochasticWeightAveraging
from lightning.pytorch.tuner import Tuner

from conftest import fit_model
from fashion_lightning import CNN, DenseBaseline
from fashion_lightning.nets.fused import FusedConvNet


class Hooked(CNN):
    """Counts the backward and optimizer-step hooks Lightning calls."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.calls: dict[str, int] = {}

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    def on_before_backward(self, loss: torch.Tensor) -> None:
        self._count("on_before_backward")

    def on_after_backward(self) -> None:
        self._count("on_after_backward")

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self._count("on_before_optimizer_step")


class OwnStep(CNN):
    """A subclass's own training step: the squared-logit penalty a user might add."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        return F.cross_entropy(logits, y) + 1e-3 * logits.pow(2).mean()


FEATURES: dict[str, tuple[type, dict]] = {
    "gradient clipping": (CNN, {"gradient_clip_val": 0.05}),
    "gradient accumulation": (CNN, {"accumulate_grad_batches": 3}),
    "backward and optimizer hooks": (Hooked, {}),
    "stochastic weight averaging": (CNN, {"callbacks": (StochasticWeightAveraging(swa_lrs=1e-3, swa_epoch_start=1),),
                                          "max_epochs": 2, "limit_train_batches": 4}),
    "bf16-mixed": (CNN, {"precision": "bf16-mixed"}),
    "a subclass's training_step": (OwnStep, {}),
}


@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_a_lightning_feature_does_with_the_fused_cnn_what_it_does_with_the_plain_one(feature: str, data_dir: Path,
                                                                                    tmp_path: Path) -> None:
    cls, settings = FEATURES[feature]
    settings = {"max_steps": 9, **settings}
    runs = []
    for fused in (False, True):
        torch.manual_seed(0)
        model = cls(fused=fused)
        callbacks = tuple(pickle.loads(pickle.dumps(c)) for c in settings.get("callbacks", ()))  # one per fit
        trainer = fit_model(model, data_dir, tmp_path, **{**settings, "callbacks": callbacks})
        runs.append((trainer, model))
    (plain_trainer, plain), (fast_trainer, fast) = runs
    assert type(fast.net) is FusedConvNet and fast.automatic_optimization
    assert fast_trainer.global_step == plain_trainer.global_step > 0
    assert getattr(fast, "calls", None) == getattr(plain, "calls", None)
    for (name, p), q in zip(fast.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-4, rtol=1e-4, msg=name)


def test_lr_find_suggests_the_same_rate_for_the_fused_cnn(data_dir: Path, tmp_path: Path) -> None:
    suggestions = []
    for fused in (False, True):
        torch.manual_seed(0)
        model = CNN(fused=fused)
        trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
        from fashion_lightning import FashionMNISTDataModule

        finder = Tuner(trainer).lr_find(model, datamodule=FashionMNISTDataModule(data_dir=str(data_dir),
                                                                                  download=False), num_training=20)
        suggestions.append(finder.suggestion())
    assert suggestions[0] == pytest.approx(suggestions[1], rel=1e-3)


def test_the_fused_cnn_pickles_and_scripts_after_a_fit(data_dir: Path, tmp_path: Path) -> None:
    model = CNN(fused=True)
    fit_model(model, data_dir, tmp_path, max_steps=3)
    copy = pickle.loads(pickle.dumps(model))
    scripted = model.to_torchscript()
    x = torch.rand(5, 1, 28, 28)
    model.eval()
    torch.testing.assert_close(scripted(x), model(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(copy.eval()(x), model(x))


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("cls", [CNN, DenseBaseline])
def test_lightnings_exports_take_any_batch_size_and_match_the_module(cls: type, fused: bool, tmp_path: Path) -> None:
    import onnxruntime

    torch.manual_seed(0)
    model = cls(fused=fused).eval()
    model.to_onnx(tmp_path / "model.onnx")
    session = onnxruntime.InferenceSession(tmp_path / "model.onnx", providers=["CPUExecutionProvider"])
    assert [(i.name, i.shape) for i in session.get_inputs()] == [("images", ["batch", 1, 28, 28])]
    methods = ("script", "trace")
    scripted, traced = (model.to_torchscript(tmp_path / f"{method}.pt", method=method) for method in methods)
    loaded = {method: torch.jit.load(tmp_path / f"{method}.pt") for method in methods}
    for n in (1, 7):
        x = torch.rand(n, 1, 28, 28)
        with torch.no_grad():
            expected = model(x)
            outputs = {"onnx": torch.from_numpy(session.run(["logits"], {"images": x.numpy()})[0]),
                       "script": scripted(x), "trace": traced(x), **{f"{m} loaded": f(x) for m, f in loaded.items()}}
        for name, output in outputs.items():
            torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5, msg=f"{name}, batch of {n}")
