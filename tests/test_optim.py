"""Tests of `mcad.optim.StableAdamW` against hand-computed steps and of `mcad.schedulers.warmup_cosine`."""

from __future__ import annotations

import functools
import math
import pickle

import pytest
import torch

from mcad.optim import StableAdamW
from mcad.schedulers import warmup_cosine, warmup_cosine_factor


def _hand_step(p, g, state, lr, wd, b1, b2, eps, clip, amsgrad=True):
    """One StableAdamW step on python floats (element-wise lists), following E-CRR2 literally."""
    state["t"] += 1
    t = state["t"]
    p = [x * (1 - lr * wd) for x in p]
    state["m"] = [b1 * m + (1 - b1) * gi for m, gi in zip(state["m"], g)]
    state["v"] = [b2 * v + (1 - b2) * gi * gi for v, gi in zip(state["v"], g)]
    state["vmax"] = [max(a, b) for a, b in zip(state["vmax"], state["v"])]
    second = state["vmax"] if amsgrad else state["v"]
    denom = [math.sqrt(v) / math.sqrt(1 - b2**t) + eps for v in second]
    rms = math.sqrt(sum((gi / d) ** 2 for gi, d in zip(g, denom)) / len(g))
    ratio = max(1.0, rms / clip)
    step = lr / (1 - b1**t) / ratio
    return [x - step * m / d for x, m, d in zip(p, state["m"], denom)]


@pytest.mark.parametrize("clip", [1.0, 0.25])
def test_single_step_matches_hand_computation(clip):
    p0, g = [1.0, -2.0, 0.5], [0.5, -0.1, 2.0]
    lr, wd, b1, b2, eps = 0.1, 0.01, 0.9, 0.999, 1e-8
    param = torch.nn.Parameter(torch.tensor(p0, dtype=torch.float64))
    opt = StableAdamW([param], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, clip_threshold=clip)
    param.grad = torch.tensor(g, dtype=torch.float64)
    opt.step()
    # First step: m_hat / denom = g / (|g| + eps) ~ sign(g) and RMS(g / denom) ~ 1, so the update is
    # ~ lr * sign(g) / max(1, 1 / clip); written out exactly (eps kept):
    u = [gi / (abs(gi) + eps) for gi in g]
    ratio = max(1.0, math.sqrt(sum(x * x for x in u) / len(u)) / clip)
    expected = [x * (1 - lr * wd) - lr * ui / ratio for x, ui in zip(p0, u)]
    assert ratio == pytest.approx(max(1.0, 1.0 / clip))
    torch.testing.assert_close(param.detach(), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-9)


@pytest.mark.parametrize("amsgrad", [True, False])
def test_multi_step_matches_hand_computation(amsgrad):
    lr, wd, b1, b2, eps, clip = 2e-3, 1e-4, 0.9, 0.999, 1e-10, 1.0
    p = [0.3, -0.7, 1.1, 0.0]
    grads = [[1.0, -2.0, 0.1, 0.5], [0.01, 0.02, -3.0, 0.5], [-0.5, 0.0, 0.2, 0.4]]
    param = torch.nn.Parameter(torch.tensor(p, dtype=torch.float64))
    opt = StableAdamW([param], lr=lr, eps=eps, weight_decay=wd, amsgrad=amsgrad, clip_threshold=clip)
    state = {"t": 0, "m": [0.0] * 4, "v": [0.0] * 4, "vmax": [0.0] * 4}
    for g in grads:
        param.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
        p = _hand_step(p, g, state, lr, wd, b1, b2, eps, clip, amsgrad)
        torch.testing.assert_close(param.detach(), torch.tensor(p, dtype=torch.float64), rtol=0, atol=1e-12)
    assert ("max_exp_avg_sq" in opt.state[param]) == amsgrad


def test_clipping_differs_from_plain_amsgrad_adamw():
    # A sudden large gradient after small ones: RMS(g / denom) >> 1, so StableAdamW shrinks the step.
    a = torch.nn.Parameter(torch.zeros(6))
    b = torch.nn.Parameter(torch.zeros(6))
    sa = StableAdamW([a], lr=1e-2, weight_decay=0.0)
    aw = torch.optim.AdamW([b], lr=1e-2, weight_decay=0.0, amsgrad=True)
    for scale in (1e-3, 1e-3, 10.0):
        g = torch.full((6,), scale)
        a.grad, b.grad = g.clone(), g.clone()
        sa.step()
        aw.step()
    assert a.detach().abs().sum() < b.detach().abs().sum()


def test_warmup_cosine_values():
    # Dinomaly/CRR WarmCosineScheduler: np.linspace warm-up (both endpoints), then half-cosine, then final.
    f = functools.partial(warmup_cosine_factor, total_steps=1000, warmup_steps=100, final_ratio=0.1)
    assert f(0) == 0.0
    assert f(99) == pytest.approx(1.0)
    assert f(49) == pytest.approx(49 / 99)
    assert f(100) == pytest.approx(1.0)
    assert f(550) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 450 / 900)))
    assert f(999) == pytest.approx(0.1, abs=1e-4) and f(1000) == 0.1 and f(5000) == 0.1
    assert warmup_cosine_factor(0, 10, 0, 0.5) == 1.0
    assert warmup_cosine_factor(0, 10, 5, 0.1, start_ratio=0.2) == 0.2
    assert warmup_cosine_factor(7, 5, 100, 0.1) == 0.1  # a run shorter than the warm-up ends at final
    assert pickle.loads(pickle.dumps(f))(550) == f(550)


def test_warmup_cosine_scheduler_with_stable_adamw():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = StableAdamW([param], lr=2e-3)
    sched = warmup_cosine(opt, total_steps=200, warmup_steps=10, final_ratio=0.1)
    lrs = []
    for _ in range(210):
        lrs.append(opt.param_groups[0]["lr"])
        param.grad = torch.ones(1)
        opt.step()
        sched.step()
    assert lrs[0] == 0.0 and lrs[9] == pytest.approx(2e-3) and lrs[-1] == pytest.approx(2e-4)
    assert all(x >= y - 1e-15 for x, y in zip(lrs[9:200], lrs[10:200]))  # non-increasing after warm-up
    restored = warmup_cosine(StableAdamW([param], lr=2e-3), total_steps=200, warmup_steps=10)
    restored.load_state_dict(pickle.loads(pickle.dumps(sched.state_dict())))
    assert restored.last_epoch == sched.last_epoch
