"""The experiment trackers as logger choices, each run read back with the tracker's own client: logger=mlflow (a
SQLite store under output_root), logger=wandb (offline, under the run directory)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import compose_train, quick_overrides
from fashion_lightning.train import train


def csv_history(run_dir: Path, key: str) -> list[tuple[int, float]]:
    """(step, value) of ``key`` as the CSV logger beside the tracker wrote it."""
    rows = csv.DictReader(open(run_dir / "logs" / "metrics.csv"))
    return [(int(row["step"]), float(row[key])) for row in rows if row[key]]


def quick_run(data_dir: Path, run_dir: Path, logger: str) -> dict:
    """Two epochs of a few steps, logged by the CSV logger and ``logger``."""
    return train(compose_train(*quick_overrides(data_dir, run_dir), "model=dense", "trainer.max_epochs=2",
                               "+trainer.limit_test_batches=1", f"logger=[csv,{logger}]"))


def test_mlflow_records_the_run_in_a_sqlite_store_under_the_output_root(data_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("mlflow", reason="needs the mlflow extra: pip install -e '.[mlflow]'")
    from mlflow import MlflowClient

    results = quick_run(data_dir, tmp_path / "run", "mlflow")
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")  # output_root: the run's parent
    experiment = client.get_experiment_by_name("fashion_lightning")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["run_dir"] == str(tmp_path / "run")
    assert experiment.artifact_location == str(tmp_path / "mlartifacts")
    for key in ("val/acc", "train/loss"):
        history = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
        assert history == csv_history(tmp_path / "run", key) and len(history) == 2
    assert run.data.metrics["test/acc"] == pytest.approx(results["test_acc"])
    assert run.data.params["lr"] == "0.001" and run.data.params["hidden1"] == "128"


def wandb_records(run_dir: Path, *options: str) -> str:
    """What ``wandb leet inspect`` (W&B's reader of a run's transaction log) prints for the offline run in
    ``run_dir``."""
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    done = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", *options, str(offline)],
                          capture_output=True, text=True, timeout=60)
    if done.returncode != 0 and "No such command" in done.stderr:
        pytest.skip("needs wandb >= 0.31 (wandb leet inspect): pip install -e '.[wandb]'")
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_wandb_runs_offline_each_train_its_own_finished_run(data_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("wandb", reason="needs the wandb extra: pip install -e '.[wandb]'")
    import wandb

    # two runs in one process, as a multirun's jobs: each ends its W&B run, or the second would log into the first
    for name in ("first", "second"):
        results = quick_run(data_dir, tmp_path / name, "wandb")
        assert wandb.run is None
        summary = json.loads(wandb_records(tmp_path / name, "--summary"))
        assert summary["state"] == "finished" and summary["config"]["hidden1"] == 128
        assert summary["summary"]["test/acc"] == pytest.approx(results["test_acc"])
        history = [json.loads(line)["history"]["item"] for line in wandb_records(tmp_path / name).splitlines()
                   if json.loads(line)["type"] == "history"]
        for key in ("val/acc", "train/loss"):
            logged = [(item["trainer/global_step"], item[key]) for item in history if key in item]
            expected = csv_history(tmp_path / name, key)
            assert [step for step, _ in logged] == [step for step, _ in expected] and len(logged) == 2
            # flat lists: pytest.approx compares no nested structures (pytest >= 9 refuses them)
            assert [value for _, value in logged] == pytest.approx([value for _, value in expected])
