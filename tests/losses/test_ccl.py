"""Tests of the CCL contrastive terms against hand-computed values and plain-python re-implementations."""

from __future__ import annotations

import math

import pytest
import torch

from mcad.losses.ccl import (
    CCLLoss,
    ccl_head_global_loss,
    ccl_v1_global_loss,
    dense_class_contrastive_loss,
    dense_correspondence,
    sample_other_class_indices,
    supcon_loss,
)
from mcad.methods.ccl_rd.components import NOISE_TRIGGER_PROB, ProjLayer, feature_noise_


# ---------------------------------------------------------------------------------------------------------
# plain-python references
# ---------------------------------------------------------------------------------------------------------
def _vec(t: torch.Tensor, b: int, i: int) -> list[float]:
    """Channel vector of sample b at flattened location i of a (B, C, h, w) tensor, as python floats."""
    flat = t.detach().double().flatten(2)
    return [float(flat[b, c, i]) for c in range(flat.shape[1])]


def _cos(u: list[float], v: list[float]) -> float:
    dot = sum(a * b for a, b in zip(u, v))
    return dot / (math.sqrt(sum(a * a for a in u)) * math.sqrt(sum(b * b for b in v)))


def _ref_dense_level(t, t_aug, p, p_aug, negs, tau):
    bsz, n = t.shape[0], t.shape[2] * t.shape[3]
    total = 0.0
    for b in range(bsz):
        for i in range(n):
            sims = [_cos(_vec(t, b, i), _vec(t_aug, b, j)) for j in range(n)]
            j_star = max(range(n), key=lambda j: sims[j])
            s_pos = _cos(_vec(p, b, i), _vec(p_aug, b, j_star)) / tau
            s_neg = _cos(_vec(p, b, i), _vec(p_aug, negs[b], i)) / tau
            total += -math.log(math.exp(s_pos) / (math.exp(s_pos) + math.exp(s_neg) + 1e-6))
    return total / (bsz * n)


def _ref_supcon(z_list, labels, tau):
    """Khosla et al. L_out with a double loop (z_list: already concatenated views)."""
    n = len(z_list)
    losses = []
    for i in range(n):
        pos = [p for p in range(n) if p != i and labels[p] == labels[i]]
        if not pos:
            continue
        denom = sum(math.exp(_cos(z_list[i], z_list[a]) / tau) for a in range(n) if a != i)
        acc = sum(math.log(math.exp(_cos(z_list[i], z_list[p]) / tau) / denom) for p in pos)
        losses.append(-acc / len(pos))
    return sum(losses) / len(losses)


def _ref_ccl_head(z_list, labels, tau):
    n = len(z_list)
    pos_terms, neg_terms = [], []
    for i in range(n):
        row = [_cos(z_list[i], z_list[j]) / tau for j in range(n)]
        lse = math.log(sum(math.exp(v) for v in row))
        logp = [v - lse for v in row]
        pos = [j for j in range(n) if labels[j] == labels[i]]  # self included
        neg = [j for j in range(n) if labels[j] != labels[i]]
        pos_terms.append(-sum(logp[j] for j in pos) / (len(pos) + 1e-6))
        neg_terms.append(-sum(logp[j] for j in neg) / (len(neg) + 1e-6))
    return sum(pos_terms) / n + sum(neg_terms) / n


def _ref_ccl_v1(z_list, labels, tau):
    n = len(z_list)
    num, cnt = 0.0, 0
    for i in range(n):
        row = [_cos(z_list[i], z_list[j]) / tau for j in range(n)]
        denom = sum(math.exp(v) for v in row)  # self included
        for j in range(n):
            if j != i and labels[j] == labels[i]:
                num += math.log(math.exp(row[j]) / denom)
                cnt += 1
    return -num / cnt


def _rows(t: torch.Tensor) -> list[list[float]]:
    return [[float(x) for x in row] for row in t.detach().double()]


def _angle_map(angles_deg: list[list[float]], radii: list[list[float]] | None = None) -> torch.Tensor:
    """(B, 2, 1, N) map whose channel vector at (b, i) is r·(cos a, sin a)."""
    bsz, n = len(angles_deg), len(angles_deg[0])
    out = torch.zeros(bsz, 2, 1, n, dtype=torch.float32)
    for b in range(bsz):
        for i in range(n):
            a = math.radians(angles_deg[b][i])
            r = 1.0 if radii is None else radii[b][i]
            out[b, 0, 0, i] = r * math.cos(a)
            out[b, 1, 0, i] = r * math.sin(a)
    return out


