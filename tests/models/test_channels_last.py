"""``channels_last=true``: every method's convolutions run on NHWC activations and give the same maps and losses."""

from __future__ import annotations

import copy

import pytest
import torch

from mcad.build import build_components
from mcad.logging import workflow_callbacks
from mcad.training.callbacks import ChannelsLast

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
    return method.compute_losses(batch)


def _maps(method, batch) -> torch.Tensor:
    method.eval()
    with torch.no_grad():
        return method.anomaly_maps(batch["image"]).anomaly_map


def _levels(maps: torch.Tensor | list[torch.Tensor]) -> list[torch.Tensor]:
    return maps if isinstance(maps, list) else [maps]


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

    # What the flag is for: the convolutions' activations are NHWC (a converted module that still computed in
    # NCHW would give the same values, so the values alone prove nothing).
    formats: list[bool] = []

    def record(module, inputs, output):
        if output.dim() == 4 and output.shape[1] > 1 and output.shape[-1] * output.shape[-2] > 1:
            formats.append(output.is_contiguous(memory_format=torch.channels_last))

    hooks = [c.register_forward_hook(record) for c in convs]
    maps_nchw, maps_nhwc = (_maps(m, batch) for m in (method, nhwc))
    for hook in hooks:
        hook.remove()
    assert formats and all(formats), f"{formats.count(False)} of {len(formats)} conv outputs are not channels-last"
    loss_nchw, loss_nhwc = (_losses(m, batch)["loss"] for m in (method, nhwc))
    loss_nhwc.backward()  # the backward pass runs on channels-last weights and activations too

    for a, b in zip(_levels(maps_nhwc), _levels(maps_nchw)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss_nhwc, loss_nchw.detach(), rtol=1e-4, atol=1e-5)


def test_channels_last_flag_adds_the_callback_once(make_config, fast_data):
    cfg = make_config([*fast_data, "logger=none", "channels_last=true"])
    added = workflow_callbacks(cfg, [])
    assert sum(isinstance(cb, ChannelsLast) for cb in added) == 1
    assert not any(isinstance(cb, ChannelsLast) for cb in workflow_callbacks(cfg, [ChannelsLast()]))
    off = make_config([*fast_data, "logger=none"])
    assert not any(isinstance(cb, ChannelsLast) for cb in workflow_callbacks(off, []))
