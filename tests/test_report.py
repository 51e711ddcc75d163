"""The evaluation report: written at the end of training and by python -m fashion_lightning.evaluate."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from fashion_lightning import FashionMNISTDataModule, report
from fashion_lightning.app import write_summary
from fashion_lightning.lit.checkpoints import load_model


def check_png(path: Path, min_size: tuple[int, int]) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] >= min_size[0] and image.size[1] >= min_size[1]


def test_training_writes_the_report(trained_run: Path) -> None:
    report = trained_run / "report"
    summary = json.loads((report / "report.json").read_text())
    matrix = summary["confusion_matrix"]
    assert len(matrix) == 10 and all(len(row) == 10 for row in matrix)
    assert sum(map(sum, matrix)) == summary["n"] == 10_000
    assert len(summary["per_class"]) == 10
    text = (report / "report.md").read_text()
    assert text.count("\n| ") == 11  # header + ten classes
    for picture in ("confusion_matrix.png", "samples.png", "curves.png"):
        assert f"({picture})" in text
    check_png(report / "confusion_matrix.png", (800, 700))
    check_png(report / "samples.png", (800, 800))
    check_png(report / "curves.png", (900, 350))


def test_evaluate_cli_writes_a_report_for_a_checkpoint(trained_run: Path, data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    done = subprocess.run([sys.executable, "-m", "fashion_lightning.evaluate",
                           f"ckpt_path={trained_run / 'checkpoints' / 'last.ckpt'}", f"paths.data_dir={data_dir}",
                           f"report_dir={out}"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "test accuracy" in done.stdout
    summary = json.loads((out / "report.json").read_text())
    assert sum(map(sum, summary["confusion_matrix"])) == 10_000
    check_png(out / "curves.png", (900, 350))


def test_sweep_summary_plots_the_swept_value(tmp_path: Path) -> None:
    for job, k, val, test in ((0, 1, 0.80, 0.79), (1, 3, 0.90, 0.89), (2, 5, 0.88, 0.87)):
        (tmp_path / str(job) / ".hydra").mkdir(parents=True)
        (tmp_path / str(job) / ".hydra" / "overrides.yaml").write_text(f"- model.kernel_size={k}\n")
        (tmp_path / str(job) / "results.json").write_text(json.dumps(
            {"val_acc_best": val, "test_acc": test, "params": 100 + k, "wall_time_s": 1.0}))
    rows = write_summary(tmp_path)
    assert [r["job"] for r in rows] == [1, 2, 0]
    check_png(tmp_path / "summary.png", (600, 400))
    assert "![" in (tmp_path / "summary.md").read_text()


def test_a_report_that_fails_midway_never_looks_finished(trained_run: Path, data_dir: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """An earlier report's report.md / report.json go first and the new ones come last, each written whole."""
    def disk_full(*args: object) -> None:
        raise OSError(28, "No space left")

    shutil.copytree(trained_run / "report", tmp_path / "report")
    monkeypatch.setattr(report, "plot_samples", disk_full)
    datamodule = FashionMNISTDataModule(data_dir=str(data_dir), download=False)
    with pytest.raises(OSError, match="No space left"):
        report.write_report(load_model(trained_run / "checkpoints" / "best.ckpt"), datamodule, tmp_path / "report")
    assert not (tmp_path / "report" / "report.md").exists() and not (tmp_path / "report" / "report.json").exists()
