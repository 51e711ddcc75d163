"""Checkpoints: files written atomically and read safely, by the apps and by Lightning (`SafeCheckpointIO`), and
the trained model rebuilt from one (`load_model`) with one clear error for a missing, damaged, unsafe, foreign or
mismatched file.

Writing: the bytes go to a temporary file in the target's folder, are flushed to disk and renamed over the target,
so that at any instant the name holds its previous file or the whole new one, whatever kills the process or fills
the disk. Reading: the archive's own CRCs are checked first (torch does not), then ``torch.load`` unpickles with
``weights_only=True``, allowing tensors, plain Python values and `SAFE_GLOBALS` only: nothing in a file runs code.
"""

from __future__ import annotations

import errno
import io
import os
import pickle
import secrets
import zipfile
from pathlib import Path, PosixPath
from typing import IO, Any

import torch
from lightning.pytorch.plugins import TorchCheckpointIO

from fashion_lightning.errors import UserError
from fashion_lightning.lit.classifier import CHECKPOINT_KEY, ImageClassifier
from fashion_lightning.lit.models import CNN, DenseBaseline

SAFE_GLOBALS: list[Any] = [PosixPath]
"""What fashion_lightning checkpoints hold beyond torch's weights-only defaults (tensors, storages, dtypes,
``OrderedDict``, plain Python values), which cover all that Lightning (loops, callbacks, optimizer and scheduler
states) and torchmetrics (metric states are tensors) save: a ``pathlib.PosixPath`` in ``datamodule_hyper_parameters``
where a Python caller gave ``FashionMNISTDataModule(data_dir=Path(...))`` (Lightning saves init arguments as given)."""


def _unnamed_file(folder: Path) -> int | None:
    """A writable file in ``folder`` without a name (Linux's ``O_TMPFILE``), of which a killed process leaves
    nothing; None where the system or the filesystem has none."""
    if not hasattr(os, "O_TMPFILE") or not os.path.isdir("/proc/self/fd"):
        return None
    try:
        return os.open(folder, os.O_TMPFILE | os.O_WRONLY, 0o666)
    except OSError as err:
        if err.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            return None
        raise


