"""Training entry point: ``python train.py method=rd data=mvtec ...`` (or ``mcad-train``).

Composes the config, validates it, builds data, method, loggers and trainer from their config groups,
trains (:func:`mcad.training.phases.fit`: one fit, or a method's phases in order), tests the last weights
under the run's protocol and writes the run's results (:func:`mcad.experiment.test_and_record`).
Evaluation only: ``train=false ckpt_path=PATH`` loads the checkpoint's weights and tests them.
"""

from __future__ import annotations

import math
import time
from typing import Any

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from mcad.build import build_components
from mcad.config import config_dir, refuse_secrets, validate_config
from mcad.experiment import test_and_record
from mcad.logging import finish_wandb, logger_settings
from mcad.runs import clear_failure, in_multirun, record_failure
from mcad.training.callbacks import run_callbacks
from mcad.training.phases import FitResult, fit, resolve_checkpoint, training_phases
from mcad.utils.checkpoints import load_checkpoint, unwrap_state_dict


def train(cfg: DictConfig) -> dict[str, Any]:
    """Runs one experiment and returns its results dict (also written to the run directory)."""
    validate_config(cfg)
    refuse_secrets(cfg)
    L.seed_everything(cfg.seed, workers=True)
    method, datamodule = build_components(cfg)
    loggers = [instantiate(node, **logger_settings(cfg, node)) for node in (cfg.get("logger") or {}).values()
               if node and node.get("_target_")]  # fmt: skip
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    phases = training_phases(method)
    ckpt = resolve_checkpoint(cfg.get("ckpt_path"), cfg.paths.output_dir, phases)

    started = time.perf_counter()
    if cfg.get("train", True):
        result = fit(cfg, method, datamodule, ckpt, loggers, callbacks=lambda phase: run_callbacks(cfg, phase))
    else:  # evaluation only: the checkpoint's weights, tested under this run's protocol
        if ckpt:
            method.load_state_dict(unwrap_state_dict(load_checkpoint(ckpt.path), ckpt.path))
        callbacks = run_callbacks(cfg)
        result = FitResult(instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks), callbacks)
    train_seconds = time.perf_counter() - started
    if not cfg.get("test", True):
        return {}
    return test_and_record(
        cfg, method, datamodule, result.trainer, result.callbacks, result.phase_figures, train_seconds,
        checkpoints=[f"checkpoints/{p.name}/last.ckpt" for p in phases] or ["checkpoints/last.ckpt"],
    )  # fmt: skip


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns ``optimized_metric`` for sweepers.

    A job of a multirun that raises writes ``failed.json`` (error type, message, traceback) into its
    directory and returns ``None``, so the sweep goes on and ``mcad-report`` marks the job as failed
    (Hydra's basic launcher would otherwise stop at the first exception). A single run still raises.
    """
    try:
        results = train(cfg)
    except Exception as err:
        if not in_multirun():
            raise
        from hydra.core.hydra_config import HydraConfig

        record_failure(HydraConfig.get().runtime.output_dir, err)
        return None
    if in_multirun():
        clear_failure(cfg.paths.output_dir)  # a stale record of an earlier attempt of this job
    finish_wandb()  # the next job of a sweep (same process) starts its own W&B run
    value = (results.get("mean") or {}).get(cfg.get("optimized_metric", "mAD"))
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


if __name__ == "__main__":
    main()
