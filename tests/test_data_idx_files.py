"""Finding, extracting and validating the Fashion-MNIST files offline, with one clear error per bad file."""

from __future__ import annotations

import errno
import gzip
import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import N_TEST, N_TRAIN, one_line_error, write_idx
from fashion_lightning import FashionMNISTDataModule, UserError
from fashion_lightning.data import idx_files
from fashion_lightning.data.idx_files import ensure_raw_files, load_split

RAW = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def add_noise(path: Path) -> None:
    """Overwrite everything after the IDX header of ``path`` with noise: header and size stay valid."""
    header = 16 if "idx3" in path.name else 8
    with open(path, "r+b") as f:
        f.seek(header)
        f.write(np.random.default_rng(0).integers(0, 256, path.stat().st_size - header, dtype=np.uint8).tobytes())


def count_hashing(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the files `idx_files` hashes from now on, in order."""
    hashed: list[str] = []
    sha256 = idx_files._sha256
    monkeypatch.setattr(idx_files, "_sha256", lambda path: hashed.append(path.name) or sha256(path))
    return hashed


def copy_source(fmnist_source: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "source"
    shutil.copytree(fmnist_source, folder)
    return folder


def test_extracts_gz_source_into_torchvision_layout(fmnist_source: Path, tmp_path: Path) -> None:
    raw = ensure_raw_files(tmp_path / "data", str(fmnist_source), download=False)
    assert raw == tmp_path / "data" / "FashionMNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(RAW)
    assert (raw / "train-images-idx3-ubyte").stat().st_size == 16 + N_TRAIN * 784


def test_existing_layout_needs_no_source(data_dir: Path, tmp_path: Path) -> None:
    dm = FashionMNISTDataModule(data_dir=str(data_dir), source_dir=str(tmp_path / "nowhere"), download=False)
    dm.prepare_data()  # the explicit but absent source is never consulted: the files are already there
    dm.setup()
    assert len(dm.test_set) == N_TEST


def test_source_from_environment_variable(fmnist_source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASHION_MNIST_DIR", str(fmnist_source))
    dm = FashionMNISTDataModule(data_dir=str(tmp_path / "data"), download=False)
    dm.prepare_data()
    assert (tmp_path / "data" / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte").is_file()


def test_environment_variable_pointing_nowhere_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match=r"\$FASHION_MNIST_DIR='.*nowhere' lacks the Fashion-MNIST files"):
        FashionMNISTDataModule(data_dir=str(tmp_path / "data"), download=False).prepare_data()


def test_missing_dataset_names_the_three_fixes(tmp_path: Path) -> None:
    with pytest.raises(UserError) as info:
        ensure_raw_files(tmp_path / "data", None, download=False)
    message = str(info.value)
    assert "(1) put torchvision's layout there" in message
    assert "apt-get install dataset-fashion-mnist" in message and "FASHION_MNIST_DIR" in message
    assert "(3) allow torchvision's download" in message


def test_uncompressed_source_files_work_too(fmnist_source: Path, tmp_path: Path) -> None:
    folder = tmp_path / "plain"
    folder.mkdir()
    for name in RAW:
        with gzip.open(fmnist_source / f"{name}.gz") as src:
            (folder / name).write_bytes(src.read())
    ensure_raw_files(tmp_path / "data", str(folder), download=False)
    assert (tmp_path / "data" / "FashionMNIST" / "raw" / RAW[0]).stat().st_size == 16 + N_TRAIN * 784


@pytest.mark.parametrize(
    ("name", "corrupt", "message"),
    [
        ("train-images-idx3-ubyte.gz", lambda p: p.write_bytes(p.read_bytes()[:5000]), "corrupt or truncated gzip"),
        ("t10k-labels-idx1-ubyte.gz", lambda p: p.write_bytes(b"not gzip at all"), "corrupt or truncated gzip"),
        ("t10k-images-idx3-ubyte.gz", lambda p: write_idx(p, np.zeros((N_TEST, 28, 28)), magic=2049),
         "wrong IDX magic number 2049, expected 2051"),
        ("t10k-images-idx3-ubyte.gz", lambda p: write_idx(p, np.zeros((N_TEST, 28, 27))),
         r"IDX shape \[10000, 28, 27\]"),
        ("t10k-labels-idx1-ubyte.gz", lambda p: write_idx(p, np.zeros(N_TEST - 1)), r"IDX shape \[9999\]"),
        ("t10k-labels-idx1-ubyte.gz", lambda p: p.write_bytes(gzip.compress(gzip.decompress(p.read_bytes())[:-3])),
         "10005 bytes, expected 10008"),
    ],
)
def test_bad_files_are_named_and_never_extracted(fmnist_source: Path, tmp_path: Path, name: str, corrupt,
                                                 message: str) -> None:
    source = copy_source(fmnist_source, tmp_path)
    corrupt(source / name)
    with pytest.raises(UserError, match=message) as info:
        ensure_raw_files(tmp_path / "data", str(source), download=False)
    assert name in str(info.value)
    raw = tmp_path / "data" / "FashionMNIST" / "raw"
    assert not (raw / name.removesuffix(".gz")).exists()
    assert not list(raw.glob("*.partial"))


def test_truncated_file_already_in_data_dir(data_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    labels = copy / "FashionMNIST" / "raw" / "train-labels-idx1-ubyte"
    labels.write_bytes(labels.read_bytes()[:-10])
    with pytest.raises(UserError, match="train-labels-idx1-ubyte: 59998 bytes, expected 60008"):
        FashionMNISTDataModule(data_dir=str(copy), download=False).setup()


def test_label_out_of_range(fmnist_source: Path, tmp_path: Path) -> None:
    source = copy_source(fmnist_source, tmp_path)
    write_idx(source / "t10k-labels-idx1-ubyte.gz", np.full(N_TEST, 12))
    with pytest.raises(UserError, match="t10k-labels-idx1-ubyte: label 12 outside 0..9"):
        FashionMNISTDataModule(data_dir=str(tmp_path / "data"), source_dir=str(source), download=False).setup()


def test_unwritable_data_dir(fmnist_source: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    with pytest.raises(UserError, match="is not writable"):
        ensure_raw_files(blocker / "data", str(fmnist_source), download=False)


def test_noise_after_an_intact_header_is_named(data_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    images = copy / "FashionMNIST" / "raw" / "train-images-idx3-ubyte"
    add_noise(images)
    with pytest.raises(UserError) as info:
        FashionMNISTDataModule(data_dir=str(copy), download=False).setup()
    message = str(info.value)
    assert message.startswith(f"{images}: content does not match") and "delete it" in message and "\n" not in message


def test_a_layout_put_there_by_hand_must_be_the_original(data_dir: Path, tmp_path: Path) -> None:
    raw = tmp_path / "data" / "FashionMNIST" / "raw"
    shutil.copytree(data_dir / "FashionMNIST" / "raw", raw)  # the synthetic files, without the record of extraction
    with pytest.raises(UserError, match="train-images-idx3-ubyte: content does not match the original Fashion-MNIST"):
        ensure_raw_files(tmp_path / "data", None, download=False)


def test_verification_is_cached_until_a_file_changes(fmnist_source: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    hashed = count_hashing(monkeypatch)
    data = tmp_path / "data"
    ensure_raw_files(data, str(fmnist_source), download=False)  # hashes while extracting, not afterwards
    ensure_raw_files(data, str(fmnist_source), download=False)
    load_split(data, train=False)
    assert hashed == []
    labels = data / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte"
    stat = labels.stat()
    os.utime(labels, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    ensure_raw_files(data, str(fmnist_source), download=False)  # same content, new time: hashed once, accepted
    ensure_raw_files(data, str(fmnist_source), download=False)
    assert hashed == ["t10k-labels-idx1-ubyte"]


def test_the_debian_folder_must_hold_the_originals(fmnist_source: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(idx_files, "DEFAULT_SOURCE_DIR", str(fmnist_source))  # synthetic files where Debian's belong
    with pytest.raises(UserError, match="train-images-idx3-ubyte.gz: content does not match the original .*reinstall"):
        ensure_raw_files(tmp_path / "data", None, download=False)
    raw = tmp_path / "data" / "FashionMNIST" / "raw"
    assert not (raw / "train-images-idx3-ubyte").exists() and not list(raw.glob("*.partial"))


def test_a_killed_extraction_leaves_no_partial_file_behind(fmnist_source: Path, tmp_path: Path) -> None:
    raw = tmp_path / "data" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "train-images-idx3-ubyte.1234.partial").write_bytes(b"left by a killed run")
    ensure_raw_files(tmp_path / "data", str(fmnist_source), download=False)
    assert sorted(p.name for p in raw.iterdir()) == sorted(RAW)


class FullDisk(io.FileIO):
    """A new file on a disk that is full once the file holds 1 MB: a write then fails as the kernel's does, with
    ENOSPC and no file name."""

    def write(self, data: bytes) -> int:
        if self.tell() >= 1 << 20:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(data)


def test_a_full_disk_names_the_file_and_leaves_no_half_file(fmnist_source: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    real_open = open
    monkeypatch.setattr(idx_files, "open", lambda file, mode="r", *args, **kwargs: FullDisk(file, mode)
                        if mode == "xb" else real_open(file, mode, *args, **kwargs), raising=False)
    raw = tmp_path / "data" / "FashionMNIST" / "raw"
    line = one_line_error(lambda: ensure_raw_files(tmp_path / "data", str(fmnist_source), download=False), capsys)
    assert line.startswith(f"error: cannot use {raw / RAW[0]}: No space left on device") and "free space" in line
    assert list(raw.iterdir()) == []  # the half-written file gone, nothing under its name
    monkeypatch.undo()  # space freed: the same call extracts the files
    ensure_raw_files(tmp_path / "data", str(fmnist_source), download=False)
    assert sorted(p.name for p in raw.iterdir()) == sorted(RAW)
