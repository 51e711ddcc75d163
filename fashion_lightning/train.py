"""Train and test one model: ``python -m fashion_lightning.train`` (a Hydra app) or ``train(cfg)`` from Python."""

from __future__ import annotations

import copy
import logging
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.loggers import Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from fashion_lightning.app import (
    CONFIG_DIR,
    DATA_PATHS,
    launch_path,
    reported_as_one_line,
    set_up_process,
    with_launch_paths,
    write_json,
)
from fashion_lightning.callbacks import EpochTimer
from fashion_lightning.checkpoint import check_compatible, check_same_data, read_checkpoint
from fashion_lightning.errors import UserError, check_positive_int, is_seed
from fashion_lightning.fast.grouped import GroupedDataModule, StepsRestored, grouped
from fashion_lightning.module import ImageClassifier

log = logging.getLogger(__name__)


def check_accelerator(accelerator: str) -> None:
    """Fail early, in one line, when a GPU is asked for on a machine without one."""
    if str(accelerator) in ("gpu", "cuda") and not torch.cuda.is_available():
        raise UserError(f"trainer.accelerator={accelerator} but this machine has no usable CUDA GPU; "
                        "use trainer=cpu or trainer.accelerator=auto")


TRAINER_INTEGERS = {"max_epochs": -1, "min_epochs": 0, "max_steps": -1, "min_steps": 0, "log_every_n_steps": 0,
                    "num_nodes": 1, "accumulate_grad_batches": 1, "check_val_every_n_epoch": 1,
                    "num_sanity_val_steps": -1}
"""Trainer settings that must be whole numbers, with the least each takes (None, where allowed, is left alone)."""


def check_settings(cfg: DictConfig) -> None:
    """One clear error for a Trainer or path setting the app would pass on to fail later, or not at all."""
    for key, least in TRAINER_INTEGERS.items():
        value = cfg.trainer.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
            raise UserError(f"trainer.{key} must be an integer >= {least}, got {value!r}")
    for key in ("data_dir", "output_root"):
        value = cfg.paths.get(key)
        if not isinstance(value, str) or not value.strip() or "\0" in value:
            raise UserError(f"paths.{key} must be a folder path, got {value!r}")