# ---------------------------------------------------------------------------------------------------------
# dense term
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tau", [0.5, 0.05])
def test_dense_loss_hand_computed_two_samples(tau):
    # B=2, C=2, 1x2 grid. With two samples of different classes the negative of each is the other one.
    t = _angle_map([[0, 90], [0, 90]], radii=[[3, 0.5], [2, 1]])
    t_aug = _angle_map([[85, 5], [10, 80]], radii=[[1, 4], [1, 1]])  # j* = (1, 0) for b=0; (0, 1) for b=1
    p = _angle_map([[20, 50], [100, 170]], radii=[[2, 1], [1, 3]])
    p_aug = _angle_map([[30, 75], [120, 140]], radii=[[1, 1], [0.5, 2]])
    labels = torch.tensor([0, 1])

    def term(pos_deg: float, neg_deg: float) -> float:
        s_pos, s_neg = math.cos(math.radians(pos_deg)) / tau, math.cos(math.radians(neg_deg)) / tau
        return -math.log(math.exp(s_pos) / (math.exp(s_pos) + math.exp(s_neg) + 1e-6))

    # (b, i): positive angle gap P[b,i] vs P'[b, j*(i)], negative gap P[b,i] vs P'[other, i]
    expected = (
        term(20 - 75, 20 - 120)  # b=0,i=0: j*=1; negative = sample 1, loc 0
        + term(50 - 30, 50 - 140)  # b=0,i=1: j*=0; negative = sample 1, loc 1
        + term(100 - 120, 100 - 30)  # b=1,i=0: j*=0; negative = sample 0, loc 0
        + term(170 - 140, 170 - 75)  # b=1,i=1: j*=1; negative = sample 0, loc 1
    ) / 4
    got = dense_class_contrastive_loss([t], [t_aug], [p], [p_aug], labels, tau=tau)
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(expected, rel=1e-5, abs=1e-6)
    # a bare tensor (single level) is accepted too
    assert float(dense_class_contrastive_loss(t, t_aug, p, p_aug, labels, tau=tau)) == pytest.approx(
        expected, rel=1e-5, abs=1e-6
    )


def test_dense_loss_three_samples_seeded_negatives_two_levels():
    torch.manual_seed(0)
    labels = torch.tensor([0, 0, 1])
    shapes = [(3, 2, 1, 2), (3, 4, 2, 2)]
    tc = [torch.randn(s) for s in shapes]
    ta = [torch.randn(s) for s in shapes]
    pc = [torch.randn(s[0], 3, *s[2:]) for s in shapes]
    pa = [torch.randn(s[0], 3, *s[2:]) for s in shapes]
    tau = 0.2

    # the negatives are re-drawn per level, in sample order, from the global CPU RNG (as the official loop)
    torch.manual_seed(7)
    negs = [sample_other_class_indices(labels).tolist() for _ in shapes]
    assert all(n[0] == 2 and n[1] == 2 and n[2] in (0, 1) for n in negs)
    expected = sum(_ref_dense_level(*lv, negs=ng, tau=tau) for *lv, ng in zip(tc, ta, pc, pa, negs)) / 2

    torch.manual_seed(7)
    got = dense_class_contrastive_loss(tc, ta, pc, pa, labels, tau=tau)
    assert float(got) == pytest.approx(expected, rel=1e-5)


def test_sample_other_class_indices():
    labels = torch.tensor([0, 0, 1, 2, 1])
    seen = {b: set() for b in range(5)}
    for s in range(60):
        torch.manual_seed(s)
        idx = sample_other_class_indices(labels)
        for b, n in enumerate(idx.tolist()):
            assert labels[n] != labels[b]
            seen[b].add(n)
    assert seen[0] == {2, 3, 4} and seen[2] == {0, 1, 3} and seen[3] == {0, 1, 2, 4}
    assert sample_other_class_indices(torch.tensor([4, 4, 4])) is None