def write_atomically(path: str | os.PathLike, data: bytes | memoryview) -> None:
    """Write ``data`` to ``path``: into a temporary file in the same folder, flushed to disk (fsync), then renamed
    over ``path``, so the name never holds part of a file. The temporary file is removed on any failure; on Linux it
    has no name until it is complete, so not even a kill -9 leaves it behind. A new file's permissions apply; an
    ``OSError`` (a full disk: ENOSPC) names ``path``."""
    path = Path(path)
    temp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = _unnamed_file(path.parent)
    named = fd is None
    try:
        if named:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with open(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(fd)
            if not named:
                # any dir fd makes Python call linkat(..., AT_SYMLINK_FOLLOW), which names the file itself (the
                # kernel ignores the dir fd of an absolute path); plain link() would link /proc's symlink
                os.link(f"/proc/self/fd/{fd}", temp, src_dir_fd=fd)
                named = True
        os.replace(temp, path)
    except BaseException as err:
        if named:
            temp.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.filename in (None, str(temp)):  # name the target, not our temporary
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise


def _gist(err: BaseException) -> str:
    """An exception's message on one line: torch's weights-only refusal by its reason, anything else its first line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
    return next((line.partition("error: ")[2] for line in lines if "WeightsUnpickler error: " in line), lines[0])


def _check_archive(file: IO[bytes], path: str | os.PathLike) -> None:
    """Raise a `UserError` unless ``file`` is a zip archive (what ``torch.save`` writes) whose every member matches
    its CRC (about 6 ms for a 10 MB checkpoint)."""
    try:
        with zipfile.ZipFile(file) as archive:
            damaged, names = archive.testzip(), archive.namelist()
    except (zipfile.BadZipFile, EOFError) as err:
        raise UserError(f"ckpt_path={str(path)!r} is not a readable checkpoint (not a complete zip archive, as "
                        f"torch.save writes: {err})") from None
    if any(name.endswith("/constants.pkl") for name in names):  # torch's own test for TorchScript
        raise UserError(f"ckpt_path={str(path)!r} is a TorchScript model (an export), not a checkpoint; pass the "
                        ".ckpt file it was exported from")
    if damaged is not None:
        raise UserError(f"ckpt_path={str(path)!r} is damaged: {damaged} fails the archive's own CRC check (the file "
                        "changed after it was written); use another copy, or an earlier checkpoint of the run")


def _refusal(file: IO[bytes], path: str | os.PathLike, err: pickle.UnpicklingError) -> UserError:
    """The `UserError` for a file weights-only unpickling refused: the types it needs, where they can be named."""
    try:
        file.seek(0)
        names = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(file))
    except Exception:  # noqa: BLE001 - a pickle too broken to list: torch's own reason is named instead
        names = []
    if not names:
        return UserError(f"ckpt_path={str(path)!r} is not a readable checkpoint ({_gist(err)})")
    allowed = ", ".join(f"{g.__module__}.{g.__qualname__}" for g in SAFE_GLOBALS)
    return UserError(f"ckpt_path={str(path)!r} holds {', '.join(names)}, which no fashion_lightning checkpoint holds "
                     f"(only tensors, plain Python values and {allowed}): refused, as loading it could run code; "
                     "use a checkpoint written by fashion_lightning")


def load_checkpoint_file(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load`` of the checkpoint file ``path``: weights-only, with `SAFE_GLOBALS` allowed for this call only,
    after `_check_archive`; one `UserError` naming the path for a damaged, unreadable or unsafe file."""
    with open(path, "rb") as file:
        _check_archive(file, path)
        file.seek(0)
        ours = [g for g in SAFE_GLOBALS if g not in torch.serialization.get_safe_globals()]  # leaving, the context
        with torch.serialization.safe_globals(ours):  # removes what it added: never one a caller had allowed
            try:
                return torch.load(file, map_location=map_location, weights_only=True)
            except pickle.UnpicklingError as err:
                raise _refusal(file, path, err) from None
            except Exception as err:  # noqa: BLE001 - zip, storage and torch errors all mean "not a checkpoint"
                raise UserError(f"ckpt_path={str(path)!r} is not a readable checkpoint "
                                f"({type(err).__name__}: {_gist(err)})") from None


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint I/O with `write_atomically` for every checkpoint a Trainer writes (``ModelCheckpoint``,
    ``trainer.save_checkpoint``, `fashion_lightning.lit.callbacks.SaveOnInterrupt`) and `load_checkpoint_file` for every
    one it reads (a resume by ``fit(ckpt_path=...)``, ``test(ckpt_path=...)``). Local paths only.

    ``Trainer(plugins=[SafeCheckpointIO()])``; ``conf/trainer/default.yaml`` sets it for the apps.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        """Write ``checkpoint`` to ``path`` atomically. It is serialized in memory first (as Lightning does): torch's
        file writer reports a full disk as an obscure ``RuntimeError``, Python's as ``OSError`` ENOSPC."""
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint takes no storage_options")
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, buffer.getbuffer())

    def load_checkpoint(self, path: str | os.PathLike, map_location: Any = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        """`load_checkpoint_file` of ``path``; always weights-only, whatever ``weights_only`` asks."""
        if not Path(path).is_file():
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        return load_checkpoint_file(path, map_location)



def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint file on the CPU, with one clear error if it is missing, damaged, unsafe or not ours."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"ckpt_path={str(path)!r} does not exist; pass a .ckpt file written by fashion_lightning")
    checkpoint = load_checkpoint_file(path, map_location="cpu")
    if not isinstance(checkpoint, dict) or CHECKPOINT_KEY not in checkpoint:
        raise UserError(f"ckpt_path={str(path)!r} is not a fashion_lightning checkpoint (no {CHECKPOINT_KEY!r})")
    return checkpoint


def check_compatible(checkpoint: dict[str, Any], model: ImageClassifier, path: str | Path) -> None:
    """Raise a `UserError` unless the checkpoint's weights fit ``model``'s architecture exactly."""
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in checkpoint.get("state_dict", {}).items()}
    if ours != theirs:
        def arch(hparams: dict[str, Any]) -> dict[str, Any]:
            return {k: v for k, v in hparams.items() if k in ("filters", "kernel_size", "hidden", "hidden1", "hidden2")}

        saved = checkpoint[CHECKPOINT_KEY].split(":")[-1]
        raise UserError(f"ckpt_path={str(path)!r} holds a {saved} {arch(checkpoint.get('hyper_parameters', {}))}, "
                        f"another architecture than the configured {type(model).__name__} {arch(model.hparams)}; "
                        "pass the model config it was trained with")


