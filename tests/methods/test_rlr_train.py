"""RLR through the framework: configs, parameter counts, Lightning training (both A-RLR3 modes),
plug-in hooks, a synthetic training run and the real-data proxy.

The pure parts (masks, attention, decoder shapes with stand-in backbones, jitter, loss, optimisation
schedules) are tested in ``test_rlr_blocks.py``.
"""

from __future__ import annotations

import json

import pytest
import torch
from hydra.utils import instantiate

from mcad.build import build_components
from mcad.methods.rlr.module import RLRModule
from mcad.train import train

# Small decoder for the runs on CPU (the faithful sizes are checked by the parameter-count test).
SMALL_DECODER = ["decoder.num_layers=1", "decoder.hidden_base=16", "decoder.num_heads=2", "decoder.ffn_ratio=2"]


def test_method_config_selects_the_rlr_recipe(make_config):
    cfg = make_config(["method=rlr"])
    assert cfg.backbone.model_name == "tf_efficientnet_b6.aa_in1k"
    assert list(cfg.backbone.out_indices) == [2, 3] and cfg.backbone.feature_pool == 3
    assert cfg.decoder.num_layers == 4 and list(cfg.decoder.gates) == [2.0, 1.0]
    assert cfg.synthesizer.scale == 4.0 and cfg.synthesizer.prob == 1.0
    assert cfg.method.optimizer.lr == 1e-4 and cfg.data.batch_size == 4 and cfg.trainer.max_epochs == 200
    assert cfg.protocol.name == "mcad"
    # Lite0 gets the stages of the same strides (8, 16).
    cfg = make_config(["method=rlr", "backbone=tf_efficientnet_lite0"])
    assert list(cfg.backbone.out_indices) == [2, 3] and cfg.backbone.feature_pool == 3
    cfg = make_config(["experiment=rlr_mvtec"])
    assert cfg.seed == 3407 and cfg.data.batch_size == 4 and cfg.trainer.max_epochs == 200
    assert cfg.trainer.accelerator == "gpu" and cfg.data.name == "mvtec"


@pytest.mark.parametrize(
    ("backbone", "channels", "trainable"),
    [("tf_efficientnet_b6", [72, 200], 21_514_512), ("tf_efficientnet_lite0", [40, 112], 21_299_352)],
)
def test_paper_backbones_build_with_expected_shapes_and_counts(make_config, backbone, channels, trainable):
    cfg = make_config(
        ["method=rlr", f"backbone={backbone}", "backbone.pretrained=false", "backbone.weights_source=null"]
    )
    method, _ = build_components(cfg)
    assert isinstance(method, RLRModule)
    assert method.model.backbone.channels == channels and method.model.backbone.strides == [8, 16]
    levels = method.model.decoder.levels
    assert [lvl.grid_size for lvl in levels] == [(32, 32), (16, 16)]
    assert [lvl.hidden_dim for lvl in levels] == [256, 512] and [lvl.window_size for lvl in levels] == [7, 5]
    assert method.parameter_counts()["params_trainable"] == trainable
    method.eval()
    with torch.no_grad():
        feats = method.model.extract_features(torch.randn(1, 3, 256, 256))
        out = method.anomaly_maps(torch.randn(1, 3, 256, 256))
    assert [tuple(f.shape) for f in feats] == [(1, channels[0], 32, 32), (1, channels[1], 16, 16)]
    assert [tuple(m.shape) for m in out.anomaly_map] == [(1, 1, 32, 32), (1, 1, 16, 16)]
    assert out.segmentation is None


def test_backbone_pools_once_and_decoder_follows_the_input_size(make_config):
    cfg = make_config(
        ["method=rlr", "backbone=tf_efficientnet_lite0", "backbone.weights_source=null", "backbone.pretrained=false",
         "data.image_size=128", "decoder.window_sizes=[5,3]", *SMALL_DECODER]
    )  # fmt: skip
    method, _ = build_components(cfg)
    assert isinstance(method.model.backbone.pool, torch.nn.AvgPool2d)  # RLR's 3x3 pooling: the backbone's only
    assert not hasattr(method.model, "pool")
    assert [lvl.grid_size for lvl in method.model.decoder.levels] == [(16, 16), (8, 8)]
    assert [lvl.num_tokens for lvl in method.model.decoder.levels] == [256, 64]
    assert method.model.decoder.hidden_dims == [32, 64]  # the width rule from the strides, base 16
    images = torch.randn(2, 3, 128, 128)
    # The plug-in hook (loss=ccl): one pass per view; input embeddings with gradients, their pooled
    # embedding, the frozen pooled features for the correspondence.
    method.train()
    own, feats = method.contrastive_forward({"image": images, "image_aug": images.flip(-1)})
    assert set(own) == {"loss", "level0", "level1"}
    assert [tuple(d.shape) for d in feats.dense] == [(2, 32, 16, 16), (2, 64, 8, 8)] and feats.dense[0].requires_grad
    assert feats.embedding.shape == (2, 96) and feats.embedding_aug.shape == (2, 96)
    corr = feats.correspondence_aug
    assert [c.shape[-2:] for c in corr] == [d.shape[-2:] for d in feats.dense] and not corr[0].requires_grad
    method.eval()
    # One map per level at its own grid; the protocol upsamples each straight to the evaluation size.
    levels = method.anomaly_maps(images).anomaly_map
    assert [tuple(m.shape) for m in levels] == [(2, 1, 16, 16), (2, 1, 8, 8)]
    with pytest.raises(ValueError, match="image-level"):
        RLRModule(method.model.backbone, instantiate(cfg.decoder), instantiate(cfg.method.optimizer),
                  synthesizer=type("Image", (), {"level": "image"})())  # fmt: skip


