"""Helpers shared by every test folder: one compose helper, one tiny-run override list, thread limits.

Importable as ``helpers`` from any test module (``tests/`` is on ``sys.path`` through the root conftest).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from mcad.config import config_dir

REPO_ROOT = Path(__file__).resolve().parents[2]
REAL_DATA = REPO_ROOT.parent / "shared" / "data" / "real"

# The smallest runs that still exercise everything: 2 classes x (8 train, 2 + 2 test) images at 64 px,
# a randomly initialised Lite0 (no weights needed), one epoch, evaluation at 64 px.
TINY = [
    "data=synthetic",
    "data.image_size=64",
    "data.batch_size=8",
    "data.eval_batch_size=16",
    "data.num_workers=0",
    "data.classes=[stripes,disk]",
    "data.options.num_train=8",
    "data.options.num_test_good=2",
    "data.options.num_test_defect=2",
    "data.options.image_size=64",
    "protocol.eval_size=64",
    "backbone=tf_efficientnet_lite0",
    "backbone.pretrained=false",
    "backbone.weights_source=null",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
    "print_table=false",
    "count_flops=false",
]


def compose_entry(
    config_name: str, overrides: list[str], output_dir: Path | None = None, cache: Path | None = None
) -> DictConfig:
    """Composes an entry point's config (``train``, ``eval``, ``predict``, ``export``) as its command line would.

    Hydra's context is set (``HydraConfig``), the ``hydra`` node removed; with ``cache`` the run's paths
    point into ``output_dir`` and the shared cache, as a test run needs.
    """
    GlobalHydra.instance().clear()
    extra = [f"hydra.run.dir={output_dir}"] if output_dir is not None else []
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=[*overrides, *extra], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg.hydra
        if cache is not None and output_dir is not None:
            cfg.paths.root_dir = str(REPO_ROOT)
            cfg.paths.output_dir = str(output_dir)
            cfg.paths.cache_dir = str(cache)
    return cfg


def compose_config(overrides: list[str], output_dir: Path, cache: Path) -> DictConfig:
    """``train.yaml`` with the run's paths in tmp folders."""
    return compose_entry("train", overrides, output_dir, cache)


@contextlib.contextmanager
def threads(count: int) -> Iterator[None]:
    """Limits torch's intra-op threads (the CI machine has two cores) and restores the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
