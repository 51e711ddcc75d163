"""Fashion-MNIST as a LightningDataModule: the images held in memory as uint8, batches sliced and scaled on the fly."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import Dataset

from fashion_lightning.data.augment import BatchAugment
from fashion_lightning.data.idx_files import IDX_FILES, ensure_raw_files, load_split
from fashion_lightning.errors import UserError, check_positive_int

CLASS_NAMES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


def to_input(images: Tensor, scale: bool = True) -> Tensor:
    """uint8 images (N, 28, 28) -> the networks' input: float32 (N, 1, 28, 28), divided by 255 when ``scale``."""
    x = images.unsqueeze(1).float()
    return x.div_(255.0) if scale else x


class ImageDataset(Dataset[tuple[Tensor, Tensor]]):
    """One split held in memory: ``images`` uint8 (N, 28, 28) and ``labels`` int64 (N,). Item ``i`` is image ``i``
    as the networks take it, float32 (1, 28, 28) divided by 255 when ``scale``, and its label, so that a
    ``DataLoader`` or any code written for torchvision's datasets reads it; the datamodule's own loaders
    (`BatchLoader`) slice whole batches from the tensors instead."""

    def __init__(self, images: Tensor, labels: Tensor, scale: bool = True) -> None:
        self.images, self.labels, self.scale = images, labels, scale

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return to_input(self.images[index][None], self.scale)[0], self.labels[index]