RESUMED_DATA = ("scale", "val_split", "seed")
"""The data settings a resumed fit must share with its checkpoint: what the pixels are (raw or / 255), which images
validate, the shuffling. (``batch_size`` too where it stopped within an epoch: `BatchLoader` checks that.)"""


def check_same_data(checkpoint: dict[str, Any], datamodule: Any, path: str | Path) -> None:
    """Raise a `UserError` naming every setting of `RESUMED_DATA` in which ``datamodule`` differs from the data the
    checkpoint was trained on (as far as the checkpoint records them)."""
    saved, ours = checkpoint.get("datamodule_hyper_parameters") or {}, getattr(datamodule, "hparams", {})
    differ = [f"data.{key}={ours[key]!r} (the checkpoint's {saved[key]!r})" for key in RESUMED_DATA
              if key in saved and key in ours and saved[key] != ours[key]]
    if differ:
        raise UserError(f"ckpt_path={str(path)!r} was trained on other data settings: {', '.join(differ)}; "
                        "resume with the checkpoint's (its experiment=...), or start a new run")


TRAINED_CLASSES = ("CNN", "DenseBaseline")
"""The classes `model_from_checkpoint` rebuilds, looked up by the class name a checkpoint records in the package's
top level (older checkpoints record another module path)."""


def model_from_checkpoint(checkpoint: dict[str, Any], path: str | Path) -> ImageClassifier:
    """Rebuild the model of a checkpoint already read from ``path`` with `read_checkpoint` (on the CPU, in eval
    mode): one of `TRAINED_CLASSES`, never an import the checkpoint names."""
    saved = str(checkpoint[CHECKPOINT_KEY])
    class_name = saved.rpartition(":")[2]
    if class_name not in TRAINED_CLASSES:
        raise UserError(f"ckpt_path={str(path)!r} holds a {saved!r} model, not one of fashion_lightning's "
                        f"{', '.join(TRAINED_CLASSES)}; load it with {class_name or 'its class'}"
                        ".load_from_checkpoint(ckpt_path) instead")
    model = {"CNN": CNN, "DenseBaseline": DenseBaseline}[class_name](**checkpoint.get("hyper_parameters", {}))
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval()


def load_model(path: str | Path) -> ImageClassifier:
    """Rebuild the trained model saved in a fashion_lightning checkpoint file (on the CPU, in eval mode)."""
    return model_from_checkpoint(read_checkpoint(path), path)


def trained_model(path: str | Path) -> tuple[ImageClassifier, bool]:
    """The trained model of a checkpoint file (on the CPU, in eval mode) and whether it was trained on pixels / 255
    (``scale``, read from the checkpoint's datamodule settings)."""
    checkpoint = read_checkpoint(path)
    scale = checkpoint.get("datamodule_hyper_parameters", {}).get("scale", True)
    return model_from_checkpoint(checkpoint, path), bool(scale)
