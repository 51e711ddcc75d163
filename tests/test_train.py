"""The Hydra training app: composition, train(cfg), the CLI, sweeps and their summary, clear failures."""

from __future__ import annotations

import csv
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
from hydra.types import RunMode
from hydra.utils import instantiate

from conftest import compose_train, one_line_error, quick_overrides
from fashion_lightning import CNN, BatchAugment, DenseBaseline, FashionMNISTDataModule
from fashion_lightning.errors import UserError
from fashion_lightning.lit.checkpoints import load_model
from fashion_lightning.train import check_accelerator, train

TRAINERS = ["default", "cpu", "gpu", "ddp", "ddp_cpu"]


def run_cli(*args: str, cwd: Path, module: str = "fashion_lightning.train") -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    env.pop("FASHION_MNIST_DIR", None)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.mark.parametrize("trainer", TRAINERS)
@pytest.mark.parametrize("model", ["cnn", "dense"])
def test_every_model_and_trainer_composes_and_instantiates(model: str, trainer: str, tmp_path: Path) -> None:
    cfg = compose_train(f"model={model}", f"trainer={trainer}", f"paths.output_dir={tmp_path}")
    assert isinstance(instantiate(cfg.model), CNN if model == "cnn" else DenseBaseline)
    assert isinstance(instantiate(cfg.data), FashionMNISTDataModule)
    if cfg.trainer.accelerator == "gpu":  # composed and checked against Trainer's signature, not started
        kwargs = {k: v for k, v in cfg.trainer.items() if k != "_target_"}
        inspect.signature(L.Trainer).bind(**kwargs)
        assert cfg.trainer.strategy == "ddp" if trainer == "ddp" else cfg.trainer.devices == 1
    else:
        trainer_obj = instantiate(cfg.trainer)
        assert isinstance(trainer_obj, L.Trainer)
        assert trainer_obj.num_devices == (2 if trainer == "ddp_cpu" else 1)
    for callback in cfg.callbacks.values():
        instantiate(callback)


def test_experiments_set_the_tutorial_recipes() -> None:
    cnn = compose_train("experiment=seed_cnn")
    assert cnn.model._target_ == "fashion_lightning.CNN" and cnn.model.keras_init and cnn.model.eps == 1e-7
    assert (cnn.data.batch_size, cnn.data.val_split, cnn.data.scale, cnn.trainer.max_epochs) == (32, 0, True, 5)
    assert cnn.test_ckpt == "last"
    dense = compose_train("experiment=seed_dense")
    assert dense.model._target_ == "fashion_lightning.DenseBaseline" and dense.model.keras_init
    assert (dense.data.scale, dense.trainer.max_epochs, dense.data.val_split) == (False, 10, 0)


@pytest.mark.parametrize(("experiment", "cls", "params"), [("best_cnn", CNN, 804_554),
                                                           ("best_dense", DenseBaseline, 29_898)])
def test_the_best_recipes_keep_the_architecture_and_never_select_on_the_test_set(experiment: str, cls: type,
                                                                               params: int) -> None:
    cfg = compose_train(f"experiment={experiment}")
    model, data = instantiate(cfg.model), instantiate(cfg.data)
    assert type(model) is cls and sum(p.numel() for p in model.net.parameters()) == params
    assert data.num_val == 5000 and cfg.test_ckpt == "last" and cfg.recipe == experiment  # validation carved
    assert isinstance(data.augment, BatchAugment) and data.augment.flip and model.hparams.eval_flip
    assert model.hparams.label_smoothing > 0 and model.hparams.schedule == "cosine"


