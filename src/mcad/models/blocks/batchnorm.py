"""BatchNorm helpers shared by methods that run extra forward passes during training."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def running_stats_frozen(module: nn.Module) -> Iterator[None]:
    """Within the block, BatchNorm layers of ``module`` normalise with batch statistics but keep their running ones.

    A momentum of 0 makes the running-average update ``(1 - 0) * running + 0 * batch`` a no-op, so the
    forward pass (and its gradients) is exactly the training-mode pass; only the statistics used at test
    time are left untouched. Layers with ``momentum=None`` (cumulative average) are switched the same way.
    The original momenta are restored on exit, also after an exception.
    """
    layers = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None) for m in layers]
    try:
        for m in layers:
            m.momentum = 0.0
        yield
    finally:
        for m, (momentum, tracked) in zip(layers, saved, strict=True):
            m.momentum = momentum
            if tracked is not None and m.num_batches_tracked is not None:  # saved only from a tracking layer
                m.num_batches_tracked.copy_(tracked)
