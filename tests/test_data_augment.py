"""Training-batch augmentation: per-image shifts, flips and erasures, only ever on training batches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fashion_lightning import BatchAugment, BatchLoader, FashionMNISTDataModule, UserError
from fashion_lightning.data.datamodule import to_input


def numbered(n: int) -> torch.Tensor:
    """``n`` distinct images: image i is an i-valued 10x10 square in the middle of a 28x28 frame, plus a mark
    in its top-left corner that tells a flip."""
    x = torch.zeros(n, 1, 28, 28)
    x[:, :, 9:19, 9:19] = torch.arange(1, n + 1, dtype=torch.float32)[:, None, None, None]
    x[:, :, 9, 9] = -1.0
    return x


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_each_image_gets_its_own_shift_within_the_bound() -> None:
    x = numbered(256)
    out = BatchAugment(shift=2)(x, generator())
    offsets = set()
    for i in range(len(x)):
        rows, cols = torch.nonzero(out[i, 0] == -1.0, as_tuple=True)
        dy, dx = int(rows[0]) - 9, int(cols[0]) - 9  # the mark moved with its image
        assert -2 <= dy <= 2 and -2 <= dx <= 2
        assert torch.equal(out[i], torch.roll(x[i], (dy, dx), dims=(1, 2)))  # a pure translation, nothing lost
        offsets.add((dy, dx))
    assert len(offsets) == 25  # every one of the (2 * 2 + 1) ** 2 shifts occurs: drawn per image, not per batch


def test_a_shift_fills_with_the_black_background() -> None:
    x = torch.ones(64, 1, 28, 28)
    out = BatchAugment(shift=3)(x, generator())
    assert out.shape == x.shape
    black = (out == 0).sum(dim=(1, 2, 3))
    assert (black > 0).any() and (black <= 28 * 28 - 25 * 25).all()  # at most 3 rows and 3 columns come in black


def test_flip_mirrors_about_half_of_the_images_left_right() -> None:
    x = numbered(400)
    out = BatchAugment(flip=True)(x, generator())
    flipped = torch.tensor([torch.equal(out[i], x[i].flip(2)) for i in range(len(x))])
    kept = torch.tensor([torch.equal(out[i], x[i]) for i in range(len(x))])
    assert (flipped ^ kept).all()
    assert 150 < int(flipped.sum()) < 250


def test_erase_blanks_one_rectangle_in_the_share_it_is_given() -> None:
    x = torch.ones(500, 1, 28, 28)
    out = BatchAugment(erase=0.5)(x, generator())
    erased = (out == 0).any(dim=(1, 2, 3))
    assert 200 < int(erased.sum()) < 300
    for i in torch.nonzero(erased).flatten()[:50]:
        rows, cols = torch.nonzero(out[i, 0] == 0, as_tuple=True)
        area = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert len(rows) == area  # one filled rectangle
        assert 0.02 * 784 * 0.5 <= area <= 0.33 * 784 * 1.5  # about torchvision's 2-33 % of the image


def test_the_same_generator_state_gives_the_same_batch() -> None:
    augment = BatchAugment(shift=2, flip=True, erase=0.5)
    x = numbered(32)
    assert torch.equal(augment(x, generator(7)), augment(x, generator(7)))
    assert not torch.equal(augment(x, generator(7)), augment(x, generator(8)))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"shift": -1}, "data.augment.shift must be a whole number of pixels in 0..27, got -1"),
    ({"shift": 1.5}, "data.augment.shift must be a whole number of pixels in 0..27, got 1.5"),
    ({"flip": "yes"}, "data.augment.flip must be true or false, got 'yes'"),
    ({"erase": 2}, r"data.augment.erase must be a probability in \[0, 1\], got 2"),
])
def test_bad_settings_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        BatchAugment(**kwargs)


def test_the_datamodule_augments_training_batches_only(data_dir: Path) -> None:
    augment = BatchAugment(shift=2, flip=True, erase=0.5)
    dm = FashionMNISTDataModule(data_dir=str(data_dir), download=False, augment=augment, batch_size=64)
    plain = FashionMNISTDataModule(data_dir=str(data_dir), download=False, batch_size=64)
    for split in ("val", "test", "predict"):
        for (x, y), (px, py) in zip(getattr(dm, f"{split}_dataloader")(), getattr(plain, f"{split}_dataloader")(),
                                          strict=True):
            assert torch.equal(x, px) and torch.equal(y, py)
    (x, y), (px, py) = next(iter(dm.train_dataloader())), next(iter(plain.train_dataloader()))
    assert torch.equal(y, py) and not torch.equal(x, px)  # the same images in the same order, augmented


def test_augmented_epochs_differ_and_a_resumed_epoch_sees_the_same_images(data_dir: Path) -> None:
    dm = FashionMNISTDataModule(data_dir=str(data_dir), download=False)
    dm.setup()
    images, labels = dm.train_set.images, dm.train_set.labels
    epochs = iter(range(10))
    loader = BatchLoader(images, labels, 50, shuffle=True, seed=3, augment=BatchAugment(shift=2, flip=True),
                         epoch_of=lambda: next(epochs))
    first = [x for x, _ in loader]
    second = [x for x, _ in loader]
    assert not torch.equal(first[0], second[0])
    resumed = BatchLoader(images, labels, 50, shuffle=True, seed=3, augment=BatchAugment(shift=2, flip=True),
                          epoch_of=lambda: 1)
    resumed.load_state_dict({"epoch": 1, "position": 4})
    assert all(torch.equal(a, b) for a, b in zip((x for x, _ in resumed), second[4:], strict=True))
    # and without augmentation the batches are the plain scaled images
    plain = BatchLoader(images, labels, 50)
    assert torch.equal(next(iter(plain))[0], to_input(images[:50]))
