"""Where a training step of the app's default (the textbook LightningModule) goes: ms a step, setting by setting.

    python benchmarks/step_cost.py --data-dir data [--recipe seed_cnn] [--network fused|plain] [--steps 400]

Each variant fits one epoch of ``--steps`` batches in this process (validation and the sanity check off), the
variants in turn, ``--rounds`` times, so that the machine's drift hits them alike; a step's time is the median gap
between consecutive ``on_train_batch_start`` calls after the first 50 (what the epoch-end checkpoints and the
loader's start cost is outside it). Variants, each one change from the one above unless it says otherwise:

- ``app``: the app's trainer, callbacks and logger, as ``experiment=<recipe>`` composes them (``--network plain``:
  with ``model.fused=false``);
- ``bar every step``: the progress bar refreshed every step (Lightning's default) instead of every 50;
- ``no progress bar``: (from ``app``) no progress bar;
- ``step loss unlogged``: (from ``no progress bar``) ``training_step`` without its ``self.log`` of the loss (which
  the module calls every ``log_every_n_steps`` steps only);
- ``no train metrics``: and without the running accuracy and loss updates either;
- ``bare Trainer``: that module in ``L.Trainer`` with no callbacks, logger, checkpointing or model summary;
- ``plain loop``: no Lightning: forward, loss, backward, Adam's step, ``zero_grad``.

Run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from fashion_lightning import CNN
from fashion_lightning.app import CONFIG_DIR, set_up_process
from fashion_lightning.train import instantiate_trainer

WARMUP = 50


class StepTimes(L.Callback):
    """The start time of every training batch."""

    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, *_: Any) -> None:
        self.starts.append(time.perf_counter())

    def ms_per_step(self) -> float:
        gaps = [b - a for a, b in zip(self.starts[WARMUP:], self.starts[WARMUP + 1:], strict=False)]
        return 1000 * statistics.median(gaps)


def unlogged(module: CNN) -> CNN:
    """``module`` with a training step that updates the running metrics but logs nothing."""

    def training_step(batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = module(x)
        loss = module.training_loss(logits, y)
        module.update_metrics("train", logits, y, loss, len(y))
        return loss

    module.training_step = training_step
    return module


def metric_free(module: CNN) -> CNN:
    """``module`` with a training step that only returns the loss."""
    module.training_step = lambda batch, batch_idx: module.training_loss(module(batch[0]), batch[1])
    return module


def step_args(doc: str, rounds: int) -> argparse.Namespace:
    """The command line of this script and of ``step_parts.py``; the process set up as the apps set theirs."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--recipe", default="seed_cnn")
    parser.add_argument("--network", choices=("fused", "plain"), default="fused")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=rounds)
    args = parser.parse_args()
    set_up_process()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # Lightning's notices, once a fit
    return args


def main() -> None:
    args = step_args(__doc__, rounds=5)

    with tempfile.TemporaryDirectory() as out, initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={args.recipe}", f"model.fused={args.network == 'fused'}",
                                          f"paths.data_dir={args.data_dir}", f"paths.output_dir={out}"])
        datamodule = instantiate(cfg.data)
        limits = {"max_epochs": 1, "limit_train_batches": args.steps, "limit_val_batches": 0,
                  "num_sanity_val_steps": 0}

        def app_fit(module_change: Callable[[CNN], CNN] = lambda m: m, bar: int | None = 50) -> float:
            built = [instantiate(c, refresh_rate=bar) if name == "progress_bar" else instantiate(c)
                     for name, c in cfg.callbacks.items() if name != "progress_bar" or bar is not None]
            timer = StepTimes()
            trainer = instantiate_trainer(cfg.trainer, callbacks=[*built, timer], **limits,
                                          logger=[instantiate(c) for c in cfg.logger.values()],
                                          enable_progress_bar=bar is not None)
            trainer.fit(module_change(instantiate(cfg.model)), datamodule=datamodule)
            return timer.ms_per_step()

        def bare_fit() -> float:
            timer = StepTimes()
            trainer = L.Trainer(callbacks=[timer], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                enable_model_summary=False, accelerator="cpu", devices=1, **limits)
            trainer.fit(metric_free(instantiate(cfg.model)), datamodule=datamodule)
            return timer.ms_per_step()

        def plain_loop() -> float:
            model = instantiate(cfg.model)
            optimizer = model.configure_optimizers()
            datamodule.setup("fit")
            starts = []
            for step, (x, y) in enumerate(datamodule.train_dataloader()):
                if step == args.steps:
                    break
                starts.append(time.perf_counter())
                loss = model.training_loss(model(x), y)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
            gaps = [b - a for a, b in zip(starts[WARMUP:], starts[WARMUP + 1:], strict=False)]
            return 1000 * statistics.median(gaps)

        variants: dict[str, Callable[[], float]] = {
            "app": app_fit,
            "bar every step": lambda: app_fit(bar=1),
            "no progress bar": lambda: app_fit(bar=None),
            "step loss unlogged": lambda: app_fit(unlogged, bar=None),
            "no train metrics": lambda: app_fit(metric_free, bar=None),
            "bare Trainer": bare_fit,
            "plain loop": plain_loop,
        }
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, fit in variants.items():
                times[name].append(fit())
    floor = statistics.median(times["plain loop"])
    print(f"\n{args.recipe}, {args.network} network, {args.steps} steps a fit, {args.rounds} rounds; torch "
          f"{torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads\n")
    print("| variant | ms a step, median (min-max) | over the plain loop, ms |")
    print("|---|---:|---:|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.2f} ({min(values):.2f}-{max(values):.2f}) | {median - floor:+.2f} |")


if __name__ == "__main__":
    main()