@pytest.mark.parametrize("optimization", ["per_level", "shared_adam_legacy"])
def test_manual_optimisation_modes_train(make_config, fast_data, two_threads, optimization):
    cfg = make_config(
        ["method=rlr", "backbone=tf_efficientnet_lite0", *fast_data, "decoder.window_sizes=[5,3]", *SMALL_DECODER,
         f"method.optimization={optimization}", "trainer.max_epochs=1", "data.options.num_train=4",
         "data.options.num_test_good=1", "data.options.num_test_defect=1", "data.batch_size=4",
         "callbacks=none", "logger=none", "count_flops=false"]
    )  # fmt: skip
    method, datamodule = build_components(cfg)
    before = [p.detach().clone() for p in method.model.decoder.parameters()]
    trainer = instantiate(cfg.trainer, logger=False, callbacks=[], enable_checkpointing=False)
    trainer.fit(method, datamodule=datamodule)
    assert not method.automatic_optimization
    optimizers = trainer.optimizers
    assert len(optimizers) == (2 if optimization == "per_level" else 1)
    assert all(not torch.equal(a, b) for a, b in zip(before, method.model.decoder.parameters()))
    assert {"train/loss_epoch", "train/level0_epoch", "train/level1_epoch"} <= set(trainer.logged_metrics)


def test_rlr_trains_and_separates_defects_on_synthetic_data(make_config, fast_data, tmp_path, two_threads):
    cfg = make_config(
        ["method=rlr", "backbone=tf_efficientnet_lite0", *fast_data, "decoder.window_sizes=[5,3]", *SMALL_DECODER,
         "method.optimizer.lr=0.003", "trainer.max_epochs=40"]
    )  # fmt: skip
    # 240 steps: at 36 steps (6 epochs, lr 1e-3) the decoder still outputs roughly the mean feature, and
    # the score (distance to it) ranks the flat synthetic defects BELOW the textured normal regions
    # (measured mean I-AUROC 0.27); trained longer the reference takes over (measured 0.92 / 0.98).
    results = train(cfg)
    assert results["mean"]["I-AUROC"] > 0.8, results["per_class"]
    assert results["mean"]["P-AUROC"] > 0.9, results["per_class"]
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["method"] == "rlr" and saved["protocol"]["name"] == "mcad"
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow
def test_rlr_real_data_proxy(make_config, real_data_root, two_threads):
    """One RLR model on bottle + cookie with the CPU proxy recipe (experiment=proxy_rlr, ~6 min here).

    Issue 5's bar is I-AUROC >= 0.98 and P-AUROC >= 0.95 per class; measured (seed 42, 2 threads): bottle
    1.000 / 0.984, cookie 0.982 / 0.973. Cookie's 14 x 32 image pairs make one misordered pair worth 0.2
    points, so the image floor for cookie sits a few pairs below the measured value.
    """
    cfg = make_config(["experiment=proxy_rlr", f"data.root={real_data_root}", "trainer.enable_progress_bar=false"])
    results = train(cfg)
    bottle, cookie = results["per_class"]["bottle"], results["per_class"]["cookie"]
    assert bottle["I-AUROC"] >= 0.98 and bottle["P-AUROC"] >= 0.95, results["per_class"]
    assert cookie["I-AUROC"] >= 0.96 and cookie["P-AUROC"] >= 0.95, results["per_class"]


def test_level_by_level_schedules_refuse_ddp_without_unused_parameters(make_config):
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DDPStrategy

    cfg = make_config(["method=rlr", "backbone=tf_efficientnet_lite0", "backbone.pretrained=false",
                       "backbone.weights_source=null", "data.image_size=128", "decoder.window_sizes=[5,3]",
                       *SMALL_DECODER, "method.optimization=shared_adam_legacy"])  # fmt: skip
    method, _ = build_components(cfg)
    method._trainer = SimpleNamespace(strategy=DDPStrategy())
    with pytest.raises(RuntimeError, match="ddp_find_unused_parameters_true"):
        method.on_fit_start()
    method._trainer = SimpleNamespace(strategy=DDPStrategy(find_unused_parameters=True))
    method.on_fit_start()  # allowed: DDP tolerates the idle level
