"""Where Lightning's per-step time goes: the CNN's training step, adding one piece of the app at a time.

    python benchmarks/lightning_overhead.py [--steps 400] [--repeats 3] [--data-dir data]

Each variant trains the same CNN (same init, same batches from the same in-memory loader) for ``--steps``
steps, and prints the median ms per step over the repeats, the variants interleaved so that machine drift
hits them alike: the plain loop; Lightning with a module that only returns the loss; the app's module
(torchmetrics updates); plus the progress bar (refresh every 100 steps); plus the CSV logger; plus the
checkpoint, interrupt and timer callbacks (the full ``callbacks=default``).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger

from fashion_lightning import CNN, FashionMNISTDataModule
from fashion_lightning.callbacks import EpochTimer, SaveOnInterrupt


class LossOnly(CNN):
    """The CNN with a training step that only computes the loss: Lightning's own cost, no metrics."""

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def on_train_epoch_end(self) -> None:
        pass


def plain(dm: FashionMNISTDataModule, steps: int) -> float:
    torch.manual_seed(0)
    net = CNN(keras_init=True).net
    optimizer = torch.optim.Adam(net.parameters(), fused=True)
    batches = iter(dm.train_dataloader())
    start = time.perf_counter()
    for _ in range(steps):
        x, y = next(batches)
        loss = F.cross_entropy(net(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - start) / steps * 1e3


def lightning(dm: FashionMNISTDataModule, steps: int, module: type, out: str, bar: bool = False,
              logger: bool = False, callbacks: bool = False) -> float:
    torch.manual_seed(0)
    timer = EpochTimer()
    extra: list[L.Callback] = [timer]
    if bar:
        extra.append(TQDMProgressBar(refresh_rate=100))
    if callbacks:
        extra += [ModelCheckpoint(dirpath=out, filename="best", monitor="val/acc", mode="max", save_last=True),
                  SaveOnInterrupt(out)]
    trainer = L.Trainer(max_epochs=1, limit_train_batches=steps, limit_val_batches=1, accelerator="cpu",
                        enable_progress_bar=bar, enable_model_summary=False, enable_checkpointing=callbacks,
                        logger=CSVLogger(out, name="logs") if logger else False, callbacks=extra,
                        num_sanity_val_steps=0)
    trainer.fit(module(keras_init=True), datamodule=dm)
    return timer.times[0] / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data-dir", default="data")
    args = parser.parse_args()
    dm = FashionMNISTDataModule(data_dir=args.data_dir)
    dm.prepare_data()
    dm.setup()
    variants = {
        "plain loop": lambda out: plain(dm, args.steps),
        "Lightning, loss-only module": lambda out: lightning(dm, args.steps, LossOnly, out),
        "+ torchmetrics (the app's module)": lambda out: lightning(dm, args.steps, CNN, out),
        "+ progress bar": lambda out: lightning(dm, args.steps, CNN, out, bar=True),
        "+ CSV logger": lambda out: lightning(dm, args.steps, CNN, out, bar=True, logger=True),
        "+ checkpoint/interrupt callbacks": lambda out: lightning(dm, args.steps, CNN, out, bar=True, logger=True,
                                                                  callbacks=True),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as out:
        for _ in range(args.repeats):
            for name, run in variants.items():
                times[name].append(run(out))
    base = statistics.median(times["plain loop"])
    print(f"\nCNN, batch 32, {args.steps} steps, median of {args.repeats}:")
    for name, values in times.items():
        ms = statistics.median(values)
        print(f"{name:<36} {ms:6.3f} ms/step   {ms / base:5.3f}x plain")


if __name__ == "__main__":
    main()
