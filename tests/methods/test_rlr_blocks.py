"""Tests of the pure-PyTorch RLR parts: masks, attention blocks, positions, decoder, jitter, loss, model."""

from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from mcad.losses.reconstruction import mse_cosine_loss, mse_cosine_score
from mcad.methods.rlr.components.attention import (
    LocalCrossAttention,
    MaskedLearnableKeyAttention,
    MultiHeadAttention,
    complement_window_mask,
    local_window_mask,
)
from mcad.methods.rlr.components.decoder import (
    DEFAULT_WINDOW_SIZES,
    RLRDecoder,
    RLRLayer,
    RLRLevelModel,
    out_index_from_stride,
    resolve_window_size,
    rlr_hidden_dim,
)
from mcad.methods.rlr.components.positional import PositionalEncoding2D, sinusoidal_position_encoding_2d
from mcad.methods.rlr.model import RLRModel, rlr_optimization_step
from mcad.synthesis.feature_jitter import FeatureJitter, feature_jitter

# Trainable parameters of RLRDecoder for EfficientNet-B6 stages [2, 3] at 256x256
# (C = 72 @ 32x32, d = 256; C = 200 @ 16x16, d = 512; 4 layers, 8 heads, FFN 4d). Stated in
# src/mcad/methods/rlr/README.md.
B6_LEVEL_PARAMS = [4_341_832, 17_172_680]
B6_DECODER_PARAMS = 21_514_512


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """These tests run many small ops: one thread avoids OpenMP oversubscription on a busy machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------------------- masks


def brute_force_window(h: int, w: int, kh: int, kw: int) -> torch.Tensor:
    """Clipped k x k window by explicit slicing, the way RLR builds it (independent of the vectorised code)."""
    mask = torch.zeros(h, w, h, w, dtype=torch.bool)
    for r in range(h):
        for c in range(w):
            r0, r1 = max(r - kh // 2, 0), min(r + kh // 2 + 1, h)
            c0, c1 = max(c - kw // 2, 0), min(c + kw // 2 + 1, w)
            mask[r, c, r0:r1, c0:c1] = True
    return mask.view(h * w, h * w)


@pytest.mark.parametrize(
    ("h", "w", "k"), [(6, 6, 3), (5, 5, 5), (4, 7, 3), (16, 16, 5), (32, 32, 7), (5, 6, (3, 5)), (3, 3, 7)]
)
def test_window_masks_match_brute_force(h, w, k):
    kh, kw = (k, k) if isinstance(k, int) else k
    expected = brute_force_window(h, w, kh, kw)
    lca = local_window_mask(h, w, k)
    mlka = complement_window_mask(h, w, k)
    assert lca.dtype == torch.bool and lca.shape == (h * w, h * w)
    assert torch.equal(lca, expected)
    assert torch.equal(mlka, ~expected)
    assert lca.diagonal().all() and not mlka.diagonal().any()  # own position: LCA yes, MLKA no


def test_window_mask_boundary_counts():
    # 6x6, k=3: corner sees 2x2, edge 2x3, interior 3x3.
    m = local_window_mask(6, 6, 3).view(6, 6, 36)
    assert m[0, 0].sum() == 4 and m[0, 3].sum() == 6 and m[3, 3].sum() == 9
    # 5x5, k=5: the centre's window covers the whole grid, so its MLKA row is empty; a corner sees 3x3.
    m = local_window_mask(5, 5, 5).view(5, 5, 25)
    assert m[2, 2].all() and m[0, 0].sum() == 9 and m[0, 2].sum() == 15
    assert not complement_window_mask(5, 5, 5)[2 * 5 + 2].any()
    with pytest.raises(ValueError):
        local_window_mask(6, 6, 4)


def test_window_size_mapping():
    assert DEFAULT_WINDOW_SIZES == {16: 5, 32: 7, 64: 11}
    assert resolve_window_size((32, 32)) == 7 and resolve_window_size((16, 16)) == 5
    assert resolve_window_size((64, 64)) == 11
    assert resolve_window_size((8, 8), {8: 3}) == 3 and resolve_window_size((8, 4), {(8, 4): 3}) == 3
    with pytest.raises(KeyError):
        resolve_window_size((20, 20))


# ------------------------------------------------------------------------------------------- attention


@pytest.fixture
def grid6():
    torch.manual_seed(0)
    h = w = 6
    k = 3
    return h, w, k, local_window_mask(h, w, k), complement_window_mask(h, w, k)


def test_lca_invariant_to_reference_outside_window(grid6):
    h, w, k, lca_mask, _ = grid6
    lca = LocalCrossAttention(16, num_heads=4).eval()
    x = torch.randn(2, h * w, 16)
    ref = torch.randn(1, h * w, 16)
    base = lca(x, ref, lca_mask)
    for p in [0, 3, 14, 35]:  # corner, edge, interior, corner
        inside = lca_mask[p]
        perturbed = ref.clone()
        perturbed[0, ~inside] += 5.0 * torch.randn(int((~inside).sum()), 16)
        out = lca(x, perturbed, lca_mask)
        torch.testing.assert_close(out[:, p], base[:, p])
        assert not torch.allclose(out, base, atol=1e-4)  # other positions do see those tokens
        perturbed = ref.clone()
        perturbed[0, inside] += 5.0 * torch.randn(int(inside.sum()), 16)
        assert not torch.allclose(lca(x, perturbed, lca_mask)[:, p], base[:, p], atol=1e-4)


def test_mlka_ignores_own_window(grid6):
    h, w, k, _, mlka_mask = grid6
    mlka = MaskedLearnableKeyAttention(16, num_heads=4).eval()
    x = torch.randn(2, h * w, 16)
    keys = torch.randn(1, h * w, 16)
    base = mlka(x, keys, mlka_mask)
    for p in [0, 14, 35]:
        window = ~mlka_mask[p]
        neighbours = window.clone()
        neighbours[p] = False  # changing x at p would change the query itself
        x2 = x.clone()
        x2[:, neighbours] += 5.0 * torch.randn(2, int(neighbours.sum()), 16)
        torch.testing.assert_close(mlka(x2, keys, mlka_mask)[:, p], base[:, p])
        k2 = keys.clone()
        k2[0, window] += 5.0 * torch.randn(int(window.sum()), 16)  # own-window keys, self included
        torch.testing.assert_close(mlka(x, k2, mlka_mask)[:, p], base[:, p])
        x3 = x.clone()
        x3[:, mlka_mask[p]] += 5.0 * torch.randn(2, int(mlka_mask[p].sum()), 16)
        assert not torch.allclose(mlka(x3, keys, mlka_mask)[:, p], base[:, p], atol=1e-4)


def test_empty_mask_row_gives_bias_not_nan():
    mask = complement_window_mask(5, 5, 5)  # centre row is empty
    mlka = MaskedLearnableKeyAttention(8, num_heads=2)
    nn.init.normal_(mlka.attn.out_proj.bias)
    x = torch.randn(3, 25, 8, requires_grad=True)
    out = mlka(x, torch.randn(1, 25, 8), mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, 12], mlka.attn.out_proj.bias.expand(3, 8))
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_attention_matches_torch_multihead_attention(grid6):
    """Same numbers as nn.MultiheadAttention (what RLR uses) with RLR's additive -inf float masks."""
    h, w, k, lca_mask, mlka_mask = grid6
    ours = MultiHeadAttention(16, 4)
    ref = nn.MultiheadAttention(16, 4, batch_first=True)
    assert n_params(ours) == n_params(ref)
    nn.init.normal_(ours.in_proj_bias)
    nn.init.normal_(ours.out_proj.bias)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, h * w, 16)
    r = torch.randn(2, h * w, 16)
    for mask in (lca_mask, mlka_mask):
        additive = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
        torch.testing.assert_close(ours(x, r, r, mask), ref(x, r, r, attn_mask=additive)[0])
        torch.testing.assert_close(ours(x, r, x, mask), ref(x, r, x, attn_mask=additive)[0])
    # A batch-1 key/value is broadcast, equal to repeating it.
    torch.testing.assert_close(
        ours(x, r[:1], r[:1], lca_mask), ours(x, r[:1].expand(2, -1, -1), r[:1].repeat(2, 1, 1), lca_mask)
    )


