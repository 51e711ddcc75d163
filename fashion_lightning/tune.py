"""Hyperparameter search with Optuna around `train`: ``python -m fashion_lightning.tune`` (a Hydra app).

Each trial is a training run (``<study dir>/trial_<n>/``) chosen on its validation accuracy, pruned from its
validation curve (`optuna_integration.PyTorchLightningPruningCallback`) and never tested. The study lives in a
database (SQLite in the study directory by default, any SQLAlchemy URL), so a search stopped with Ctrl-C resumes
where it stopped, the interrupted trial run again, and several processes can search one study: trial n draws from a
sampler seeded with the config's ``seed`` and n (`TrialSeededTPE`), so the processes draw differently and the study
is reproducible from its seed. A trial whose process was killed is failed and run again once (`fail_dead_trials`).
At the end the study directory gets ``trials.csv``, ``summary.md`` and Optuna's plots, and the best trial is
trained again with each of ``tune.seeds`` and tested once (``best/seed_<s>/``).

Optuna is driven directly: the Hydra Optuna sweeper (1.3.0) pins ``optuna<3``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import statistics
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from fashion_lightning.app import (
    CONFIG_DIR,
    DATA_PATHS,
    reported_as_one_line,
    set_up_process,
    with_launch_paths,
    write_figure,
    write_json,
    write_text,
)
from fashion_lightning.errors import UserError, check_positive_int, is_seed
from fashion_lightning.train import route_lightning_logs, train

try:
    import optuna
    import sqlalchemy.exc
    from optuna.distributions import BaseDistribution
    from optuna.trial import FrozenTrial, Trial, TrialState
    from optuna_integration import PyTorchLightningPruningCallback
except ImportError as err:  # pragma: no cover - the message names the extra
    raise ImportError("fashion_lightning.tune needs the tune extra: pip install 'fashion_lightning[tune]'") from err

log = logging.getLogger(__name__)
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
INTERRUPTED = "interrupted"
"""User attribute of a trial stopped by Ctrl-C: the next run of the study runs its parameters again."""
RETRY_OF = "retry_of"
MONITOR = "val/acc"
"""What a trial reports after each epoch (for pruning); the study maximizes its best value, ``val_acc_best``."""


def flatten(space: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``space``'s ranges by dotted key: ``{model: {lr: {low: .., high: ..}}}`` -> ``{"model.lr": {...}}``."""
    flat = {}
    for key, node in space.items():
        is_range = not isinstance(node, Mapping) or {"low", "high", "choices"} & set(node)
        flat |= {prefix + key: node} if is_range else flatten(node, f"{prefix}{key}.")
    return flat


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def range_spec(key: str, node: Any) -> dict[str, Any]:
    """``tune.space``'s entry ``key`` as a dict: ``{low, high[, log, step]}`` (low <= high; with ``log``, low > 0 and
    no step) or ``{choices: [...]}`` (a non-empty list); anything else is a `UserError` saying what is accepted."""
    spec = dict(node) if isinstance(node, Mapping) else {}
    if set(spec) == {"choices"}:
        choices = spec["choices"]
        ok = isinstance(choices, Sequence) and not isinstance(choices, str) and len(choices) > 0
    elif {"low", "high"} <= set(spec) <= {"low", "high", "log", "step"}:
        low, high, log, step = spec["low"], spec["high"], spec.get("log"), spec.get("step")
        ok = (_number(low) and _number(high) and low <= high and (step is None or (_number(step) and step > 0))
              and (not log or (low > 0 and step is None)))
    else:
        ok = False
    if not ok:
        raise UserError(f"tune.space.{key} must be {{low: ..., high: ...[, log: true][, step: ...]}} (low <= high; "
                        f"with log, low > 0 and no step) or {{choices: [...]}}, got {node!r}")
    return spec


def suggest(trial: Trial, space: Mapping[str, Any]) -> dict[str, Any]:
    """The trial's value for each ``key: {low, high[, log, step]}`` or ``key: {choices: [...]}`` of ``space``
    (nested as the training config; whole numbers when ``low`` and ``high`` are, a float range otherwise)."""
    values = {}
    for key, node in flatten(space).items():
        spec = range_spec(key, node)
        if "choices" in spec:
            values[key] = trial.suggest_categorical(key, list(spec["choices"]))
            continue
        low, high = spec["low"], spec["high"]
        kwargs = {k: spec[k] for k in ("log", "step") if spec.get(k) is not None}
        whole = all(isinstance(v, int) and not isinstance(v, bool) for v in (low, high))
        values[key] = (trial.suggest_int if whole else trial.suggest_float)(key, low, high, **kwargs)
    return values


