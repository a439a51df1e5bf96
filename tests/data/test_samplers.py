"""Training orders: mixed-class batches per rank, class-balanced epochs."""

import numpy as np
import pytest

from mcad.data.io import DataError
from mcad.data.samplers import ClassBalancedIndices, MixedClassOrder


@pytest.mark.parametrize("num_replicas", [1, 2, 3])
def test_mixed_class_order_mixes_every_batch_of_every_rank(num_replicas):
    ids = [0] * 30 + [1] * 2
    order = list(MixedClassOrder(ids, batch_size=4, seed=0, num_replicas=num_replicas))
    assert len(order) == len(ids)
    for rank in range(num_replicas):  # what DistributedSampler(shuffle=False) hands each rank
        stream = order[rank::num_replicas]
        batches = [stream[i : i + 4] for i in range(0, len(stream), 4)]
        assert all(len({ids[i] for i in b}) >= 2 for b in batches if len(b) >= 2), (rank, batches)
    with pytest.raises(DataError, match="two classes"):
        MixedClassOrder([0, 0, 0], batch_size=2)


def test_class_balanced_sampler_draws_every_class_equally_and_covers_the_small_one():
    ids = [0] * 20 + [1] * 3 + [2] * 7
    sampler = ClassBalancedIndices(ids, seed=5)
    epoch0 = list(sampler)
    assert len(epoch0) == len(ids)
    counts = np.bincount([ids[i] for i in epoch0], minlength=3)
    assert counts.tolist() == [10, 10, 10]
    # within a class the draws are whole shuffled passes: the 3 small-class images appear 3 or 4 times each
    small = np.bincount([i for i in epoch0 if ids[i] == 1], minlength=23)[20:23]
    assert small.min() >= 3 and small.max() <= 4
    # the 20-image class gets 10 distinct images (no repeat before a pass is used up)
    assert len({i for i in epoch0 if ids[i] == 0}) == 10
    # a pure function of (seed, epoch)
    assert list(ClassBalancedIndices(ids, seed=5)) == epoch0
    sampler.set_epoch(1)
    assert list(sampler) != epoch0