def test_dense_correspondence_chunking_is_exact():
    torch.manual_seed(1)
    t, ta = torch.randn(2, 5, 3, 4), torch.randn(2, 5, 3, 4)
    full = dense_correspondence(t, ta, chunk_size=None)
    assert full.shape == (2, 12)
    assert torch.equal(full, dense_correspondence(t, ta, chunk_size=5))
    assert torch.equal(full, dense_correspondence(t, ta, chunk_size=1))


def test_dense_loss_two_classes_nonzero_finite_and_differentiable():
    torch.manual_seed(2)
    shapes = [(4, 8, 4, 4), (4, 16, 2, 2)]
    tc = [torch.randn(s) for s in shapes]
    ta = [torch.randn(s) for s in shapes]
    pc = [torch.randn(s, requires_grad=True) for s in shapes]
    pa = [torch.randn(s, requires_grad=True) for s in shapes]
    loss = dense_class_contrastive_loss(tc, ta, pc, pa, torch.tensor([0, 1, 0, 1]))
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    for x in pc + pa:
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_dense_loss_single_class_is_exact_zero_with_graph():
    torch.manual_seed(3)
    shapes = [(3, 4, 2, 2), (3, 8, 1, 1)]
    tc = [torch.randn(s) for s in shapes]
    ta = [torch.randn(s) for s in shapes]
    pc = [torch.randn(s, requires_grad=True) for s in shapes]
    pa = [torch.randn(s, requires_grad=True) for s in shapes]
    loss = dense_class_contrastive_loss(tc, ta, pc, pa, torch.tensor([5, 5, 5]))
    assert loss.item() == 0.0 and not math.copysign(1.0, loss.item()) < 0
    assert loss.requires_grad
    loss.backward()
    for x in pc + pa:
        assert x.grad is not None and torch.count_nonzero(x.grad) == 0


def test_dense_loss_rejects_mismatched_levels():
    t = [torch.randn(2, 2, 1, 2)]
    with pytest.raises(ValueError):
        dense_class_contrastive_loss(t, t, t + t, t + t, torch.tensor([0, 1]))
    with pytest.raises(ValueError):
        dense_class_contrastive_loss(t, t, [torch.randn(2, 2, 2, 2)], [torch.randn(2, 2, 2, 2)], torch.tensor([0, 1]))


# ---------------------------------------------------------------------------------------------------------
# global terms
# ---------------------------------------------------------------------------------------------------------
def test_global_losses_hand_computed():
    tau = 0.5
    g = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    g_aug = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 1])
    # every anchor: one positive at cos 1, two others at cos 0 (self excluded) -> log(1 + 2 e^{-1/tau})
    assert float(supcon_loss(g, g_aug, y, tau)) == pytest.approx(math.log(1 + 2 * math.exp(-1 / tau)), rel=1e-6)
    # v1 keeps self (cos 1) in the denominator -> log(2 + 2 e^{-1/tau})
    assert float(ccl_v1_global_loss(g, g_aug, y, tau)) == pytest.approx(math.log(2 + 2 * math.exp(-1 / tau)), rel=1e-6)

    # HEAD variant on g = [e0, e1, e0], labels [0, 1, 0]
    g3 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]])
    y3 = torch.tensor([0, 1, 0])
    e = math.exp(1 / tau)
    lse_a = math.log(2 * e + 1)  # rows 0 and 2: [1/tau, 0, 1/tau]
    lse_b = math.log(e + 2)  # row 1: [0, 1/tau, 0]
    pos_a = -(2 / tau - 2 * lse_a) / (2 + 1e-6)
    neg_a = lse_a / (1 + 1e-6)
    pos_b = -(1 / tau - lse_b) / (1 + 1e-6)
    neg_b = 2 * lse_b / (2 + 1e-6)
    expected = (2 * pos_a + pos_b) / 3 + (2 * neg_a + neg_b) / 3
    assert float(ccl_head_global_loss(g3, y3, tau)) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("tau", [0.05, 0.3])
def test_supcon_matches_double_loop(tau):
    torch.manual_seed(4)
    g, g_aug = torch.randn(6, 5), torch.randn(6, 5)
    y = [0, 1, 2, 0, 1, 0]
    expected = _ref_supcon(_rows(g) + _rows(g_aug), y + y, tau)
    assert float(supcon_loss(g, g_aug, torch.tensor(y), tau)) == pytest.approx(expected, rel=1e-5)
    # (B, D, 1, 1) GAP outputs are accepted
    assert float(supcon_loss(g[..., None, None], g_aug[..., None, None], torch.tensor(y), tau)) == pytest.approx(
        expected, rel=1e-5
    )