# ------------------------------------------------------------------------------------------- positions


def test_positional_encoding_values():
    h, w, d = 3, 4, 8
    enc = sinusoidal_position_encoding_2d(h, w, d)
    assert enc.shape == (h * w, d)
    # d/2 = 4 channels per axis, frequencies 1 and 1e4^(-2/4) = 0.01; layout [sin cos sin cos](x) then (y).
    r, c = 1, 2
    expected = torch.tensor(
        [math.sin(c), math.cos(c), math.sin(0.01 * c), math.cos(0.01 * c),
         math.sin(r), math.cos(r), math.sin(0.01 * r), math.cos(0.01 * r)]
    )  # fmt: skip
    torch.testing.assert_close(enc[r * w + c], expected)
    torch.testing.assert_close(enc[0], torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0]))
    # d = 256: channel 2 (second x pair) has frequency 1e4^(-2/128).
    big = sinusoidal_position_encoding_2d(32, 32, 256)
    torch.testing.assert_close(big[5 * 32 + 7, 2], torch.tensor(math.sin(7 * 1e4 ** (-2 / 128))))
    torch.testing.assert_close(big[5 * 32 + 7, 128 + 3], torch.tensor(math.cos(5 * 1e4 ** (-2 / 128))))
    module = PositionalEncoding2D(d, (h, w))
    torch.testing.assert_close(module(torch.zeros(2, h * w, d)), enc.expand(2, -1, -1))
    assert "encoding" not in module.state_dict()
    with pytest.raises(ValueError):
        sinusoidal_position_encoding_2d(4, 4, 6)


