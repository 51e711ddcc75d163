"""fashion_lightning: the Keras Fashion-MNIST tutorial's dense baseline and CNN, with Lightning and Hydra.

The rooms, in reading order: `nets` (the networks), `lit` (the LightningModules, callbacks, checkpoints), `data`
(the datamodule), then the apps at this level (``python -m fashion_lightning.train``, ...) and their helpers
(`app`). ``docs/walkthrough.md`` follows one default run through them.
"""

from fashion_lightning.data import CLASS_NAMES, BatchAugment, BatchLoader, FashionMNISTDataModule
from fashion_lightning.errors import UserError
from fashion_lightning.lit import CNN, DenseBaseline, ImageClassifier
from fashion_lightning.nets import ConvNet, DenseNet, FusedConvNet, FusedDenseNet, keras_init_, summary

__all__ = [
    "CLASS_NAMES", "CNN", "BatchAugment", "BatchLoader", "ConvNet", "DenseBaseline", "DenseNet",
    "FashionMNISTDataModule", "FusedConvNet", "FusedDenseNet", "ImageClassifier", "UserError", "keras_init_",
    "summary",
]
