"""The tutorial's own Keras recipes, written anew: the yardstick `benchmark.py` times ours against.

    python benchmarks/keras_tutorial.py seed_cnn --seed 0 [--data-dir DIR] [--epochs N]

Needs TensorFlow (``pip install tensorflow-cpu``; any interpreter that has it, see ``benchmark.py --keras-python``).
The layers, Keras defaults (glorot-uniform weights, Adam with epsilon 1e-7), batch 32 and epochs are the
tutorial's (``../shared/seed``): seed_dense on raw 0-255 pixels for 10 epochs, seed_cnn on pixels / 255 for 5
epochs with the test set as ``validation_data``. The data is read from the same IDX files as ours: a folder of the
four original files (``.gz`` or not), or torchvision's layout under it. Prints one JSON line: the training time
of each epoch (validation excluded), the final epoch's running train accuracy (what ``fit`` prints) and the test
accuracy (seed_dense: one ``evaluate`` after training, which the tutorial leaves out).
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from pathlib import Path

import numpy as np

RECIPES = {"seed_dense": 10, "seed_cnn": 5}


def read_idx(folder: Path, name: str) -> np.ndarray:
    """One IDX file as an array: read here, as this script runs where TensorFlow is, without torch or this package."""
    for candidate in (folder / name, folder / f"{name}.gz", folder / "FashionMNIST" / "raw" / name):
        if candidate.is_file():
            raw = (gzip.open if candidate.suffix == ".gz" else open)(candidate, "rb").read()
            dims = raw[3]
            shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
            return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)
    raise SystemExit(f"{name} not found in {folder} (nor .gz, nor FashionMNIST/raw/); pass --data-dir")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", choices=sorted(RECIPES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=None, help="default: the tutorial's (10 dense, 5 CNN)")
    parser.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    args = parser.parse_args()
    import tensorflow as tf

    folder = Path(args.data_dir)
    train_x, train_y = read_idx(folder, "train-images-idx3-ubyte"), read_idx(folder, "train-labels-idx1-ubyte")
    test_x, test_y = read_idx(folder, "t10k-images-idx3-ubyte"), read_idx(folder, "t10k-labels-idx1-ubyte")
    tf.keras.utils.set_random_seed(args.seed)
    layers = tf.keras.layers
    if args.recipe == "seed_dense":  # raw pixels, as the tutorial's dense code
        train_x, test_x = train_x.astype("float32"), test_x.astype("float32")
        model = tf.keras.Sequential([layers.Input((28, 28)), layers.Dense(128, activation="relu"),
                                     layers.Dense(64, activation="relu"), layers.Flatten(),
                                     layers.Dense(10, activation="softmax")])
    else:
        train_x, test_x = (train_x / 255.0).reshape(-1, 28, 28, 1), (test_x / 255.0).reshape(-1, 28, 28, 1)
        model = tf.keras.Sequential([layers.Input((28, 28, 1)),
                                     layers.Conv2D(32, (3, 3), padding="same", activation="relu"),
                                     layers.MaxPooling2D((2, 2)), layers.Flatten(),
                                     layers.Dense(128, activation="relu"), layers.Dense(10, activation="softmax")])
    model.compile(loss="sparse_categorical_crossentropy", optimizer="adam", metrics=["accuracy"])

    class EpochTimes(tf.keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.times: list[float] = []

        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self.start = time.perf_counter()

        def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
            self.last = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            self.times.append(self.last - self.start)  # up to the last training batch: validation excluded

    timer = EpochTimes()
    validation = (test_x, test_y) if args.recipe == "seed_cnn" else None
    history = model.fit(train_x, train_y, validation_data=validation, epochs=args.epochs or RECIPES[args.recipe],
                        batch_size=32, callbacks=[timer], verbose=0)
    test_acc = (history.history["val_accuracy"][-1] if validation
                else model.evaluate(test_x, test_y, batch_size=1000, verbose=0)[1])
    print(json.dumps({"epoch_time_s": timer.times, "train_acc": history.history["accuracy"][-1],
                      "test_acc": float(test_acc), "parameters": model.count_params()}))


if __name__ == "__main__":
    main()