class BatchLoader:
    """Batches sliced from in-memory uint8 tensors and scaled on the fly: no per-sample work.

    Yields ``(images, labels)``: float32 ``(B, 1, 28, 28)`` (divided by 255 when ``scale``) and int64
    ``(B,)`` on the tensors' device. With ``shuffle``, every epoch has its own seeded order; with
    ``world_size > 1`` each rank reads its share (training shares are padded to equal length, like
    ``DistributedSampler``; evaluation shares are not, so every item is counted once). The order is a
    function of (seed, epoch), the epoch taken from ``epoch_of`` (the trainer's) when given, else counted by the
    loader: its first pass reads ``first_epoch``, each later one the next. It is resumable mid-epoch: Lightning saves
    ``state_dict()`` in checkpoints and restores it before iterating. With ``augment``,
    each batch is augmented with a generator seeded by (seed, epoch, rank, batch), so a resumed epoch sees the
    same images.
    """

    def __init__(self, images: Tensor, labels: Tensor, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                 scale: bool = True, rank: int = 0, world_size: int = 1,
                 epoch_of: Callable[[], int] | None = None, first_epoch: int = 0,
                 augment: BatchAugment | None = None) -> None:
        self.images, self.labels = images, labels
        self.augment = augment
        self.batch_size, self.shuffle, self.seed, self.scale = batch_size, shuffle, seed, scale
        self.rank, self.world_size = rank, world_size
        self.epoch_of = epoch_of  # where the epoch number comes from, e.g. the trainer's; else each pass is the next
        self.epoch, self.position = first_epoch - 1, 0  # epoch being read and batches handed out in it
        self._resume: dict[str, int] | None = None

    def _indices(self, epoch: int) -> Tensor:
        n = len(self.labels)
        if not self.shuffle:
            return torch.arange(self.rank, n, self.world_size)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch))
        per_rank = math.ceil(n / self.world_size)
        order = torch.cat([order, order[: per_rank * self.world_size - n]])
        return order[self.rank :: self.world_size]

    def __len__(self) -> int:
        return self._batches(self.batch_size)

    def _batches(self, batch_size: int) -> int:
        n = len(self.labels)
        per_rank = math.ceil(n / self.world_size) if self.shuffle else len(range(self.rank, n, self.world_size))
        return math.ceil(per_rank / batch_size)

    def _next_epoch(self) -> int:
        return self.epoch + 1 if self.epoch_of is None else self.epoch_of()

    def start(self) -> int:
        """Where the next pass starts: the restored position when it reads the saved epoch, else 0."""
        resume = self._resume
        return resume["position"] if resume and resume["epoch"] == self._next_epoch() else 0

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        epoch, start = self._next_epoch(), self.start()
        self._resume = None
        self.epoch, self.position = epoch, start
        indices = self._indices(epoch).to(self.images.device)
        for begin in range(start * self.batch_size, len(indices), self.batch_size):
            idx = indices[begin : begin + self.batch_size]
            self.position += 1
            x = to_input(self.images[idx], self.scale)
            if self.augment is not None:
                key = hash((self.seed, epoch, self.rank, self.position)) & 0xFFFF_FFFF_FFFF
                x = self.augment(x, torch.Generator(x.device).manual_seed(key))
            yield x, self.labels[idx]

    def give_back(self, batches: int) -> None:
        """Count the last ``batches`` handed out as unread: a step that failed took them, and a resume runs it again."""
        self.position -= batches

    def state_dict(self) -> dict[str, int]:
        """Where reading stands: the epoch and how many batches (of ``batch_size``) were handed out."""
        return {"epoch": self.epoch, "position": self.position, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a `state_dict` when the next iteration reads the same epoch; a position within an epoch
        counts batches, so it needs the batch size it was saved with."""
        saved = state.get("batch_size", self.batch_size)
        if saved != self.batch_size and 0 < state.get("position", 0) < self._batches(saved):
            raise UserError(f"the checkpoint stopped {state['position']} batches of {saved} into an epoch; resume it "
                            f"with data.batch_size={saved} (got {self.batch_size}), or resume from an epoch's end")
        self._resume = dict(state)


class FashionMNISTDataModule(L.LightningDataModule):
    """Fashion-MNIST with validation carved from the 60k training images; the 10k test set stays untouched.

    Batches are float32 ``(B, 1, 28, 28)`` images and int64 labels (`BatchLoader`), on the trainer's device,
    where the images are kept as uint8. After ``setup()``, ``train_set``, ``val_set`` and ``test_set`` are the
    splits as datasets (`ImageDataset`: ``len()``, items as the batches hold them; ``.images``, ``.labels``), and
    ``num_classes`` is 10. Under DDP each rank reads its share of every epoch's order. With ``overfit_batches``
    the training order is not shuffled (Lightning's rule). Outside a trainer, as with
    ``DataLoader(shuffle=True)``, every pass over the training set has a new order: a new ``train_dataloader()``
    continues with the epoch after the one the previous loader read, so ``for epoch in range(3): for x, y in
    dm.train_dataloader(): ...`` reads epochs 0, 1, 2 (as does iterating one loader three times); in a fit the
    epoch is the trainer's.

    Args:
        data_dir: where torchvision's layout (``FashionMNIST/raw``) lives or is made.
        source_dir: a folder of the four original ``.gz`` files (default ``$FASHION_MNIST_DIR``, then
            ``/usr/share/datasets/fashion-mnist``), used when ``data_dir`` lacks them.
        val_split: validation size carved from the training set, a count or a fraction in (0, 1);
            ``0`` validates on the test set as the tutorial did.
        batch_size: training batch size per device, as Lightning's ``DataLoader`` batch sizes are (under DDP a step
            reads ``batch_size`` images on each device; nothing is divided by the number of devices).
        eval_batch_size: batch size for validation, test and prediction, per device. The default, 250, gives the
            5,000 validation images 20 batches and the test set 40, so that a fractional ``limit_val_batches`` or
            ``limit_test_batches`` down to 0.05 and 0.025 still reads one.
        scale: divide pixels by 255 (the tutorial's dense run used raw 0-255 pixels).
        seed: seeds the validation split and the per-epoch shuffling.
        download: let torchvision download when no local copy exists.
        augment: augmentation of the training batches (`BatchAugment`); validation, test and prediction batches
            are never augmented.
        num_workers, pin_memory: accepted for configs written for a ``DataLoader``, with no effect (a warning says
            so): the images are held in memory, on the trainer's device, and batches are sliced from them in the
            training process, so there is nothing to load in workers or to pin.
    """

    classes = CLASS_NAMES
    num_classes = len(CLASS_NAMES)

    def __init__(self, data_dir: str = "data", source_dir: str | None = None, val_split: int | float = 5000,
                 batch_size: int = 32, eval_batch_size: int = 250, scale: bool = True, seed: int = 0,
                 download: bool = True, augment: BatchAugment | None = None, num_workers: int = 0,
                 pin_memory: bool = False) -> None:
        super().__init__()
        if augment is not None and not isinstance(augment, BatchAugment):
            raise UserError(f"data.augment must be a BatchAugment or null, got {augment!r}")
        check_positive_int("data.batch_size", batch_size)
        check_positive_int("data.eval_batch_size", eval_batch_size)
        self.num_val = self._val_count(val_split)
        self._check_dataloader_settings(num_workers, pin_memory)
        self.save_hyperparameters(ignore=["augment", "num_workers", "pin_memory"])
        self.augment = augment
        self.train_set: ImageDataset | None = None
        self.val_set: ImageDataset | None = None
        self.test_set: ImageDataset | None = None
        self._on_device: dict[tuple[str, str], tuple[Tensor, Tensor]] = {}
        self._last_train_loader: BatchLoader | None = None  # the last one handed out outside a trainer

    @staticmethod
    def _check_dataloader_settings(num_workers: int, pin_memory: bool) -> None:
        """Check ``num_workers`` and ``pin_memory`` as a ``DataLoader`` would take them; warn that they do nothing."""
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise UserError(f"data.num_workers must be an integer >= 0, got {num_workers!r}")
        if not isinstance(pin_memory, bool):
            raise UserError(f"data.pin_memory must be true or false, got {pin_memory!r}")
        asked = [f"data.num_workers={num_workers}"] * (num_workers > 0) + ["data.pin_memory=True"] * pin_memory
        if asked:
            rank_zero_warn(f"{' and '.join(asked)} {'has' if len(asked) == 1 else 'have'} no effect: the images are "
                           "held in memory, on the trainer's device, and batches are sliced from them in the "
                           "training process (no workers, nothing to pin)")

    @staticmethod
    def _val_count(val_split: int | float) -> int:
        n_train = IDX_FILES["train-labels-idx1-ubyte"][1]
        accepted = (f"data.val_split must be 0 (validate on the test set), a count in 1..{n_train - 1} or a fraction "
                    f"in (0, 1), got {val_split!r}")
        if isinstance(val_split, bool) or not isinstance(val_split, int | float):
            raise UserError(accepted)
        if isinstance(val_split, float):
            if val_split == 0:
                return 0
            if not 0 < val_split < 1:
                raise UserError(accepted)
            count = round(val_split * n_train)
            if not 0 < count < n_train:
                raise UserError(f"{accepted}: that fraction of {n_train} is {count} images")
            return count
        if not 0 <= val_split < n_train:
            raise UserError(accepted)
        return val_split

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
        self.test_set = ImageDataset(*load_split(hp.data_dir, train=False), scale=hp.scale)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(hp.seed))
        val_idx, train_idx = order[: self.num_val].sort().values, order[self.num_val :].sort().values
        self.train_set = ImageDataset(images[train_idx], labels[train_idx], scale=hp.scale)
        self.val_set = ImageDataset(images[val_idx], labels[val_idx], hp.scale) if self.num_val else self.test_set

    def _loader(self, split: str) -> BatchLoader:
        """A loader of ``split`` for the attached trainer's device and rank (the data moved there once, as uint8)."""
        self.setup()
        trainer, hp, train = self.trainer, self.hparams, split == "train"
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        if (split, str(device)) not in self._on_device:
            data = getattr(self, f"{split}_set")
            self._on_device[split, str(device)] = (data.images.to(device), data.labels.to(device))
        images, labels = self._on_device[split, str(device)]
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        counted = train and trainer is None  # epochs counted here: continue after the previous loader's
        previous = self._last_train_loader if counted else None
        loader = BatchLoader(images, labels, hp.batch_size if train else hp.eval_batch_size, seed=hp.seed,
                             shuffle=train and not (trainer is not None and trainer.overfit_batches > 0),
                             scale=hp.scale, rank=rank, world_size=world,
                             epoch_of=(lambda: trainer.current_epoch) if train and trainer is not None else None,
                             first_epoch=previous.epoch + 1 if previous is not None else 0,
                             augment=self.augment if train else None)
        if counted:
            self._last_train_loader = loader
        return loader

    def train_dataloader(self) -> BatchLoader:
        return self._loader("train")

    def val_dataloader(self) -> BatchLoader:
        return self._loader("val")

    def test_dataloader(self) -> BatchLoader:
        return self._loader("test")

    def predict_dataloader(self) -> BatchLoader:
        return self._loader("test")
