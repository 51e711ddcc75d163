"""Fashion-MNIST's four IDX files, found and validated offline: torchvision's layout, a folder of the original
``.gz`` files (the Debian package's, by default), or torchvision's download.

Each file's content is verified once (SHA-256) and the result kept in ``FashionMNIST/raw.verified.json`` beside
the ``raw`` folder, so later runs hash a file again only when its size or modification time changed. Extraction
holds the lock ``FashionMNIST/raw.lock``: first runs started together wait for each other.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import secrets
import struct
import tempfile
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock
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
# SHA-256 of the original (uncompressed) files; torchvision's FashionMNIST.resources has the published .gz MD5s,
# which the Debian package's recompressed .gz files do not match, so the content is what is compared
ORIGINAL_SHA256: dict[str, str] = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
STAMP = "raw.verified.json"  # in FashionMNIST/: file name -> {"size", "mtime_ns", "sha256"} of the verified file


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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _read_stamp(raw: Path) -> dict[str, dict]:
    try:
        stamp = json.loads((raw.parent / STAMP).read_text())
    except (OSError, ValueError):
        return {}
    return stamp if isinstance(stamp, dict) else {}


def _write_stamp(raw: Path, stamp: dict[str, dict]) -> None:
    """Write the record of verified files atomically (a temporary file of this writer's own, then renamed)."""
    partial = raw.parent / f"{STAMP}.{secrets.token_hex(8)}.partial"
    try:
        with open(partial, "x") as f:
            json.dump(stamp, f, indent=1)
        os.replace(partial, raw.parent / STAMP)
    finally:
        partial.unlink(missing_ok=True)


def _lock(raw: Path) -> FileLock:
    """The lock extraction and download hold: one run at a time writes into ``raw``."""
    return FileLock(raw.parent / "raw.lock")


def _stamp_entry(path: Path, sha256: str) -> dict[str, int | str]:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256}


def verify_raw_files(raw: Path, names: Iterable[str] = tuple(IDX_FILES)) -> None:
    """Check the IDX files ``names`` in ``raw`` (`check_idx_file`), then their content; raise `UserError` naming one.

    A file's content must be the original's (`ORIGINAL_SHA256`) or, for one extracted here, what was extracted.
    It is hashed only when its size or modification time differs from the record (`STAMP`), which is then updated
    where the folder is writable.
    """
    stamp = _read_stamp(raw)
    changed = False
    for name in names:
        path = raw / name
        check_idx_file(path)
        entry = stamp.get(name) if isinstance(stamp.get(name), dict) else {}
        stat = path.stat()
        if (entry.get("size"), entry.get("mtime_ns")) == (stat.st_size, stat.st_mtime_ns):
            continue
        sha256 = _sha256(path)
        if sha256 not in (ORIGINAL_SHA256[name], entry.get("sha256")):
            extracted = " nor the one extracted here" if entry else ""
            raise UserError(f"{path}: content does not match the original Fashion-MNIST file{extracted}; "
                            "delete it so it is extracted again from the source")
        stamp[name], changed = _stamp_entry(path, sha256), True
    if changed:
        try:
            _write_stamp(raw, stamp)
        except OSError:  # a read-only data_dir: verified all the same, only not remembered
            pass


@contextmanager
def _writing(target: Path) -> Iterator[None]:
    """An `OSError` raised inside that names no file (as a write to an open file does: a full disk, a quota) is raised
    again naming ``target``, so that the error says where: ``cannot use <target>: No space left on device ...``."""
    try:
        yield
    except OSError as err:
        if err.errno is None or err.filename is not None:
            raise
        raise OSError(err.errno, err.strerror, str(target)) from err


