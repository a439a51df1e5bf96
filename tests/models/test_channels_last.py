"""``channels_last=true``: every method runs in NHWC memory format and computes the same maps and losses."""

from __future__ import annotations

import copy

import pytest
import torch

from mcad.training.callbacks import ChannelsLast
from mcad.logging import workflow_callbacks
from mcad.build import build_components

# Small settings per method (Lite0, random weights, 64 px) so that the four build in seconds.
METHODS = {
    "rd": ["method=rd"],
    "ccl_rd": ["method=ccl_rd"],
    "rlr": ["method=rlr", "backbone=tf_efficientnet_lite0", "decoder.window_sizes=[5,3]"],
    "crr": ["method=crr", "backbone=tf_efficientnet_lite0", "data.crop_size=null", "decoder.embed_dim=64",
            "method.seg_head.base_width=8", "method.seg_head.num_stages=2", "method.seg_head.final_width=8",
            "method.seg_head.output_size=[32,32]"],
}  # fmt: skip


def _losses(method, batch) -> dict[str, torch.Tensor]:
    method.train()
    torch.manual_seed(0)  # the same noise / masking draws for both memory formats
    return method.training_losses(batch)


def _maps(method, batch) -> torch.Tensor:
    method.eval()
    with torch.no_grad():
        return method.anomaly_maps(batch["image"]).anomaly_map


@pytest.mark.parametrize("name", sorted(METHODS))
def test_channels_last_keeps_maps_and_losses(name, make_config, fast_data):
    cfg = make_config([*METHODS[name], *fast_data, "backbone.pretrained=false", "count_flops=false"])
    method, datamodule = build_components(cfg)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    nhwc = copy.deepcopy(method)  # two identical modules: a training step would move the BN statistics
    ChannelsLast._convert(nhwc)
    convs = [m for m in nhwc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)

    maps_nchw, maps_nhwc = (_maps(m, batch) for m in (method, nhwc))
    loss_nchw, loss_nhwc = (_losses(m, batch)["loss"] for m in (method, nhwc))
    loss_nhwc.backward()  # the backward pass runs on channels-last weights and activations too

    torch.testing.assert_close(maps_nhwc, maps_nchw, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss_nhwc, loss_nchw.detach(), rtol=1e-4, atol=1e-5)


def test_channels_last_flag_adds_the_callback_once(make_config, fast_data):
    cfg = make_config([*fast_data, "logger=none", "channels_last=true"])
    added = workflow_callbacks(cfg, [])
    assert sum(isinstance(cb, ChannelsLast) for cb in added) == 1
    assert not any(isinstance(cb, ChannelsLast) for cb in workflow_callbacks(cfg, [ChannelsLast()]))
    off = make_config([*fast_data, "logger=none"])
    assert not any(isinstance(cb, ChannelsLast) for cb in workflow_callbacks(off, []))
