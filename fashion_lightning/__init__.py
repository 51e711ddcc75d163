"""fashion_lightning: the Keras Fashion-MNIST tutorial's dense baseline and CNN, with Lightning and Hydra."""

from fashion_lightning.augment import BatchAugment
from fashion_lightning.classifiers import CNN, DenseBaseline
from fashion_lightning.data import CLASS_NAMES, BatchLoader, FashionMNISTDataModule
from fashion_lightning.errors import UserError
from fashion_lightning.models import ConvNet, DenseNet, keras_init_, summary
from fashion_lightning.module import ImageClassifier

__all__ = [
    "CLASS_NAMES", "CNN", "BatchAugment", "BatchLoader", "ConvNet", "DenseBaseline", "DenseNet",
    "FashionMNISTDataModule", "ImageClassifier", "UserError", "keras_init_", "summary",
]