def check_known(config: DictConfig, key: str) -> None:
    """A `UserError` unless ``config`` has the dotted ``key``."""
    if OmegaConf.select(config, key, default=KeyError) is KeyError:
        raise UserError(f"tune.space names {key}, which the training config does not have; "
                        "search keys of the composed config (python -m fashion_lightning.train --cfg job)")


def check_settings(cfg: DictConfig) -> None:
    """One clear error, before the study opens, for a ``tune`` setting that Optuna (or a trial) would fail on later."""
    t = cfg.tune
    if not is_seed(cfg.seed):  # the sampler's too
        raise UserError(f"seed must be an integer in 0..{2**32 - 1}, got {cfg.seed!r}")
    check_positive_int("tune.n_trials", t.n_trials)
    for key, value, optional in (("heartbeat_s", t.heartbeat_s, False), ("timeout_s", t.timeout_s, True)):
        if not (optional and value is None) and not (_number(value) and value > 0):
            raise UserError(f"tune.{key} must be a positive number{' or null' if optional else ''}, got {value!r}")
    if not isinstance(t.seeds, Sequence) or isinstance(t.seeds, str) or not all(map(is_seed, t.seeds)):
        raise UserError(f"tune.seeds must be a list of integers in 0..{2**32 - 1} (or []), got {t.seeds!r}")
    for key, node in flatten(t.space).items():
        range_spec(key, node)
        check_known(cfg, key)


def trial_config(cfg: DictConfig, values: Mapping[str, Any], run_dir: Path, **settings: Any) -> DictConfig:
    """``cfg``'s training config with ``values`` set (dotted keys, which must exist) and the run directory."""
    run = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "tune"])
    for key, value in {**values, **settings, "paths.output_dir": str(run_dir)}.items():
        check_known(run, key)
        OmegaConf.update(run, key, value, merge=False)
    return run


class TrialSeededTPE(optuna.samplers.BaseSampler):
    """Optuna's TPE sampler, seeded afresh for each trial from the config's ``seed`` and the trial's number.

    The database numbers trials uniquely, so processes searching one study never draw alike (one `TPESampler`
    seeded with ``seed`` in each would try the same parameters), and the study stays reproducible from its seed:
    trial n draws the same random numbers whichever process runs it. Its first trials (TPE's random start) are
    thereby the same; later ones depend also on the trials finished by then, as TPE's always do.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.by_trial: dict[int, optuna.samplers.TPESampler] = {}

    def tpe(self, trial: FrozenTrial) -> optuna.samplers.TPESampler:
        """The sampler of ``trial``, seeded with (``seed``, its number)."""
        if trial.number not in self.by_trial:
            seed = int(np.random.SeedSequence([self.seed, trial.number]).generate_state(1)[0])
            self.by_trial[trial.number] = optuna.samplers.TPESampler(seed=seed)
        return self.by_trial[trial.number]

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.tpe(trial).before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self.tpe(trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        return self.tpe(trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self.tpe(trial).sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        self.tpe(trial).after_trial(study, trial, state, values)
        del self.by_trial[trial.number]


def open_study(cfg: DictConfig) -> optuna.Study:
    """The study named ``tune.study`` in ``tune.storage``, made if new, with its sampler and pruner."""
    t = cfg.tune
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)
        for attempt in range(3):  # processes creating one database at once: the losers find it made and open it
            try:
                storage = optuna.storages.RDBStorage(str(t.storage), heartbeat_interval=t.heartbeat_s,
                                                     grace_period=3 * t.heartbeat_s,
                                                     heartbeat_stale_trial_callback=retry)
                break
            except (ValueError, ImportError, sqlalchemy.exc.SQLAlchemyError) as err:
                racing = isinstance(err, sqlalchemy.exc.IntegrityError | sqlalchemy.exc.OperationalError)
                if racing and attempt < 2:  # another process was creating the same tables
                    continue
                raise UserError(f"tune.storage={t.storage!r} cannot be opened ({type(err).__name__}: "
                                f"{str(err).splitlines()[0]}); give an SQLAlchemy URL such as sqlite:///study.db"
                                ) from None
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=t.pruner.startup_trials,
                                          n_warmup_steps=t.pruner.warmup_epochs)
              if t.pruner.enabled else optuna.pruners.NopPruner())
    return optuna.create_study(study_name=t.study, storage=storage, direction="maximize", load_if_exists=True,
                               sampler=TrialSeededTPE(cfg.seed), pruner=pruner)


def fail_dead_trials(study: optuna.Study) -> None:
    """Fail each running trial without a heartbeat for 3 x ``tune.heartbeat_s`` (its process was killed with
    SIGKILL, or its machine went down); `open_study`'s callback enqueues its parameters to run again once, when the
    study needs more trials. Optuna does this only before it starts a trial."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def requeue_interrupted(study: optuna.Study) -> None:
    """Enqueue again the parameters of each trial stopped by Ctrl-C that has not been run again yet."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get(RETRY_OF) for t in trials}
    for t in trials:
        if t.state == TrialState.FAIL and t.user_attrs.get(INTERRUPTED) and t.number not in retried:
            study.enqueue_trial(t.params, user_attrs={RETRY_OF: t.number})
            log.info("trial %d was interrupted: it runs again", t.number)


def objective(cfg: DictConfig, study_dir: Path) -> Any:
    """The function Optuna maximizes: a training run's best validation accuracy."""

    def run(trial: Trial) -> float:
        values = suggest(trial, cfg.tune.space)
        run_dir = study_dir / f"trial_{trial.number:04d}"
        trial.set_user_attr("run_dir", str(run_dir))
        run_cfg = trial_config(cfg, values, run_dir, test=False, report=False, recipe=f"{cfg.tune.study}-trial")
        run_cfg.callbacks.pop("on_interrupt", None)  # a stopped or pruned trial is run again whole, not resumed
        pruning = PyTorchLightningPruningCallback(trial, monitor=MONITOR)
        try:
            results = train(run_cfg, callbacks=[pruning])
        except (KeyboardInterrupt, SystemExit) as err:  # Lightning ends a fit stopped by Ctrl-C with sys.exit(1)
            trial.set_user_attr(INTERRUPTED, True)
            raise KeyboardInterrupt from err  # Optuna records the trial as failed, and the search stops
        return results["val_acc_best"]

    return run


