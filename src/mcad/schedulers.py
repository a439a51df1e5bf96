"""Learning-rate schedules that need the run's total number of optimiser steps.

Config files give them as ``_partial_`` callables; the method calls them with the optimiser and
``total_steps`` (``trainer.estimated_stepping_batches``) and steps them every iteration.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def step_decay(optimizer: Optimizer, total_steps: int, milestone: float = 0.8, gamma: float = 0.1) -> LambdaLR:
    """Multiplies the LR by ``gamma`` once ``milestone`` of the training steps are done (ADer RD:
    ×0.1 at 80 %, iteration-based, no warm-up)."""
    boundary = int(math.ceil(milestone * total_steps))
    return LambdaLR(optimizer, lambda step: 1.0 if step < boundary else gamma)


def warmup_cosine(
    optimizer: Optimizer, total_steps: int, warmup_steps: int = 100, final_ratio: float = 0.1
) -> LambdaLR:
    """Linear warm-up from 0 over ``warmup_steps``, then cosine decay to ``final_ratio`` × LR
    (Dinomaly/CRR ``WarmCosineScheduler``: 2e-3 -> 2e-4 is ``final_ratio=0.1``)."""

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return step / warmup_steps
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return final_ratio + (1.0 - final_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)
