"""Lightning's side: the LightningModules and what a Trainer plugs in.

- `classifier`: `ImageClassifier`, a LightningModule training any logits network (automatic optimization);
- `models`: `CNN` and `DenseBaseline`, the tutorial's two models;
- `callbacks`: the app's callbacks (interrupt checkpoint, finite loss, best checkpoint, epoch timer, EMA);
- `checkpoints`: checkpoint files written atomically and read weights-only, and `load_model`;
- `grouped`: the opt-in grouped training steps (Keras' ``steps_per_execution``), imported by nothing else here.
"""

from fashion_lightning.lit.classifier import ImageClassifier
from fashion_lightning.lit.models import CNN, DenseBaseline

__all__ = ["CNN", "DenseBaseline", "ImageClassifier"]