def write_summary(study: optuna.Study, study_dir: Path, reruns: list[dict[str, Any]]) -> None:
    """``trials.csv``, ``summary.md``, ``history.png`` and ``importances.png`` in ``study_dir``."""
    trials = study.get_trials(deepcopy=False)
    names = sorted({k for t in trials for k in t.params})
    rows = [{"trial": t.number, "state": t.state.name, "value": t.value, "epochs": len(t.intermediate_values),
             "duration_s": round(t.duration.total_seconds(), 1) if t.duration else None,
             **{k: t.params.get(k) for k in names}, "run_dir": t.user_attrs.get("run_dir")} for t in trials]
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=["trial", "state", "value", "epochs", "duration_s", *names, "run_dir"])
    writer.writeheader()
    writer.writerows(rows)
    write_text(study_dir / "trials.csv", table.getvalue())
    pictures = plot_study(study, study_dir)
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    text = [f"# Study {study.study_name}", "",
            f"{len(trials)} trials: {sum(t.state == TrialState.COMPLETE for t in trials)} complete, "
            f"{sum(t.state == TrialState.PRUNED for t in trials)} pruned, "
            f"{sum(t.state == TrialState.FAIL for t in trials)} failed. Chosen on validation accuracy; "
            "the test set is used only by the re-runs of the best trial.", ""]
    if done:
        best = study.best_trial
        text += [f"Best: trial {best.number}, validation accuracy {best.value:.4f}, with", "",
                 *[f"- `{k}={v}`" for k, v in best.params.items()], ""]
    if reruns:
        accs = [r["test_acc"] for r in reruns]
        spread = f" ± {statistics.stdev(accs):.4f}" if len(accs) > 1 else ""
        text += [f"Re-run with seeds {', '.join(str(r['seed']) for r in reruns)}: test accuracy "
                 f"**{statistics.mean(accs):.4f}**{spread} (each tested once).", ""]
    text += ["| trial | state | validation acc | epochs | duration (s) | " + " | ".join(names) + " |",
             "|---:|---|---:|---:|---:|" + "---|" * len(names)]
    text += [f"| {r['trial']} | {r['state']} | {'' if r['value'] is None else format(r['value'], '.4f')} | "
             f"{r['epochs']} | {r['duration_s']} | " + " | ".join(str(r[k]) for k in names) + " |" for r in rows]
    text += ["", *[f"![{p[:-4]}]({p})" for p in pictures], ""]
    write_text(study_dir / "summary.md", "\n".join(text))


