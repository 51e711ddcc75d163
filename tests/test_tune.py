"""The hyperparameter search: trials chosen on validation, pruned, interrupted and resumed from the database."""

from __future__ import annotations

import csv
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from conftest import quick_overrides
from fashion_lightning import UserError
from fashion_lightning.app import CONFIG_DIR

tune = pytest.importorskip("fashion_lightning.tune", reason="needs the tune extra: pip install -e '.[tune]'")
optuna = pytest.importorskip("optuna")


def compose_tune(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("tune", overrides=list(overrides))


class Interrupt(L.Callback):
    """Ctrl-C in the middle of a fit, as SaveOnInterrupt turns a SIGINT into."""

    def on_before_backward(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step >= 3:
            raise KeyboardInterrupt("stopped by SIGINT")


def test_a_search_prunes_is_interrupted_and_resumes_from_its_database(data_dir: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    study_dir = tmp_path / "study"
    overrides = [o for o in quick_overrides(data_dir, tmp_path / "unused") if "limit_train" not in o]
    cfg = compose_tune(*overrides, "model=dense", "trainer.max_epochs=2", "+trainer.limit_train_batches=12",
                       f"tune.study_dir={study_dir}", "tune.n_trials=3", "tune.seeds=[5]",
                       "tune.pruner.startup_trials=1", "tune.pruner.warmup_epochs=0",
                       "~tune.space.model", "~tune.space.data",
                       "+tune.space.model.lr={low:1.0e-6,high:1.0e-2,log:true}",
                       "tune.enqueue=[{model.lr:0.003},{model.lr:1.0e-6},{model.lr:0.003}]")
    real_train = tune.train

    def interrupted_third(run_cfg: DictConfig, callbacks: list) -> dict:
        extra = [Interrupt()] if run_cfg.paths.output_dir.endswith("trial_0002") else []
        return real_train(run_cfg, callbacks=[*callbacks, *extra])

    monkeypatch.setattr(tune, "train", interrupted_third)
    with pytest.raises(KeyboardInterrupt):
        tune.tune(cfg)
    study = optuna.load_study(study_name="search", storage=f"sqlite:///{study_dir}/study.db")
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "PRUNED", "FAIL"]  # the tiny rate's curve fell below the first trial's: pruned
    assert study.trials[1].last_step == 0 and study.trials[2].user_attrs["interrupted"]
    for trial in study.trials[:2]:  # trials select on validation and never test
        results = json.loads((Path(trial.user_attrs["run_dir"]) / "results.json").read_text()) \
            if trial.state.name == "COMPLETE" else None
        assert results is None or ("test_acc" not in results and results["tested"] is None)

    monkeypatch.setattr(tune, "train", real_train)
    summary = tune.tune(cfg)  # the same command again: the interrupted trial runs again, and the study ends
    study = optuna.load_study(study_name="search", storage=f"sqlite:///{study_dir}/study.db")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "PRUNED", "FAIL", "COMPLETE"]
    assert study.trials[3].params == study.trials[2].params and study.trials[3].user_attrs["retry_of"] == 2
    assert summary["best_params"] == study.best_params and summary["val_acc"] == study.best_value > 0.5
    (rerun,) = [json.loads((study_dir / "best" / "seed_5" / "results.json").read_text())]
    assert rerun["seed"] == 5 and rerun["test_acc"] == summary["test_acc"][0] and rerun["recipe"] == "search-best"
    rows = list(csv.DictReader(open(study_dir / "trials.csv")))
    assert [r["state"] for r in rows] == ["COMPLETE", "PRUNED", "FAIL", "COMPLETE"] and "model.lr" in rows[0]
    text = (study_dir / "summary.md").read_text()
    assert f"trial {study.best_trial.number}" in text and "test accuracy" in text
    for picture in ("history.png", "importances.png"):
        assert (study_dir / picture).stat().st_size > 5_000 and f"]({picture})" in text
    assert json.loads((study_dir / "best.json").read_text())["best_trial"] == study.best_trial.number


@pytest.mark.parametrize(("override", "message"), [
    ("+tune.space.model.lr={low:0.1}", r"tune.space.model.lr must be \{low: ..., high: ...\[, log: true\]"),
    ("+tune.space.model.nope={low:1,high:2}", "tune.space names model.nope, which the training config does not have"),
    ("tune.storage=nope://x", r"tune.storage='nope://x' cannot be opened \(.*\); give an SQLAlchemy URL"),
    ("+tune.space.model.lr={low:0.01,high:0.001}", r"tune.space.model.lr must be .*\(low <= high; with log"),
    ("+tune.space.model.lr={low:0,high:1,log:true}", r"tune.space.model.lr must be .*\(low <= high; with log"),
    ("+tune.space.data.batch_size={choices:5}", r"tune.space.data.batch_size must be .* or \{choices: \[...\]\}"),
    ("tune.n_trials=0", "tune.n_trials must be a positive integer, got 0"),
    ("tune.heartbeat_s=0", "tune.heartbeat_s must be a positive number, got 0"),
    ("tune.timeout_s=-5", "tune.timeout_s must be a positive number or null, got -5"),
    ("tune.seeds=3", r"tune.seeds must be a list of integers in 0..4294967295 \(or \[\]\), got 3"),
])
def test_a_bad_search_space_is_one_clear_error(override: str, message: str, tmp_path: Path) -> None:
    cfg = compose_tune(f"tune.study_dir={tmp_path}", "~tune.space.model", "~tune.space.data", override)
    with pytest.raises(UserError, match=message):
        tune.tune(cfg)
    assert not (tmp_path / "study.db").exists() or override.startswith("tune.storage")  # refused before the study


def test_the_cli_answers_a_bad_storage_in_one_line(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "fashion_lightning.tune", "tune.storage=nope://x",
                           f"tune.study_dir={tmp_path}"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("error: tune.storage='nope://x' cannot be opened")
    assert "Traceback" not in done.stderr


def test_two_processes_search_one_study(data_dir: Path, tmp_path: Path) -> None:
    study_dir = tmp_path / "study"
    args = [sys.executable, "-m", "fashion_lightning.tune", *quick_overrides(data_dir, tmp_path / "unused"),
            "model=dense", f"tune.study_dir={study_dir}", "tune.n_trials=4", "tune.pruner.enabled=false",
            "~tune.space.data"]
    study_dir.mkdir()
    searches = [subprocess.Popen([*args, f"tune.seeds={seeds}"], cwd=tmp_path, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for seeds in ("[1]", "[]")]  # one re-runs
    outputs = [search.communicate(timeout=600) for search in searches]
    assert [search.returncode for search in searches] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    study = optuna.load_study(study_name="search", storage=f"sqlite:///{study_dir}/study.db")
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(complete) >= 4 and len({t.user_attrs["run_dir"] for t in complete}) == len(complete)
    assert all((Path(t.user_attrs["run_dir"]) / "results.json").is_file() for t in complete)
    assert (study_dir / "best" / "seed_1" / "results.json").is_file()


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # trials asked outside optimize
def test_two_searchers_of_one_study_draw_different_trials_reproducibly(tmp_path: Path) -> None:
    def first_trials(study_dir: Path, processes: int) -> list[dict]:
        """The parameters of trials 0 and 1 when ``processes`` searchers (1 or 2) open the study as `tune` does."""
        study_dir.mkdir()
        cfg = compose_tune(f"tune.study_dir={study_dir}")
        searchers = [tune.open_study(cfg) for _ in range(processes)]
        trials = [searchers[i % processes].ask() for i in range(2)]
        return [tune.suggest(trial, cfg.tune.space) for trial in trials]

    two = first_trials(tmp_path / "two", 2)
    assert two[0] != two[1]
    assert first_trials(tmp_path / "again", 2) == two  # reproducible from the seed
    assert first_trials(tmp_path / "one", 1) == two  # whichever process draws trial n


def running_trial(study_dir: Path, heartbeat_age_s: int, lr: float | None = None) -> int:
    """The number of a trial that a search process runs (the next waiting one, else a new one with ``lr``) or,
    with an old heartbeat, left RUNNING when it was killed with SIGKILL. (Optuna records a heartbeat as now: the
    test ages its row in the database.)"""
    storage = optuna.storages.RDBStorage(f"sqlite:///{study_dir}/study.db", heartbeat_interval=60)
    study = optuna.create_study(study_name="search", storage=storage, direction="maximize", load_if_exists=True)
    if lr is not None:
        study.enqueue_trial({"model.lr": lr})
    trial = study.ask({"model.lr": optuna.distributions.FloatDistribution(1e-6, 1e-2, log=True)})
    trial_id = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name("search"), trial.number)
    storage.record_heartbeat(trial_id)
    with sqlite3.connect(study_dir / "study.db") as db:
        db.execute("UPDATE trial_heartbeats SET heartbeat = datetime(heartbeat, ?) WHERE trial_id = ?",
                   (f"-{heartbeat_age_s} seconds", trial_id))
    storage.engine.dispose()
    return trial.number


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # the trials made here, asked outside optimize
def test_a_trial_of_a_killed_process_is_failed_and_run_again(data_dir: Path, tmp_path: Path) -> None:
    """A trial without a heartbeat for 3 x tune.heartbeat_s is failed and its parameters run again, also when the
    study already has its n_trials finished trials (the retry then waits for a search that needs it)."""
    study_dir = tmp_path / "study"
    study_dir.mkdir()
    overrides = [o for o in quick_overrides(data_dir, tmp_path / "unused") if "limit_train" not in o]
    cfg = compose_tune(*overrides, "model=dense", "+trainer.limit_train_batches=4", f"tune.study_dir={study_dir}",
                       "tune.n_trials=2", "tune.seeds=[]", "tune.pruner.enabled=false", "~tune.space.model",
                       "~tune.space.data", "+tune.space.model.lr={low:1.0e-6,high:1.0e-2,log:true}")
    retried = optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number

    def trials() -> list[optuna.trial.FrozenTrial]:
        return optuna.load_study(study_name="search", storage=cfg.tune.storage).trials

    dead = running_trial(study_dir, heartbeat_age_s=3600, lr=0.003)  # tune.heartbeat_s=60: stale after 180 s
    tune.tune(cfg)
    assert [t.state.name for t in trials()] == ["FAIL", "COMPLETE", "COMPLETE"]
    assert retried(trials()[1]) == dead and trials()[1].params == {"model.lr": 0.003}

    dead = running_trial(study_dir, heartbeat_age_s=3600, lr=0.001)  # n_trials finished: tune searches no more
    tune.tune(cfg)
    assert [t.state.name for t in trials()] == ["FAIL", "COMPLETE", "COMPLETE", "FAIL", "WAITING"]
    assert retried(trials()[4]) == dead and trials()[4].params == {"model.lr": 0.001}

    alive = running_trial(study_dir, heartbeat_age_s=100)  # another process runs the retry: left running
    tune.tune(cfg)
    assert [t.state.name for t in trials()] == ["FAIL", "COMPLETE", "COMPLETE", "FAIL", "RUNNING"] and alive == 4
