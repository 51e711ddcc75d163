"""What the apps share (`fashion_lightning.app`), and what the library leaves alone: importing it or fitting with it
changes no process-wide state; the core imports nothing of the grouped steps."""

from __future__ import annotations

import ast
import atexit
import errno
import gc
import runpy
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from fashion_lightning import app
from fashion_lightning.lit import checkpoints

CORE = ("nets.tutorial", "nets.fused", "lit.classifier", "lit.models", "lit.callbacks", "lit.checkpoints",
        "data.datamodule", "data.images")


@pytest.mark.parametrize("disabled_before", [False, True])
def test_importing_the_library_and_fitting_leaves_gc_allocator_and_environment_alone(disabled_before: bool,
                                                                                      tmp_path) -> None:
    code = f"""
import gc, os
if {disabled_before}: gc.disable()
threshold, env = gc.get_threshold(), dict(os.environ)
import torch
import fashion_lightning
from fashion_lightning import CNN
from fashion_lightning.lit.grouped import grouped
model = grouped(CNN)(fused=True)
x = torch.rand(4, 1, 28, 28)
model.net(x).sum().backward()
print(gc.isenabled(), gc.get_freeze_count(), gc.get_threshold() == threshold, dict(os.environ) == env)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == [str(not disabled_before), "0", "True", "True"]


def package_imports(module: str) -> set[str]:
    """The fashion_lightning modules that ``module``'s source imports."""
    import fashion_lightning

    path = Path(fashion_lightning.__file__).parent / module.replace(".", "/")
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
            [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        found |= {n.removeprefix("fashion_lightning.") for n in names if n.startswith("fashion_lightning.")}
    return found


@pytest.mark.parametrize("module", CORE)
def test_the_core_imports_nothing_of_the_grouped_steps_or_the_apps(module: str) -> None:
    seen, todo = set(), [module]
    while todo:  # everything the module's imports reach inside the package
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo += package_imports(current)
    assert not seen & {"lit.grouped", "app", "train"}, seen
    source = (Path(__file__).parents[1] / "fashion_lightning" / f"{module.replace('.', '/')}.py").read_text()
    assert "automatic_optimization" not in source


def test_the_default_run_imports_nothing_of_the_grouped_steps(tmp_path: Path) -> None:
    code = ("import sys, fashion_lightning.train, fashion_lightning.report; "
            "print('fashion_lightning.lit.grouped' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False"]


CYCLE_AT_EXIT = """
import sys
from fashion_lightning.app import set_up_process
class Cycle:
    def __del__(self) -> None:
        print("finalized")
cycle = Cycle()
cycle.itself = cycle
del cycle
if sys.argv[1] == "app":
    set_up_process()
"""


@pytest.mark.parametrize("process", ["library", "app"])
def test_an_apps_exit_skips_the_final_collection(process: str) -> None:
    done = subprocess.run([sys.executable, "-c", CYCLE_AT_EXIT, process], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ([] if process == "app" else ["finalized"])  # the cycle collected only without it


APPS = ("train", "evaluate", "predict", "export", "compare", "tune", "serve", "explain")
EXTRAS = {"tune": "optuna", "serve": "litserve"}


@pytest.mark.parametrize("app", APPS)
def test_every_app_run_as_a_program_skips_the_final_collection(
        app: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    if app in EXTRAS:
        pytest.importorskip(EXTRAS[app])
    registered = []
    monkeypatch.setattr(atexit, "register", lambda func, *args, **kwargs: registered.append(func) or func)
    monkeypatch.setattr(sys, "argv", [f"fashion_lightning/{app}.py", "--help"])  # Hydra prints its help, exits
    with pytest.raises(SystemExit) as exited, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # runpy: the module was imported before
        runpy.run_module(f"fashion_lightning.{app}", run_name="__main__")
    assert exited.value.code in (0, None) and "== Config ==" in capsys.readouterr().out
    assert gc.freeze in registered  # set_up_process(), before main()


def _write(target: Path, version: str) -> None:
    """`app.write_figure` for a .png (a figure titled ``version``), `app.write_text` otherwise."""
    from matplotlib.figure import Figure

    if target.suffix == ".png":
        figure = Figure(figsize=(2, 2))
        figure.suptitle(version)
        app.write_figure(figure, target)
    else:
        app.write_text(target, version)


@pytest.mark.parametrize("written", ["report.md", "confusion_matrix.png"])
def test_a_result_file_rewritten_on_a_full_disk_keeps_its_previous_version(written: str, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Text and figures go through the same atomic write as checkpoints; here the disk fills at the flush."""
    target = tmp_path / written
    target.write_bytes(b"the previous version")

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoints.os, "fsync", full)
    with pytest.raises(OSError, match="No space left on device"):
        _write(target, "the new version")
    assert target.read_bytes() == b"the previous version" and [p.name for p in tmp_path.iterdir()] == [written]
    monkeypatch.undo()
    _write(target, "the new version")
    assert target.read_bytes().startswith(b"\x89PNG" if target.suffix == ".png" else b"the new version")
