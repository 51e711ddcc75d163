"""A non-editable install ships the configs and works from any directory."""

from __future__ import annotations

import site
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

ROOT = Path(__file__).parents[1]


def isolated_python(where: Path) -> str:
    """A fresh virtual environment that sees this interpreter's installed packages (torch, lightning, ...) but not
    this checkout: the parent's site directories are appended to its path without running their ``.pth`` files,
    so an editable install of fashion_lightning stays out. Works from a venv as from the system interpreter."""
    venv.create(where, with_pip=False)
    python = where / "bin" / "python"
    own = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         check=True, capture_output=True, text=True).stdout.strip()
    parents = dict.fromkeys([*site.getsitepackages(), sysconfig.get_paths()["purelib"]])
    (Path(own) / "parent-site-packages.pth").write_text("\n".join(parents) + "\n")
    return str(python)


def test_wheel_installs_with_configs_and_runs_from_anywhere(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(ROOT)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("fashion_lightning-*.whl")
    python = isolated_python(tmp_path / "venv")
    subprocess.run([python, "-m", "pip", "install", "--no-deps", "-q", str(wheel)], check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    probe = ("import fashion_lightning.train as t, fashion_lightning as f; print(t.CONFIG_DIR); print(f.__file__); "
             "from importlib.resources import files; print(files('fashion_lightning') / 'serve_page.html')")
    lines = subprocess.run([python, "-c", probe], cwd=elsewhere, check=True, capture_output=True,
                           text=True).stdout.split()
    assert all(str(tmp_path / "venv") in line for line in lines), lines
    assert (Path(lines[0]) / "experiment" / "seed_cnn.yaml").is_file()
    assert (Path(lines[0]) / "experiment" / "seed_cnn.yaml").is_file() and (Path(lines[0]) / "serve.yaml").is_file()
    assert Path(lines[2]).is_file()  # the serve page
    assert (Path(lines[0]) / "debug" / "fdr.yaml").is_file() and (Path(lines[0]) / "logger" / "wandb.yaml").is_file()
    job = subprocess.run([python, "-m", "fashion_lightning.train", "experiment=seed_dense", "--cfg", "job"],
                         cwd=elsewhere, check=True, capture_output=True, text=True).stdout
    assert "_target_: fashion_lightning.DenseBaseline" in job and "max_epochs: 10" in job and "fused: true" in job
    assert compose_by_module(python, elsewhere) == "fashion_lightning.DenseBaseline 3 [2, 1]"


COMPOSE = """
from hydra import compose, initialize_config_module
with initialize_config_module("fashion_lightning.conf", version_base="1.3"):
    cfg = compose("train", overrides=["experiment=seed_dense", "debug=limit", "trainer.limit_val_batches=1"])
print(cfg.model._target_, cfg.trainer.max_epochs, [cfg.trainer.limit_test_batches, cfg.trainer.limit_val_batches])
"""


def compose_by_module(python: str, cwd: Path) -> str:
    """What Hydra's Compose API gives ``python`` (started in ``cwd``) for the shipped configs found by module."""
    return subprocess.run([python, "-c", COMPOSE], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def test_the_editable_install_finds_the_configs_by_module(tmp_path: Path) -> None:
    assert compose_by_module(sys.executable, tmp_path) == "fashion_lightning.DenseBaseline 3 [2, 1]"
