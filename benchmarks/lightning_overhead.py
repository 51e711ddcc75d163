"""Where Lightning's per-step time goes, and what ``data.batches_per_step`` buys back.

    python benchmarks/lightning_overhead.py [--model cnn|dense] [--steps 1536] [--repeats 3] [--per-step 64]
                                            [--data-dir data]

Each variant takes ``--steps`` Adam steps of batch 32 on the same network (same init, same batches from the
same in-memory tensors), and the script prints the median ms per optimizer step over the repeats, the
variants interleaved so that machine drift hits them alike: the plain loop (each batch computed as the
training module computes it, ``module.loss_and_grads``, then ``optimizer.step()``); Lightning with a bare trainer
(no progress bar, logger or callbacks); Lightning with the app's progress bar, CSV logger and checkpoint,
interrupt and timer callbacks. The Lightning variants run once with one batch per training step and once
with ``--per-step`` (``data.batches_per_step``). ``tune_process()`` is applied to all of them.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from fashion_lightning import CNN, BatchLoader, DenseBaseline, FashionMNISTDataModule
from fashion_lightning.callbacks import BatchProgressBar, EpochTimer, SaveOnInterrupt
from fashion_lightning.module import loss_and_grads
from fashion_lightning.runtime import tune_process

MODELS = {"cnn": CNN, "dense": DenseBaseline}


def plain(cls: type, dm: FashionMNISTDataModule, steps: int) -> float:
    torch.manual_seed(0)
    net = cls(keras_init=True).net
    optimizer = torch.optim.Adam(net.parameters(), fused=True)
    batches = iter(BatchLoader(*dm.train_set, 32, shuffle=True))
    start = time.perf_counter()
    for _ in range(steps):
        x, y = next(batches)
        loss_and_grads(net, x, y, optimizer)
        optimizer.step()
    return (time.perf_counter() - start) / steps * 1e3


def lightning(cls: type, dm: FashionMNISTDataModule, steps: int, out: str, app: bool) -> float:
    torch.manual_seed(0)
    timer = EpochTimer()
    extra: list[L.Callback] = [timer]
    if app:
        extra += [BatchProgressBar(), SaveOnInterrupt(out),
                  ModelCheckpoint(dirpath=out, filename="best", monitor="val/acc", mode="max"),
                  ModelCheckpoint(dirpath=out, filename="last", enable_version_counter=False)]
    trainer = L.Trainer(max_epochs=1, limit_train_batches=steps // dm.hparams.batches_per_step, limit_val_batches=1,
                        accelerator="cpu", enable_progress_bar=app, enable_model_summary=False,
                        enable_checkpointing=app, logger=CSVLogger(out, name="logs") if app else False,
                        callbacks=extra, num_sanity_val_steps=0)
    trainer.fit(cls(keras_init=True), datamodule=dm)
    return timer.times[0] / trainer.global_step * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="cnn")
    parser.add_argument("--steps", type=int, default=1536,
                        help="Adam steps per variant: a multiple of --per-step, within one epoch (1718 batches)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--per-step", type=int, default=64, help="batches per training step, the grouped variants")
    parser.add_argument("--data-dir", default="data")
    args = parser.parse_args()
    tune_process()
    cls = MODELS[args.model]
    dms = {k: FashionMNISTDataModule(data_dir=args.data_dir, batches_per_step=k) for k in (1, args.per_step)}
    for dm in dms.values():
        dm.prepare_data()
        dm.setup()
    epoch = len(dms[1].train_set[0]) // 32
    if not 0 < args.steps <= epoch or args.steps % args.per_step:
        parser.error(f"--steps must be a positive multiple of --per-step ({args.per_step}) up to one epoch's "
                     f"{epoch} batches, got {args.steps}")
    variants = {"plain loop": lambda out: plain(cls, dms[1], args.steps)}
    for per_step, dm in dms.items():
        variants[f"Lightning, bare trainer, {per_step} batch/step"] = \
            lambda out, dm=dm: lightning(cls, dm, args.steps, out, app=False)
        variants[f"Lightning, the app's bar/logger/callbacks, {per_step} batch/step"] = \
            lambda out, dm=dm: lightning(cls, dm, args.steps, out, app=True)
    times: dict[str, list[float]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as out:
        for _ in range(args.repeats):
            for name, run in variants.items():
                times[name].append(run(out))
    base = statistics.median(times["plain loop"])
    print(f"\n{args.model}, batch 32, {args.steps} optimizer steps, median of {args.repeats}:")
    for name, values in times.items():
        ms = statistics.median(values)
        print(f"{name:<60} {ms:6.3f} ms/step   {ms / base:5.3f}x plain")


if __name__ == "__main__":
    main()
