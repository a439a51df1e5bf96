"""Tests of the RD++-style projection layers used by CCL."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mcad.methods.ccl_rd.components.projection import MultiProjectionLayer, ProjLayer, projection_param_count

WRN50_CHANNELS = [256, 512, 1024]


def _n(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_param_count_wrn50_levels():
    m = MultiProjectionLayer(WRN50_CHANNELS)
    # per level 11.25·C² weights + 2.25·C biases: 737,856 + 2,950,272 + 11,798,784
    assert _n(m) == 15_486_912 == projection_param_count(WRN50_CHANNELS)
    assert [_n(layer) for layer in m.layers] == [737_856, 2_950_272, 11_798_784]
    assert _n(m) / 1e6 == pytest.approx(15.5, abs=0.05)  # the CCL paper's "about 15.5 M"
    sep = MultiProjectionLayer(WRN50_CHANNELS, separable=True)
    assert _n(sep) == projection_param_count(WRN50_CHANNELS, separable=True)


def test_proj_layer_structure():
    layer = ProjLayer(256)
    mods = list(layer.proj)
    convs = [m for m in mods if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(256, 128), (128, 64), (64, 128), (128, 256)]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) and c.bias is not None for c in convs)
    # conv -> InstanceNorm2d (no affine, no running stats) -> LeakyReLU, four times, also after the last conv
    for k in range(4):
        conv, norm, act = mods[3 * k : 3 * k + 3]
        assert isinstance(conv, nn.Conv2d)
        assert isinstance(norm, nn.InstanceNorm2d) and not norm.affine and not norm.track_running_stats
        assert isinstance(act, nn.LeakyReLU) and act.negative_slope == 0.01 and not act.inplace


def test_forward_shapes_and_level_check():
    torch.manual_seed(0)
    m = MultiProjectionLayer([16, 32, 64])
    feats = [torch.randn(2, 16, 8, 8), torch.randn(2, 32, 4, 4), torch.randn(2, 64, 2, 2)]
    out = m(feats)
    assert [o.shape for o in out] == [f.shape for f in feats]
    with pytest.raises(ValueError):
        m(feats[:2])
    with pytest.raises(ValueError):
        ProjLayer(6)


def test_width_multiplier_scales_the_hidden_widths_only():
    layer = ProjLayer(24, width_multiplier=4)
    convs = [m for m in layer.proj if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(24, 48), (48, 24), (24, 48), (48, 24)]
    lite0 = [24, 40, 112]
    for separable in (False, True):
        wide = MultiProjectionLayer(lite0, separable=separable, width_multiplier=4)
        assert _n(wide) == projection_param_count(lite0, separable=separable, width_multiplier=4)
        assert _n(wide) > _n(MultiProjectionLayer(lite0, separable=separable))
    assert wide([torch.randn(1, c, 4, 4) for c in lite0])[0].shape == (1, 24, 4, 4)
    for bad in (0, 1.5):
        with pytest.raises(ValueError, match="width_multiplier"):
            ProjLayer(24, width_multiplier=bad)
