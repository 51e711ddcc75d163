"""The shipped configs as Hydra users reach them: the Compose API, and relative paths under hydra.job.chdir=true."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir, initialize_config_module
from PIL import Image

from conftest import quick_overrides, smooth_item
from fashion_lightning.app import CONFIG_DIR
from fashion_lightning.train import train


def run_app(app: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    env.pop("FASHION_MNIST_DIR", None)
    return subprocess.run([sys.executable, "-m", f"fashion_lightning.{app}", *args], cwd=cwd, capture_output=True,
                          text=True, env=env, timeout=300)


def without_paths(data_dir: Path, tmp_path: Path) -> list[str]:
    """`quick_overrides` less its paths: the test sets its own."""
    return [o for o in quick_overrides(data_dir, tmp_path) if not o.startswith("paths.")]


def test_train_runs_on_a_config_composed_by_module_or_folder_without_a_hydra_app(
        data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    overrides = [*without_paths(data_dir, tmp_path), f"paths.data_dir={data_dir}", "paths.output_root=outs",
                 "model=dense"]
    with initialize_config_module("fashion_lightning.conf", version_base="1.3"):
        by_module = compose("train", overrides=overrides)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        assert compose("train", overrides=overrides) == by_module
    first, second = train(by_module), train(by_module)
    runs = sorted((tmp_path / "outs" / "runs").iterdir())
    assert len(runs) == 2 and {first["run_dir"], second["run_dir"]} == {str(run) for run in runs}  # a new one each
    for results in (first, second):
        run = Path(results["run_dir"])
        assert run.is_absolute() and json.loads((run / "results.json").read_text()) == results
        assert results["steps"] == 20 and (run / "checkpoints" / "best.ckpt").is_file()


def test_an_output_dir_given_is_the_run_directory_without_a_hydra_app(data_dir: Path, tmp_path: Path) -> None:
    with initialize_config_module("fashion_lightning.conf", version_base="1.3"):
        cfg = compose("train", overrides=[*quick_overrides(data_dir, tmp_path / "mine"), "model=dense"])
    assert train(cfg)["run_dir"] == str(tmp_path / "mine") and (tmp_path / "mine" / "results.json").is_file()
    assert not (tmp_path / "runs").exists()


def test_with_chdir_relative_data_output_and_last_checkpoint_mean_the_launch_folder(data_dir: Path,
                                                                                   tmp_path: Path) -> None:
    (tmp_path / "data").symlink_to(data_dir)
    args = [*without_paths(data_dir, tmp_path), "model=dense", "paths.data_dir=data", "paths.output_root=outs",
            "hydra.job.chdir=true"]
    done = run_app("train", *args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = (tmp_path / "outs" / "runs").iterdir()
    assert (run / "results.json").is_file() and not (run / "data").exists()  # the data was read, not extracted again
    assert "chdir: true" in (run / ".hydra" / "hydra.yaml").read_text()

    resumed = run_app("train", "-m", *args, "ckpt_path=last", "trainer.max_epochs=2", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (sweep,) = (tmp_path / "outs" / "multiruns").iterdir()
    results = json.loads((sweep / "0" / "results.json").read_text())
    assert results["resumed_from"] == str(run / "checkpoints" / "last.ckpt") and results["steps"] == 40
    summary = (sweep / "summary.csv").read_text()  # at the sweep root, though the job ran in its own folder
    assert "ckpt_path=last" in summary and ",ok," in summary


def test_with_chdir_predict_reads_its_checkpoint_images_and_data_from_the_launch_folder(trained_run: Path,
                                                                                       data_dir: Path,
                                                                                       tmp_path: Path) -> None:
    (tmp_path / "run").symlink_to(trained_run)
    (tmp_path / "data").symlink_to(data_dir)
    Image.fromarray(smooth_item()).save(tmp_path / "item.png")
    done = run_app("predict", "ckpt_path=run/checkpoints/best.ckpt", "inputs=[item.png,test:0]", "format=json",
                   "paths.data_dir=data", "data.download=false", "hydra.run.dir=elsewhere", "hydra.job.chdir=true",
                   cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout)
    assert [row["input"] for row in rows] == ["item.png", "test:0"] and all("prediction" in row for row in rows)


def test_with_chdir_compare_reads_and_writes_relative_to_the_launch_folder(tmp_path: Path) -> None:
    run = tmp_path / "outs" / "runs" / "one"
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps({"model": "fashion_lightning.CNN", "recipe": "seed_cnn",
                                                  "test_acc": 0.9, "epoch_time_s": [1.0], "params": 804_554}))
    done = run_app("compare", "runs=[outs/runs]", "out_dir=page", "hydra.run.dir=elsewhere", "hydra.job.chdir=true",
                   cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "seed_cnn" in (tmp_path / "page" / "compare.md").read_text()
    assert not (tmp_path / "elsewhere" / "page").exists()
