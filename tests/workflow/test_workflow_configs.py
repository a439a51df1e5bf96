"""The workflow's configs compose and validate: every job of every ablation sweep, HPO searches, launchers,
the eval / predict / export entry points."""

from pathlib import Path

import pytest
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from omegaconf import OmegaConf
from workflow_helpers import compose_entry

from mcad.config import config_dir
from mcad.config.validate import validate_config

CONF = Path(config_dir())
ABLATIONS = sorted(p.stem for p in (CONF / "experiment").glob("ablation_*.yaml"))
SEARCHES = sorted(p.stem for p in (CONF / "hparams_search").glob("*.yaml"))
METHODS = sorted(p.stem for p in (CONF / "method").glob("*.yaml"))


def _compose_train(overrides, tmp_path):
    return compose_entry("train", [*overrides, f"hydra.run.dir={tmp_path}"])


def test_every_method_has_an_ablation():
    for method in METHODS:
        prefix = "ablation_ccl_" if method == "ccl_rd" else f"ablation_{method}_"
        assert any(a.startswith(prefix) for a in ABLATIONS), method


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_every_job_of_an_ablation_sweep_validates(ablation, tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={ablation}"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert params and "seed" in params, "an ablation sweeps its option(s) and seeds"
    jobs = BasicSweeper.split_arguments(
        OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()]), None
    )[0]
    assert len(jobs) >= 4
    assert cfg.task_name == ablation and cfg.data.name in ("mvtec", "visa")
    for job in jobs:
        validate_config(_compose_train([f"experiment={ablation}", *job], tmp_path))


@pytest.mark.parametrize("search", SEARCHES)
def test_hparams_search_composes_with_its_method(search, tmp_path):
    method = search.removesuffix("_optuna")
    cfg = compose_entry("train", [f"hparams_search={search}", f"method={method}", f"hydra.run.dir={tmp_path}"])
    validate_config(cfg)
    from hydra.core.hydra_config import HydraConfig

    sweeper = HydraConfig.get().sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
    for key in sweeper.params:
        assert OmegaConf.select(cfg, key) is not None, key  # every searched key exists in the method's config


@pytest.mark.parametrize("launcher, target", [("slurm", "SlurmLauncher"), ("submitit_local", "LocalLauncher")])
def test_launchers_compose(launcher, target, tmp_path):
    compose_entry("train", [f"hydra/launcher={launcher}", f"hydra.run.dir={tmp_path}"])
    from hydra.core.hydra_config import HydraConfig

    assert HydraConfig.get().launcher._target_.endswith(target)


def test_ddp_trainer_multi_node_config(tmp_path):
    cfg = _compose_train(["trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"], tmp_path)
    validate_config(cfg)
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.num_nodes == 2


def test_callback_options_build(tmp_path):
    cfg = _compose_train(["callbacks=visualize", "logger=wandb"], tmp_path)
    validate_config(cfg)
    assert instantiate(cfg.callbacks.visualize).collector.select == "worst"
    cfg = _compose_train(["callbacks=wandb"], tmp_path)
    validate_config(cfg)
    assert {"model_checkpoint", "efficiency", "wandb_panels"} <= set(cfg.callbacks)


@pytest.mark.parametrize("entry", ["eval", "predict", "export"])
def test_entry_point_configs_compose(entry, tmp_path):
    overrides = ["ckpt_path=x.ckpt"] + (["input=in", f"output={tmp_path}"] if entry == "predict" else [])
    cfg = compose_entry(entry, overrides)
    assert cfg.task_name == entry and cfg.ckpt_path == "x.ckpt"
