"""Where a training run's time goes outside its epochs: a timeline from process start to the end of ``train(cfg)``.

    python benchmarks/timeline.py experiment=seed_cnn paths.data_dir=data [any train override ...]

Runs `fashion_lightning.train.train` on the composed ``train`` config, as the CLI does (the run directory is a
temporary folder), and prints the seconds since the interpreter started at each phase: the imports, composing the
config, each training epoch's start and end, each validation, the test, and the return of ``train(cfg)`` (after the
report and ``results.json``). The interpreter's exit comes after that. Run it with nothing else on the machine.
"""

from __future__ import annotations

import sys
import tempfile
import time

START = time.perf_counter()


def mark(what: str) -> None:
    print(f"{time.perf_counter() - START:7.2f} s  {what}", flush=True)


import fashion_lightning  # noqa: E402, F401  (the imports timed one by one, after START, in the app's order)

mark("import fashion_lightning (with it torch, Lightning, torchmetrics, torchvision)")
import lightning as L  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from fashion_lightning import train  # noqa: E402
from fashion_lightning.app import CONFIG_DIR, set_up_process  # noqa: E402

mark("import hydra, fashion_lightning.train")


class Phases(L.Callback):
    """Marks the phases of fit and test."""

    def on_fit_start(self, *_: object) -> None:
        mark("fit starts (data loaded, model built, trainer set up)")

    def on_sanity_check_end(self, *_: object) -> None:
        mark("sanity-check validation done")

    def on_train_epoch_start(self, trainer: L.Trainer, *_: object) -> None:
        mark(f"epoch {trainer.current_epoch} starts")

    def on_validation_start(self, trainer: L.Trainer, *_: object) -> None:
        if not trainer.sanity_checking:
            mark(f"epoch {trainer.current_epoch}: training steps done, validation starts")

    def on_validation_end(self, trainer: L.Trainer, *_: object) -> None:
        if not trainer.sanity_checking:
            mark(f"epoch {trainer.current_epoch}: validation done")

    def on_train_epoch_end(self, trainer: L.Trainer, *_: object) -> None:
        mark(f"epoch {trainer.current_epoch} ends (checkpoints written)")

    def on_test_start(self, *_: object) -> None:
        mark("test starts")

    def on_test_end(self, *_: object) -> None:
        mark("test done")


def main() -> None:
    set_up_process()  # as the app does
    with tempfile.TemporaryDirectory() as run_dir, initialize_config_dir(config_dir=CONFIG_DIR,
                                                                           version_base="1.3"):
        cfg = compose("train", overrides=[*sys.argv[1:], f"paths.output_dir={run_dir}"])
        mark("config composed")
        results = train.train(cfg, callbacks=[Phases()])
        mark(f"train(cfg) returned (after the report and results.json): {results['steps']} steps, the epochs' "
             f"training steps {sum(results['epoch_time_s']):.1f} s in all")


if __name__ == "__main__":
    main()