# --------------------------------------------------------------------------------------------- decoder


def reference_level_forward(level: RLRLevelModel, tokens: torch.Tensor) -> torch.Tensor:
    """Independent re-statement of one RLR level with nn.MultiheadAttention and float masks."""
    h, w = level.grid_size
    inside = brute_force_window(h, w, level.window_size, level.window_size)
    lca_add = torch.zeros(inside.shape).masked_fill(~inside, float("-inf"))
    mlka_add = torch.zeros(inside.shape).masked_fill(inside, float("-inf"))
    pos = sinusoidal_position_encoding_2d(h, w, level.hidden_dim)
    x = level.embedding.proj(tokens) + pos
    ref = (level.reference_embedding.proj(level.reference) + pos).repeat(tokens.shape[0], 1, 1)
    for layer in level.layers:
        mca = nn.MultiheadAttention(level.hidden_dim, layer.lca.attn.num_heads, batch_first=True)
        nsa = nn.MultiheadAttention(level.hidden_dim, layer.mlka.attn.num_heads, batch_first=True)
        mca.load_state_dict(layer.lca.attn.state_dict())
        nsa.load_state_dict(layer.mlka.attn.state_dict())
        new = 2 * mca(x, ref, ref, attn_mask=lca_add)[0] + 1 * nsa(x, ref, x, attn_mask=mlka_add)[0]
        x = layer.norm1(new)  # no residual from x
        x = layer.norm2(x + layer.ffn.fc2(F.gelu(layer.ffn.fc1(x))))
    return level.projection(level.norm(x))


def test_level_model_matches_reference_formulation():
    torch.manual_seed(1)
    level = RLRLevelModel(12, (6, 6), hidden_dim=16, num_layers=2, num_heads=4, window_size=3).eval()
    tokens = torch.randn(2, 36, 12)
    with torch.no_grad():
        torch.testing.assert_close(level(tokens), reference_level_forward(level, tokens), rtol=1e-4, atol=1e-5)


def test_level_model_structure_and_options():
    level = RLRLevelModel(10, 8, hidden_dim=16, num_layers=3, num_heads=4, window_size_map={8: 3})
    assert level.reference.shape == (1, 64, 10)
    assert abs(level.reference.std().item() - 1.0) < 0.2  # N(0, 1)
    assert level.embedding.proj is not level.reference_embedding.proj
    assert level.window_size == 3 and len(level.layers) == 3
    assert {k for k in level.state_dict() if "mask" in k or "encoding" in k} == set()
    # Kaiming-normal fan_in, leaky_relu (a=0 -> gain sqrt(2)): std = sqrt(2 / C).
    big = RLRLevelModel(200, 16, hidden_dim=512, num_layers=1)
    assert abs(big.embedding.proj.weight.std().item() - math.sqrt(2 / 200)) < 0.01
    # Ablations.
    only_lca = RLRLevelModel(10, 8, 16, num_layers=1, num_heads=4, window_size=5, use_mlka=False)
    assert only_lca.layers[0].mlka is None and only_lca.layers[0].lca is not None
    assert torch.equal(only_lca.lca_mask, local_window_mask(8, 8, 5))
    only_mlka = RLRLevelModel(10, 8, 16, num_layers=1, num_heads=4, window_size=3, use_lca=False)
    assert only_mlka.layers[0].lca is None
    assert n_params(only_lca) == n_params(only_mlka) < n_params(level)
    with pytest.raises(ValueError):
        RLRLayer(16, 4, use_lca=False, use_mlka=False)
    for model in (only_lca, only_mlka):
        assert model(torch.randn(2, 64, 10)).shape == (2, 64, 10)


