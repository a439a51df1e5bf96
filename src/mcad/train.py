"""Training entry point: ``python train.py method=rd data=mvtec ...`` (or ``mcad-train``).

Composes the config, validates it, builds data, method, loggers and trainer from their config
groups, trains, evaluates the last weights under the run's protocol, and writes ``results.json``,
``metrics.csv`` and ``metrics.md`` into the run directory.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from mcad.config.validate import validate_config
from mcad.evaluation.results import metrics_markdown, write_results

log = logging.getLogger(__name__)


def config_dir() -> str:
    """The ``conf/`` folder: ``$MCAD_CONFIG_DIR`` or the repository's (editable install)."""
    env = os.environ.get("MCAD_CONFIG_DIR")
    candidates = [Path(env)] if env else []
    candidates += [Path(__file__).resolve().parents[2] / "conf", Path.cwd() / "conf"]
    for path in candidates:
        if (path / "train.yaml").is_file():
            return str(path)
    raise FileNotFoundError(
        "Cannot find the config folder (conf/train.yaml). Install mcad in editable mode from its "
        "repository (pip install -e .) or set MCAD_CONFIG_DIR."
    )


def _instantiate_optional(node: DictConfig | None) -> Any:
    if node is None or node.get("_target_") is None:
        return None
    return instantiate(node)


def build_components(cfg: DictConfig) -> tuple[L.LightningModule, L.LightningDataModule]:
    """Builds the method and the datamodule from the config groups (no training)."""
    backbone = instantiate(cfg.backbone)
    datamodule = instantiate(cfg.data)
    if datamodule.mean is None or datamodule.std is None:
        datamodule.mean, datamodule.std = list(backbone.mean), list(backbone.std)
    synthesizer = _instantiate_optional(cfg.get("synthesizer"))
    if synthesizer is not None and getattr(synthesizer, "level", "image") == "image":
        datamodule.synthesizer = synthesizer
    method = instantiate(
        cfg.method,
        backbone=backbone,
        decoder=_instantiate_optional(cfg.get("decoder")),
        loss=_instantiate_optional(cfg.get("loss")),
        synthesizer=synthesizer,
        protocol=instantiate(cfg.protocol),
    )
    # A method (or its loss plug-in) may need extra views or a sampler from the data layer.
    configure_data = getattr(method, "configure_datamodule", None)
    if configure_data is not None:
        configure_data(datamodule)
    return method, datamodule


def _loggers(cfg: DictConfig) -> list:
    return [instantiate(node) for node in (cfg.get("logger") or {}).values() if node and node.get("_target_")]


def _callbacks(cfg: DictConfig) -> list:
    return [instantiate(node) for node in (cfg.get("callbacks") or {}).values() if node and node.get("_target_")]


def _resolve_ckpt(cfg: DictConfig) -> str | None:
    ckpt = cfg.get("ckpt_path")
    if ckpt == "last":
        path = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
        if not path.is_file():
            raise FileNotFoundError(f"ckpt_path=last but {path} does not exist (resume needs hydra.run.dir of that run).")
        return str(path)
    if ckpt and not Path(ckpt).is_file():
        raise FileNotFoundError(f"Checkpoint not found: {ckpt}")
    return ckpt


def count_flops(method: L.LightningModule, input_size: int) -> float | None:
    """FLOPs of the inference path (``anomaly_maps``) for one image, by ``torch.utils.flop_counter``."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = method.training
    method.eval()
    try:
        image = torch.zeros(1, 3, input_size, input_size, device=method.device)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            method.anomaly_maps(image)
        return float(counter.get_total_flops())
    except Exception as err:  # noqa: BLE001 - a counting failure must not lose a finished run
        log.warning("FLOP counting failed: %s", err)
        return None
    finally:
        method.train(was_training)


def method_name(cfg: DictConfig, method: L.LightningModule) -> str:
    """The ``method`` group option chosen for this run (``rd``, ``ccl_rd``...), else the class name."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return str(HydraConfig.get().runtime.choices["method"])
    except (ValueError, KeyError):
        return type(method).__name__


def train(cfg: DictConfig) -> dict[str, Any]:
    """Runs one experiment and returns its results dict (also written to the run directory)."""
    validate_config(cfg)
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    method, datamodule = build_components(cfg)
    callbacks = _callbacks(cfg)
    trainer: L.Trainer = instantiate(cfg.trainer, logger=_loggers(cfg) or False, callbacks=callbacks)
    for lg in trainer.loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    started = time.perf_counter()
    if cfg.get("train", True):
        trainer.fit(method, datamodule=datamodule, ckpt_path=_resolve_ckpt(cfg))
    train_seconds = time.perf_counter() - started
    if not cfg.get("test", True):
        return {}
    trainer.test(method, datamodule=datamodule, verbose=False)
    if not trainer.is_global_zero:
        return {}

    efficiency: dict[str, Any] = dict(method.parameter_counts())
    for cb in callbacks:
        efficiency.update(getattr(cb, "figures", {}) or {})
    efficiency.setdefault("train_wall_seconds", train_seconds)
    if cfg.get("count_flops", True):
        efficiency["flops_per_image"] = count_flops(method, datamodule.input_size)
        efficiency["flops_input_size"] = datamodule.input_size
    assert method.test_results is not None
    results = {
        "method": method_name(cfg, method),
        "data": datamodule.name,
        "classes": list(datamodule.class_names),
        "backbone": cfg.backbone.get("model_name"),
        "seed": cfg.seed,
        "protocol": method.protocol.to_dict(),
        "per_class": method.test_results["per_class"],
        "mean": method.test_results["mean"],
        "efficiency": efficiency,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    paths = write_results(output_dir, results)
    if cfg.get("print_table", True):
        print(f"\n{results['method']} on {results['data']} ({results['protocol']['name']} protocol), %:\n")
        print(metrics_markdown(results["per_class"], results["mean"]))
        print(f"Outputs in {output_dir}: {', '.join(p.name for p in paths.values())}, checkpoints/last.ckpt")
    return results


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns ``optimized_metric`` for sweepers."""
    results = train(cfg)
    value = (results.get("mean") or {}).get(cfg.get("optimized_metric", "mAD"))
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


if __name__ == "__main__":
    main()
