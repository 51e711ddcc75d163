"""Nothing lost on interruptions, exact reruns and resumes, one clear error for a full disk or missing data."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from conftest import compose_train, one_line_error, quick_overrides
from fashion_lightning import app
from fashion_lightning.app import reported_as_one_line, stopped_by_signals
from fashion_lightning.lit import checkpoints
from fashion_lightning.train import resume_hint, train


class SignalAt(L.Callback):
    """Sends a real signal to this process (or raises) when training reaches ``step``, before that step's backward
    (in a group of batches too): a known interruption."""

    def __init__(self, step: int, signum: int = 0) -> None:
        self.step, self.signum = step, signum

    def on_before_backward(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            if self.signum:
                os.kill(os.getpid(), self.signum)  # lands mid-step, as a Ctrl-C would
            else:
                raise RuntimeError("simulated crash")


def run_overrides(data_dir: Path, out: Path, *extra: str) -> list[str]:
    base = [o for o in quick_overrides(data_dir, out) if "limit_train_batches" not in o and "max_epochs" not in o]
    return [*base, "trainer.max_epochs=2", "steps_per_execution=3", "+trainer.limit_train_batches=24",
            "trainer.deterministic=true",
            "test_ckpt=last", "seed=3", *extra]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def reference(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("reference") / "run"
    return train(compose_train(*run_overrides(data_dir, out))), out


def test_two_seeded_deterministic_runs_are_identical(reference: tuple[dict, Path], data_dir: Path,
                                                     tmp_path: Path) -> None:
    results, run = reference
    again = train(compose_train(*run_overrides(data_dir, tmp_path / "again")))
    keys = ("test_acc", "test_loss", "val_acc", "val_loss", "train_acc", "train_loss", "steps")
    assert {k: again[k] for k in keys} == {k: results[k] for k in keys}
    assert same_weights(final_weights(tmp_path / "again"), final_weights(run))
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == results["steps"] == 48  # last.ckpt is the final state, improved or not


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_then_resumed_run_equals_the_uninterrupted_one(signum: int, reference: tuple[dict, Path],
                                                                   data_dir: Path, tmp_path: Path) -> None:
    results, run = reference
    stopped = tmp_path / "stopped"
    callback = [f"+callbacks.signal._target_={__name__}.SignalAt", "+callbacks.signal.step=33",
                f"+callbacks.signal.signum={int(signum)}"]
    with pytest.raises(SystemExit) as info:  # as a shell reports a process the signal ended
        train(compose_train(*run_overrides(data_dir, stopped), *callback))
    assert info.value.code == 128 + signum
    assert (stopped / "checkpoints" / "interrupted.ckpt").is_file()
    assert not (stopped / "results.json").exists()  # the run says it is incomplete
    interrupted = torch.load(stopped / "checkpoints" / "interrupted.ckpt", map_location="cpu", weights_only=False)
    assert interrupted["global_step"] == 36  # it stopped at the end of the step (3 batches) the signal hit

    resumed = train(compose_train(*run_overrides(data_dir, tmp_path / "resumed"),
                                  f"ckpt_path={stopped / 'checkpoints' / 'interrupted.ckpt'}"))
    keys = ("test_acc", "test_loss", "val_acc", "val_loss", "train_acc", "train_loss", "steps", "epochs")
    assert {k: resumed[k] for k in keys} == {k: results[k] for k in keys}
    assert same_weights(final_weights(tmp_path / "resumed"), final_weights(run))


def test_ckpt_path_last_resumes_the_newest_run(reference: tuple[dict, Path], data_dir: Path, tmp_path: Path) -> None:
    results, _ = reference
    stopped = tmp_path / "runs" / "stopped"
    with pytest.raises(SystemExit):
        train(compose_train(*run_overrides(data_dir, stopped), f"+callbacks.signal._target_={__name__}.SignalAt",
                            "+callbacks.signal.step=6", f"+callbacks.signal.signum={int(signal.SIGINT)}"))
    resumed = train(compose_train(*run_overrides(data_dir, tmp_path / "runs" / "resumed"), "ckpt_path=last"))
    assert resumed["resumed_from"] == str(stopped / "checkpoints" / "interrupted.ckpt")
    assert resumed["test_acc"] == results["test_acc"] and resumed["steps"] == results["steps"]


@pytest.mark.parametrize(("override", "named"), [("data.scale=false", "data.scale=False (the checkpoint's True)"),
                                                  ("data.val_split=100", "data.val_split=100 (the checkpoint's 5000)"),
                                                  ("seed=4", "data.seed=4 (the checkpoint's 3)")])
def test_a_resume_on_other_data_settings_is_one_clear_error(override: str, named: str, reference: tuple[dict, Path],
                                                            data_dir: Path, tmp_path: Path, capsys) -> None:
    """Raw pixels where the weights learnt / 255, or another validation split: a resume that would look fine."""
    _, run = reference
    cfg = compose_train(*run_overrides(data_dir, tmp_path / "resumed", override),
                        f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}")
    assert "was trained on other data settings: " + named in one_line_error(lambda: train(cfg), capsys)
    assert not (tmp_path / "resumed" / "results.json").exists()


def test_a_resume_into_a_new_run_directory_keeps_the_best_so_far(reference: tuple[dict, Path], data_dir: Path,
                                                                  tmp_path: Path) -> None:
    """test_ckpt=best after a resume tests the best checkpoint of the whole training, not the best since the resume."""
    _, run = reference
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    (best,) = [state for key, state in ckpt["callbacks"].items() if "'monitor': 'val/acc'" in key]
    assert best["best_model_path"] == str(run / "checkpoints" / "best.ckpt")
    best["best_model_score"] = torch.tensor(2.0)  # an accuracy that no epoch after the resume can beat
    best["best_k_models"] = {best["best_model_path"]: torch.tensor(2.0)}
    torch.save(ckpt, tmp_path / "resume.ckpt")
    resumed = train(compose_train(*run_overrides(data_dir, tmp_path / "resumed", "trainer.max_epochs=3"),
                                  "test_ckpt=best", f"ckpt_path={tmp_path / 'resume.ckpt'}"))
    assert resumed["epochs"] == 3 and resumed["tested"] == best["best_model_path"]
    assert not (tmp_path / "resumed" / "checkpoints" / "best.ckpt").exists()
    assert (run / "checkpoints" / "best.ckpt").is_file()  # the earlier run's files are never deleted


def test_a_resume_from_an_epochs_last_step_starts_the_next_epochs_means_afresh(data_dir: Path,
                                                                              tmp_path: Path) -> None:
    """Saved at an epoch's last step, the checkpoint holds that epoch's whole running means; Lightning resumes at
    the next epoch without ending it, and the next epoch's train/acc must not average over both."""
    textbook = "steps_per_execution=1"  # one batch a step: checkpoints every n training steps
    whole = train(compose_train(*run_overrides(data_dir, tmp_path / "whole"), textbook))
    every_epoch = ["+callbacks.steps._target_=lightning.pytorch.callbacks.ModelCheckpoint",
                   f"+callbacks.steps.dirpath={tmp_path / 'steps'}", "+callbacks.steps.every_n_train_steps=24",
                   "+callbacks.steps.filename=end"]
    train(compose_train(*run_overrides(data_dir, tmp_path / "first", "trainer.max_epochs=1"), textbook, *every_epoch))
    resumed = train(compose_train(*run_overrides(data_dir, tmp_path / "resumed"), textbook,
                                  f"ckpt_path={tmp_path / 'steps' / 'end.ckpt'}"))
    assert resumed["steps"] == whole["steps"] == 48
    assert (resumed["train_acc"], resumed["train_loss"]) == (whole["train_acc"], whole["train_loss"])