def test_lca_only_layer_ignores_input_values_without_residual():
    """With MLKA off, a layer's output at p only depends on x_p through the query: no copy path."""
    torch.manual_seed(2)
    layer = RLRLayer(16, 4, use_mlka=False).eval()
    ref = torch.randn(1, 36, 16)
    mask = local_window_mask(6, 6, 3)
    x = torch.randn(1, 36, 16)
    out = layer(x, ref, mask, None)
    assert not torch.allclose(out, x, atol=0.1)
    # Scaling x by a positive factor only sharpens/flattens softmax; with one key per window (k=1)
    # the output would be exactly the value, i.e. the projected reference token, independent of x.
    layer1 = RLRLayer(16, 4, use_mlka=False).eval()
    mask1 = local_window_mask(6, 6, 1)
    torch.testing.assert_close(layer1(x, ref, mask1, None), layer1(5 * x + 3, ref, mask1, None))
    residual = RLRLayer(16, 4, use_mlka=False, attention_residual=True).eval()
    residual.load_state_dict(layer1.state_dict())
    assert not torch.allclose(residual(x, ref, mask1, None), residual(5 * x + 3, ref, mask1, None))


def test_hidden_width_rule():
    assert [rlr_hidden_dim(i) for i in (1, 2, 3)] == [128, 256, 512]
    assert [out_index_from_stride(s) for s in (4, 8, 16)] == [1, 2, 3]
    assert RLRDecoder([8, 8], [4, 2], window_sizes=[3, 1], num_layers=1).hidden_dims == [256, 512]
    assert RLRDecoder([8], [4], window_sizes=[3], num_layers=1, hidden_dims=[32]).hidden_dims == [32]
    three = RLRDecoder([8, 8, 8], [8, 4, 2], window_sizes=[3, 3, 1], num_layers=1, hidden_base=16)
    assert three.hidden_dims == [16, 32, 64]


def test_b6_parameter_count():
    dec = RLRDecoder([72, 200], [(32, 32), (16, 16)], num_layers=4)
    assert dec.hidden_dims == [256, 512]
    assert [lvl.window_size for lvl in dec.levels] == [7, 5]
    assert [n_params(lvl) for lvl in dec.levels] == B6_LEVEL_PARAMS
    assert n_params(dec) == B6_DECODER_PARAMS

    def closed_form(c: int, d: int, tokens: int, layers: int = 4) -> int:
        embeddings = 2 * (c * d + d)
        layer = 2 * (4 * d * d + 4 * d) + 2 * 2 * d + (8 * d * d + 5 * d)  # 2 MHA, 2 LN, FFN 4d
        return embeddings + tokens * c + layers * layer + 2 * d + d * c + c

    assert closed_form(72, 256, 1024) + closed_form(200, 512, 256) == B6_DECODER_PARAMS


def timm_net(name: str, strides=(8, 16)):
    """Stages 0-3 of a randomly initialised timm model, and the indices of the wanted strides.

    Stopping after stage 3 (stride 16 in both EfficientNets) skips the costly deep stages of B6.
    """
    net = timm.create_model(name, features_only=True, pretrained=False, out_indices=(0, 1, 2, 3)).eval()
    idx = [i for i, s in enumerate(net.feature_info.reduction()) if s in strides]
    return net, idx


class TimmStandIn(nn.Module):
    """Minimal stand-in for mcad.models.backbones.TimmBackbone (random weights, no download)."""

    def __init__(self, net: nn.Module, idx: list[int]) -> None:
        super().__init__()
        self.net, self.idx = net, idx
        self.channels = [net.feature_info.channels()[i] for i in idx]
        self.strides = [net.feature_info.reduction()[i] for i in idx]

    def forward(self, images):
        feats = self.net(images)
        return [feats[i] for i in self.idx]


