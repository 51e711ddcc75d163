"""Shared fixtures: a synthetic Fashion-MNIST written as real IDX .gz files, and composed app configs."""

from __future__ import annotations

import functools
import gzip
import struct
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from PIL import Image

from fashion_lightning import FashionMNISTDataModule
from fashion_lightning.app import CONFIG_DIR, reported_as_one_line
from fashion_lightning.data.idx_files import ensure_raw_files

N_TRAIN, N_TEST = 60_000, 10_000


def write_idx(path: Path, array: np.ndarray, magic: int | None = None) -> None:
    """Write ``array`` (uint8) as an IDX file, gzipped when ``path`` ends in .gz."""
    magic = magic if magic is not None else (2051 if array.ndim == 3 else 2049)
    header = struct.pack(f">{1 + array.ndim}I", magic, *array.shape)
    opener = gzip.open if path.suffix == ".gz" else open
    kwargs = {"compresslevel": 1} if path.suffix == ".gz" else {}
    with opener(path, "wb", **kwargs) as f:
        f.write(header + array.astype(np.uint8).tobytes())


def synthetic_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Learnable fake Fashion-MNIST: each class is a fixed blocky pattern, light on dark, with noise."""
    rng = np.random.default_rng(seed)
    blocks = np.random.default_rng(0).random((10, 7, 7)) > 0.55
    templates = np.kron(blocks, np.ones((4, 4))) * 200.0
    labels = rng.integers(0, 10, n).astype(np.uint8)
    images = templates[labels] * rng.uniform(0.3, 1.0, (n, 1, 1)) + rng.uniform(0, 150, (n, 28, 28))
    return np.clip(images, 0, 255).astype(np.uint8), labels


def smooth_item() -> np.ndarray:
    """A 28x28 light-on-dark object with soft edges, filling the frame like a Fashion-MNIST item."""
    yy, xx = np.mgrid[:28, :28]
    body = np.clip(1.2 - ((yy - 13.5) / 14) ** 2 - ((xx - 13.5) / 9) ** 2, 0, 1) * 230
    body[10:18, 12:16] *= 0.3  # a darker detail
    return body.astype(np.uint8)


def save_variants(folder: Path) -> list[str]:
    """One item saved three ways: light-on-dark PNG, a dark-on-light 'photo' JPEG, an odd-sized RGB PNG."""
    image = smooth_item()
    Image.fromarray(image).save(folder / "light_on_dark.png")
    big = Image.fromarray(255 - image).resize((150, 150), Image.BILINEAR)
    canvas = Image.new("L", (230, 190), 255)
    canvas.paste(big, (40, 20))
    canvas.convert("RGB").save(folder / "photo.jpg", quality=95)
    Image.fromarray(np.stack([image] * 3, axis=-1)).resize((61, 61), Image.BILINEAR).save(folder / "rgb_odd.png")
    return ["light_on_dark.png", "photo.jpg", "rgb_odd.png"]


@functools.cache
def huge_png(width: int = 20_000, height: int = 20_000) -> bytes:
    """A valid black 1-bit PNG written row by row: 20000x20000 takes 50 kB and 0.2 s, never its 400 MB of pixels,
    and is past Pillow's decompression-bomb limit (which makes `Image.open` refuse it)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer = zlib.compressobj(9)
    row = bytes(1 + (width + 7) // 8)  # filter type 0, then the row's bits
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1 bit a pixel, grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture(scope="session")
def fmnist_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of the four original-style .gz files, synthetic content, full 60,000/10,000 size."""
    folder = tmp_path_factory.mktemp("fmnist_source")
    for prefix, n, seed in (("train", N_TRAIN, 1), ("t10k", N_TEST, 2)):
        images, labels = synthetic_split(n, seed)
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return folder


@pytest.fixture(scope="session")
def data_dir(fmnist_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data_dir already holding torchvision's layout, extracted from `fmnist_source`."""
    folder = tmp_path_factory.mktemp("fmnist_data")
    ensure_raw_files(folder, str(fmnist_source), download=False)
    return folder


@pytest.fixture(autouse=True)
def _no_hydra_job_left_behind() -> Iterator[None]:
    """Each test starts as a fresh process would: an in-process Hydra app leaves its job's HydraConfig set."""
    yield
    HydraConfig.instance().cfg = None


@pytest.fixture(autouse=True)
def _no_real_source(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Tests never read $FASHION_MNIST_DIR or the Debian folder unless they ask for it."""
    monkeypatch.delenv("FASHION_MNIST_DIR", raising=False)
    monkeypatch.setattr("fashion_lightning.data.idx_files.DEFAULT_SOURCE_DIR", str(tmp_path / "no-debian-data"))


def quick_overrides(data_dir: Path, output_dir: Path) -> list[str]:
    """Overrides for a run of a few steps on the synthetic data, writing into ``output_dir``."""
    return [f"paths.data_dir={data_dir}", f"paths.output_dir={output_dir}", f"paths.output_root={output_dir.parent}",
            "trainer=cpu", "trainer.max_epochs=1", "+trainer.limit_train_batches=20",
            "+trainer.limit_val_batches=2",
            "~callbacks.progress_bar", "+trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false",
            "data.download=false",
            "report=false"]


def compose_train(*overrides: str, hydra_node: bool = False) -> DictConfig:
    """The composed ``train`` config, as the Hydra app would see it (with the hydra node if asked)."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=hydra_node)


@pytest.fixture(scope="session")
def trained_run(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory of a CNN trained briefly on the synthetic data, with its report."""
    from fashion_lightning.train import train

    out = tmp_path_factory.mktemp("trained") / "run"
    overrides = [o for o in quick_overrides(data_dir, out) if o != "report=false"]
    train(compose_train(*overrides, "+trainer.limit_test_batches=2"))
    return out


def one_line_error(run: Callable[[], object], capsys: pytest.CaptureFixture[str]) -> str:
    """What an app answers a user's mistake with: ``run()`` under the apps' error handler exits with code 1 after
    one ``error: ...`` line on stderr; that line."""
    with pytest.raises(SystemExit) as info, reported_as_one_line():
        run()
    err = capsys.readouterr().err
    assert info.value.code == 1 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


def fit_model(model: L.LightningModule, data_dir: Path, tmp_path: Path, callbacks: tuple = (),
              data: dict | None = None, ckpt_path: Path | None = None, **trainer_kwargs: object) -> L.Trainer:
    """Fit ``model`` on the synthetic data with a quiet CPU trainer (one validation batch, no sanity check,
    logger or checkpoints unless asked for); return the trainer."""
    settings = {"accelerator": "cpu", "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
                "enable_model_summary": False, "default_root_dir": tmp_path, "limit_val_batches": 1,
                "num_sanity_val_steps": 0, **trainer_kwargs}
    trainer = L.Trainer(callbacks=list(callbacks), **settings)
    trainer.fit(model, datamodule=FashionMNISTDataModule(data_dir=str(data_dir), download=False, **(data or {})),
                ckpt_path=ckpt_path)
    return trainer


class SaveWeightsAtEnd(L.Callback):
    """Saves each rank's final weights to ``<dirpath>/rank<global rank>.pt`` (the DDP tests compare them)."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().cpu() for k, v in pl_module.net.state_dict().items()},
                   self.dirpath / f"rank{trainer.global_rank}.pt")


@pytest.fixture(scope="session")
def server_url(trained_run: Path) -> Iterator[str]:
    """A server for the synthetic-data checkpoint (uploads limited to 3 MB, to test the limit cheaply)."""
    serve = pytest.importorskip("fashion_lightning.serve", reason="needs the serve extra: pip install -e '.[serve]'")
    with serve.in_background(trained_run / "checkpoints" / "best.ckpt", "max_upload_mb=3") as url:
        yield url
