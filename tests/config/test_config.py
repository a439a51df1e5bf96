from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import open_dict

from mcad.config import config_dir
from mcad.config.validate import ConfigError, validate_config

CONF = Path(config_dir())
METHODS = sorted(p.stem for p in (CONF / "method").glob("*.yaml"))
DATASETS = sorted(p.stem for p in (CONF / "data").glob("*.yaml"))
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml") if not p.stem.startswith("ablation_"))


@pytest.mark.parametrize("data", DATASETS)
@pytest.mark.parametrize("method", METHODS)
def test_every_method_data_pair_composes_and_validates(make_config, method, data):
    overrides = [f"method={method}", f"data={data}"]
    if data == "folder":
        overrides.append("data.root=/some/where")
    cfg = make_config(overrides)
    validate_config(cfg)
    assert cfg.method._target_.startswith("mcad.methods.")
    assert cfg.backbone._target_ == "mcad.models.backbones.TimmBackbone"
    assert cfg.protocol._target_ == "mcad.evaluation.protocol.EvalProtocol"
    protocol = instantiate(cfg.protocol)
    assert protocol.eval_size == 256


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_validates(make_config, experiment):
    cfg = make_config([f"experiment={experiment}"])
    validate_config(cfg)


def test_method_selects_its_defaults_and_command_line_overrides_them(make_config):
    cfg = make_config(["method=rd"])
    assert cfg.backbone.model_name == "wide_resnet50_2.racm_in1k"
    assert cfg.decoder._target_.endswith("DeResNetDecoder")
    assert cfg.trainer.gradient_clip_val == 5.0
    cfg = make_config(["method=rd", "backbone=tf_efficientnet_lite0"])
    assert cfg.backbone.model_name == "tf_efficientnet_lite0"
    assert list(cfg.backbone.out_indices) == [1, 2, 3]


def test_misspelt_key_in_a_config_fails_with_its_name(make_config):
    cfg = make_config(["method=rd"])
    with open_dict(cfg):
        cfg.method.optimizer.lrr = 0.1
    with pytest.raises(ConfigError, match=r"method\.optimizer\.lrr.*Did you mean 'lr'"):
        validate_config(cfg)


def test_wrong_type_fails_with_key_and_types(make_config):
    with pytest.raises(ConfigError, match=r"data\.batch_size.*int"):
        validate_config(make_config(["data.batch_size=sixteen"]))
    with pytest.raises(ConfigError, match=r"protocol\.smooth_for_pixel"):
        validate_config(make_config(["protocol.smooth_for_pixel=maybe"]))


def test_unknown_group_option_and_unknown_override_key_fail(make_config):
    with pytest.raises(ConfigCompositionException, match="foo"):
        make_config(["method=foo"])
    with pytest.raises(ConfigCompositionException, match="batch_sizee"):
        make_config(["data.batch_sizee=3"])