def _extract(source: Path, target: Path, stamp: dict[str, dict], original: bool) -> None:
    """Copy or gunzip ``source`` to ``target`` through a temporary file of its own, validated, recorded in ``stamp``
    and renamed into place; never leave a bad or half file under ``target``. ``original``: the content must be the
    original Fashion-MNIST file's."""
    partial = target.with_name(f"{target.name}.{secrets.token_hex(8)}.partial")
    digest = hashlib.sha256()
    try:
        opener = gzip.open if source.suffix == ".gz" else open
        with opener(source, "rb") as src, _writing(target), open(partial, "xb") as dst:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                dst.write(chunk)
        check_idx_file(partial, target.name, shown=source)
        if original and digest.hexdigest() != ORIGINAL_SHA256[target.name]:
            raise UserError(f"{source}: content does not match the original Fashion-MNIST file; reinstall it: "
                            "`apt-get install --reinstall dataset-fashion-mnist`")
        stamp[target.name] = _stamp_entry(partial, digest.hexdigest())  # a rename keeps the size and time
        with _writing(target.parent / STAMP):
            _write_stamp(target.parent, stamp)  # before the rename: whoever sees the file sees its record
        os.replace(partial, target)
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
        verify_raw_files(raw)
        return raw
    explicit = source_dir or os.environ.get(SOURCE_ENV)
    folder = Path(explicit or DEFAULT_SOURCE_DIR).expanduser()
    sources = {name: _find_source(name, folder) for name in missing}
    if all(sources.values()):
        _make_dir(raw)
        with _lock(raw):  # a run that waited here finds the files extracted
            for stale in raw.glob("*.partial"):  # left by a killed run: only the lock's holder writes them
                stale.unlink(missing_ok=True)
            stamp = _read_stamp(raw)
            for name, source in sources.items():
                if not (raw / name).is_file():
                    _extract(source, raw / name, stamp, original=not explicit)
        verify_raw_files(raw)
        return raw
    if explicit:
        origin = "source_dir" if source_dir else f"${SOURCE_ENV}"
        absent = ", ".join(f"{name}.gz" for name, found in sources.items() if not found)
        raise UserError(f"{origin}={explicit!r} lacks the Fashion-MNIST files {absent}; point it at the folder "
                        "holding the four original files (train/t10k images/labels, .gz or not)")
    if download and _download(root, raw):
        verify_raw_files(raw)
        return raw
    raise UserError(
        f"Fashion-MNIST not found in data_dir={str(root)!r} and could not be obtained. Fix it one of three ways: "
        f"(1) put torchvision's layout there ({raw}/<the four IDX files>); "
        f"(2) install the data offline: `apt-get install dataset-fashion-mnist` (gives {DEFAULT_SOURCE_DIR}), "
        f"or set ${SOURCE_ENV} / data.source_dir to a folder of the four .gz files; "
        "(3) allow torchvision's download (needs the internet and download=true)"
    )


def _download(root: Path, raw: Path) -> bool:
    """torchvision's download of both splits into ``root``, one run at a time; whether it worked."""
    _make_dir(raw)
    with _lock(raw):
        try:
            for train in (True, False):
                FashionMNIST(root, train=train, download=True)
        except Exception:  # noqa: BLE001 - any download failure ends in ensure_raw_files' one message
            return False
    return True


def _make_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):  # a probe of its own: concurrent runs never remove each other's
            pass
    except OSError as err:
        raise UserError(f"data_dir {str(path)!r} is not writable ({err.strerror}); "
                        "pass a data_dir you can write to") from None


def load_split(data_dir: str | os.PathLike, train: bool) -> tuple[Tensor, Tensor]:
    """Read one official split with torchvision: uint8 images (N, 28, 28) and int64 labels (N,)."""
    raw = Path(data_dir).expanduser() / "FashionMNIST" / "raw"
    prefix = "train" if train else "t10k"
    verify_raw_files(raw, [f"{prefix}-{kind}-ubyte" for kind in ("images-idx3", "labels-idx1")])
    dataset = FashionMNIST(Path(data_dir).expanduser(), train=train, download=False)
    labels = dataset.targets.long()
    if labels.numel() and int(labels.max()) > 9:
        raise UserError(f"{raw / f'{prefix}-labels-idx1-ubyte'}: label {int(labels.max())} outside 0..9")
    return dataset.data, labels