@pytest.mark.parametrize("model", ["cnn", "dense"])
def test_train_returns_metrics_and_writes_a_reloadable_run(model: str, data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    results = train(compose_train(f"model={model}", *quick_overrides(data_dir, out)))
    assert results["params"] == (804_554 if model == "cnn" else 29_898)
    assert results["steps"] == 20 and results["epochs"] == 1
    assert 0.0 <= results["test_acc"] <= 1.0 and results["val_acc_best"] > 0.3
    assert results["tested"].endswith("checkpoints/best.ckpt")
    assert json.loads((out / "results.json").read_text()) == results
    assert {p.name for p in (out / "checkpoints").iterdir()} == {"best.ckpt", "last.ckpt"}
    reloaded = load_model(out / "checkpoints" / "best.ckpt")
    assert isinstance(reloaded, CNN if model == "cnn" else DenseBaseline)
    rows = list(csv.DictReader(open(out / "logs" / "metrics.csv")))
    assert any(row["val/acc"] for row in rows) and any(row["train/acc"] for row in rows)


OPTIONS = {"default": ((), True, 1), "plain network": (("model.fused=false",), False, 1),
           "grouped steps": (("steps_per_execution=4",), True, 4)}


@pytest.mark.parametrize("option", sorted(OPTIONS))
@pytest.mark.parametrize("model", ["cnn", "dense"])
def test_the_default_is_the_textbook_module_and_each_speed_option_says_what_it_changes(
        option: str, model: str, data_dir: Path, tmp_path: Path) -> None:
    overrides, fused, steps = OPTIONS[option]
    cfg = compose_train(*overrides, f"model={model}", *quick_overrides(data_dir, tmp_path / "run"))
    assert cfg.steps_per_execution == steps and cfg.model.fused == fused
    default = compose_train()
    assert default.steps_per_execution == 1 and default.model._target_ == "fashion_lightning.CNN"
    results = train(cfg)
    assert results["steps"] == 20 and results["val_acc_best"] > 0.3
    reloaded = load_model(tmp_path / "run" / "checkpoints" / "best.ckpt")  # the plain class, whatever the option
    assert type(reloaded) is (CNN if model == "cnn" else DenseBaseline)
    assert reloaded.automatic_optimization and reloaded.hparams.fused == fused


def test_a_run_logs_to_train_log_without_lightnings_tips(data_dir: Path, tmp_path: Path) -> None:
    skip = ("paths.output", "+trainer.enable_model_summary")
    overrides = [o for o in quick_overrides(data_dir, tmp_path) if not o.startswith(skip)]
    done = run_cli(*overrides, "model=dense", "paths.output_root=outs", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    (run_dir,) = (tmp_path / "outs" / "runs").iterdir()
    log = (run_dir / "train.log").read_text()
    assert "`Trainer.fit` stopped" in log and "test accuracy" in log and str(run_dir / "results.json") in log
    assert "Total Flops" in log and "0         Total Flops" not in log  # the summary's FLOPs of a real input
    assert "Tip:" not in done.stdout + done.stderr + log


def test_test_ckpt_last_reports_the_final_weights(data_dir: Path, tmp_path: Path) -> None:
    results = train(compose_train("test_ckpt=last", *quick_overrides(data_dir, tmp_path / "run")))
    assert results["tested"] == "final weights"


def test_gpu_without_gpu_is_one_clear_error() -> None:
    with pytest.raises(UserError, match="trainer.accelerator=gpu but this machine has no usable CUDA GPU"):
        check_accelerator("gpu")


def test_cli_run_writes_the_run_directory(data_dir: Path, tmp_path: Path) -> None:
    overrides = [o for o in quick_overrides(data_dir, tmp_path) if not o.startswith("paths.output")]
    done = run_cli(*overrides, "model=dense", "report=true", "paths.output_root=outs", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    (run_dir,) = (tmp_path / "outs" / "runs").iterdir()
    assert {"results.json", "checkpoints", "logs", ".hydra", "report"} <= {p.name for p in run_dir.iterdir()}
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert json.loads((run_dir / "results.json").read_text())["overrides"][-1] == "paths.output_root=outs"
    assert (run_dir / "report" / "curves.png").is_file()


def test_cli_kernel_size_sweep_writes_jobs_and_summary(data_dir: Path, tmp_path: Path) -> None:
    overrides = [o for o in quick_overrides(data_dir, tmp_path) if not o.startswith("paths.output")]
    done = run_cli("-m", "model.kernel_size=1,3", *overrides, "paths.output_root=outs", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    (sweep_dir,) = (tmp_path / "outs" / "multiruns").iterdir()
    assert (sweep_dir / "0" / "results.json").is_file() and (sweep_dir / "1" / "results.json").is_file()
    rows = list(csv.DictReader(open(sweep_dir / "summary.csv")))
    assert sorted(r["overrides"].split()[0] for r in rows) == ["model.kernel_size=1", "model.kernel_size=3"]
    assert all(r["status"] == "ok" for r in rows)
    accs = [float(r["val_acc_best"]) for r in rows]
    assert accs == sorted(accs, reverse=True)
    assert {int(r["params"]) for r in rows} == {32 + 32 + 802_944 + 1290, 804_554}
    table = (sweep_dir / "summary.md").read_text()
    assert "| job | overrides | status | val_acc_best | test_acc | params | wall_time_s | error |" in table


def test_sweep_records_a_failed_job_and_runs_the_rest(data_dir: Path, tmp_path: Path) -> None:
    overrides = [o for o in quick_overrides(data_dir, tmp_path) if not o.startswith("paths.output")]
    done = run_cli("-m", "model.kernel_size=0,3", *overrides, "paths.output_root=outs", cwd=tmp_path)
    assert done.returncode != 0
    assert "model.kernel_size must be a positive integer, got 0" in done.stderr
    (sweep_dir,) = (tmp_path / "outs" / "multiruns").iterdir()
    rows = {r["overrides"].split()[0]: r for r in csv.DictReader(open(sweep_dir / "summary.csv"))}
    assert rows["model.kernel_size=0"]["status"] == "failed"
    assert "model.kernel_size must be a positive integer, got 0" in rows["model.kernel_size=0"]["error"]
    assert rows["model.kernel_size=3"]["status"] == "ok"
    assert not (sweep_dir / "0" / "results.json").exists()


def test_sweep_preset_selects_the_kernel_sizes() -> None:
    cfg = compose_train("sweep=kernel_size", hydra_node=True)
    assert cfg.hydra.sweeper.params["model.kernel_size"] == "1,3,5,7"
    assert cfg.hydra.mode == RunMode.MULTIRUN


@pytest.mark.parametrize(("args", "message"), [
    (["trainer.accelerator=gpu"], "error: trainer.accelerator=gpu but this machine has no usable CUDA GPU"),
    (["model=resnet"], "Could not find 'model/resnet'"),
    (["trainer=tpu"], "Could not find 'trainer/tpu'"),
    (["experiment=nope"], "Could not find 'experiment/nope'"),
    (["no_such_key=1"], "Could not override 'no_such_key'"),
    (["model.kernel_size=three"], "error: model.kernel_size must be a positive integer, got 'three'"),
    (["paths.output_root=blocker/outs"], "error: paths.output_root='blocker/outs' is not writable"),
    (["paths.output_root="], "error: paths.output_root must be a folder path, got ''"),
    (["steps_per_execution=64", "+trainer.gradient_clip_val=1.0"],
     "(steps_per_execution=64 trains with Lightning's manual optimization); set steps_per_execution=1"),
])
def test_cli_bad_input_is_one_clear_error(args: list[str], message: str, data_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "blocker").write_text("a file where a folder should be")
    done = run_cli(f"paths.data_dir={data_dir}", "paths.output_root=outs", *args, cwd=tmp_path)
    assert done.returncode != 0
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert not list(tmp_path.glob("outs/runs/*/results.json"))


@pytest.mark.parametrize(("args", "message"), [
    (["model.kernel_size=-1"], "model.kernel_size must be a positive integer, got -1"),
    (["model.kernel_size=0"], "model.kernel_size must be a positive integer, got 0"),
    (["model.kernel_size=2.5"], "model.kernel_size must be a positive integer, got 2.5"),
    (["model.filters=0"], "model.filters must be a positive integer, got 0"),
    (["model.hidden=0"], "model.hidden must be a positive integer, got 0"),
    (["model=dense", "model.hidden1=-4"], "model.hidden1 must be a positive integer, got -4"),
    (["data.batch_size=0"], "data.batch_size must be a positive integer, got 0"),
    (["data.batch_size=-8"], "data.batch_size must be a positive integer, got -8"),
    (["data.val_split=-5"], "data.val_split must be 0 (validate on the test set)"),
    (["data.val_split=60000"], "data.val_split must be 0 (validate on the test set)"),
    (["data.val_split=1.0"], "data.val_split must be 0 (validate on the test set), a count in 1..59999 or a fraction "
                             "in (0, 1), got 1.0"),
    (["steps_per_execution=0"], "steps_per_execution must be a positive integer, got 0"),
    (["trainer.max_epochs=-5"], "trainer.max_epochs must be an integer >= -1, got -5"),
    (["trainer.max_epochs=abc"], "trainer.max_epochs must be an integer >= -1, got 'abc'"),
    (["trainer.log_every_n_steps=2.5"], "trainer.log_every_n_steps must be an integer >= 0, got 2.5"),
    (["trainer.precision=17"], "Lightning refused the trainer settings: Precision 17 is invalid. Allowed precision"),
    (["trainer.devices=0"], "Lightning refused the trainer settings: `Trainer(devices=0)` value is not a valid input"),
    (["paths.data_dir="], "paths.data_dir must be a folder path, got ''"),
    (["ckpt_path=missing.ckpt"], "ckpt_path='missing.ckpt' does not exist"),
    (["ckpt_path=last"], "ckpt_path=last but no interrupted.ckpt or last.ckpt exists under"),
    (["paths.data_dir=blocker/data"], "is not writable"),
    (["test_ckpt=best_or_not"], "test_ckpt must be best or last, got 'best_or_not'"),
    (["data.val_split=0"], "data.val_split=0 validates on the test set, so test_ckpt=best would choose the epoch"),
    (["seed=-1"], "seed must be an integer in 0..4294967295, got -1"),
    (["seed=abc"], "seed must be an integer in 0..4294967295, got 'abc'"),
])
def test_bad_settings_are_one_clear_error(args: list[str], message: str, tmp_path: Path, capsys,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The same path as the CLI (the app's error handler around train), run in-process to keep the suite fast."""
    (tmp_path / "blocker").write_text("a file where a folder should be")
    monkeypatch.chdir(tmp_path)
    cfg = compose_train(f"paths.output_dir={tmp_path / 'outs' / 'run'}", f"paths.output_root={tmp_path / 'outs'}",
                        "paths.data_dir=data", *args)
    assert message in one_line_error(lambda: train(cfg), capsys)
    assert not (tmp_path / "outs" / "run" / "results.json").exists()


def test_help_lists_groups_and_options(tmp_path: Path) -> None:
    done = run_cli("--help", cwd=tmp_path)
    assert done.returncode == 0
    for line in ("model: cnn, dense", "trainer: cpu, ddp, ddp_cpu, default, gpu",
                 "experiment: best_cnn, best_dense, fast_cnn, seed_cnn, seed_dense", "callbacks: default, ema",
                 "sweep: kernel_size", "logger: csv, mlflow, tensorboard, wandb",
                 "debug: fdr, limit, overfit, profiler"):
        assert line in done.stdout


def test_a_diverging_run_stops_with_one_line_and_no_result(data_dir: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    cfg = compose_train(*quick_overrides(data_dir, out), "model.lr=1e20")
    err = one_line_error(lambda: train(cfg), capsys)
    assert "error: the training loss became nan at epoch 0, step " in err and "(model.lr=1e+20)" in err
    assert not (out / "results.json").exists()


def test_a_sweep_records_a_diverging_job_as_its_error(data_dir: Path, tmp_path: Path) -> None:
    skip = ("paths.output",)
    overrides = [o for o in quick_overrides(data_dir, tmp_path) if not o.startswith(skip)]
    done = run_cli("-m", "model=dense", "model.lr=1e20,0.001", *overrides, "paths.output_root=outs", cwd=tmp_path)
    assert done.returncode != 0  # Hydra ends a sweep with a failed job in error
    (summary,) = tmp_path.glob("outs/multiruns/*/summary.csv")
    rows = {row["overrides"].split()[1]: row for row in csv.DictReader(summary.open())}
    failed, fine = rows["model.lr=1e+20"], rows["model.lr=0.001"]
    assert failed["status"] == "failed" and failed["error"].startswith("the training loss became nan at epoch 0")
    assert fine["status"] == "ok" and float(fine["test_acc"]) > 0.5


def test_an_empty_output_root_is_refused_before_hydra_makes_a_folder(tmp_path: Path) -> None:
    root_runs = Path("/runs")
    existed = root_runs.exists()
    done = run_cli("paths.output_root=", cwd=tmp_path)
    assert done.returncode == 1 and done.stderr.strip().splitlines()[-1] == (
        "error: paths.output_root must be a folder path, got ''")
    assert root_runs.exists() == existed and not (tmp_path / "runs").exists()


def test_an_error_once_training_began_starts_a_line_of_its_own(data_dir: Path, tmp_path: Path) -> None:
    """A refusal raised after the progress bar opened, as a resume under other steps_per_execution is."""
    first = tmp_path / "first"
    train(compose_train(*quick_overrides(data_dir, first), "trainer.max_epochs=1"))
    args = [f"paths.data_dir={data_dir}", "paths.output_root=outs", "data.download=false",
            "+trainer.limit_train_batches=20", "+trainer.limit_val_batches=2", "steps_per_execution=4",
            "trainer.max_epochs=2", f"ckpt_path={first / 'checkpoints' / 'last.ckpt'}",
            "callbacks.progress_bar.refresh_rate=1"]
    done = subprocess.run([sys.executable, "-m", "fashion_lightning.train", *args], cwd=tmp_path, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)  # as a terminal shows both
    assert done.returncode == 1 and "Training" in done.stdout  # the bar was open
    error = next(line for line in done.stdout.split("\n") if "error: " in line)
    assert error.rsplit("\r", 1)[-1].startswith("error: the checkpoint was written after 20 optimizer steps"), error
