"""Learning-rate schedules that need the run's total number of optimiser steps.

Config files give them as ``_partial_`` callables; the method calls them with the optimiser and
``total_steps`` (``trainer.estimated_stepping_batches``) and steps them every iteration.
"""

from __future__ import annotations

import functools
import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def step_decay(optimizer: Optimizer, total_steps: int, milestone: float = 0.8, gamma: float = 0.1) -> LambdaLR:
    """Multiplies the LR by ``gamma`` once ``milestone`` of the training steps are done.

    ADer RD: ×0.1 at 80 %, iteration-based, no warm-up.
    """
    boundary = int(math.ceil(milestone * total_steps))
    return LambdaLR(optimizer, lambda step: 1.0 if step < boundary else gamma)


def warmup_cosine_factor(
    step: int, total_steps: int, warmup_steps: int = 100, final_ratio: float = 0.1, start_ratio: float = 0.0
) -> float:
    """LR multiplier of Dinomaly's / CRR's ``WarmCosineScheduler`` (``utils.py``) at ``step``.

    * ``step < warmup_steps``: linear from ``start_ratio`` (step 0) to 1 (step ``warmup_steps - 1``), both
      endpoints included like the official ``np.linspace(start, base, warmup_iters)``;
    * ``warmup_steps <= step < total_steps``: ``final + (1 - final) (1 + cos(pi i / n)) / 2`` with
      ``i = step - warmup_steps`` and ``n = total_steps - warmup_steps``;
    * ``step >= total_steps``: ``final_ratio`` (also when the run is shorter than the warm-up, as there).
    """
    if step >= total_steps:
        return final_ratio
    if step < warmup_steps:
        if warmup_steps == 1:
            return start_ratio
        return start_ratio + (1.0 - start_ratio) * step / (warmup_steps - 1)
    i, n = step - warmup_steps, total_steps - warmup_steps
    return final_ratio + 0.5 * (1.0 - final_ratio) * (1.0 + math.cos(math.pi * i / n))


def warmup_cosine(
    optimizer: Optimizer,
    total_steps: int,
    warmup_steps: int = 100,
    final_ratio: float = 0.1,
    start_ratio: float = 0.0,
) -> LambdaLR:
    """Linear warm-up from ``start_ratio`` × LR, then cosine decay to ``final_ratio`` × LR.

    Dinomaly/CRR ``WarmCosineScheduler``: 0 -> 2e-3 over 100 iterations, then 2e-3 -> 2e-4 is
    ``final_ratio=0.1``; see :func:`warmup_cosine_factor`. The factor is a ``functools.partial`` of a
    module-level function, so the scheduler pickles.
    """
    factor = functools.partial(
        warmup_cosine_factor,
        total_steps=total_steps,
        warmup_steps=warmup_steps,
        final_ratio=final_ratio,
        start_ratio=start_ratio,
    )
    return LambdaLR(optimizer, factor)
