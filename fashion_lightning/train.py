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
from filelock import FileLock, Timeout
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from fashion_lightning.app import (
    CONFIG_DIR,
    DATA_PATHS,
    launch_path,
    reported_as_one_line,
    set_up_process,
    stopped_by_signals,
    with_launch_paths,
    write_json,
)
from fashion_lightning.errors import UserError, check_positive_int, is_seed
from fashion_lightning.lit.callbacks import EpochTimer
from fashion_lightning.lit.checkpoints import check_compatible, check_same_data, read_checkpoint
from fashion_lightning.lit.classifier import ImageClassifier
from fashion_lightning.lit.profilers import NoProfiler

log = logging.getLogger(__name__)


def train(cfg: DictConfig, callbacks: Sequence[L.Callback] = ()) -> dict[str, Any]:
    """Fit ``cfg.model`` on ``cfg.data``, test the chosen checkpoint once (unless ``cfg.test`` is false), write
    ``results.json``; return it.

    ``cfg`` is the composed ``train`` config; ``cfg.paths.output_dir`` is the run directory (without a Hydra app
    running, a new one under ``cfg.paths.output_root``: `run_config`). ``callbacks`` are Lightning callbacks added
    to the configured ones (a tuner's pruning callback, for example). Under ``trainer.fast_dev_run`` nothing is
    written, as Lightning writes no checkpoint or log then.
    """
    start = time.perf_counter()
    check_config(cfg)
    cfg = run_config(cfg)
    with run_dir_lock(Path(cfg.paths.output_dir), writes=not cfg.trainer.get("fast_dev_run")):
        return fit_and_test(cfg, callbacks, start)


def fit_and_test(cfg: DictConfig, callbacks: Sequence[L.Callback], start: float) -> dict[str, Any]:
    """`train`'s work, in the run directory it holds."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    steps = cfg.get("steps_per_execution", 1)

    datamodule: L.LightningDataModule = instantiate(cfg.data)
    check_test_choice(cfg, datamodule)
    model = build_model(cfg.model, steps)
    ckpt_path = resume_checkpoint(cfg, model, datamodule)
    callbacks = [*(instantiate(c) for c in (cfg.get("callbacks") or {}).values()), *callbacks]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values()]
    trainer = instantiate_trainer(cfg.trainer, callbacks=callbacks, logger=loggers or False)

    with ending_wandb_run(trainer.loggers):
        with manual_optimization_refusals(steps):
            trainer.fit(model, datamodule=fit_datamodule(datamodule, steps), ckpt_path=ckpt_path)
        fit_metrics = {k.replace("/", "_"): float(v) for k, v in trainer.callback_metrics.items() if "/" in k}
        test_ckpt, test_metrics = test(cfg, trainer, model, datamodule)

    results = {
        **fit_metrics,
        **test_metrics,
        "tested": test_ckpt,
        "epochs": trainer.current_epoch,
        "steps": trainer.global_step,
        "wall_time_s": round(time.perf_counter() - start, 2),
        "epoch_time_s": epoch_times(trainer),
        "params": sum(p.numel() for p in model.net.parameters()),
        "model": cfg.model._target_,
        "recipe": cfg.get("recipe", "custom"),
        "seed": cfg.seed,
        "overrides": _overrides(),
        "resumed_from": ckpt_path,
        "run_dir": cfg.paths.output_dir,
    }
    write_results(cfg, trainer, model, datamodule, results)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        trainer.strategy.barrier("results written")  # no rank exits while rank 0 still writes
        torch.distributed.destroy_process_group()
    return results


def test(cfg: DictConfig, trainer: L.Trainer, model: ImageClassifier,
         datamodule: L.LightningDataModule) -> tuple[str | None, dict[str, float]]:
    """Test the checkpoint ``cfg.test_ckpt`` chooses once, unless ``cfg.test`` is false: what was tested (a path, or
    "final weights"; None when nothing was) and ``test_acc``, ``test_loss``."""
    if not cfg.get("test", True):
        return None, {}
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if cfg.test_ckpt == "best" and not best:
        log.warning("test_ckpt=best, but no best checkpoint was saved (nothing validated?): testing the final weights")
    ckpt_path = best if cfg.test_ckpt == "best" and best else None
    (metrics,) = trainer.test(model, datamodule=datamodule, ckpt_path=ckpt_path, verbose=False)
    return ckpt_path or "final weights", {"test_acc": metrics["test/acc"], "test_loss": metrics["test/loss"]}


def epoch_times(trainer: L.Trainer) -> list[float]:
    """The training epochs' wall times an `EpochTimer` among the callbacks measured (none without one)."""
    timer = next((c for c in trainer.callbacks if isinstance(c, EpochTimer)), None)
    return [round(t, 3) for t in timer.times] if timer else []


def write_results(cfg: DictConfig, trainer: L.Trainer, model: ImageClassifier, datamodule: L.LightningDataModule,
                  results: dict[str, Any]) -> None:
    """On rank 0: the report (``cfg.report``, after a test) and ``results.json`` in the run directory, the latter
    last, so that a run whose report failed never looks finished. Nothing under ``fast_dev_run``."""
    if not trainer.is_global_zero:
        return
    if trainer.fast_dev_run:
        log.info("fast_dev_run: %d training step(s) ran; no results.json, report, checkpoint or log written",
                 results["steps"])
        return
    run_dir = Path(cfg.paths.output_dir)
    if cfg.get("report") and results["tested"]:
        from fashion_lightning.report import METRICS_CSV, write_report

        write_report(model, datamodule, run_dir / "report", metrics_csv=run_dir / METRICS_CSV)
    write_json(run_dir / "results.json", results)
    if results["tested"]:
        log.info("test accuracy %.4f (%s), %d steps in %.1f s; results: %s", results["test_acc"], results["tested"],
                 results["steps"], results["wall_time_s"], run_dir / "results.json")


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
    """The configured Trainer, with `NoProfiler` where no profiler is given (Lightning's default, at less cost a
    hook call); Lightning's refusal of a setting as one `UserError`."""
    if trainer_cfg.get("profiler") is None and kwargs.get("profiler") is None:
        kwargs["profiler"] = NoProfiler()
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


