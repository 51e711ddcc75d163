"""Fashion-MNIST's four IDX files, found and validated offline: torchvision's layout, a folder of the original
``.gz`` files (the Debian package's, by default), or torchvision's download."""

from __future__ import annotations

import gzip
import math
import os
import shutil
import struct
import zlib
from pathlib import Path

from torch import Tensor
from torchvision.datasets import FashionMNIST

from fashion_lightning.errors import UserError

DEFAULT_SOURCE_DIR = "/usr/share/datasets/fashion-mnist"
SOURCE_ENV = "FASHION_MNIST_DIR"
# file name -> (IDX magic number, item count); images are 28x28 uint8, labels uint8 in 0..9
IDX_FILES: dict[str, tuple[int, int]] = {
    "train-images-idx3-ubyte": (2051, 60_000),
    "train-labels-idx1-ubyte": (2049, 60_000),
    "t10k-images-idx3-ubyte": (2051, 10_000),
    "t10k-labels-idx1-ubyte": (2049, 10_000),
}


def check_idx_file(path: Path, name: str | None = None, shown: Path | None = None) -> None:
    """Check an uncompressed IDX file's magic number, dimensions and size; raise `UserError` naming it.

    ``name`` is its Fashion-MNIST file name (default ``path.name``); ``shown`` the path errors name.
    """
    magic, count = IDX_FILES[name or path.name]
    shown = shown or path
    dims = 3 if magic == 2051 else 1
    header_size = 4 + 4 * dims
    with open(path, "rb") as f:
        header = f.read(header_size)
    if len(header) < header_size:
        raise UserError(f"{shown}: truncated IDX file ({len(header)} bytes, no complete header)")
    found_magic, *shape = struct.unpack(f">{1 + dims}I", header)
    if found_magic != magic:
        raise UserError(f"{shown}: wrong IDX magic number {found_magic}, expected {magic}")
    expected_shape = [count, 28, 28][:dims]
    if shape != expected_shape:
        raise UserError(f"{shown}: IDX shape {shape}, expected {expected_shape}")
    size = path.stat().st_size
    expected_size = header_size + math.prod(expected_shape)
    if size != expected_size:
        raise UserError(f"{shown}: {size} bytes, expected {expected_size} (truncated or padded file)")


def _find_source(name: str, folder: Path) -> Path | None:
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            return candidate
    return None


def _extract(source: Path, target: Path) -> None:
    """Copy or gunzip ``source`` to ``target`` atomically, then validate; never leave a bad file behind."""
    partial = target.with_name(target.name + ".partial")
    try:
        opener = gzip.open if source.suffix == ".gz" else open
        with opener(source, "rb") as src, open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        check_idx_file(partial, target.name, shown=source)
        partial.rename(target)
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise UserError(f"{source}: corrupt or truncated gzip file ({err})") from None
    finally:
        partial.unlink(missing_ok=True)


def ensure_raw_files(data_dir: str | os.PathLike, source_dir: str | None = None, download: bool = True) -> Path:
    """Make ``data_dir/FashionMNIST/raw`` hold the four validated IDX files; return that folder.

    Tried in order: files already there; a folder of the original ``.gz`` (or uncompressed) files given
    by ``source_dir``, else ``$FASHION_MNIST_DIR``, else the Debian package's folder; torchvision's
    download. An explicitly named source that lacks the files is an error, not a reason to download.
    """
    root = Path(data_dir).expanduser()
    raw = root / "FashionMNIST" / "raw"
    missing = [name for name in IDX_FILES if not (raw / name).is_file()]
    if not missing:
        return raw
    explicit = source_dir or os.environ.get(SOURCE_ENV)
    folder = Path(explicit or DEFAULT_SOURCE_DIR).expanduser()
    sources = {name: _find_source(name, folder) for name in missing}
    if all(sources.values()):
        _make_dir(raw)
        for name, source in sources.items():
            _extract(source, raw / name)
        return raw
    if explicit:
        origin = "source_dir" if source_dir else f"${SOURCE_ENV}"
        absent = ", ".join(f"{name}.gz" for name, found in sources.items() if not found)
        raise UserError(f"{origin}={explicit!r} lacks the Fashion-MNIST files {absent}; point it at the folder "
                        "holding the four original files (train/t10k images/labels, .gz or not)")
    if download:
        _make_dir(root)
        try:
            for train in (True, False):
                FashionMNIST(root, train=train, download=True)
            return raw
        except Exception:  # noqa: BLE001 - any download failure ends in the one message below
            pass
    raise UserError(
        f"Fashion-MNIST not found in data_dir={str(root)!r} and could not be obtained. Fix it one of three ways: "
        f"(1) put torchvision's layout there ({raw}/<the four IDX files>); "
        f"(2) install the data offline: `apt-get install dataset-fashion-mnist` (gives {DEFAULT_SOURCE_DIR}), "
        f"or set ${SOURCE_ENV} / data.source_dir to a folder of the four .gz files; "
        "(3) allow torchvision's download (needs the internet and download=true)"
    )


def _make_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write_test"
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise UserError(f"data_dir {str(path)!r} is not writable ({err.strerror}); "
                        "pass a data_dir you can write to") from None


def load_split(data_dir: str | os.PathLike, train: bool) -> tuple[Tensor, Tensor]:
    """Read one official split with torchvision: uint8 images (N, 28, 28) and int64 labels (N,)."""
    raw = Path(data_dir).expanduser() / "FashionMNIST" / "raw"
    prefix = "train" if train else "t10k"
    for kind in ("images-idx3", "labels-idx1"):
        check_idx_file(raw / f"{prefix}-{kind}-ubyte")
    dataset = FashionMNIST(Path(data_dir).expanduser(), train=train, download=False)
    labels = dataset.targets.long()
    if labels.numel() and int(labels.max()) > 9:
        raise UserError(f"{raw / f'{prefix}-labels-idx1-ubyte'}: label {int(labels.max())} outside 0..9")
    return dataset.data, labels
