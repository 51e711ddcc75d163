"""Start-up and exit without the cyclic collector walking the imports: the collector's state kept, nothing left frozen,
and every app's exit skipping the final collection."""

from __future__ import annotations

import atexit
import gc
import runpy
import subprocess
import sys
import warnings

import pytest

from fashion_lightning.startup import imports_kept_old


@pytest.mark.parametrize("enabled", [True, False])
def test_imports_kept_old_pauses_the_collector_then_restores_it(enabled: bool) -> None:
    was = gc.isenabled()
    (gc.enable if enabled else gc.disable)()
    try:
        with imports_kept_old():
            assert not gc.isenabled()
            made_inside = [object()]
        assert gc.isenabled() is enabled
        assert gc.get_freeze_count() == 0  # nothing stays frozen
        assert any(o is made_inside for o in gc.get_objects(generation=2))  # counted as old, not young
    finally:
        (gc.enable if was else gc.disable)()


def test_a_freeze_of_the_process_own_is_left_alone_and_a_disabled_collector_stays_disabled() -> None:
    was = gc.isenabled()
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        with imports_kept_old():
            gc.enable()  # an import that turns the collector on
        assert gc.get_freeze_count() == frozen > 0
    finally:
        gc.unfreeze()
        (gc.enable if was else gc.disable)()
    gc.disable()
    try:
        with imports_kept_old():
            gc.enable()
        assert not gc.isenabled()
    finally:
        (gc.enable if was else gc.disable)()


@pytest.mark.parametrize("disabled_before", [False, True])
def test_importing_the_package_leaves_the_collector_as_it_was(disabled_before: bool) -> None:
    code = f"import gc\nif {disabled_before}: gc.disable()\nimport fashion_lightning\n" \
           "print(gc.isenabled(), gc.get_freeze_count())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == [str(not disabled_before), "0"]


CYCLE_AT_EXIT = """
import sys
from fashion_lightning.startup import skip_collection_at_exit
class Cycle:
    def __del__(self) -> None:
        print("finalized")
cycle = Cycle()
cycle.itself = cycle
del cycle
if sys.argv[1] == "app":
    skip_collection_at_exit()
"""


@pytest.mark.parametrize("process", ["library", "app"])
def test_an_apps_exit_skips_the_final_collection(process: str) -> None:
    done = subprocess.run([sys.executable, "-c", CYCLE_AT_EXIT, process], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ([] if process == "app" else ["finalized"])  # the cycle collected only without it


APPS = ("train", "evaluate", "predict", "export", "compare", "tune", "serve")
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
    assert gc.freeze in registered  # skip_collection_at_exit(), before main()