def instantiate_trainer(trainer_cfg: DictConfig, **kwargs: Any) -> L.Trainer:
    """The configured Trainer; Lightning's refusal of a setting as one `UserError`."""
    try:
        return instantiate(trainer_cfg, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if not isinstance(cause, ValueError | TypeError | AssertionError | MisconfigurationException):
            raise
        said = str(cause).strip().replace("\n", " ") or f"{type(cause).__name__} without a message"
        raise UserError(f"Lightning refused the trainer settings: {said}") from err


RESUMABLE = ("interrupted.ckpt", "last.ckpt")
"""The checkpoints a resume looks for: where training stood when it was stopped, or when it ended."""


def resolve_ckpt_path(ckpt_path: str | None, output_root: str | os.PathLike) -> str | None:
    """Turn ``ckpt_path`` into a checkpoint file, or None: a file; a run directory (its newest resumable
    checkpoint); or "last", the newest resumable checkpoint of any run under ``output_root``. A relative path is
    read from the launch folder (`launch_path`)."""
    if ckpt_path is None:
        return None
    path = Path(output_root if ckpt_path == "last" else launch_path(ckpt_path)).expanduser()
    if ckpt_path != "last" and not path.is_dir():
        return str(path)
    pattern = "**/checkpoints/" if ckpt_path == "last" else "checkpoints/"
    found = [p for name in RESUMABLE for p in path.glob(pattern + name)]
    if not found:
        raise UserError(f"ckpt_path={ckpt_path} but no {' or '.join(RESUMABLE)} exists under {str(path)!r}; "
                        "train first or pass a .ckpt file")
    return str(max(found, key=lambda p: p.stat().st_mtime))


def build_model(model_cfg: DictConfig, steps_per_execution: int = 1) -> ImageClassifier:
    """``model_cfg``'s LightningModule; with ``steps_per_execution`` > 1 its grouped-steps class (`fast.grouped`)."""
    if steps_per_execution == 1:
        return instantiate(model_cfg)
    build = instantiate(model_cfg, _partial_=True)
    return grouped(build.func)(*build.args, **build.keywords)


def _overrides() -> list[str]:
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


RUN_PATHS = ("paths.output_root", "paths.output_dir", *DATA_PATHS)
"""The train config's paths, read from the launch folder whatever ``hydra.job.chdir`` (`with_launch_paths`)."""

RUN_DIR_TIME = "%Y-%m-%d_%H-%M-%S_%f"
"""How run directories are named under ``<output_root>/runs/``, as ``conf/hydra/default.yaml`` names them."""


def run_config(cfg: DictConfig) -> DictConfig:
    """A copy of ``cfg`` with its `RUN_PATHS` read from the launch folder and ``paths.output_dir`` the run directory:
    Hydra's (``hydra.runtime.output_dir``), or, in a config composed with Hydra's Compose API and no Hydra app
    running, a new one under ``paths.output_root``."""
    if not HydraConfig.initialized() and "${hydra:" in str(OmegaConf.to_container(cfg.paths)["output_dir"]):
        cfg = copy.deepcopy(cfg)
        run_dir = Path(cfg.paths.output_root).expanduser().absolute() / "runs" / datetime.now().strftime(RUN_DIR_TIME)
        cfg.paths.output_dir = str(run_dir)
    return with_launch_paths(cfg, *RUN_PATHS)


@contextmanager
def ending_wandb_run(loggers: Sequence[Logger]) -> Iterator[None]:
    """End the W&B run of a `WandbLogger` when the block ends, failed or not. Lightning finalizes every logger after
    fit and test, but W&B's run stays the process's current one, and the next `WandbLogger` in the process (the
    next job of a multirun) would log into it."""
    failed = True
    try:
        yield
        failed = False
    finally:
        if any(isinstance(logger, WandbLogger) for logger in loggers):
            import wandb

            if wandb.run is not None:
                wandb.finish(exit_code=int(failed))


def train(cfg: DictConfig, callbacks: Sequence[L.Callback] = ()) -> dict[str, Any]:
    """Fit ``cfg.model`` on ``cfg.data``, test the chosen checkpoint once (unless ``cfg.test`` is false), write
    ``results.json``; return it.

    ``cfg`` is the composed ``train`` config; ``cfg.paths.output_dir`` is the run directory (without a Hydra app
    running, a new one under ``cfg.paths.output_root``: `run_config`). ``callbacks`` are Lightning callbacks added
    to the configured ones (a tuner's pruning callback, for example). Under ``trainer.fast_dev_run`` nothing is
    written, as Lightning writes no checkpoint or log then.
    """
    start = time.perf_counter()
    check_settings(cfg)
    cfg = run_config(cfg)
    Path(cfg.paths.output_root).mkdir(parents=True, exist_ok=True)  # as the app does first: a tracker's store is there
    check_accelerator(cfg.trainer.accelerator)
    if cfg.test_ckpt not in ("best", "last"):
        raise UserError(f"test_ckpt must be best or last, got {cfg.test_ckpt!r}")
    run_dir = Path(cfg.paths.output_dir)
    if not is_seed(cfg.seed):
        raise UserError(f"seed must be an integer in 0..{2**32 - 1}, got {cfg.seed!r}")
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule: L.LightningDataModule = instantiate(cfg.data)
    if cfg.test_ckpt == "best" and cfg.get("test", True) and getattr(datamodule, "num_val", None) == 0:
        raise UserError("data.val_split=0 validates on the test set, so test_ckpt=best would choose the epoch by its "
                        "test accuracy and report that same accuracy; set test_ckpt=last (as the seed experiments do)")
    steps = check_positive_int("steps_per_execution", cfg.get("steps_per_execution", 1))
    model, fit_data = build_model(cfg.model, steps), GroupedDataModule(datamodule, steps) if steps > 1 else datamodule
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), cfg.paths.output_root)
    if ckpt_path:
        checkpoint = read_checkpoint(ckpt_path)
        check_compatible(checkpoint, model, ckpt_path)
        check_same_data(checkpoint, datamodule, ckpt_path)
    callbacks = [*(instantiate(c) for c in (cfg.get("callbacks") or {}).values()), *callbacks]
    if steps == 1:  # grouped models add their own
        callbacks.append(StepsRestored())
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values()]
    trainer = instantiate_trainer(cfg.trainer, callbacks=callbacks, logger=loggers or False)

    with ending_wandb_run(trainer.loggers):
        try:
            with warnings.catch_warnings():
                if steps > 1:  # Lightning compares log_every_n_steps with groups; grouped steps log each batch
                    warnings.filterwarnings("ignore", message="The number of training batches .* logging interval")
                trainer.fit(model, datamodule=fit_data, ckpt_path=ckpt_path)
        except MisconfigurationException as err:  # Lightning's refusals of manual optimization
            if steps == 1 or "manual optimization" not in str(err):
                raise
            raise UserError(f"{str(err).strip()} (steps_per_execution={steps} trains with Lightning's manual "
                            "optimization); set steps_per_execution=1 (speed=fused keeps the fused kernels)"
                            ) from err
        fit_metrics = {k.replace("/", "_"): float(v) for k, v in trainer.callback_metrics.items() if "/" in k}
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        test_ckpt = best if cfg.test_ckpt == "best" and best else None
        tested = cfg.get("test", True)
        if tested and cfg.test_ckpt == "best" and not best:
            log.warning("test_ckpt=best, but no best checkpoint was saved (nothing validated?): testing the final "
                        "weights")
        if tested:
            (test_metrics,) = trainer.test(model, datamodule=datamodule, ckpt_path=test_ckpt, verbose=False)

    timer = next((c for c in trainer.callbacks if isinstance(c, EpochTimer)), None)
    results = {
        **fit_metrics,
        **({"test_acc": test_metrics["test/acc"], "test_loss": test_metrics["test/loss"],
            "tested": test_ckpt or "final weights"} if tested else {"tested": None}),
        "epochs": trainer.current_epoch,
        "steps": trainer.global_step,
        "wall_time_s": round(time.perf_counter() - start, 2),
        "epoch_time_s": [round(t, 3) for t in timer.times] if timer else [],
        "params": sum(p.numel() for p in model.net.parameters()),
        "model": cfg.model._target_,
        "recipe": cfg.get("recipe", "custom"),
        "seed": cfg.seed,
        "overrides": _overrides(),
        "resumed_from": ckpt_path,
        "run_dir": str(run_dir),
    }
    if trainer.is_global_zero and trainer.fast_dev_run:
        log.info("fast_dev_run: %d training step(s) ran; no results.json, report, checkpoint or log written",
                 results["steps"])
    elif trainer.is_global_zero:
        if cfg.get("report") and tested:
            from fashion_lightning.report import METRICS_CSV, write_report

            write_report(model, datamodule, run_dir / "report", metrics_csv=run_dir / METRICS_CSV)
        write_json(run_dir / "results.json", results)
        if tested:
            log.info("test accuracy %.4f (%s), %d steps in %.1f s; results: %s", results["test_acc"],
                     results["tested"], results["steps"], results["wall_time_s"], run_dir / "results.json")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        trainer.strategy.barrier("results written")  # no rank exits while rank 0 still writes
        torch.distributed.destroy_process_group()
    return results


def route_lightning_logs() -> None:
    """Lightning's messages and Python's warnings into the logging Hydra set up (the console and the run's
    ``train.log``); Lightning's advertising tips dropped. Lightning gives its loggers a handler of their own when
    it is imported before logging is configured, which kept them out of ``train.log``."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "torchmetrics"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(lambda r: "Tip:" not in str(r.msg))
    # a deprecation inside Lightning 2.6 itself, raised under torch 2.14: nothing a user can act on
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    logging.captureWarnings(True)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    """The Hydra entry point; returns ``cfg.optimized_metric`` from the results for sweepers."""
    route_lightning_logs()
    with reported_as_one_line():
        return train(cfg).get(cfg.optimized_metric)


if __name__ == "__main__":
    set_up_process()
    main()
