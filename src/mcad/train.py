"""Training entry point: ``python train.py method=rd data=mvtec ...`` (or ``mcad-train``).

Composes the config, validates it, builds data, method, loggers and trainer from their config
groups, trains, evaluates the last weights under the run's protocol, and writes ``results.json``,
``metrics.csv`` and ``metrics.md`` into the run directory.

Training phases: a method that trains in several consecutive phases (CRR: reconstruction, then the
segmentation head with the reconstruction network frozen) defines ``training_phases()`` returning
``[{"name": str, "trainer": {Trainer kwargs}, "data": {datamodule attributes}}, ...]`` and
``start_phase(name)``, which must put the method entirely into that phase (optimiser, frozen parts)
without relying on earlier phases having run in this process. Each phase then gets its own Trainer
(the run's trainer config updated with the phase's ``trainer`` entries, e.g. ``max_steps``), its ``data``
entries are set on the datamodule for that phase only (e.g. a smaller batch), and its checkpoints go to
``checkpoints/<name>/``; every checkpoint records its phase (``training_phase``). ``ckpt_path`` resumes
the phase its checkpoint belongs to and runs the following ones; ``ckpt_path=last`` picks the latest
phase that has a ``last.ckpt``. A method without ``training_phases`` trains in one ``trainer.fit``.

Evaluation only: ``train=false ckpt_path=PATH`` loads the checkpoint's weights and tests them.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
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


def _callbacks(cfg: DictConfig, phase: str | None = None) -> list:
    callbacks = [instantiate(node) for node in (cfg.get("callbacks") or {}).values() if node and node.get("_target_")]
    if phase is not None:
        for cb in callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.dirpath:
                cb.dirpath = os.path.join(cb.dirpath, phase)
        callbacks.append(_PhaseTag(phase))
    return callbacks


class _PhaseTag(L.Callback):
    """Writes the training phase into every checkpoint, so that a resume knows which phase it continues."""

    def __init__(self, phase: str) -> None:
        self.phase = phase

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint["training_phase"] = self.phase


def _training_phases(method: L.LightningModule) -> list[dict[str, Any]]:
    """The method's training phases (see the module docstring); empty for single-phase methods."""
    phases = getattr(method, "training_phases", None)
    return list(phases()) if callable(phases) else []


def _resolve_ckpt(cfg: DictConfig, phases: Sequence[str] = ()) -> str | None:
    ckpt = cfg.get("ckpt_path")
    if ckpt == "last":
        folder = Path(cfg.paths.output_dir) / "checkpoints"
        candidates = [folder / name / "last.ckpt" for name in reversed(phases)] or [folder / "last.ckpt"]
        for path in candidates:
            if path.is_file():
                return str(path)
        raise FileNotFoundError(
            f"ckpt_path=last but {candidates[0]} does not exist (resume needs hydra.run.dir of that run)."
        )
    if ckpt and not Path(ckpt).is_file():
        raise FileNotFoundError(f"Checkpoint not found: {ckpt}")
    return ckpt


def _fit_phases(
    cfg: DictConfig,
    method: L.LightningModule,
    datamodule: L.LightningDataModule,
    phases: list[dict[str, Any]],
    ckpt: str | None,
    loggers: list,
) -> tuple[L.Trainer, list, dict[str, Any]]:
    """Runs the training phases in order (from the checkpoint's phase when resuming).

    Returns:
        The last phase's trainer and callbacks, and efficiency figures per phase (``<phase>/<figure>``).
    """
    names = [phase["name"] for phase in phases]
    start = 0
    if ckpt:
        tag = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True).get("training_phase")
        if tag not in names:
            raise ValueError(f"{ckpt} records training phase {tag!r}, but this method's phases are {names}.")
        start = names.index(tag)
    figures: dict[str, Any] = {}
    for phase in phases[start:]:
        name = phase["name"]
        data = dict(phase.get("data") or {})
        saved = {key: getattr(datamodule, key) for key in data}
        for key, value in data.items():
            setattr(datamodule, key, value)
        method.start_phase(name)
        callbacks = _callbacks(cfg, phase=name)
        overrides = dict(phase.get("trainer") or {})
        trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks, **overrides)
        log.info("Training phase '%s' (%s).", name, ", ".join(f"{k}={v}" for k, v in overrides.items()))
        started = time.perf_counter()
        trainer.fit(method, datamodule=datamodule, ckpt_path=ckpt if name == names[start] else None)
        figures[f"{name}/train_seconds"] = time.perf_counter() - started
        for cb in callbacks:
            done = getattr(cb, "figures", {}) or {}
            figures.update({f"{name}/{k}": v for k, v in done.items() if k.startswith("train")})
        for key, value in saved.items():
            setattr(datamodule, key, value)
    return trainer, callbacks, figures


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
    phases = _training_phases(method)
    callbacks = _callbacks(cfg)
    loggers = _loggers(cfg)
    trainer: L.Trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks)
    for lg in trainer.loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    started = time.perf_counter()
    ckpt = _resolve_ckpt(cfg, [phase["name"] for phase in phases])
    phase_figures: dict[str, Any] = {}
    if cfg.get("train", True):
        if phases:
            trainer, callbacks, phase_figures = _fit_phases(cfg, method, datamodule, phases, ckpt, loggers)
        else:
            trainer.fit(method, datamodule=datamodule, ckpt_path=ckpt)
    elif ckpt:
        # Evaluation only: the checkpoint's weights, tested under this run's protocol.
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        method.load_state_dict(state["state_dict"])
        log.info("Loaded the weights of %s (train=false).", ckpt)
    train_seconds = time.perf_counter() - started
    if not cfg.get("test", True):
        return {}
    trainer.test(method, datamodule=datamodule, verbose=False)
    if not trainer.is_global_zero:
        return {}

    efficiency: dict[str, Any] = dict(method.parameter_counts())
    for cb in callbacks:
        efficiency.update(getattr(cb, "figures", {}) or {})
    if phase_figures:
        # Whole-run training figures over all phases, plus each phase's own.
        images = [v for k, v in phase_figures.items() if k.endswith("/train_images") and v]
        rates = [v for k, v in phase_figures.items() if k.endswith("/train_images_per_second") and v]
        if images and len(images) == len(rates):
            efficiency["train_images"] = sum(images)
            efficiency["train_images_per_second"] = sum(images) / sum(n / r for n, r in zip(images, rates))
        efficiency["train_wall_seconds"] = train_seconds
        efficiency.update(phase_figures)
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
    # Method- or loss-plug-in-specific entries (e.g. CCL's pseudo-label agreement).
    results.update(getattr(method, "extra_results", dict)() or {})
    paths = write_results(output_dir, results)
    if cfg.get("print_table", True):
        print(f"\n{results['method']} on {results['data']} ({results['protocol']['name']} protocol), %:\n")
        print(metrics_markdown(results["per_class"], results["mean"]))
        ckpts = ", ".join(f"checkpoints/{p['name']}/last.ckpt" for p in phases) or "checkpoints/last.ckpt"
        print(f"Outputs in {output_dir}: {', '.join(p.name for p in paths.values())}, {ckpts}")
    return results


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns ``optimized_metric`` for sweepers."""
    results = train(cfg)
    value = (results.get("mean") or {}).get(cfg.get("optimized_metric", "mAD"))
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


if __name__ == "__main__":
    main()