@pytest.mark.parametrize(
    ("name", "out_indices", "channels"),
    [("tf_efficientnet_b6", [2, 3], [72, 200]), ("tf_efficientnet_lite0", [2, 3], [40, 112])],
)
def test_decoder_shapes_on_paper_backbones(name, out_indices, channels):
    net, idx = timm_net(name)
    assert idx == out_indices
    backbone = TimmStandIn(net, idx)
    assert backbone.channels == channels and backbone.strides == [8, 16]
    with torch.no_grad():
        feats = backbone(torch.randn(1, 3, 256, 256))
    assert [tuple(f.shape[-2:]) for f in feats] == [(32, 32), (16, 16)]
    dec = RLRDecoder.for_backbone(backbone.channels, backbone.strides, 256).eval()
    assert dec.hidden_dims == [256, 512] and [lvl.window_size for lvl in dec.levels] == [7, 5]
    with torch.no_grad():
        out, hidden = dec.forward_with_hidden(feats)
    assert [o.shape for o in out] == [f.shape for f in feats]
    assert [tuple(hd.shape) for hd in hidden] == [(1, 256, 32, 32), (1, 512, 16, 16)]
    assert all(torch.isfinite(o).all() for o in out)
    if name == "tf_efficientnet_b6":
        assert n_params(dec) == B6_DECODER_PARAMS


def test_rlr_model_on_lite0():
    from mcad.models.backbones import TimmBackbone

    # 128x128 input and narrow levels keep this fast; the full-size decoder is checked above. The backbone
    # wrapper is the one place that freezes (and pools, RLR's feature_pool=3).
    backbone = TimmBackbone("tf_efficientnet_lite0", out_indices=[2, 3], pretrained=False, feature_pool=3)
    model = RLRModel.from_backbone(backbone, 128, num_layers=1, hidden_dims=[32, 64], num_heads=4, window_sizes=[5, 3])
    model.train()
    assert not model.backbone.model.training and model.decoder.training  # BN statistics of the wrapper fixed
    assert all(not p.requires_grad for p in model.backbone.parameters())
    assert isinstance(model.jitter, FeatureJitter) and model.jitter.scale == 4.0
    images = torch.randn(2, 3, 128, 128)
    out = model.forward_train(images)
    losses, feats, recons = out.losses, out.features, out.reconstructions
    assert len(losses) == 2 and all(loss.ndim == 0 for loss in losses)
    assert [r.shape for r in recons] == [f.shape for f in feats]
    # what a contrastive plug-in reads: each level's trainable input embedding, with gradients
    embedded = model.input_embeddings(feats)
    assert [tuple(e.shape) for e in embedded] == [(2, 32, 16, 16), (2, 64, 8, 8)] and embedded[0].requires_grad
    assert not any(f.requires_grad for f in feats)
    sum(losses).backward()
    assert all(p.grad is not None for p in model.decoder.parameters())
    assert all(p.grad is None for p in model.backbone.parameters())
    model.eval()
    amap = model.anomaly_map(images)
    assert amap.shape == (2, 1, 16, 16) and torch.isfinite(amap).all() and (amap >= 0).all()
    assert model.anomaly_map(images, size=(128, 128)).shape == (2, 1, 128, 128)
    assert torch.equal(model(images), amap)
    # The anomaly map is the level mean of the per-level scores, resized to the finest grid.
    feats = model.extract_features(images)
    with torch.no_grad():
        recons = model.decoder(feats)
    s0, s1 = (mse_cosine_score(r, f) for r, f in zip(recons, feats))
    s1 = F.interpolate(s1[:, None], size=(16, 16), mode="bilinear", align_corners=True)[:, 0]
    torch.testing.assert_close(amap[:, 0], (s0 + s1) / 2)
    with pytest.raises(ValueError):
        RLRModel(backbone, RLRDecoder([8, 8], [16, 8], num_layers=1, window_sizes=[3, 3]))