@pytest.mark.parametrize("tau", [0.05, 0.3])
def test_ccl_head_matches_plain_reimplementation(tau):
    torch.manual_seed(6)
    g = torch.randn(7, 6)
    y = [0, 1, 2, 0, 1, 0, 3]
    expected = _ref_ccl_head(_rows(g), y, tau)
    assert float(ccl_head_global_loss(g, torch.tensor(y), tau)) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("tau", [0.05, 0.3])
def test_ccl_v1_matches_plain_reimplementation(tau):
    torch.manual_seed(7)
    g, g_aug = torch.randn(5, 6), torch.randn(5, 6)
    y = [0, 1, 2, 0, 1]
    expected = _ref_ccl_v1(_rows(g) + _rows(g_aug), y + y, tau)
    assert float(ccl_v1_global_loss(g, g_aug, torch.tensor(y), tau)) == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------------------------------------------------
# feature noise
# ---------------------------------------------------------------------------------------------------------
def test_feature_noise_triggered_masks_half_the_locations_for_all_channels():
    torch.manual_seed(8)
    feats = [torch.randn(4, 3, 16, 16), torch.randn(4, 5, 8, 8)]
    before = [f.clone() for f in feats]
    ids = [id(f) for f in feats]
    applied = feature_noise_(feats, prob_apply=1.0)
    assert applied
    assert [id(f) for f in feats] == ids  # same tensors, modified in place
    for f, f0 in zip(feats, before):
        changed = f != f0  # (B, C, H, W)
        per_loc = changed.any(dim=1)
        # the mask is shared by all channels: a location is changed in every channel or in none
        assert torch.equal(changed.all(dim=1), per_loc)
        frac = per_loc.float().mean().item()
        assert 0.4 < frac < 0.6


def test_feature_noise_not_triggered_leaves_features_untouched():
    feats = [torch.randn(2, 3, 4, 4)]
    before = feats[0].clone()
    assert not feature_noise_(feats, prob_apply=0.0)
    assert torch.equal(feats[0], before)


def test_feature_noise_official_trigger_rule_and_draws():
    # decision = one N(0,1) draw > 0.5 from the global CPU RNG (first draw of the call)
    for s in range(20):
        torch.manual_seed(s)
        expect = bool(torch.randn(1).item() > 0.5)
        torch.manual_seed(s)
        assert feature_noise_([torch.zeros(1, 1, 2, 2)]) == expect
    torch.manual_seed(123)
    hits = sum(feature_noise_([torch.zeros(1, 1, 1, 1)]) for _ in range(4000))
    assert abs(hits / 4000 - NOISE_TRIGGER_PROB) < 0.03
    assert abs(NOISE_TRIGGER_PROB - 0.30854) < 1e-4
    # The official draw order (model/rd.py train_forward): decision, then per level randn_like(feature)
    # and randint(0, 2, (B, 1, H, W)); with the same seed the perturbation is identical.
    seed = next(s for s in range(100) if torch.randn(1, generator=torch.Generator().manual_seed(s)).item() > 0.5)
    feats = [torch.zeros(2, 3, 4, 4), torch.zeros(2, 5, 2, 2)]
    torch.manual_seed(seed)
    assert feature_noise_(feats)
    torch.manual_seed(seed)
    torch.randn(1)
    for f in feats:
        noise, mask = torch.randn_like(f), torch.randint(0, 2, (f.shape[0], 1, *f.shape[2:]))
        torch.testing.assert_close(f, noise * mask, rtol=0, atol=0)


def test_feature_noise_in_place_keeps_autograd_through_projection():
    torch.manual_seed(9)
    proj = ProjLayer(8)
    x = torch.randn(2, 8, 4, 4)
    # in place on a ProjLayer output is autograd-safe (LeakyReLU is not in-place)
    feats = [proj(x)]
    assert feature_noise_(feats, prob_apply=1.0)
    feats[0].pow(2).mean().backward()
    assert all(p.grad is not None for p in proj.parameters())