def resume_hint(run_dir: Path) -> str:
    """What a stopped run left to resume from in ``run_dir``, and the command that resumes it."""
    saved = [name for name in RESUMABLE if (run_dir / "checkpoints" / name).is_file()]
    if not saved:
        return f"no checkpoint was saved in {run_dir} (no training step had finished); start the run again"
    return (f"{' and '.join(saved)} saved in {run_dir / 'checkpoints'}; resume with: python -m fashion_lightning.train "
            f"ckpt_path={run_dir} and the run's other settings")


@contextmanager
def run_dir_lock(run_dir: Path, writes: bool = True) -> Iterator[None]:
    """Hold ``run_dir`` for this run (rank 0, for the whole run, where it ``writes``: not under ``fast_dev_run``): a
    second run started into the same folder is refused in one line, never mixed with this one's checkpoints, logs
    and results."""
    if rank_zero_only.rank != 0 or not writes:
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(run_dir / ".run.lock", timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise UserError(f"another run is writing into {run_dir} now; give each run its own folder "
                        "(hydra.run.dir, or leave it to Hydra's default)") from None
    try:
        yield
    finally:
        lock.release()


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
    """``model_cfg``'s LightningModule; with ``steps_per_execution`` > 1 its grouped-steps twin (`lit.grouped`)."""
    if steps_per_execution == 1:
        return instantiate(model_cfg)
    from fashion_lightning.lit.grouped import grouped  # the opt-in: nothing else imports it

    build = instantiate(model_cfg, _partial_=True)
    return grouped(build.func)(*build.args, **build.keywords)


def fit_datamodule(datamodule: L.LightningDataModule, steps_per_execution: int) -> L.LightningDataModule:
    """The datamodule ``fit`` reads: ``datamodule``, its training batches grouped where ``steps_per_execution`` > 1."""
    if steps_per_execution == 1:
        return datamodule
    from fashion_lightning.lit.grouped import GroupedDataModule

    return GroupedDataModule(datamodule, steps_per_execution)


def check_config(cfg: DictConfig) -> None:
    """One clear error for a setting of the train config that would fail later, or not at all."""
    check_settings(cfg)
    check_accelerator(cfg.trainer.accelerator)
    if cfg.test_ckpt not in ("best", "last"):
        raise UserError(f"test_ckpt must be best or last, got {cfg.test_ckpt!r}")
    if not is_seed(cfg.seed):
        raise UserError(f"seed must be an integer in 0..{2**32 - 1}, got {cfg.seed!r}")
    check_positive_int("steps_per_execution", cfg.get("steps_per_execution", 1))


def check_test_choice(cfg: DictConfig, datamodule: L.LightningDataModule) -> None:
    """Refuse choosing the tested checkpoint by the test set itself."""
    if cfg.test_ckpt == "best" and cfg.get("test", True) and getattr(datamodule, "num_val", None) == 0:
        raise UserError("data.val_split=0 validates on the test set, so test_ckpt=best would choose the epoch by its "
                        "test accuracy and report that same accuracy; set test_ckpt=last (as the seed experiments do)")


def resume_checkpoint(cfg: DictConfig, model: ImageClassifier, datamodule: L.LightningDataModule) -> str | None:
    """``cfg.ckpt_path`` as a file (`resolve_ckpt_path`), checked against the model and the data; None for none."""
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), cfg.paths.output_root)
    if ckpt_path:
        checkpoint = read_checkpoint(ckpt_path)
        check_compatible(checkpoint, model, ckpt_path)
        check_same_data(checkpoint, datamodule, ckpt_path)
    return ckpt_path


@contextmanager
def manual_optimization_refusals(steps_per_execution: int) -> Iterator[None]:
    """Lightning's refusals of a setting under manual optimization (grouped steps), as one `UserError` naming the
    way out; and its warning that a log interval exceeds an epoch's training steps, which count groups there."""
    try:
        with warnings.catch_warnings():
            if steps_per_execution > 1:  # grouped steps log each batch themselves
                warnings.filterwarnings("ignore", message="The number of training batches .* logging interval")
            yield
    except MisconfigurationException as err:
        if steps_per_execution == 1 or "manual optimization" not in str(err):
            raise
        raise UserError(f"{str(err).strip()} (steps_per_execution={steps_per_execution} trains with Lightning's "
                        "manual optimization); set steps_per_execution=1") from err


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
    cfg = with_launch_paths(cfg, *RUN_PATHS)
    Path(cfg.paths.output_root).mkdir(parents=True, exist_ok=True)  # as the app does first: a tracker's store is there
    return cfg


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
    with reported_as_one_line(), stopped_by_signals(lambda: resume_hint(Path(launch_path(cfg.paths.output_dir)))):
        return train(cfg).get(cfg.optimized_metric)


if __name__ == "__main__":
    set_up_process()
    main()
