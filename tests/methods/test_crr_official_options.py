"""CRR / Dinomaly faithful options: prefix tokens, DINOv2's position-table rule, the official mask draws,
``method=dinomaly``, the imgaug-like autocontrast and the checkpoint converter's errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from timm.layers import resample_abs_pos_embed

from mcad.build import build_components
from mcad.methods.crr import CRRModel
from mcad.methods.crr.components.bottleneck import NoisyBottleneck
from mcad.methods.crr.official import OfficialCheckpointError, convert_official_checkpoint, recon_key, seg_key
from mcad.models.backbones import TimmBackbone, dinov2_interpolate_pos_embed
from mcad.synthesis.perlin import PerlinSynthesizer, PilAutocontrast

VIT = "vit_small_patch14_reg4_dinov2"
LEVELS = list(range(2, 10))
LITE0 = ["backbone=tf_efficientnet_lite0", "backbone.pretrained=false", "decoder.embed_dim=64",
         "decoder.num_decoder_blocks=2", "count_flops=false"]  # fmt: skip


@pytest.fixture(autouse=True)
def _single_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- bottleneck mask draws
def test_mask_draws_the_official_bmlp6_numbers():
    x = torch.randn(2, 21, 64)
    bn = NoisyBottleneck(64, mask_ratio=0.4, mask_at_test=True).eval()
    torch.manual_seed(7)
    masked = bn.mask_features(x)
    torch.manual_seed(7)
    u = torch.rand((2, 21, 64))  # bMlp6: torch.rand((B, N, C)) on the CPU generator ...
    expected = x * torch.where(u > 1 - 0.4, 0, 1)  # ... zero where u > 1 - lambda
    torch.testing.assert_close(masked, expected, rtol=0, atol=0)
    # one draw over [x; x~] equals two consecutive draws (the CPU generator is sequential)
    torch.manual_seed(7)
    both = bn.mask_features(torch.cat([x, x]))
    torch.manual_seed(7)
    first, second = bn.mask_features(x), bn.mask_features(x)
    torch.testing.assert_close(both, torch.cat([first, second]), rtol=0, atol=0)
    device = NoisyBottleneck(64, mask_ratio=0.4, mask_rng="device").train()
    assert abs((device.mask_features(torch.ones(4, 64, 64)) == 0).float().mean().item() - 0.4) < 0.01
    with pytest.raises(ValueError, match="mask_rng"):
        NoisyBottleneck(64, mask_rng="gpu")


# ----------------------------------------------------------------------------- DINOv2 position table
def test_dinov2_position_rule():
    torch.manual_seed(0)
    table = torch.randn(1, 37 * 37, 8)
    out = dinov2_interpolate_pos_embed(table, (28, 28))
    assert out.shape == (1, 784, 8)
    square = table.reshape(1, 37, 37, 8).permute(0, 3, 1, 2)
    ref = F.interpolate(square, scale_factor=(28.1 / 37, 28.1 / 37), mode="bicubic", antialias=False)
    torch.testing.assert_close(out, ref.permute(0, 2, 3, 1).reshape(1, 784, 8), rtol=0, atol=0)
    timm_rule = resample_abs_pos_embed(table, new_size=[28, 28], num_prefix_tokens=0)
    assert (out - timm_rule).abs().max() > 1e-2  # a different table: sampling positions and antialiasing differ
    torch.testing.assert_close(dinov2_interpolate_pos_embed(table, (37, 37)), table)  # native grid: unchanged
    assert dinov2_interpolate_pos_embed(table, (4, 6)).shape == (1, 24, 8)
    with pytest.raises(ValueError, match="square"):
        dinov2_interpolate_pos_embed(torch.zeros(1, 10, 8), (2, 2))


def test_backbone_official_position_table_and_weights_files(tmp_path):
    torch.manual_seed(3)
    native = timm.create_model(VIT, pretrained=False, features_only=True, out_indices=LEVELS)
    torch.manual_seed(3)
    bb = TimmBackbone(VIT, LEVELS, pretrained=False, img_size=56, pos_embed_interpolation="dinov2_official")
    vit = bb.model.model
    assert vit.pos_embed.shape == (1, 16, 384) and tuple(vit.patch_embed.img_size) == (56, 56)
    expected = dinov2_interpolate_pos_embed(native.model.pos_embed.detach(), (4, 4))
    torch.testing.assert_close(vit.pos_embed.detach(), expected, rtol=0, atol=0)
    assert bb(torch.randn(1, 3, 56, 56))[0].shape == (1, 384, 4, 4)
    # a file at the native grid is resized with the same rule ...
    path = tmp_path / "native.pth"
    torch.save(native.state_dict(), path)
    loaded = TimmBackbone(VIT, LEVELS, pretrained=False, weights_path=str(path), img_size=56,
                          pos_embed_interpolation="dinov2_official")  # fmt: skip
    torch.testing.assert_close(loaded.model.model.pos_embed.detach(), expected, rtol=0, atol=0)
    # ... and a file saved from a built backbone (already at img_size) is loaded as it is
    path = tmp_path / "built.pth"
    torch.save(bb.model.state_dict(), path)
    again = TimmBackbone(VIT, LEVELS, pretrained=False, weights_path=str(path), img_size=56,
                         pos_embed_interpolation="dinov2_official")  # fmt: skip
    for a, b in zip(bb.model.state_dict().values(), again.model.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="img_size"):
        TimmBackbone(VIT, LEVELS, pretrained=False, pos_embed_interpolation="dinov2_official")
    with pytest.raises(ValueError, match="pos_embed_interpolation"):
        TimmBackbone(VIT, LEVELS, pretrained=False, img_size=56, pos_embed_interpolation="bilinear")
    with pytest.raises(ValueError, match="absolute position"):
        TimmBackbone("tf_efficientnet_lite0", [1, 2], pretrained=False, img_size=64,
                     pos_embed_interpolation="dinov2_official")  # fmt: skip


# ----------------------------------------------------------------------------- prefix tokens
def test_prefix_tokens_travel_through_the_decoder():
    torch.manual_seed(0)
    bb = TimmBackbone(VIT, LEVELS, pretrained=False, img_size=56, prefix_tokens=True)
    assert bb.num_prefix_tokens == 5
    feats = bb(torch.randn(2, 3, 56, 56))
    assert all(isinstance(f, tuple) for f in feats)
    assert feats[0][0].shape == (2, 384, 4, 4) and feats[0][1].shape == (2, 5, 384)
    model = CRRModel(bb).eval()
    seen = []
    model.bottleneck.register_forward_hook(lambda mod, args, out: seen.append(tuple(args[0].shape)))
    out = model(torch.randn(2, 3, 56, 56))
    enc, dec = out.encoder, out.decoder
    assert seen == [(2, 5 + 16, 384)]  # CLS + 4 registers + 4x4 patches, as the official ViTill
    assert [tuple(t.shape) for t in enc + dec] == [(2, 384, 4, 4)] * 4
    bb.prefix_tokens = False  # backbone.prefix_tokens=false: patch tokens only
    out = model(torch.randn(2, 3, 56, 56))
    enc, dec = out.encoder, out.decoder
    assert seen[-1] == (2, 16, 384) and [tuple(t.shape) for t in enc + dec] == [(2, 384, 4, 4)] * 4
    with pytest.raises(ValueError, match="prefix_tokens"):
        TimmBackbone("tf_efficientnet_lite0", [1, 2], pretrained=False, prefix_tokens=True)


def test_dinov2_backbone_config_is_faithful_by_default(make_config):
    cfg = make_config(["method=crr", "backbone.pretrained=false"])
    assert cfg.backbone.prefix_tokens is True and cfg.backbone.pos_embed_interpolation == "dinov2_official"
    assert cfg.decoder.mask_rng == "cpu"


def test_flops_and_onnx_export_with_prefix_tokens(tmp_path):
    pytest.importorskip("onnxruntime")
    from mcad.export import export_onnx, onnx_max_difference
    from mcad.training.efficiency import count_flops

    torch.manual_seed(0)
    bb = TimmBackbone(VIT, LEVELS, pretrained=False, img_size=56, prefix_tokens=True,
                      pos_embed_interpolation="dinov2_official")  # fmt: skip
    from mcad.evaluation.protocol import EvalProtocol
    from mcad.methods.crr.module import CRRModule
    from mcad.optim import StableAdamW

    method = CRRModule(
        bb,
        decoder=lambda backbone: CRRModel(backbone, num_decoder_blocks=2),
        seg_head=None,
        optimizer=lambda params: StableAdamW(params),
        stage2_steps=0,
        repair=False,
        protocol=EvalProtocol(eval_size=64, kernel_size=5, border="constant", image_score="topk_mean"),
    ).eval()
    flops = count_flops(method, 56)
    assert flops is not None and flops > 0
    path = export_onnx(method, 56, tmp_path / "crr.onnx")
    assert onnx_max_difference(method, path, 56) < 1e-4


# ----------------------------------------------------------------------------- method=dinomaly
def test_dinomaly_recipe_builds(make_config):
    cfg = make_config(["experiment=dinomaly_mvtec", "backbone.pretrained=false"])
    assert (cfg.data.image_size, cfg.data.crop_size, cfg.data.batch_size, cfg.seed) == (448, 392, 16, 1)
    assert cfg.protocol.name == "dinomaly_gt0" and cfg.trainer.gradient_clip_val == 0.1
    assert cfg.synthesizer.get("_target_") is None and cfg.method_name == "dinomaly"
    method, datamodule = build_components(cfg)
    assert datamodule.request.synthesizer is None and method.seg_head is None and not method.repair
    assert method.model.bottleneck.mask_ratio == 0.0 and method.model.bottleneck.drop.p == 0.2
    assert [p.name for p in method.training_phases()] == ["stage1"]
    assert method.training_phases()[0].trainer["max_steps"] == 10_000
    counts = method.parameter_counts()
    assert counts["params_reconstruction"] == 61_425_408 and counts["params_seg_head"] == 0
    assert method.data_request().synthesizer is None


def test_dinomaly_trains_on_clean_images_only(make_config):
    cfg = make_config(["method=dinomaly", *LITE0])
    method, _ = build_components(cfg)
    method.train()
    losses = method.training_losses({"image": torch.randn(2, 3, 64, 64)})  # no synthetic_image needed
    losses["loss"].backward()
    assert set(losses) == {"loss"} and losses["loss"].item() > 0
    assert all(p.grad is not None for p in method.model.trainable_parameters())
    assert method.anomaly_maps(torch.randn(1, 3, 64, 64)).segmentation is None
    # no synthetic images are asked of the data layer, even with a synthesizer configured; CRR asks for them
    cfg = make_config([*LITE0, "method=dinomaly", "synthesizer=perlin"])
    assert build_components(cfg)[0].data_request().synthesizer is None
    crr, datamodule = build_components(make_config([*LITE0, "method=crr"]))
    assert crr.data_request().synthesizer is crr.synthesizer is datamodule.request.synthesizer is not None


def test_seg_head_none_needs_no_stage2():
    from mcad.methods.crr.module import CRRModule

    bb = TimmBackbone("tf_efficientnet_lite0", [1, 2], pretrained=False)
    with pytest.raises(ValueError, match="stage2_steps=0"):
        CRRModule(bb, decoder=None, seg_head=None, optimizer=torch.optim.Adam, stage2_steps=10)


# ----------------------------------------------------------------------------- synthesis
def test_autocontrast_is_pil_with_a_random_integer_cutoff():
    rng = np.random.default_rng(0)
    img = (rng.random((48, 40, 3)) * 100 + 60).astype(np.uint8)
    op = PilAutocontrast()
    seen = set()
    for seed in range(40):
        op.set_random_seed(seed)
        cutoff = op.get_params()["cutoff"]
        seen.add(cutoff)
        out = op.apply(img, cutoff=cutoff)
        np.testing.assert_array_equal(out, np.array(ImageOps.autocontrast(Image.fromarray(img), cutoff=cutoff)))
    assert min(seen) >= 0 and max(seen) <= 20 and len(seen) > 10
    assert any(isinstance(a, PilAutocontrast) for a in PerlinSynthesizer().augmenters)
    with pytest.raises(TypeError):
        PerlinSynthesizer()(img, np.random.default_rng(0), foreground_mask=np.ones(img.shape[:2]))


# ----------------------------------------------------------------------------- checkpoint converter
def test_converter_names_and_errors():
    assert recon_key("bottleneck.0.fc1.weight") == "model.bottleneck.fc1.weight"
    assert recon_key("decoder.7.attn.qkv.bias") == "model.decoder.7.attn.qkv.bias"
    assert recon_key("encoder.blocks.0.norm1.weight") is None
    assert seg_key("up1.1.weight") == "seg_head.stages.0.up.0.weight"
    assert seg_key("up4.2.running_var") == "seg_head.stages.3.up.1.running_var"
    assert seg_key("db2.4.bias") == "seg_head.stages.1.db.4.bias"
    assert seg_key("fin_out.0.weight") == "seg_head.final.weight"
    with pytest.raises(OfficialCheckpointError, match="Not an official"):
        convert_official_checkpoint({"foo": torch.zeros(1)})
    encoder = {
        "encoder.cls_token": torch.zeros(1, 1, 8), "encoder.pos_embed": torch.zeros(1, 1 + 9, 8),
        "encoder.register_tokens": torch.zeros(1, 4, 8), "encoder.mask_token": torch.zeros(1, 8),
        "encoder.patch_embed.proj.weight": torch.zeros(8, 3, 14, 14),
        "encoder.blocks.0.norm1.weight": torch.ones(8),
    }  # fmt: skip
    with pytest.raises(OfficialCheckpointError, match="lacks"):
        convert_official_checkpoint({**encoder, "decoder.0.norm1.weight": torch.ones(8)}, img_size=28, num_blocks=1)
    with pytest.raises(OfficialCheckpointError, match="Unexpected"):
        convert_official_checkpoint({**encoder, "extra.weight": torch.ones(8)}, img_size=28, num_blocks=1)
    bare = {k[8:]: v for k, v in encoder.items()}  # a dinov2_*_pretrain.pth-style encoder file
    out = convert_official_checkpoint(bare, img_size=28, num_blocks=1)
    assert out["model.backbone.model.model.pos_embed"].shape == (1, 4, 8)  # 3x3 -> 2x2, DINOv2 rule
    assert math.isclose(float(out["model.backbone.model.model.blocks.0.norm1.weight"].sum()), 8.0)
    # with our state dict as reference: a bare encoder is not asked for decoder keys, a wrong shape is named
    reference = {**{k: v.clone() for k, v in out.items()}, "model.decoder.0.norm1.weight": torch.ones(8)}
    assert set(convert_official_checkpoint(bare, reference=reference)) == set(out)
    reference["model.backbone.model.model.reg_token"] = torch.zeros(1, 2, 8)
    with pytest.raises(OfficialCheckpointError, match="shape mismatch.*reg_token"):
        convert_official_checkpoint(bare, reference=reference)
