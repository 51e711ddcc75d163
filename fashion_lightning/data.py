"""Fashion-MNIST as a LightningDataModule: finding the files offline, validating them, fast in-memory batches."""

from __future__ import annotations

import gzip
import math
import os
import shutil
import struct
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import SingleDeviceStrategy
from torch import Tensor
from torchvision.datasets import FashionMNIST

from fashion_lightning.errors import UserError, check_positive_int

CLASS_NAMES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
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


def to_input(images: Tensor, scale: bool = True) -> Tensor:
    """uint8 images (N, 28, 28) -> the networks' input: float32 (N, 1, 28, 28), divided by 255 when ``scale``."""
    x = images.unsqueeze(1).float()
    return x.div_(255.0) if scale else x


class BatchLoader:
    """Batches sliced from in-memory uint8 tensors and scaled on the fly: no per-sample work.

    Yields ``(images, labels)``: float32 ``(B, 1, 28, 28)`` (divided by 255 when ``scale``) and int64
    ``(B,)`` on the tensors' device. With ``shuffle``, every epoch has its own seeded order; with
    ``world_size > 1`` each rank reads its share (training shares are padded to equal length, like
    ``DistributedSampler``; evaluation shares are not, so every item is counted once). The order is a
    function of (seed, epoch), the epoch taken from ``epoch_of`` (the trainer's) when given; it is resumable
    mid-epoch: Lightning saves ``state_dict()`` in checkpoints and restores it before iterating.

    With ``batches_per_step > 1`` it yields lists of that many consecutive batches instead (the last list
    of an epoch may be shorter), gathered and scaled in one go: one Lightning training step takes one
    optimizer step per batch (see `ImageClassifier`), the same math with the per-step overhead paid once.
    """

    def __init__(self, images: Tensor, labels: Tensor, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                 scale: bool = True, rank: int = 0, world_size: int = 1, batches_per_step: int = 1,
                 epoch_of: Callable[[], int] | None = None) -> None:
        self.images, self.labels = images, labels
        self.batch_size, self.shuffle, self.seed, self.scale = batch_size, shuffle, seed, scale
        self.batches_per_step = batches_per_step
        self.rank, self.world_size = rank, world_size
        self.epoch_of = epoch_of  # where the epoch number comes from, e.g. the trainer's; else each pass is the next
        self.epoch, self.position = -1, 0  # epoch being read and items (batches or lists) handed out in it
        self._resume: dict[str, int] | None = None

    def _indices(self, epoch: int) -> Tensor:
        n = len(self.labels)
        if not self.shuffle:
            return torch.arange(self.rank, n, self.world_size)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch))
        per_rank = math.ceil(n / self.world_size)
        order = torch.cat([order, order[: per_rank * self.world_size - n]])
        return order[self.rank :: self.world_size]

    @property
    def num_batches(self) -> int:
        """Batches in one epoch of this rank's share."""
        n = len(self.labels)
        per_rank = math.ceil(n / self.world_size) if self.shuffle else len(range(self.rank, n, self.world_size))
        return math.ceil(per_rank / self.batch_size)

    def __len__(self) -> int:
        return math.ceil(self.num_batches / self.batches_per_step)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor] | list[tuple[Tensor, Tensor]]]:
        epoch = self.epoch + 1 if self.epoch_of is None else self.epoch_of()
        resume, self._resume = self._resume, None
        start = resume["position"] if resume and resume["epoch"] == epoch else 0
        self.epoch, self.position = epoch, start
        indices = self._indices(epoch).to(self.images.device)
        step = self.batch_size * self.batches_per_step
        for begin in range(start * step, len(indices), step):
            idx = indices[begin : begin + step]
            x, y = to_input(self.images[idx], self.scale), self.labels[idx]
            self.position += 1
            if self.batches_per_step == 1:
                yield x, y
            else:
                yield list(zip(x.split(self.batch_size), y.split(self.batch_size), strict=True))

    def state_dict(self) -> dict[str, int]:
        """Where reading stands: the epoch and how many items (batches or lists of them) were handed out."""
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a `state_dict` when the next iteration reads the same epoch."""
        self._resume = dict(state)


def batches_in_steps(loader: object, steps: int | float) -> int | float:
    """The batches an epoch's first ``steps`` training steps take from ``loader``: ``batches_per_step`` a step
    for a `BatchLoader` (its last step of an epoch may take fewer), one a step for any other loader."""
    if not isinstance(loader, BatchLoader):
        return steps
    return min(steps * loader.batches_per_step, loader.num_batches)


class FashionMNISTDataModule(L.LightningDataModule):
    """Fashion-MNIST with validation carved from the 60k training images; the 10k test set stays untouched.

    Args:
        data_dir: where torchvision's layout (``FashionMNIST/raw``) lives or is made.
        source_dir: a folder of the four original ``.gz`` files (default ``$FASHION_MNIST_DIR``, then
            ``/usr/share/datasets/fashion-mnist``), used when ``data_dir`` lacks them.
        val_split: validation size carved from the training set, a count or a fraction in (0, 1);
            ``0`` validates on the test set as the tutorial did.
        batch_size: training batch size per device.
        eval_batch_size: batch size for validation, test and prediction.
        batches_per_step: batches handed to one Lightning training step, each still one optimizer step
            (see `BatchLoader`); the same math, less per-step overhead. Single-device runs only: under DDP
            every batch is its own step (DDP synchronises gradients once per forward of its wrapper).
        scale: divide pixels by 255 (the tutorial's dense run used raw 0-255 pixels).
        seed: seeds the validation split and the per-epoch shuffling.
        download: let torchvision download when no local copy exists.
    """

    classes = CLASS_NAMES

    def __init__(self, data_dir: str = "data", source_dir: str | None = None, val_split: int | float = 5000,
                 batch_size: int = 32, eval_batch_size: int = 1000, batches_per_step: int = 1, scale: bool = True,
                 seed: int = 0, download: bool = True) -> None:
        super().__init__()
        check_positive_int("data.batch_size", batch_size)
        check_positive_int("data.eval_batch_size", eval_batch_size)
        check_positive_int("data.batches_per_step", batches_per_step)
        self.num_val = self._val_count(val_split)
        self.save_hyperparameters()
        self.train_set: tuple[Tensor, Tensor] | None = None
        self.val_set: tuple[Tensor, Tensor] | None = None
        self.test_set: tuple[Tensor, Tensor] | None = None
        self._loaders: dict[str, BatchLoader] = {}

    @staticmethod
    def _val_count(val_split: int | float) -> int:
        n_train = IDX_FILES["train-labels-idx1-ubyte"][1]
        if isinstance(val_split, bool) or not isinstance(val_split, int | float):
            raise UserError(f"data.val_split must be a count or a fraction, got {val_split!r}")
        count = round(val_split * n_train) if isinstance(val_split, float) and val_split < 1 else val_split
        if count != int(count) or not 0 <= count < n_train:
            raise UserError(f"data.val_split must be 0 (validate on the test set), a count in 1..{n_train - 1} "
                            f"or a fraction in (0, 1), got {val_split!r}")
        return int(count)

    def prepare_data(self) -> None:
        """Find, extract and validate the files (once per node)."""
        hp = self.hparams
        ensure_raw_files(hp.data_dir, hp.source_dir, hp.download)

    def setup(self, stage: str | None = None) -> None:
        """Load both splits into memory and carve the validation set; idempotent."""
        if self.test_set is not None:
            return
        hp = self.hparams
        ensure_raw_files(hp.data_dir, hp.source_dir, hp.download)  # a no-op when prepare_data ran
        images, labels = load_split(hp.data_dir, train=True)
        self.test_set = load_split(hp.data_dir, train=False)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(hp.seed))
        val_idx, train_idx = order[: self.num_val].sort().values, order[self.num_val :].sort().values
        self.train_set = (images[train_idx], labels[train_idx])
        self.val_set = (images[val_idx], labels[val_idx]) if self.num_val else self.test_set

    def _loader(self, split: str) -> BatchLoader:
        """One loader per split and placement, its data moved once to the trainer's device (kept as uint8)."""
        trainer = self.trainer
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        train = split == "train"
        single = trainer is None or isinstance(trainer.strategy, SingleDeviceStrategy)
        per_step = self.hparams.batches_per_step if train and single else 1
        key = f"{split}:{device}:{rank}/{world}:{per_step}"
        if key not in self._loaders:
            self.setup()
            images, labels = (t.to(device) for t in getattr(self, f"{split}_set"))
            hp = self.hparams
            self._loaders[key] = BatchLoader(
                images, labels, hp.batch_size if train else hp.eval_batch_size, shuffle=train, seed=hp.seed,
                scale=hp.scale, rank=rank, world_size=world, batches_per_step=per_step,
                epoch_of=(lambda: self.trainer.current_epoch) if train and trainer is not None else None)
        return self._loaders[key]

    def train_dataloader(self) -> BatchLoader:
        return self._loader("train")

    def val_dataloader(self) -> BatchLoader:
        return self._loader("val")

    def test_dataloader(self) -> BatchLoader:
        return self._loader("test")

    def predict_dataloader(self) -> BatchLoader:
        return self._loader("test")