def test_batch_independence():
    class Fixed(nn.Module):
        channels, strides = [4], [4]

        def __init__(self):
            super().__init__()
            self.feat = torch.randn(3, 4, 8, 8)

        def forward(self, images):
            return [self.feat[: images.shape[0]]]

    backbone = Fixed()
    dec = RLRDecoder([4], [8], num_layers=1, hidden_dims=[16], num_heads=4, window_sizes=[3]).eval()
    model = RLRModel(backbone, dec)
    assert torch.equal(model.extract_features(torch.zeros(3, 3, 32, 32))[0], backbone.feat)  # pooled nowhere else
    # Each image is reconstructed on its own (the reference is shared, not mixed across the batch).
    full = model.anomaly_map(torch.zeros(3, 3, 32, 32))
    torch.testing.assert_close(full[:2], model.anomaly_map(torch.zeros(2, 3, 32, 32)))


# ---------------------------------------------------------------------------------------------- jitter


def test_feature_jitter_magnitude_statistics():
    torch.manual_seed(3)
    c = 64
    base = torch.randn(1, 3, c) * torch.tensor([0.5, 2.0, 10.0])[None, :, None]
    x = base.expand(20000, -1, -1).contiguous()
    g = torch.Generator().manual_seed(0)
    noise = feature_jitter(x, scale=4.0, generator=g) - x
    expected_std = 4.0 * base.norm(dim=-1) / c  # (1, 3): ||x|| / C * s per token
    std = noise.std(dim=(0, 2))
    torch.testing.assert_close(std, expected_std[0], rtol=0.01, atol=0)
    assert noise.mean().abs() < 0.01 * expected_std.min()
    noise2 = feature_jitter(x, scale=2.0, generator=torch.Generator().manual_seed(0)) - x
    torch.testing.assert_close(noise2, noise / 2)  # same draws, half the scale


def test_feature_jitter_on_maps_uses_channel_dim():
    maps = torch.randn(4000, 8, 2, 3) * 3.0
    noise = feature_jitter(maps, scale=4.0, generator=torch.Generator().manual_seed(1)) - maps
    ratio = noise / (4.0 * maps.norm(dim=1, keepdim=True) / 8)
    assert abs(ratio.std().item() - 1.0) < 0.02


def test_feature_jitter_prob_and_determinism():
    x = torch.randn(6, 40, 16)
    assert feature_jitter(x, prob=0.0) is x
    assert feature_jitter(x, scale=0.0) is x
    out = feature_jitter(x, prob=0.25, generator=torch.Generator().manual_seed(0))
    changed = (out != x).any(dim=-1)
    assert (changed.sum(dim=1) == 40 - int(0.75 * 40)).all()  # exactly int((1-p) L) stay clean
    a = feature_jitter(x, generator=torch.Generator().manual_seed(7))
    b = feature_jitter(x, generator=torch.Generator().manual_seed(7))
    c = feature_jitter(x, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a != x).all()  # prob=1: every token and channel jittered
    jitter = FeatureJitter(scale=4.0, prob=1.0, generator=torch.Generator().manual_seed(7))
    assert jitter.level == "feature"
    outs = jitter([x, x.transpose(1, 2).reshape(6, 16, 5, 8)])
    assert torch.equal(outs[0], a) and outs[1].shape == (6, 16, 5, 8)
    with pytest.raises(ValueError):
        FeatureJitter(prob=1.5)


# ------------------------------------------------------------------------------------------------ loss


def test_mse_cosine_loss_and_score():
    torch.manual_seed(4)
    x = torch.randn(2, 5, 3, 4)
    y = torch.randn(2, 5, 3, 4)
    cos = (x * y).sum(1) / (x.norm(dim=1) * y.norm(dim=1))
    torch.testing.assert_close(mse_cosine_loss(y, x), ((x - y) ** 2).mean() + (1 - cos).mean())
    score = mse_cosine_score(y, x)
    assert score.shape == (2, 3, 4)
    torch.testing.assert_close(score, ((x - y) ** 2).mean(1) + 1 - cos)
    assert mse_cosine_loss(x, x).abs() < 1e-6 and mse_cosine_score(x, x).abs().max() < 1e-6
    tokens_x = x.permute(0, 2, 3, 1).reshape(2, 12, 5)
    tokens_y = y.permute(0, 2, 3, 1).reshape(2, 12, 5)
    torch.testing.assert_close(mse_cosine_loss(tokens_y, tokens_x), mse_cosine_loss(y, x))
    torch.testing.assert_close(mse_cosine_score(tokens_y, tokens_x), score.reshape(2, 12))
    # The loss is the mean of the score's terms.
    torch.testing.assert_close(mse_cosine_loss(y, x), score.mean())


