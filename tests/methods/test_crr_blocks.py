"""Tests of CRR's pure-PyTorch parts: blocks, losses, the reconstruction network, the seg head."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from mcad.losses.focal import focal_loss
from mcad.losses.hard_mining import global_cosine, global_cosine_hard_mining, hard_mining_p
from mcad.methods.crr import CRRModel
from mcad.methods.crr.components.bottleneck import NoisyBottleneck
from mcad.methods.crr.components.linear_attention import LinearAttention, LinearAttentionBlock
from mcad.methods.crr.components.resample import resample_to_grid
from mcad.methods.crr.components.seg_head import SegmentationHead
from mcad.optim import StableAdamW

# Paper-setting sizes (ViT-B/14 reg4, embed 768, 8 decoder blocks; seg head 1536 -> base 192 -> 2 @ 256²).
PAPER_RECON_PARAMS = 61_425_408  # 4,722,432 bottleneck + 56,702,976 decoder (E-CRR6: ≈61.4 M)
PAPER_SEG_HEAD_PARAMS = 70_441_778  # E-CRR6: ≈70.4 M


@pytest.fixture(autouse=True)
def _single_thread():
    # Tiny tensors on a shared 2-core machine: intra-op threading only adds contention (~10x slower).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class ViTStandIn(nn.Module):
    """DINOv2-reg4-shaped timm ViT (random weights) giving blocks 2..9 as maps, optionally with prefix."""

    def __init__(self, img_size: int = 56, prefix: bool = False, **kwargs) -> None:
        super().__init__()
        self.vit = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=img_size, **kwargs)
        self.indices = list(range(2, 10))
        self.prefix = prefix
        self.channels = [self.vit.embed_dim] * len(self.indices)
        self.strides = [14] * len(self.indices)

    def forward(self, x):
        return self.vit.forward_intermediates(
            x, indices=self.indices, return_prefix_tokens=self.prefix, intermediates_only=True, stop_early=True
        )


class CNNStandIn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = timm.create_model(
            "tf_efficientnet_lite0", features_only=True, pretrained=False, out_indices=(1, 2, 3)
        )
        self.channels = self.net.feature_info.channels()
        self.strides = self.net.feature_info.reduction()

    def forward(self, x):
        return self.net(x)


class ShapeOnly(nn.Module):
    channels = [768] * 8
    strides = [14] * 8

    def forward(self, x):  # pragma: no cover - never called
        raise RuntimeError


# ----------------------------------------------------------------------------- linear attention
def test_linear_attention_matches_explicit_formula():
    torch.manual_seed(0)
    attn = LinearAttention(16, num_heads=2, qkv_bias=True)
    x = torch.randn(2, 7, 16)
    q, k, v = attn.qkv(x).reshape(2, 7, 3, 2, 8).permute(2, 0, 3, 1, 4)
    phi_q, phi_k = F.elu(q) + 1, F.elu(k) + 1
    weights = phi_q @ phi_k.transpose(-2, -1)  # (B, h, N, N), positive
    weights = weights / weights.sum(-1, keepdim=True)  # = phi(q) . sum phi(k) normalisation
    expected = attn.proj((weights @ v).transpose(1, 2).reshape(2, 7, 16))
    torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-6)


def test_decoder_block_layout():
    blk = LinearAttentionBlock(32, num_heads=4)
    assert blk.norm1.eps == 1e-8 and blk.mlp.fc1.out_features == 128 and blk.attn.qkv.bias is not None
    assert blk(torch.randn(2, 5, 32)).shape == (2, 5, 32)
    with pytest.raises(ValueError):
        LinearAttention(30, num_heads=4)


# ----------------------------------------------------------------------------- bottleneck
def test_bottleneck_mask_ratio_and_eval_modes():
    torch.manual_seed(0)
    x = torch.ones(4, 64, 128)
    bn = NoisyBottleneck(128, mask_ratio=0.4, dropout=0.2)
    bn.train()
    masked = bn.mask_features(x)
    assert set(masked.unique().tolist()) <= {0.0, 1.0}  # not rescaled
    assert abs((masked == 0).float().mean().item() - 0.4) < 0.01

    bn.eval()  # deterministic: expectation of the mask
    torch.testing.assert_close(bn.mask_features(x), 0.6 * x)
    y = torch.randn(2, 9, 128)
    torch.testing.assert_close(bn(y), bn(y))
    torch.testing.assert_close(bn.mask_features(y).mean(), 0.6 * y.mean())

    faithful = NoisyBottleneck(128, mask_ratio=0.4, mask_at_test=True).eval()
    m1, m2 = faithful.mask_features(x), faithful.mask_features(x)
    assert not torch.equal(m1, m2)
    assert abs((m1 == 0).float().mean().item() - 0.4) < 0.01
    assert not torch.equal(faithful(y), faithful(y))


# ----------------------------------------------------------------------------- losses
def test_hard_mining_value_and_gradient_scaling():
    torch.manual_seed(0)
    enc = [torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)]
    dec_a = [torch.randn(2, 3, 4, 5, requires_grad=True) for _ in range(2)]
    dec_b = [d.detach().clone().requires_grad_(True) for d in dec_a]
    p, factor = 0.7, 0.1

    plain = global_cosine(enc, dec_a)
    mined = global_cosine_hard_mining(enc, [d * 1.0 for d in dec_b], p=p, factor=factor)
    torch.testing.assert_close(mined, plain)
    expected_value = sum((1 - F.cosine_similarity(e.flatten(1), d.flatten(1))).mean() for e, d in zip(enc, dec_a)) / 2
    torch.testing.assert_close(plain, expected_value)

    plain.backward()
    mined.backward()
    for e, da, db in zip(enc, dec_a, dec_b):
        dist = 1 - F.cosine_similarity(e, da.detach(), dim=1)  # (B, h, w)
        k = int(dist.numel() * (1 - p))
        thresh = dist.flatten().sort(descending=True).values[k - 1]
        easy = (dist < thresh).unsqueeze(1).expand_as(da)
        assert easy[:, 0].float().mean().item() == pytest.approx(p, abs=0.05)
        torch.testing.assert_close(db.grad[easy], factor * da.grad[easy])
        torch.testing.assert_close(db.grad[~easy], da.grad[~easy])
    assert enc[0].grad is None


def test_hard_mining_schedule_and_edge_cases():
    assert hard_mining_p(0) == 0.0
    assert hard_mining_p(500) == pytest.approx(0.45)
    assert hard_mining_p(1000) == pytest.approx(0.9) and hard_mining_p(5000) == pytest.approx(0.9)
    enc = [torch.randn(1, 2, 2, 2)]
    dec = [torch.randn(1, 2, 2, 2, requires_grad=True)]
    global_cosine_hard_mining(enc, [dec[0] * 1.0], p=1.0).backward()  # k clamps to 1, no error
    with pytest.raises(ValueError):
        global_cosine_hard_mining(enc, [torch.randn(1, 2, 2, 3)], p=0.5)


def test_focal_loss_against_hand_computation():
    logits = torch.tensor([[[[2.0, -1.0]], [[0.5, 0.3]]]])  # (B=1, K=2, 1, 2)
    target = torch.tensor([[[[1.0, 0.0]]]])  # (B, 1, 1, 2)
    s = 1e-5
    losses = []
    for (z0, z1), t in (((2.0, 0.5), 1), ((-1.0, 0.3), 0)):
        p1 = math.exp(z1) / (math.exp(z0) + math.exp(z1))
        probs = (1 - p1, p1)
        onehot = [s, s]  # one-hot clamped to [s / (K - 1), 1 - s]
        onehot[t] = 1 - s
        pt = onehot[0] * probs[0] + onehot[1] * probs[1] + s
        losses.append(-((1 - pt) ** 2) * math.log(pt))
    out = focal_loss(logits, target)
    assert out.item() == pytest.approx(sum(losses) / 2, rel=1e-6)
    assert focal_loss(logits, target, reduction="none").shape == (1, 1, 2)
    assert focal_loss(logits, target[:, 0]).item() == pytest.approx(out.item())


# ----------------------------------------------------------------------------- CRR model
@pytest.mark.parametrize("prefix", [False, True])
def test_crr_model_shapes_vit(prefix):
    torch.manual_seed(0)
    # the backbone wrapper (mcad.models.backbones) freezes a real encoder; the stand-in is frozen here
    model = CRRModel(ViTStandIn(img_size=56, prefix=prefix).requires_grad_(False), dropout=0.2)
    assert model.embed_dim == 384 and model.groups == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert model.decoder_groups == [[0, 1, 2, 3], [4, 5, 6, 7]] and model.decoder[0].attn.num_heads == 6
    out = model(torch.randn(2, 3, 56, 56))
    enc, dec = out.encoder, out.decoder
    assert [tuple(t.shape) for t in enc] == [(2, 384, 4, 4)] * 2
    assert [tuple(t.shape) for t in dec] == [(2, 384, 4, 4)] * 2
    assert not enc[0].requires_grad and dec[0].requires_grad

    seg_in = model.seg_input(enc, dec)
    assert seg_in.shape == (2, 768, 4, 4)
    cos = torch.stack([F.cosine_similarity(e, d, dim=1) for e, d in zip(enc, dec)], 1)
    torch.testing.assert_close(-seg_in.view(2, 2, 384, 4, 4).sum(2), cos, rtol=1e-4, atol=1e-5)
    rmap = model.reconstruction_map(enc, dec)
    assert rmap.shape == (2, 1, 4, 4)
    torch.testing.assert_close(rmap[:, 0], (1 - cos).mean(1))
    assert model.reconstruction_map(enc, dec, out_size=(32, 32)).shape == (2, 1, 32, 32)
    # the bottleneck maps a contrastive plug-in reads: its frozen input, its trainable output
    assert out.fused.shape == out.bottleneck.shape == (2, 384, 4, 4) and out.bottleneck.requires_grad

    # only bottleneck + decoder train; eval is deterministic with mask_at_test=False
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in model.trainable_parameters()}
    model.eval()
    x = torch.randn(1, 3, 56, 56)
    torch.testing.assert_close(model(x).decoder[0], model(x).decoder[0])


def test_crr_model_cnn_adaptation():
    torch.manual_seed(0)
    backbone = CNNStandIn()
    model = CRRModel(backbone)
    assert backbone.channels == [24, 40, 112]
    assert model.embed_dim == 128 and model.groups == [[0, 1], [2]]
    model.train()
    out = model(torch.randn(2, 3, 64, 64))
    enc, dec = out.encoder, out.decoder
    assert [tuple(t.shape) for t in enc + dec] == [(2, 128, 4, 4)] * 4
    assert not enc[0].requires_grad  # the encoder side is never trained (the backbone wrapper freezes)
    # the width adapters are fixed isometries for C_i <= D: cosine geometry of each level is kept
    w = model.level_proj_0
    torch.testing.assert_close(w @ w.T, torch.eye(24), atol=1e-5, rtol=0)
    assert "level_proj_0" in model.state_dict() and not any("level_proj" in n for n, _ in model.named_parameters())
    finest = CRRModel(backbone, token_grid="finest", embed_dim=64)
    assert finest(torch.randn(1, 3, 64, 64)).encoder[0].shape == (1, 64, 16, 16)


def test_crr_model_with_project_backbone():
    backbones = pytest.importorskip("mcad.models.backbones")
    bb = backbones.TimmBackbone("vit_small_patch14_reg4_dinov2", list(range(2, 10)), pretrained=False, img_size=56)
    out = CRRModel(bb)(torch.randn(1, 3, 56, 56))
    enc, dec = out.encoder, out.decoder
    assert [tuple(t.shape) for t in enc + dec] == [(1, 384, 4, 4)] * 4


def test_crr_param_count_paper_setting():
    model = CRRModel(ShapeOnly(), dropout=0.2)
    n_bottleneck = sum(p.numel() for p in model.bottleneck.parameters())
    n_decoder = sum(p.numel() for p in model.decoder.parameters())
    assert (n_bottleneck, n_decoder) == (4_722_432, 56_702_976)
    assert n_bottleneck + n_decoder == PAPER_RECON_PARAMS
    assert model.decoder[0].attn.num_heads == 12


def test_seg_head_paper_param_count_and_small_proxy():
    head = SegmentationHead(in_channels=1536, base_width=192, out_channels=2, output_size=(256, 256))
    assert sum(p.numel() for p in head.parameters()) == PAPER_SEG_HEAD_PARAMS
    del head
    torch.manual_seed(0)
    small = SegmentationHead(in_channels=96, base_width=8, num_stages=3, output_size=(40, 40))
    out = small(torch.randn(2, 96, 5, 5))
    assert out.shape == (2, 2, 40, 40)
    assert small(torch.randn(2, 96, 5, 5), output_size=(24, 32)).shape == (2, 2, 24, 32)
    bn = small.stages[0].up[1]
    assert torch.all(bn.bias == 0) and abs(bn.weight.mean().item() - 1) < 0.02
    assert abs(small.stages[0].up[0].weight.std().item() - 0.02) < 0.002


def test_stage_one_training_lowers_loss():
    torch.manual_seed(0)
    backbone = ViTStandIn(img_size=42, embed_dim=96, num_heads=3)
    model = CRRModel(backbone, dropout=0.2)
    opt = StableAdamW(model.trainable_parameters(), lr=2e-3, weight_decay=1e-4, eps=1e-10, amsgrad=True)
    images = torch.randn(8, 3, 42, 42)
    synthetic = images.clone()
    synthetic[:, :, 10:24, 10:24] = torch.randn(8, 3, 14, 14)  # crude "anomaly" to be repaired
    losses = []
    model.train()
    for step in range(30):
        idx = torch.randint(0, 8, (4,))
        out = model(images[idx])
        enc, dec = out.encoder, out.decoder
        dec_syn = model(synthetic[idx]).decoder
        p = hard_mining_p(step, ramp_iters=20)
        loss = global_cosine_hard_mining(enc, dec, p) + global_cosine_hard_mining(enc, dec_syn, p)
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.trainable_parameters(), max_norm=0.1)
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.7 * first, (first, last)  # ~2.0 -> ~1.05 (noise from mask + dropout)


@pytest.mark.parametrize(
    "size_in, size_out", [((28, 28), (7, 7)), ((14, 10), (7, 7)), ((7, 5), (14, 14)), ((9, 9), (4, 6))]
)
def test_grid_resampling_equals_antialiased_bilinear(size_in, size_out):
    # the adapter's matrix form is what F.interpolate(bilinear, antialias=True) computes, up and down
    x = torch.randn(2, 3, *size_in, dtype=torch.float64)
    expected = F.interpolate(x, size=size_out, mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(resample_to_grid(x, size_out), expected, rtol=0, atol=1e-12)
