"""`NoProfiler`: Lightning's no profiling, one context for every hook call."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import fit_model
from fashion_lightning import DenseBaseline
from fashion_lightning.lit.profilers import NoProfiler


def test_every_profiled_action_gets_the_same_do_nothing_context_and_errors_pass_through() -> None:
    profiler = NoProfiler()
    contexts = {id(profiler.profile(name)) for name in ("[Callback]X.on_train_batch_end", "run_training_batch")}
    assert len(contexts) == 1
    with pytest.raises(ValueError, match="raised inside"), profiler.profile("a hook"):
        raise ValueError("raised inside")


def test_a_fit_under_it_trains_and_records_nothing(data_dir: Path, tmp_path: Path) -> None:
    trainer = fit_model(DenseBaseline(), data_dir, tmp_path, profiler=NoProfiler(), max_steps=5)
    assert trainer.global_step == 5 and trainer.profiler.summary() == ""
