"""Where a run resumed on another number of ranks picks up the data: checked against the examples
each layout actually reads (``train_batch_indices``), not against the mapping's own arithmetic."""

from __future__ import annotations

import pytest

from dist_robust.data.pipeline import batches_per_epoch, continue_batch_index, micro_batch_number, train_batch_indices

SEED = 3


def _read(n: int, micro: int, world: int, first: int, last: int) -> list[int]:
    """Examples read by per-rank batches first..last-1 on every rank, in the order the ranks read them."""
    return [i for b in range(first, last) for r in range(world)
            for i in train_batch_indices(n, micro, world, r, SEED, b)]


@pytest.mark.parametrize("n,micro,old_world,new_world,stopped_at", [
    (256, 8, 2, 1, 3),   # 2 ranks -> 1, inside the first epoch
    (256, 8, 1, 2, 6),   # 1 rank -> 2, at a whole row of two micro-batches
    (256, 8, 2, 4, 22),  # 2 -> 4 ranks, in the second epoch (16 batches per epoch on 2 ranks)
    (264, 8, 2, 1, 9),   # epochs of different lengths: 2 ranks drop 8 examples, 1 rank none
])
def test_continuing_reads_the_rest_of_the_epoch_once(n, micro, old_world, new_world, stopped_at):
    new_index, repeated = continue_batch_index(n, micro, old_world, new_world, stopped_at)
    assert repeated == 0
    epoch_old, j = divmod(stopped_at, batches_per_epoch(n, micro, old_world))
    seen = _read(n, micro, old_world, epoch_old * batches_per_epoch(n, micro, old_world), stopped_at)
    per_new = batches_per_epoch(n, micro, new_world)
    rest = _read(n, micro, new_world, new_index, (new_index // per_new + 1) * per_new)
    assert not set(seen) & set(rest)  # nothing read twice
    assert len(set(seen + rest)) == per_new * new_world * micro  # the new layout's whole epoch, nothing skipped
    # and the next micro-batches are the ones an uninterrupted old-layout run reads next, in order
    following = _read(n, micro, old_world, stopped_at, stopped_at + 1)
    assert rest[:len(following)] == following


def test_a_position_inside_a_row_is_rounded_back_and_says_how_much_repeats():
    # 3 batches on 1 rank = 1.5 rows of 2 ranks: the new layout starts at row 1 and reads one micro-batch again
    assert continue_batch_index(256, 8, 1, 2, 3) == (1, 1)


def test_micro_batch_numbers_do_not_depend_on_the_number_of_ranks():
    """The seed of a micro-batch's dropout and perturbation: the same for the same examples."""
    n, micro = 256, 8
    one = {tuple(train_batch_indices(n, micro, 1, 0, SEED, b)): micro_batch_number(n, micro, 1, 0, b)
           for b in range(40)}
    for b in range(20):
        for r in range(2):
            examples = tuple(train_batch_indices(n, micro, 2, r, SEED, b))
            assert one[examples] == micro_batch_number(n, micro, 2, r, b)
    assert [micro_batch_number(n, micro, 1, 0, b) for b in range(40)] == list(range(40))  # one rank: the batch index
