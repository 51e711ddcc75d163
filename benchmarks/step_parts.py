"""Where a default training step's time goes, part by part, timed inside one fit: the app's step against a plain loop.

    python benchmarks/step_parts.py --data-dir data [--recipe seed_cnn] [--steps 400] [--rounds 3]

`step_cost.py` removes one thing at a time and compares whole fits, which this VM's drift (up to a quarter between
runs) can swamp for parts of a few tens of microseconds. Here every part of the step is timed inside the same fit,
so the drift hits them alike: the network's forward, the loss, autograd's backward, Adam's step, ``zero_grad``, the
next batch, the metric updates and ``self.log`` (wrapping the module's and optimizer's methods), and Lightning's
dispatch of callback, LightningModule and strategy hooks (wrapping the functions its loops call them through,
``lightning.pytorch.trainer.call._call_*_hook(s)``: private, so this script may need updating with Lightning).
Each part counts its own time only (a wrapped call inside another is subtracted from it); what no wrapper covers
(the loops, the closure, progress tracking, the logger connector) is the rest. The wrappers cost about 1 µs a call
themselves, counted in the parts. The plain loop runs the same network, loss, optimizer and batches with the
same wrappers. ``--rounds`` alternates the two; the table gives medians over the rounds.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning.pytorch.loops.fetchers import _PrefetchDataFetcher
from lightning.pytorch.trainer import call
from step_cost import step_args

from fashion_lightning.app import CONFIG_DIR
from fashion_lightning.train import instantiate_trainer

WARMUP = 50
DISPATCH = {"_call_callback_hooks": "callback hook dispatch",
            "_call_lightning_module_hook": "LightningModule hook dispatch (and the hooks' untimed work)",
            "_call_strategy_hook": "strategy hook dispatch"}


STEP_HOOKS = ("on_train_batch_start", "on_before_backward", "on_after_backward", "on_before_optimizer_step",
              "on_before_zero_grad", "on_train_batch_end")
"""The callback hooks Lightning calls at every training step (automatic optimization)."""


class Parts:
    """Exclusive wall time and calls of each wrapped part, recorded while ``on``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: Counter[str] = Counter()
        self.on, self.started = False, 0.0
        self._children: list[float] = []  # for each wrapped call in flight: the time of its wrapped callees

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            self._children.append(0.0)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                took = time.perf_counter() - start
                children = self._children.pop()
                if self.on:
                    self.seconds[name] += took - children
                    self.calls[name] += 1
                if self._children:
                    self._children[-1] += took

        return timed

    def start(self) -> None:
        self.seconds.clear()
        self.calls.clear()
        self.on, self.started = True, time.perf_counter()

    def stop(self) -> float:
        self.on = False
        return time.perf_counter() - self.started


def wrap_module(parts: Parts, module: L.LightningModule) -> None:
    """Time the module's network, loss, metric updates, ``self.log`` and backward (instance attributes)."""
    module.net.forward = parts.wrap("network forward", module.net.forward)
    module.training_loss = parts.wrap("loss", module.training_loss)
    module.update_metrics = parts.wrap("metric updates", module.update_metrics)
    module.log = parts.wrap("self.log", module.log)
    module.backward = parts.wrap("autograd backward", module.backward)
    for split in ("train", "val", "test"):
        for kind in ("acc", "loss"):
            metric = getattr(module, f"{split}_{kind}")
            metric.update = parts.wrap(f"metric updates: {type(metric).__name__}.update", metric.update)


def wrap_optimizer(parts: Parts, optimizer: torch.optim.Optimizer) -> None:
    optimizer.step = parts.wrap("Adam's step", optimizer.step)
    optimizer.zero_grad = parts.wrap("zero_grad", optimizer.zero_grad)


