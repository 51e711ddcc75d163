"""DDP on 2 CPU processes (gloo) really averages gradients: both ranks end with the same weights, and those are
the weights of one process training on both ranks' batches at once (batch 2B against 2 x B, the same samples)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import compose_train, fit_model, quick_overrides
from fashion_lightning import CNN, DenseBaseline, FashionMNISTDataModule
from fashion_lightning.lit.checkpoints import load_model
from fashion_lightning.report import predict_test_set
from fashion_lightning.train import train

TESTS = Path(__file__).parent
SCRIPT = """
import sys
import lightning as L
from conftest import SaveWeightsAtEnd
from fashion_lightning import CNN, DenseBaseline, FashionMNISTDataModule
from fashion_lightning.nets import fused as networks
from fashion_lightning.nets import kernels

calls = []


class Counted(kernels.ConvPoolReLU):
    @staticmethod
    def forward(ctx, *args):
        calls.append(1)
        return kernels.ConvPoolReLU.forward(ctx, *args)


networks.ConvPoolReLU = Counted
data_dir, out, model = sys.argv[1:4]
L.seed_everything(0)
module = CNN(fused=True) if model == "cnn-fused" else DenseBaseline()
trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=6, limit_val_batches=1, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    callbacks=[SaveWeightsAtEnd(out)])
trainer.fit(module, datamodule=FashionMNISTDataModule(data_dir=data_dir, download=False, batch_size=16))
sys.stdout.write(f"automatic optimization: {module.automatic_optimization} global step: {trainer.global_step} "
                 f"network: {type(module.net).__name__} kernel calls: {len(calls) > 0}\\n")  # one write per rank
"""


SIGNAL_SCRIPT = """
import os
import signal
import sys
import lightning as L
from fashion_lightning import DenseBaseline, FashionMNISTDataModule
from fashion_lightning.lit.callbacks import SaveOnInterrupt

class SignalToRankOne(L.Callback):
    def on_train_batch_start(self, trainer, *args):
        if trainer.global_rank == 1 and trainer.global_step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # one process only: the other is busy with its own step

data_dir, out = sys.argv[1:3]
trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=20, limit_val_batches=1, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    callbacks=[SaveOnInterrupt(out), SignalToRankOne()])
trainer.fit(DenseBaseline(), datamodule=FashionMNISTDataModule(data_dir=data_dir, download=False, batch_size=16))
"""


def run(*command: str, cwd: Path, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    for name in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "FASHION_MNIST_DIR"):
        env.pop(name, None)
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout)
    assert done.returncode == 0 or not check, done.stderr[-3000:]
    return done


def rank_weights(out: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    return tuple(torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))


def assert_synchronised_and_single_process(ranks: tuple[dict, dict], single: dict[str, torch.Tensor]) -> None:
    rank0, rank1 = ranks
    assert rank0.keys() == rank1.keys() == single.keys()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)  # the same averaged gradients, the same steps
    for k in rank0:  # float rounding moves a few weights by ~2e-5 (Adam scales tiny gradients up); 2 unsynchronised
        assert torch.allclose(rank0[k], single[k], atol=1e-4, rtol=0), k  # replicas differ by ~1e-2 on most


@pytest.mark.parametrize("model", ["dense", "cnn-fused"])
def test_ddp_through_the_python_api_averages_gradients(model: str, data_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "ddp_script.py").write_text(textwrap.dedent(SCRIPT))
    done = run(sys.executable, "ddp_script.py", str(data_dir), str(tmp_path / "ranks"), model, cwd=tmp_path)
    fused = model == "cnn-fused"
    line = (f"automatic optimization: True global step: 6 network: {'FusedConvNet' if fused else 'DenseNet'} "
            f"kernel calls: {fused}")
    assert done.stdout.count(line) == 2, done.stdout  # both ranks ran the fused kernels (or neither, the dense net)
    torch.manual_seed(0)
    single = CNN() if model == "cnn-fused" else DenseBaseline()
    fit_model(single, data_dir, tmp_path, max_steps=6, data={"batch_size": 32})
    assert_synchronised_and_single_process(rank_weights(tmp_path / "ranks"), single.net.state_dict())


def test_ddp_through_the_app_averages_gradients_and_writes_one_run(data_dir: Path, tmp_path: Path) -> None:
    skip = ("paths.output", "trainer=", "report")
    overrides = [o for o in quick_overrides(data_dir, tmp_path) if not o.startswith(skip)]
    dump = ["+callbacks.dump._target_=conftest.SaveWeightsAtEnd", f"+callbacks.dump.dirpath={tmp_path / 'ranks'}"]
    run(sys.executable, "-m", "fashion_lightning.train", "trainer=ddp_cpu", "trainer.devices=2", "model=dense",
        "data.batch_size=16", *overrides, *dump, "paths.output_root=outs", "report=true", cwd=tmp_path)
    (run_dir,) = (tmp_path / "outs" / "runs").iterdir()  # one run directory, not one per rank
    results = json.loads((run_dir / "results.json").read_text())
    assert results["steps"] == 20 and (run_dir / "report" / "report.md").is_file()
    model = load_model(run_dir / "checkpoints" / "last.ckpt")
    probs, _, labels = predict_test_set(model, FashionMNISTDataModule(data_dir=str(data_dir), download=False))
    assert results["test_acc"] == pytest.approx((probs.argmax(1) == labels).float().mean().item(), abs=1e-6)

    single = tmp_path / "single"
    train(compose_train("model=dense", "data.batch_size=32", *quick_overrides(data_dir, single), "test_ckpt=last"))
    weights = torch.load(single / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    net = {k.removeprefix("net."): v for k, v in weights.items() if k.startswith("net.")}
    assert_synchronised_and_single_process(rank_weights(tmp_path / "ranks"), net)


def test_a_signal_to_one_process_stops_every_process_after_the_same_step(data_dir: Path, tmp_path: Path) -> None:
    """Ctrl-C reaches the processes at different points of a step: they agree to stop after the same one (one that
    stopped alone would leave the other waiting in the next step's gradient all-reduce for ever)."""
    (tmp_path / "signal_script.py").write_text(textwrap.dedent(SIGNAL_SCRIPT))
    done = run(sys.executable, "signal_script.py", str(data_dir), str(tmp_path / "ckpt"), cwd=tmp_path, check=False,
               timeout=300)
    assert done.returncode == 128 + signal.SIGINT  # rank 0 stops by the signal rank 1 received
    saved = torch.load(tmp_path / "ckpt" / "interrupted.ckpt", map_location="cpu", weights_only=False)
    assert saved["global_step"] == 4  # the step under way when the signal came, then both stopped