# -------------------------------------------------------------------------------------------- training


class TinyBackbone(nn.Module):
    """Frozen random conv net with two levels (stride 4 and 8), standing in for EfficientNet."""

    channels = [8, 16]
    strides = [4, 8]

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(8, 16, 2, stride=2), nn.ReLU())

    def forward(self, images):
        a = self.stem(images)
        return [a, self.down(a)]


def tiny_model(seed: int = 0, jitter_seed: int | None = None) -> RLRModel:
    torch.manual_seed(seed)
    dec = RLRDecoder.for_backbone(
        TinyBackbone.channels, TinyBackbone.strides, 32, num_layers=2, hidden_dims=[32, 32],
        num_heads=4, window_sizes=[3, 3],
    )  # fmt: skip
    gen = torch.Generator().manual_seed(jitter_seed) if jitter_seed is not None else None
    return RLRModel(TinyBackbone(), dec, jitter=FeatureJitter(4.0, 1.0, gen))


def test_short_training_lowers_loss():
    model = tiny_model(seed=0, jitter_seed=0)
    gen = torch.Generator().manual_seed(0)
    images = F.avg_pool2d(torch.randn(16, 3, 32, 32, generator=gen), 5, 1, 2)  # smooth "normal" images
    params = model.level_parameters()
    optimizers = [torch.optim.Adam(p, lr=2e-3) for p in params]

    def clean_loss() -> float:
        model.eval()
        with torch.no_grad():
            feats = model.extract_features(images)
            value = sum(mse_cosine_loss(r, f) for r, f in zip(model.decoder(feats), feats)).item()
        model.train()
        return value

    before = clean_loss()
    model.train()
    for step in range(50):
        batch = images[(step * 4) % 16 : (step * 4) % 16 + 4]
        rlr_optimization_step(model, batch, optimizers, "per_level")
    after = clean_loss()
    assert after < 0.5 * before, (before, after)


def test_optimization_schedules():
    """per_level (one Adam per level) == summed (one Adam, summed loss); legacy adds momentum-only steps."""
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    models = {s: tiny_model(seed=0, jitter_seed=5) for s in ("per_level", "summed", "shared_adam_legacy")}
    opts = {
        "per_level": [torch.optim.Adam(p, lr=1e-3) for p in models["per_level"].level_parameters()],
        "summed": torch.optim.Adam(models["summed"].decoder.parameters(), lr=1e-3),
        "shared_adam_legacy": torch.optim.Adam(models["shared_adam_legacy"].decoder.parameters(), lr=1e-3),
    }
    for _ in range(3):
        for schedule, model in models.items():
            rlr_optimization_step(model, images, opts[schedule], schedule)
    per_level, summed, legacy = (dict(models[s].decoder.named_parameters()) for s in models)
    for name in per_level:
        torch.testing.assert_close(per_level[name], summed[name], rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(per_level[n], legacy[n]) for n in per_level)
    # Legacy step counts: level 0 steps twice per iteration; level 1's grad is still None during
    # level 0's very first step, so it has one step fewer.
    state = opts["shared_adam_legacy"].state
    lvl0, lvl1 = (next(iter(lvl.parameters())) for lvl in models["shared_adam_legacy"].decoder.levels)
    assert int(state[lvl0]["step"]) == 6 and int(state[lvl1]["step"]) == 5
    state = opts["summed"].state
    assert int(state[next(iter(models["summed"].decoder.levels[0].parameters()))]["step"]) == 3
    with pytest.raises(ValueError):
        rlr_optimization_step(models["summed"], images, opts["per_level"], "summed")


def test_models_copy_and_device_buffers():
    model = tiny_model()
    clone = copy.deepcopy(model)
    level = clone.decoder.levels[0]
    assert level.lca_mask.dtype == torch.bool and level.lca_mask.shape == (64, 64)
    assert set(model.state_dict()) == set(clone.state_dict())
    assert not any(k.endswith(("lca_mask", "mlka_mask", "encoding")) for k in model.state_dict())
