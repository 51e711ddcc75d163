"""The data: Fashion-MNIST as a LightningDataModule, and images from outside it.

- `datamodule`: `FashionMNISTDataModule` and its in-memory `BatchLoader`;
- `idx_files`: the four raw IDX files, found, extracted and verified offline;
- `augment`: `BatchAugment`, augmentation of whole training batches;
- `images`: photos and drawings made to look like Fashion-MNIST (``predict``, ``serve``).
"""

from fashion_lightning.data.augment import BatchAugment
from fashion_lightning.data.datamodule import CLASS_NAMES, BatchLoader, FashionMNISTDataModule

__all__ = ["CLASS_NAMES", "BatchAugment", "BatchLoader", "FashionMNISTDataModule"]
