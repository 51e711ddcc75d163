"""Hydra callbacks of the training app: a writable output root checked up front, and the sweep summary."""

from __future__ import annotations

import csv
import io
import json
import sys
import uuid
from pathlib import Path
from typing import Any

from filelock import FileLock
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from fashion_lightning.app import AppError, launch_path, write_json, write_text
from fashion_lightning.report import plot_sweep

COLUMNS = ("job", "overrides", "status", "val_acc_best", "test_acc", "params", "wall_time_s", "error")


class CheckOutputRoot(Callback):
    """Before any run directory is made: ``paths.output_root`` must be a writable folder, else one clear error."""

    def _check(self, config: DictConfig) -> None:
        root = Path(config.paths.output_root)
        probe = root / f".write-test-{uuid.uuid4().hex}"
        try:
            root.mkdir(parents=True, exist_ok=True)
            try:
                probe.write_bytes(b"0" * 4096)
            finally:
                probe.unlink(missing_ok=True)
        except OSError as err:  # Hydra turns a callback's exception into a warning, so end the app here
            print(f"error: paths.output_root={str(root)!r} is not writable ({err.strerror}); "
                  "choose a folder on a writable disk with free space", file=sys.stderr)
            sys.exit(1)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config)


class SweepSummary(Callback):
    """After every job of a multirun, rewrite ``summary.csv`` and ``summary.md`` at the sweep root.

    Rows are sorted by best validation accuracy; a failed job is listed with its error (kept in the job
    directory's ``error.json``), so the summary is complete even when a failure ends the sweep with exit 1. Jobs
    that end at once (a parallel launcher: joblib, submitit) take turns, so the last one lists them all.
    """

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        if job_return.status == JobStatus.FAILED:
            error = job_return._return_value
            message = str(error) if isinstance(error, ValueError | AppError) else f"{type(error).__name__}: {error}"
            write_json(Path(config.hydra.runtime.output_dir) / "error.json", {"error": message})
        sweep_dir = Path(launch_path(config.hydra.sweep.dir))  # also where hydra.job.chdir=true moved this job
        with FileLock(sweep_dir / ".summary.lock"):
            write_summary(sweep_dir)


def collect_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job directory of a sweep: its overrides, status, metrics or error."""
    rows = []
    for job_dir in sorted((d for d in sweep_dir.iterdir() if d.name.isdigit()), key=lambda d: int(d.name)):
        overrides_file = job_dir / ".hydra" / "overrides.yaml"
        overrides = OmegaConf.to_container(OmegaConf.load(overrides_file)) if overrides_file.exists() else []
        row: dict[str, Any] = {"job": int(job_dir.name), "overrides": " ".join(overrides), "status": "running"}
        if (job_dir / "results.json").exists():
            results = json.loads((job_dir / "results.json").read_text())
            row.update({key: results.get(key) for key in COLUMNS[3:7]}, status="ok")
        elif (job_dir / "error.json").exists():
            row.update(status="failed", error=json.loads((job_dir / "error.json").read_text())["error"])
        rows.append(row)
    return sorted(rows, key=lambda r: (r.get("val_acc_best") is None, -(r.get("val_acc_best") or 0), r["job"]))


def write_summary(sweep_dir: Path) -> list[dict[str, Any]]:
    """Write ``summary.csv`` and ``summary.md`` for the sweep in ``sweep_dir``; return the rows."""
    rows = collect_rows(sweep_dir)
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    write_text(sweep_dir / "summary.csv", table.getvalue())

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4f}" if value < 10 else f"{value:.1f}"
        return "" if value is None else str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in COLUMNS) + " |" for row in rows]
    if plot_sweep(rows, sweep_dir / "summary.png"):
        lines += ["", "![accuracy against the swept value](summary.png)"]
    write_text(sweep_dir / "summary.md", f"# Sweep {sweep_dir.name}\n\n" + "\n".join(lines) + "\n")
    return rows
