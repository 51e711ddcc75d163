"""Hydra's launchers as config choices (the launchers extra): a kernel-size sweep run by joblib (parallel processes)
and by submitit's local executor, each with its summary at the sweep root."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import quick_overrides

LAUNCHERS = {"joblib": ("hydra_plugins.hydra_joblib_launcher", "hydra.launcher.n_jobs=2"),
             "submitit_local": ("hydra_plugins.hydra_submitit_launcher", "hydra.launcher.timeout_min=5")}
PARAMS = {1: 32 + 32 + 802_944 + 1290, 3: 804_554}  # the CNN's parameters by kernel size


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_a_launcher_runs_the_kernel_size_sweep_and_its_summary(launcher: str, data_dir: Path, tmp_path: Path) -> None:
    plugin, setting = LAUNCHERS[launcher]
    if importlib.util.find_spec(plugin) is None:
        pytest.skip(f"needs the launchers extra ({plugin}): pip install -e '.[launchers]'")
    overrides = [o for o in quick_overrides(data_dir, tmp_path) if not o.startswith("paths.output")]
    env = {k: v for k, v in os.environ.items() if k != "FASHION_MNIST_DIR"}
    done = subprocess.run([sys.executable, "-m", "fashion_lightning.train", "-m", f"hydra/launcher={launcher}",
                           setting, "model.kernel_size=1,3", *overrides, "+trainer.limit_test_batches=1",
                           "paths.output_root=outs"], cwd=tmp_path, capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (sweep,) = (tmp_path / "outs" / "multiruns").iterdir()
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert len(rows) == 2 and all(row["status"] == "ok" for row in rows)
    accs = [float(row["val_acc_best"]) for row in rows]
    assert accs == sorted(accs, reverse=True)
    for row in rows:
        kernel = int(row["overrides"].split()[0].removeprefix("model.kernel_size="))
        results = json.loads((sweep / row["job"] / "results.json").read_text())
        assert int(row["params"]) == results["params"] == PARAMS[kernel]
        assert float(row["test_acc"]) == pytest.approx(results["test_acc"], abs=1e-4)
        assert results["overrides"][0] == f"model.kernel_size={kernel}" and results["steps"] == 20
    assert f"| {rows[0]['job']} | model.kernel_size=" in (sweep / "summary.md").read_text()
    if launcher == "joblib":  # the jobs ran in two processes at once
        assert "Joblib.Parallel(n_jobs=2," in done.stdout + done.stderr
    else:  # each job a process of submitit's, with its log and result
        assert len(list((sweep / ".submitit").glob("*/*_0_result.pkl"))) == 2
