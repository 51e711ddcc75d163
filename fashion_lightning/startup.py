"""Start-up and exit of the package and its apps, without Python's cyclic garbage collector walking the imports.

Importing torch, Lightning, torchmetrics and torchvision creates about half a million objects that live as long as
the process. Left alone, the collector walks them all again and again while they are being created (seven full
collections), and once more at exit, where Python's finalization collects before the operating system takes the
memory back anyway: about 3 s of a training run on a 2-core CPU (``benchmarks/README.md``). No result depends on it.
"""

from __future__ import annotations

import atexit
import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def imports_kept_old() -> Iterator[None]:
    """Pause the collector for the imports inside; afterwards count every object then alive as old (the oldest
    generation, walked only by the rare full collections), and leave the collector enabled or disabled as it was.

    Objects alive at the import, the importing process's own included, count as old; nothing stays frozen, and
    where the process had frozen objects itself (``gc.freeze()`` before a fork, say) the objects are left as they
    are, its freeze untouched.
    """
    enabled, frozen_before = gc.isenabled(), gc.get_freeze_count()
    gc.disable()
    try:
        yield
    finally:
        if not frozen_before:  # unfreeze would release the process's own frozen objects too
            gc.freeze()  # into the permanent generation, then back into the oldest: never walked as young objects
            gc.unfreeze()
        (gc.enable if enabled else gc.disable)()


def skip_collection_at_exit() -> None:
    """For an app's process (never a library import): at exit, freeze every object still alive, so that Python's
    finalization does not walk them all to collect reference cycles the operating system frees anyway.

    The atexit handlers registered after this one (the app's) run first; Python never promises finalizers of objects
    alive at exit, and the apps close every file they write before they return.
    """
    atexit.register(gc.freeze)
