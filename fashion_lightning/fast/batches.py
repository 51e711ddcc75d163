"""Several batches for one Lightning training step: Lightning's per-step machinery paid once for all of them."""

from __future__ import annotations

import math
from collections.abc import Iterator

from torch import Tensor

from fashion_lightning.data import BatchLoader


class GroupedBatches:
    """The batches of ``loader`` (a `BatchLoader`) in lists of ``per_step`` consecutive ones (the last list of an
    epoch may be shorter), at most ``limit`` batches an epoch.

    Its length counts lists, which is what Lightning counts as training steps; lists end at multiples of
    ``per_step`` batches into the epoch, also in an epoch resumed mid-list, so the count holds. Its state is the
    loader's, whose ``position`` counts the batches handed out.
    """

    def __init__(self, loader: BatchLoader, per_step: int, limit: int | None = None) -> None:
        self.loader, self.per_step = loader, per_step
        self.num_batches = len(loader) if limit is None else min(len(loader), limit)

    def __len__(self) -> int:
        return math.ceil(self.num_batches / self.per_step)

    def __iter__(self) -> Iterator[list[tuple[Tensor, Tensor]]]:
        k = self.per_step
        end = (self.loader.start() // k + 1) * k  # where the first list ends, also in a resumed epoch
        group: list[tuple[Tensor, Tensor]] = []
        for batch in self.loader:
            group.append(batch)
            if self.loader.position >= min(end, self.num_batches):
                yield group
                group, end = [], end + k
                if self.loader.position >= self.num_batches:
                    return
        if group:
            yield group

    def batches_in(self, steps: int | float) -> int | float:
        """The batches the first ``steps`` training steps of an epoch take."""
        return min(steps * self.per_step, self.num_batches)

    def give_back(self, batches: int) -> None:
        """Count the last ``batches`` handed out as unread: a step that failed took them, and a resume runs it again."""
        self.loader.give_back(batches)

    def state_dict(self) -> dict[str, int]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.loader.load_state_dict(state)