# ---------------------------------------------------------------------------------------------------------
# combined module
# ---------------------------------------------------------------------------------------------------------
def _batch(labels, seed=10, d=6):
    torch.manual_seed(seed)
    b = len(labels)
    shapes = [(b, 4, 2, 2), (b, 8, 1, 2)]
    return dict(
        correspondence=[torch.randn(s) for s in shapes],
        correspondence_aug=[torch.randn(s) for s in shapes],
        dense=[torch.randn(s, requires_grad=True) for s in shapes],
        dense_aug=[torch.randn(s, requires_grad=True) for s in shapes],
        embedding=torch.randn(b, d, requires_grad=True),
        embedding_aug=torch.randn(b, d, requires_grad=True),
        labels=torch.tensor(labels),
    )


def test_ccl_loss_combines_weighted_terms():
    inp = _batch([0, 1, 0, 2])
    crit = CCLLoss(lambda_dense=0.5, lambda_global=2.0, tau_dense=0.1, tau_global=0.2, global_cl="supcon")
    torch.manual_seed(0)
    out = crit(**inp)
    torch.manual_seed(0)
    dense = dense_class_contrastive_loss(
        inp["correspondence"], inp["correspondence_aug"], inp["dense"], inp["dense_aug"], inp["labels"], tau=0.1
    )
    glob = supcon_loss(inp["embedding"], inp["embedding_aug"], inp["labels"], tau=0.2)
    assert out["dense"].item() == pytest.approx(0.5 * dense.item(), rel=1e-6)
    assert out["global"].item() == pytest.approx(2.0 * glob.item(), rel=1e-6)
    (out["dense"] + out["global"]).backward()
    assert inp["embedding"].grad is not None and inp["dense"][0].grad is not None


def test_ccl_loss_default_global_term_is_the_iccv_code():
    # The ICCV code's formula (HEAD 6502f68 SCLLoss): clean view only; the augmented embedding is unused.
    inp = _batch([0, 1, 1, 2])
    crit = CCLLoss(use_dense=False)
    assert crit.global_cl == "ccl_head" and not crit.needs_augmented_embedding
    expected = ccl_head_global_loss(inp["embedding"], inp["labels"]).item()
    assert crit(**{**inp, "embedding_aug": None})["global"].item() == pytest.approx(expected, rel=1e-6)


def test_ccl_loss_variants_and_switches():
    inp = _batch([0, 1, 1])
    head = CCLLoss(global_cl="ccl_head", use_dense=False)
    out = head(**{**inp, "embedding_aug": None})
    assert out["dense"].item() == 0.0
    assert out["global"].item() == pytest.approx(ccl_head_global_loss(inp["embedding"], inp["labels"]).item())
    v1 = CCLLoss(global_cl="ccl_v1", use_dense=False)
    assert v1(**inp)["global"].item() == pytest.approx(
        ccl_v1_global_loss(inp["embedding"], inp["embedding_aug"], inp["labels"]).item()
    )
    with pytest.raises(ValueError):
        v1(**{**inp, "embedding_aug": None})
    off = CCLLoss(use_global=False)
    assert off(**inp)["global"].item() == 0.0
    with pytest.raises(ValueError):
        CCLLoss(global_cl="infonce")


def test_ccl_loss_dense_levels_selects_the_levels_averaged():
    inp = _batch([0, 1, 0, 2])
    deep = CCLLoss(dense_levels=[1])
    torch.manual_seed(0)
    out = deep(**inp)
    torch.manual_seed(0)
    only_deep = dense_class_contrastive_loss(
        *[inp[k][1:] for k in ("correspondence", "correspondence_aug", "dense", "dense_aug")], inp["labels"], tau=0.05
    )
    assert out["dense"].item() == pytest.approx(only_deep.item(), rel=1e-6)
    torch.manual_seed(0)
    everything = CCLLoss()(**inp)
    assert out["dense"].item() != pytest.approx(everything["dense"].item(), rel=1e-3)
    out["dense"].backward()
    assert inp["dense"][0].grad is None and inp["dense"][1].grad is not None
    with pytest.raises(ValueError, match="exposes 2 levels"):
        CCLLoss(dense_levels=[2])(**inp)
    with pytest.raises(ValueError, match="dense_levels"):
        CCLLoss(dense_levels=[])
