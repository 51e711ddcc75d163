"""`NoProfiler`: Lightning's default of no profiling, at less cost a hook call (the app's Trainer takes it where no
profiler is configured)."""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager

from lightning.pytorch.profilers import PassThroughProfiler


class NoProfiler(PassThroughProfiler):
    """Lightning's ``PassThroughProfiler`` (it records nothing), whose ``profile`` context is made once.

    Lightning enters ``trainer.profiler.profile(name)`` around every hook it calls, for every callback: about sixty
    a training step with the app's callbacks. ``PassThroughProfiler`` makes a generator-based context each time
    (about 1 µs, more in a real step); this one hands out one do-nothing context (``benchmarks/step_parts.py``:
    the dispatch rows). No upstream issue found.
    """

    _nothing = contextlib.nullcontext()

    def profile(self, action_name: str) -> AbstractContextManager[None]:
        return self._nothing
