"""Checkpoints written atomically: a kill or a full disk leaves each name holding its previous file, never part of
one, and no temporary file anywhere; the apps' Trainer writes and reads through `SafeCheckpointIO`."""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from conftest import compose_train, one_line_error, quick_overrides
from fashion_lightning.lit import checkpoints
from fashion_lightning.lit.checkpoints import SafeCheckpointIO, read_checkpoint, write_atomically
from fashion_lightning.train import instantiate_trainer, train


@contextmanager
def small_disk(folder: Path, size: int) -> Iterator[Path]:
    """``folder`` as a filesystem of its own, a tmpfs of ``size`` bytes (skips the test where mounting fails)."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def apps_checkpoint_io() -> Any:
    """The checkpoint I/O of the Trainer the apps configure (``conf/trainer``)."""
    cfg = compose_train("trainer=cpu", "paths.output_dir=unused")
    return instantiate_trainer(cfg.trainer, logger=False, enable_progress_bar=False).strategy.checkpoint_io


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_apps_trainer_writes_and_reads_through_the_safe_plugin() -> None:
    assert isinstance(apps_checkpoint_io(), SafeCheckpointIO)


KILLED_WRITE = """
import resource, signal, sys
import torch
from hydra import compose, initialize_config_dir
from fashion_lightning.app import CONFIG_DIR
from fashion_lightning.train import instantiate_trainer

path = sys.argv[1]
with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
    cfg = compose("train", overrides=["trainer=cpu", "paths.output_dir=unused"])
io = instantiate_trainer(cfg.trainer, logger=False, enable_progress_bar=False).strategy.checkpoint_io
checkpoint = torch.load(path, weights_only=True)
checkpoint["global_step"] += 1
# the kernel kills the process (SIGXFSZ, which Python ignores unless told) at the first write past half the
# checkpoint's size, whatever file it writes, wherever it is
signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), resource.RLIM_INFINITY))
io.save_checkpoint(checkpoint, path)
"""


@pytest.mark.parametrize("disk", ["same filesystem as $TMPDIR", "another filesystem"])
def test_a_kill_while_rewriting_a_checkpoint_leaves_the_previous_one_and_no_temporary_file(
        disk: str, trained_run: Path, tmp_path: Path) -> None:
    """A real kill mid-write, without timing: the kernel's file-size limit stops the writer at a known byte. Today's
    Lightning wrote into $TMPDIR first (an orphan per kill), then copied into place across filesystems."""
    temp_dir = tmp_path / "tmp"
    temp_dir.mkdir()
    folder = tmp_path / "checkpoints"
    with small_disk(folder, 64 << 20) if disk == "another filesystem" else nullcontext(folder.mkdir()):
        last = folder / "last.ckpt"
        last.write_bytes((trained_run / "checkpoints" / "last.ckpt").read_bytes())
        before = digest(last)
        killed = subprocess.run([sys.executable, "-c", KILLED_WRITE, str(last), str(last.stat().st_size // 2)],
                                env={**os.environ, "TMPDIR": str(temp_dir)}, capture_output=True, text=True,
                                timeout=300)
        assert killed.returncode == -signal.SIGXFSZ, killed.stderr
        assert digest(last) == before and read_checkpoint(last)["global_step"] > 0
        assert [p.name for p in folder.iterdir()] == ["last.ckpt"] and not list(temp_dir.iterdir())


def test_a_full_disk_leaves_the_previous_checkpoint_and_no_temporary_file(trained_run: Path,
                                                                           tmp_path: Path) -> None:
    """A checkpoint larger than the free space: written in place, the old one was cut and the new one half there."""
    checkpoint = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=True)  # 9.7 MB
    with small_disk(tmp_path / "disk", 4 << 20) as folder:
        last = folder / "last.ckpt"
        torch.save({"state_dict": {}, "global_step": 1}, last)
        before = digest(last)
        with pytest.raises(OSError) as full:
            apps_checkpoint_io().save_checkpoint(checkpoint, last)
        assert digest(last) == before and [p.name for p in folder.iterdir()] == ["last.ckpt"]
        assert full.value.errno == errno.ENOSPC and full.value.filename == str(last)


@pytest.mark.parametrize("temporary", ["unnamed (O_TMPFILE)", "named"])
def test_a_failing_write_removes_its_temporary_file(temporary: str, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the disk reports its error only at the flush (ENOSPC from fsync), on either kind of temporary file."""
    if temporary == "named":
        monkeypatch.setattr(checkpoints, "_unnamed_file", lambda folder: None)
    target = tmp_path / "best.ckpt"
    write_atomically(target, b"the previous checkpoint")

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoints.os, "fsync", full)
    with pytest.raises(OSError, match="No space left on device") as raised:
        SafeCheckpointIO().save_checkpoint({"weights": torch.ones(1000)}, target)
    assert raised.value.filename == str(target)
    assert target.read_bytes() == b"the previous checkpoint" and [p.name for p in tmp_path.iterdir()] == ["best.ckpt"]
    monkeypatch.undo()
    SafeCheckpointIO().save_checkpoint({"weights": torch.ones(3)}, target)
    assert torch.equal(SafeCheckpointIO().load_checkpoint(target)["weights"], torch.ones(3))
    umask = os.umask(0o022)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # a new file's permissions, not mkstemp's 0o600


class FillsTheDisk(L.Callback):
    """After the first epoch's checkpoints, fills the run's disk but for half a checkpoint."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == 1:
            stat = os.statvfs(self.folder)
            half = (self.folder / "checkpoints" / "last.ckpt").stat().st_size // 2
            (self.folder / "filler").write_bytes(bytes(stat.f_bavail * stat.f_frsize - half))


def test_a_run_on_a_full_disk_stops_with_one_line_and_keeps_its_checkpoints(data_dir: Path, tmp_path: Path,
                                                                             capsys) -> None:
    with small_disk(tmp_path / "disk", 8 << 20) as out:
        cfg = compose_train(*quick_overrides(data_dir, out), "model=dense", "trainer.max_epochs=2")
        err = one_line_error(lambda: train(cfg, callbacks=[FillsTheDisk(out)]), capsys)
        assert "No space left on device" in err and str(out) in err
        checkpoints = out / "checkpoints"
        assert sorted(p.name for p in checkpoints.iterdir()) == ["best.ckpt", "last.ckpt"]
        assert all(read_checkpoint(checkpoints / name)["epoch"] == 0 for name in ("best.ckpt", "last.ckpt"))
        assert not (out / "results.json").exists()