class CrashInside(L.Callback):
    """Raises inside the training step at ``step``, in the forward pass of the network's last layer."""

    def __init__(self, step: int) -> None:
        self.step, self.armed = step, True

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.trainer = trainer
        pl_module.net.out.register_forward_hook(self._forward)

    def _forward(self, module: Any, args: Any, output: Any) -> None:
        trainer = self.trainer
        if self.armed and trainer.training and trainer.global_step == self.step:
            self.armed = False
            raise RuntimeError("crash inside a step")


@pytest.mark.parametrize("steps", [3, 1])
def test_a_run_resumed_after_a_crash_inside_a_step_equals_the_uninterrupted_one(steps: int, data_dir: Path,
                                                                                 tmp_path: Path) -> None:
    """The step the crash struck runs again on resume, over the batches it had not applied: nothing skipped, nothing
    applied twice, every epoch validated."""
    crash = [f"+callbacks.crash._target_={__name__}.CrashInside", f"steps_per_execution={steps}"]
    reference = train(compose_train(*run_overrides(data_dir, tmp_path / "reference"), *crash,
                                    "+callbacks.crash.step=-1"))
    with pytest.raises(RuntimeError, match="crash inside a step"):
        train(compose_train(*run_overrides(data_dir, tmp_path / "crashed"), *crash, "+callbacks.crash.step=31"))
    ckpt = tmp_path / "crashed" / "checkpoints" / "interrupted.ckpt"
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"] == 31  # grouped: 30 + 1 of 3
    resumed = train(compose_train(*run_overrides(data_dir, tmp_path / "resumed"), *crash, "+callbacks.crash.step=-1",
                                  f"ckpt_path={ckpt}"))
    keys = ("test_acc", "test_loss", "val_acc", "val_loss", "steps", "epochs")
    assert {k: resumed[k] for k in keys} == {k: reference[k] for k in keys}
    assert same_weights(final_weights(tmp_path / "resumed"), final_weights(tmp_path / "reference"))


