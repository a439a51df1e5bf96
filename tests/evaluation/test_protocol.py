import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from mcad.evaluation.protocol import EvalProtocol


@pytest.mark.parametrize("sigma, size", [(4.0, 64), (8.0, 20), (1.5, 33)])
def test_gaussian_equals_scipy_reflect(sigma, size):
    maps = torch.rand(3, size, size, generator=torch.Generator().manual_seed(0))
    ours = EvalProtocol(eval_size=size, sigma=sigma).smooth(maps).numpy()
    ref = np.stack([gaussian_filter(m.astype(np.float64), sigma) for m in maps.numpy()])
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_dinomaly_kernel_is_5x5_zero_padded():
    maps = torch.rand(2, 16, 16, generator=torch.Generator().manual_seed(1))
    proto = EvalProtocol(eval_size=16, kernel_size=5, border="constant")
    ref = np.stack([gaussian_filter(m.astype(np.float64), 4.0, mode="constant", truncate=0.5) for m in maps.numpy()])
    np.testing.assert_allclose(proto.smooth(maps).numpy(), ref, atol=1e-6)


def test_scores_masks_and_fusion():
    raw = torch.zeros(2, 1, 8, 8)
    raw[0, 0, 2, 3] = 10.0
    proto = EvalProtocol(eval_size=8, smoothing="none", image_score="topk_mean", topk_ratio=2 / 64)
    maps, scores = proto.process(raw)
    assert maps.shape == (2, 8, 8)
    assert scores.tolist() == [5.0, 0.0]  # mean of the top two pixels
    seg = torch.ones(2, 1, 4, 4)
    fused, _ = EvalProtocol(eval_size=8, smoothing="none", seg_weight=0.3).process(raw, seg)
    assert torch.allclose(fused[1], torch.full((8, 8), 0.3))
    masks = torch.zeros(1, 1, 16, 16)
    masks[0, 0, 4:8, 4:8] = 1.0
    binary = EvalProtocol(eval_size=8, gt_threshold=0.5).binarize_masks(masks)
    assert binary.dtype == torch.uint8 and int(binary.sum()) == 4
    # a mask value exactly at the threshold: excluded by `>`, included by `>=` (CRR's loader)
    half = torch.full((1, 1, 8, 8), 0.5)
    assert int(EvalProtocol(eval_size=8).binarize_masks(half).sum()) == 0
    assert int(EvalProtocol(eval_size=8, gt_inclusive=True).binarize_masks(half).sum()) == 64


def test_levels_are_upsampled_straight_to_the_evaluation_size():
    # The official RD / ADer / RLR fusion: every level straight to the evaluation size, then the mean.
    # Upsampling a coarse fused map again (16 -> 64 -> 256) is not the same, so the two must differ.
    torch.manual_seed(0)
    levels = [torch.rand(2, 1, 64, 64), torch.rand(2, 1, 32, 32), torch.rand(2, 1, 16, 16)]
    proto = EvalProtocol(eval_size=256, smoothing="none")
    fused, _ = proto.process(levels)
    up = [F.interpolate(m, size=(256, 256), mode="bilinear", align_corners=True) for m in levels]
    torch.testing.assert_close(fused, torch.stack(up).mean(0)[:, 0], rtol=0, atol=1e-6)
    coarse = torch.stack([F.interpolate(m, size=(64, 64), mode="bilinear", align_corners=True) for m in levels])
    two_stage, _ = proto.process(coarse.mean(0))
    assert float((two_stage - fused).abs().max()) > 1e-3
    with pytest.raises(ValueError, match="empty"):
        proto.process([])


def test_unsmoothed_pixel_maps_but_smoothed_scores():
    raw = torch.zeros(1, 1, 32, 32)
    raw[0, 0, 10, 10] = 1.0
    maps, score = EvalProtocol(eval_size=32, sigma=2.0, smooth_for_pixel=False).process(raw)
    assert float(maps.max()) == 1.0 and float(score) < 0.1


def test_invalid_options_fail_loudly():
    with pytest.raises(ValueError, match="image_score"):
        EvalProtocol(image_score="mean")
    with pytest.raises(ValueError, match="kernel_size"):
        EvalProtocol(kernel_size=4)


def test_dinomaly_evaluation_resizes_via_the_input_size_and_masks_nearest():
    # Dinomaly's own evaluation (utils.py::evaluation_batch): map to the input size (align_corners) and then
    # to 256 (align_corners=False); masks nearest to 256, kept where > 0.
    torch.manual_seed(1)
    raw = torch.rand(2, 1, 28, 28)
    proto = EvalProtocol(eval_size=64, smoothing="none", resize_via_input=True)
    maps, _ = proto.process(raw, input_size=(112, 112))
    at_input = F.interpolate(raw, size=(112, 112), mode="bilinear", align_corners=True)
    expected = F.interpolate(at_input, size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(maps, expected, rtol=0, atol=1e-6)
    direct, _ = EvalProtocol(eval_size=64, smoothing="none").process(raw)
    assert float((direct - maps).abs().max()) > 1e-4  # the two resizes differ
    with pytest.raises(ValueError, match="input size"):
        proto.process(raw)
    mask = torch.zeros(1, 1, 112, 112)
    mask[0, 0, 50:53, 50:53] = 0.2  # a faint sliver: bilinear at > 0.5 drops it, nearest at > 0 keeps it
    nearest = EvalProtocol(eval_size=64, gt_threshold=0.0, mask_resize="nearest").binarize_masks(mask)
    assert int(nearest.sum()) > 0 and int(EvalProtocol(eval_size=64).binarize_masks(mask).sum()) == 0
    with pytest.raises(ValueError, match="mask_resize"):
        EvalProtocol(mask_resize="area")