class Window(L.Callback):
    """Records parts over ``steps`` training steps after `WARMUP`, from one batch's start to another's."""

    def __init__(self, parts: Parts, steps: int) -> None:
        self.parts, self.steps, self.seconds = parts, steps, 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        wrap_optimizer(self.parts, trainer.optimizers[0])
        for callback in trainer.callbacks:
            if callback is not self:
                for hook in STEP_HOOKS:
                    setattr(callback, hook, self.parts.wrap(f"callbacks' own work: {type(callback).__name__}",
                                                            getattr(callback, hook)))

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if batch_idx == WARMUP:
            self.parts.start()
        elif batch_idx == WARMUP + self.steps:
            self.seconds = self.parts.stop()


def main() -> None:
    args = step_args(__doc__, rounds=3)
    parts = Parts()
    for name, label in DISPATCH.items():
        setattr(call, name, parts.wrap(label, getattr(call, name)))
    _PrefetchDataFetcher.__next__ = parts.wrap("next batch", _PrefetchDataFetcher.__next__)

    with tempfile.TemporaryDirectory() as out, initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={args.recipe}", f"model.fused={args.network == 'fused'}",
                                          f"paths.data_dir={args.data_dir}", f"paths.output_dir={out}"])
        datamodule = instantiate(cfg.data)

        def app() -> tuple[dict[str, float], Counter[str]]:
            window = Window(parts, args.steps)
            trainer = instantiate_trainer(cfg.trainer, callbacks=[*(instantiate(c) for c in cfg.callbacks.values()),
                                                                  window],
                                          logger=[instantiate(c) for c in cfg.logger.values()], max_epochs=1,
                                          limit_train_batches=WARMUP + args.steps + 1, limit_val_batches=0,
                                          num_sanity_val_steps=0)
            module = instantiate(cfg.model)
            wrap_module(parts, module)
            trainer.fit(module, datamodule=datamodule)
            return per_step(dict(parts.seconds), parts.calls, window.seconds, args.steps)

        def plain() -> tuple[dict[str, float], Counter[str]]:
            module = instantiate(cfg.model)
            wrap_module(parts, module)
            optimizer = module.configure_optimizers()
            wrap_optimizer(parts, optimizer)
            datamodule.setup("fit")
            batches = iter(datamodule.train_dataloader())
            next_batch = parts.wrap("next batch", lambda: next(batches))
            for step in range(WARMUP + args.steps):
                if step == WARMUP:
                    parts.start()
                x, y = next_batch()
                loss = module.training_loss(module(x), y)
                module.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            return per_step(dict(parts.seconds), parts.calls, parts.stop(), args.steps)

        rounds = [(app(), plain()) for _ in range(args.rounds)]

    names = list(dict.fromkeys(name for (a, _), (p, _) in rounds for name in [*a, *p]))
    print(f"\n{args.recipe}, {args.network} network, {args.steps} steps a fit after {WARMUP}, {args.rounds} rounds; "
          f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads, "
          f"Lightning {L.__version__}\n")
    print("| part | calls a step (app) | app, µs a step | plain loop, µs a step | app - plain |")
    print("|---|---:|---:|---:|---:|")
    for name in names:
        app_us = statistics.median(a.get(name, 0.0) for (a, _), _ in rounds)
        plain_us = statistics.median(p.get(name, 0.0) for _, (p, _) in rounds)
        calls = statistics.median(c.get(name, 0) for (_, c), _ in rounds)
        print(f"| {name} | {calls:g} | {app_us:.0f} | {plain_us:.0f} | {app_us - plain_us:+.0f} |")


def per_step(seconds: dict[str, float], calls: Counter[str], total: float,
             steps: int) -> tuple[dict[str, float], Counter[str]]:
    """µs a step of each part, the rest (the step's time no part covers) and the whole step; calls a step."""
    us = {name: 1e6 * s / steps for name, s in seconds.items()}
    us["the rest (loops, closure, progress, logger connector)"] = 1e6 * total / steps - sum(us.values())
    us["the whole step"] = 1e6 * total / steps
    return us, Counter({name: round(n / steps, 2) for name, n in calls.items()})


if __name__ == "__main__":
    main()