def plot_study(study: optuna.Study, study_dir: Path) -> list[str]:
    """Optuna's optimization history and parameter importances as PNGs; the names of those written."""
    from optuna.visualization import matplotlib as plots

    written = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
        charts = [("history.png", lambda: plots.plot_optimization_history(study))]
        if len(complete) >= 2 and len({k for t in complete for k in t.params}) >= 1:
            evaluator = optuna.importance.PedAnovaImportanceEvaluator()
            charts.append(("importances.png", lambda: plots.plot_param_importances(study, evaluator=evaluator)))
        for name, chart in charts:
            try:
                axes = chart()
            except (ValueError, RuntimeError) as err:  # too few distinct trials for importances, say
                log.warning("no %s: %s", name, err)
                continue
            figure = axes.figure
            figure.set_size_inches(8, 5)
            figure.set_dpi(100)
            figure.tight_layout()
            write_figure(figure, study_dir / name)
            figure.clf()
            written.append(name)
    return written


def rerun_best(cfg: DictConfig, study: optuna.Study, study_dir: Path) -> list[dict[str, Any]]:
    """Train the best trial's parameters again with each of ``tune.seeds``, each tested once (a seed whose run
    with these parameters is already there is not run again)."""
    best = study.best_trial
    results = []
    for seed in cfg.tune.seeds:
        run_dir = study_dir / "best" / f"seed_{seed}"
        done = run_dir / "results.json"
        if done.is_file() and json.loads((run_dir / "params.json").read_text()) == best.params:
            results.append(json.loads(done.read_text()))
            continue
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "params.json", best.params)
        results.append(train(trial_config(cfg, best.params, run_dir, seed=seed, test=True,
                                          recipe=f"{cfg.tune.study}-best")))
    return results


def tune(cfg: DictConfig) -> dict[str, Any]:
    """Run (or resume) the study until ``tune.n_trials`` trials have finished, then re-run the best; return a
    summary: best parameters, validation accuracy and the re-runs' test accuracies."""
    check_settings(cfg)
    cfg = with_launch_paths(cfg, "paths.output_root", "tune.study_dir", *DATA_PATHS)
    study_dir = Path(cfg.tune.study_dir)
    study_dir.mkdir(parents=True, exist_ok=True)
    study = open_study(cfg)
    if not study.get_trials(deepcopy=False):
        for params in cfg.tune.enqueue:  # a new study tries these first, e.g. the recipe's own values
            study.enqueue_trial(OmegaConf.to_container(params))
    fail_dead_trials(study)  # also when no trial is left to run: none stays RUNNING for good
    requeue_interrupted(study)
    finished = sum(t.state in FINISHED for t in study.get_trials(deepcopy=False))
    if finished < cfg.tune.n_trials:
        log.info("study %s: %d of %d trials finished; searching", cfg.tune.study, finished, cfg.tune.n_trials)
        study.optimize(objective(cfg, study_dir), timeout=cfg.tune.timeout_s, gc_after_trial=True,
                       callbacks=[optuna.study.MaxTrialsCallback(cfg.tune.n_trials, states=FINISHED)])
        fail_dead_trials(study)  # those of another process that died during this search's last trial
    if not any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        write_summary(study, study_dir, [])
        raise UserError(f"study {cfg.tune.study} has no complete trial (all pruned or failed); see "
                        f"{study_dir / 'trials.csv'}")
    reruns = rerun_best(cfg, study, study_dir) if cfg.tune.seeds else []
    write_summary(study, study_dir, reruns)
    summary = {"study": cfg.tune.study, "best_trial": study.best_trial.number, "best_params": study.best_params,
               "val_acc": study.best_value, "test_acc": [r["test_acc"] for r in reruns],
               "summary": str(study_dir / "summary.md")}
    write_json(study_dir / "best.json", summary)
    return summary


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="tune")
def main(cfg: DictConfig) -> None:
    """The Hydra entry point; Ctrl-C stops the search, and the same command resumes it."""
    route_lightning_logs()
    optuna.logging.enable_propagation()
    optuna.logging.disable_default_handler()
    with reported_as_one_line():
        try:
            summary = tune(cfg)
        except KeyboardInterrupt:
            print(f"search interrupted; run the same command again to resume study {cfg.tune.study}")
            raise SystemExit(130) from None
    print(f"best trial {summary['best_trial']}: validation accuracy {summary['val_acc']:.4f}; "
          f"test accuracy of the re-runs {summary['test_acc']}; {summary['summary']}")


if __name__ == "__main__":
    set_up_process()
    main()
