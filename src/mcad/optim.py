"""Optimisers that torch does not ship (LR schedules live in :mod:`mcad.schedulers`).

* `StableAdamW` - AdamW with AMSGrad and per-tensor update clipping (Wortsman et al. 2023, "Stable and
  low-precision training for large-scale vision-language models"), as in `optimizers/StableAdamW.py` of
  Qiqigeww/CRR-MUAD and guojiajeremy/Dinomaly (erratum E-CRR2: plain `AdamW(amsgrad=True)` differs).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import overload

import torch
from torch.optim import Optimizer

__all__ = ["StableAdamW"]


class StableAdamW(Optimizer):
    """AdamW (+ AMSGrad) whose per-tensor step is divided by max(1, RMS(g / denom) / clip_threshold).

    One step for a parameter p with gradient g (t = step count, lr = the group's current lr):

        p     <- p * (1 - lr * weight_decay)                      (decoupled decay, unclipped lr)
        m     <- b1 m + (1 - b1) g;   v <- b2 v + (1 - b2) g^2;   v_max <- max(v_max, v)   (AMSGrad)
        denom <- sqrt(v_max) / sqrt(1 - b2^t) + eps               (v instead of v_max without AMSGrad)
        r     <- max(1, RMS(g / denom) / clip_threshold)          (RMS over the whole tensor)
        p     <- p - lr / (1 - b1^t) / r * m / denom

    The ratio g / denom uses the raw current gradient, not m; with r = 1 this is exactly AdamW.

    Args:
        params: Parameters or parameter groups.
        lr: Learning rate (CRR: 2e-3).
        betas: Moment coefficients (CRR: (0.9, 0.999)).
        eps: Denominator epsilon (CRR: 1e-10).
        weight_decay: Decoupled weight decay (CRR: 1e-4).
        amsgrad: Use the running maximum of the second moment (CRR: True; the official class defaults to
            False but CRR always passes True).
        clip_threshold: RMS above which the update is scaled down (1.0).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = True,
        clip_threshold: float = 1.0,
    ) -> None:
        if lr < 0.0:
            raise ValueError(f"invalid learning rate: {lr}")
        if eps < 0.0:
            raise ValueError(f"invalid epsilon: {eps}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas: {betas}")
        if weight_decay < 0.0:
            raise ValueError(f"invalid weight_decay: {weight_decay}")
        if clip_threshold <= 0.0:
            raise ValueError(f"invalid clip_threshold: {clip_threshold}")
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, clip_threshold=clip_threshold
        )
        super().__init__(params, defaults)

    # The overloads mirror torch's Optimizer.step: a closure's loss is returned, no closure gives None.
    @overload
    def step(self, closure: None = None) -> None: ...

    @overload
    def step(self, closure: Callable[[], float]) -> float: ...

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform one optimisation step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError("StableAdamW does not support sparse gradients")
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    if group["amsgrad"]:
                        state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if wd != 0.0:
                    p.mul_(1.0 - lr * wd)
                state["step"] += 1
                t = state["step"]
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                if group["amsgrad"]:
                    second = state["max_exp_avg_sq"]
                    torch.maximum(second, exp_avg_sq, out=second)
                else:
                    second = exp_avg_sq
                bias_correction1 = 1.0 - beta1**t
                bias_correction2 = 1.0 - beta2**t
                denom = (second.sqrt() / math.sqrt(bias_correction2)).add_(eps)
                # Kept as a tensor (no .item()) so the step never forces a host-device sync.
                rms = (grad / denom).pow(2).mean().sqrt()
                ratio = torch.clamp(rms / group["clip_threshold"], min=1.0)
                p.addcdiv_(exp_avg, denom * ratio, value=-lr / bias_correction1)
        return loss
