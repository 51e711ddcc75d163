"""GroupedBatches: the loader's batches in lists, resumable, limits counted in batches."""

from __future__ import annotations

import torch

from fashion_lightning import BatchLoader
from fashion_lightning.fast import GroupedBatches


def make_loader(**kwargs: object) -> BatchLoader:
    images = torch.arange(103, dtype=torch.uint8).view(103, 1, 1).expand(103, 28, 28)
    return BatchLoader(images, torch.arange(103), 10, shuffle=True, seed=5, **kwargs)  # 11 batches, the last of 3


def labels(groups: list) -> list[list[int]]:
    return [[int(y[0]) for _, y in group] for group in groups]


def test_lists_hold_the_same_batches_in_order() -> None:
    single = [y for _, y in make_loader()]
    grouped = GroupedBatches(make_loader(), 4)
    lists = list(grouped)
    assert len(grouped) == len(lists) == 3 and [len(g) for g in lists] == [4, 4, 3]
    assert all(torch.equal(a, b) for a, (_, b) in zip(single, [batch for g in lists for batch in g], strict=True))
    assert grouped.batches_in(2) == 8 and grouped.batches_in(3) == 11


def test_a_limit_counts_batches() -> None:
    grouped = GroupedBatches(make_loader(), 4, limit=6)
    assert len(grouped) == 2 and [len(g) for g in grouped] == [4, 2]


def test_a_resumed_epoch_reads_the_rest_and_its_short_last_list() -> None:
    expected = labels(GroupedBatches(make_loader(), 4))
    for limit, rest in ((None, expected[1:]), (6, [expected[1][:2]])):
        first = GroupedBatches(make_loader(epoch_of=lambda: 0), 4, limit)
        head = next(iter(first))
        assert [int(y[0]) for _, y in head] == expected[0]
        resumed = GroupedBatches(make_loader(epoch_of=lambda: 0), 4, limit)
        resumed.load_state_dict(first.state_dict())
        assert labels(resumed) == rest


def test_a_failed_step_is_read_again_from_where_it_stopped() -> None:
    expected = labels(GroupedBatches(make_loader(), 4))  # [[0..3], [4..7], [8..10]] by position
    first = GroupedBatches(make_loader(epoch_of=lambda: 0), 4)
    next(iter(first))
    first.give_back(1)  # the step failed after applying 3 of its 4 batches
    resumed = GroupedBatches(make_loader(epoch_of=lambda: 0), 4)
    resumed.load_state_dict(first.state_dict())
    assert labels(resumed) == [[expected[0][3]], expected[1], expected[2]]  # the lists Lightning still counts
