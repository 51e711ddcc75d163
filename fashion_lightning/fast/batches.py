"""Several batches for one Lightning training step: Lightning's per-step machinery paid once for all of them."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sized
from typing import Any


class GroupedBatches:
    """The batches of ``loader`` in lists of ``per_step`` consecutive ones (the last list of an epoch may be
    shorter), at most ``limit`` batches an epoch.

    Its length counts lists, which is what Lightning counts as training steps. Its ``state_dict`` is the wrapped
    loader's, so a resumable loader (`BatchLoader`) resumes exactly where the last whole list ended.
    """

    def __init__(self, loader: Sized, per_step: int, limit: int | None = None) -> None:
        self.loader, self.per_step = loader, per_step
        self.num_batches = len(loader) if limit is None else min(len(loader), limit)

    def __len__(self) -> int:
        return math.ceil(self.num_batches / self.per_step)

    def __iter__(self) -> Iterator[list[Any]]:
        group: list[Any] = []
        for i, batch in zip(range(self.num_batches), self.loader, strict=False):
            group.append(batch)
            if len(group) == self.per_step or i + 1 == self.num_batches:
                yield group
                group = []

    def batches_in(self, steps: int | float) -> int | float:
        """The batches the first ``steps`` training steps of an epoch take."""
        return min(steps * self.per_step, self.num_batches)

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict() if hasattr(self.loader, "state_dict") else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if hasattr(self.loader, "load_state_dict"):
            self.loader.load_state_dict(state)