def test_a_crash_mid_epoch_leaves_a_checkpoint(data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(compose_train(*run_overrides(data_dir, tmp_path / "crash"),
                            f"+callbacks.signal._target_={__name__}.SignalAt", "+callbacks.signal.step=6"))
    assert (tmp_path / "crash" / "checkpoints" / "interrupted.ckpt").is_file()
    assert not (tmp_path / "crash" / "results.json").exists()


def test_environment_variable_pointing_nowhere_via_the_cli(tmp_path: Path) -> None:
    env = {**os.environ, "FASHION_MNIST_DIR": str(tmp_path / "nowhere")}
    done = subprocess.run([sys.executable, "-m", "fashion_lightning.train", f"paths.data_dir={tmp_path / 'data'}",
                           "paths.output_root=outs"], cwd=tmp_path, capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 1
    assert "$FASHION_MNIST_DIR=" in done.stderr and "lacks the Fashion-MNIST files" in done.stderr
    assert "Traceback" not in done.stderr and not list(tmp_path.glob("outs/runs/*/results.json"))


def test_a_full_disk_is_one_clear_error_and_no_result(data_dir: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """The disk fills while results.json is flushed: one line, and no results.json, whole or half."""
    real_write, real_fsync = app.write_atomically, checkpoints.os.fsync
    writing: list[str] = []

    def full_disk_at_flush(fd: int) -> None:
        if writing and writing[-1] == "results.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    def recorded(path: Path, data: bytes) -> None:
        writing.append(Path(path).name)
        real_write(path, data)

    monkeypatch.setattr(app, "write_atomically", recorded)
    monkeypatch.setattr(checkpoints.os, "fsync", full_disk_at_flush)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as info, reported_as_one_line():
        train(compose_train(*quick_overrides(data_dir, out)))
    assert info.value.code == 1
    assert "No space left on device (a full or read-only disk, or no permission?)" in capsys.readouterr().err
    assert writing[-1] == "results.json" and not (out / "results.json").exists()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


class SignalIn(L.Callback):
    """Sends this process a signal when ``phase`` starts: the sanity check, a training step, the final test."""

    def __init__(self, phase: str, signum: int = int(signal.SIGTERM)) -> None:
        self.phase, self.signum = phase, signum

    def _send(self, phase: str) -> None:
        if phase == self.phase:
            os.kill(os.getpid(), self.signum)

    def on_sanity_check_start(self, *args: Any) -> None:
        self._send("sanity_check")

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == 5:
            self._send("training")

    def on_test_start(self, *args: Any) -> None:
        self._send("test")


@pytest.mark.parametrize(("phase", "said"), [
    ("sanity_check", "no checkpoint was saved in "),
    ("training", "interrupted.ckpt saved in "),
    ("test", "last.ckpt saved in "),
])
def test_a_signal_in_any_phase_exits_128_plus_it_with_one_line_on_what_was_saved(
        phase: str, said: str, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    cfg = compose_train(*quick_overrides(data_dir, out), "+trainer.num_sanity_val_steps=1",
                        f"+callbacks.signal._target_={__name__}.SignalIn", f"+callbacks.signal.phase={phase}")
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as info, stopped_by_signals(lambda: resume_hint(out)):
        train(cfg)
    assert info.value.code == 128 + signal.SIGTERM
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"stopped by SIGTERM: {said}{out}"), last
    assert ("resume with: python -m fashion_lightning.train ckpt_path=" in last) == (phase != "sanity_check")
    assert not (out / "results.json").exists()
    assert signal.getsignal(signal.SIGTERM) is before  # the app's handler is gone with the app


def test_a_second_run_into_the_same_run_directory_is_refused_in_one_line(data_dir: Path, tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from filelock import FileLock; "
                               f"lock = FileLock({str(out / '.run.lock')!r}); lock.acquire(); print('held', "
                               "flush=True); sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"  # the first run holds its folder
        err = one_line_error(lambda: train(compose_train(*quick_overrides(data_dir, out))), capsys)
        assert f"another run is writing into {out} now" in err
        assert not (out / "checkpoints").exists() and not (out / "results.json").exists()
    finally:
        holder.communicate("")
    assert train(compose_train(*quick_overrides(data_dir, out)))["steps"] == 20  # free again once it ended
