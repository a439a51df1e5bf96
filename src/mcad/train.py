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
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from mcad.config.validate import validate_config
from mcad.evaluation.results import metrics_markdown, write_results
from mcad.logging import finish_wandb, logger_settings, publish_results, workflow_callbacks
from mcad.report import clear_failure, in_multirun, record_failure

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


# Config keys that would hold credentials; such values end up in results.json, .hydra/ and loggers.
_SECRET_KEY = re.compile(r"(^|_)(api_?key|password|secret|auth_?token|access_?token)$", re.IGNORECASE)


def refuse_secrets(cfg: DictConfig) -> None:
    """Refuses credentials in the config: they belong in the environment (``WANDB_API_KEY``).

    The resolved config is saved into ``results.json``, ``.hydra/`` and every logger, so a key set there
    would leak. W&B reads its key from the environment (or ``~/.netrc``) by itself.

    Raises:
        ConfigError: A key named like a credential (``api_key``, ``password``, ``access_token`` ...) is set.
    """
    from mcad.config.validate import ConfigError

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                where = f"{path}.{key}" if path else str(key)
                if _SECRET_KEY.search(str(key)) and value not in (None, ""):
                    raise ConfigError(
                        f"'{where}' looks like a credential: keys and tokens are read from the environment "
                        "only (e.g. WANDB_API_KEY), never from the config, which is saved with the results."
                    )
                walk(value, where)
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{path}[{i}]")

    walk(OmegaConf.to_container(cfg, resolve=False), "")


def _instantiate_optional(node: DictConfig | None) -> Any:
    if node is None or node.get("_target_") is None:
        return None
    return instantiate(node, _convert_="all")


def build_components(cfg: DictConfig) -> tuple[L.LightningModule, L.LightningDataModule]:
    """Builds the method and the datamodule from the config groups (no training)."""
    backbone = instantiate(cfg.backbone)
    datamodule = instantiate(cfg.data)
    if datamodule.mean is None or datamodule.std is None:
        datamodule.mean, datamodule.std = list(backbone.mean), list(backbone.std)
    synthesizer = _instantiate_optional(cfg.get("synthesizer"))
    if synthesizer is not None and getattr(synthesizer, "level", "image") == "image":
        datamodule.synthesizer = synthesizer
    try:
        # _convert_="all": plain lists and dicts reach the modules, so that no OmegaConf object (e.g. an
        # optimiser's betas) ends up in a checkpoint, which torch.load(weights_only=True) would refuse.
        method = instantiate(
            cfg.method,
            _convert_="all",
            backbone=backbone,
            decoder=_instantiate_optional(cfg.get("decoder")),
            loss=_instantiate_optional(cfg.get("loss")),
            synthesizer=synthesizer,
            protocol=instantiate(cfg.protocol),
        )
    except InstantiationException as err:
        # A method's build-time check (e.g. decoder widths vs backbone levels) raises ValueError; name the
        # backbone's side of the mismatch too, whichever method raised it.
        cause = err.__cause__
        if not isinstance(cause, ValueError):
            raise
        raise ValueError(
            f"Cannot build {cfg.method.get('_target_')} on backbone {cfg.backbone.get('model_name')} "
            f"(backbone.out_indices={list(getattr(backbone, 'out_indices', []))}: feature widths "
            f"{list(getattr(backbone, 'channels', []))}, strides {list(getattr(backbone, 'strides', []))}): {cause}"
        ) from cause
    # A method (or its loss plug-in) may need extra views or a sampler from the data layer.
    configure_data = getattr(method, "configure_datamodule", None)
    if configure_data is not None:
        configure_data(datamodule)
    return method, datamodule


def _loggers(cfg: DictConfig) -> list:
    # W&B runs get their sweep group, tags, name and job type (mcad.logging.wandb_panels).
    nodes = [node for node in (cfg.get("logger") or {}).values() if node and node.get("_target_")]
    return [instantiate(node, **logger_settings(cfg, node)) for node in nodes]


def _callbacks(cfg: DictConfig, phase: str | None = None) -> list:
    callbacks = [instantiate(node) for node in (cfg.get("callbacks") or {}).values() if node and node.get("_target_")]
    # visualize=true -> PNG overlays; a W&B logger -> its dashboard panels (mcad.logging).
    callbacks += workflow_callbacks(cfg, callbacks)
    callbacks += [_GlobalRNGState(), _ResumeAtEpochBoundary()]
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


class _GlobalRNGState(L.Callback):
    """Saves the global RNG states in every checkpoint and restores them when training resumes.

    Randomness drawn inside training steps (dropout, feature noise and masking, CCL's noise draw) comes
    from the global torch RNG (and NumPy's / Python's for some helpers). Lightning does not checkpoint
    these states, so a resumed run would re-seed them and diverge from an uninterrupted one. The states are
    captured when the checkpoint is written (end of an epoch) and put back at ``on_train_start``: the first
    hook after the training loader has been set up, with no random draw before the next training step in
    either run (the data pipeline has its own seeds, see :class:`mcad.data.datamodule.EpochSeededSampler`).
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        """Global RNG states as tensors and plain values (loadable with ``weights_only=True``)."""
        import random

        import numpy as np

        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state = {
            "torch": torch.get_rng_state(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "python": random.getstate(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keeps the loaded states until training starts."""
        self._pending = dict(state_dict)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Restores the states of a resumed run."""
        import random

        import numpy as np

        state, self._pending = self._pending, None
        if not state:
            return
        torch.set_rng_state(state["torch"])
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        python = state["python"]
        random.setstate((python[0], tuple(python[1]), python[2]))
        cuda = state.get("cuda")
        if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


class _ResumeAtEpochBoundary(L.Callback):
    """Makes a resume from an end-of-epoch checkpoint start the next epoch cleanly, also for ``max_steps`` runs.

    ``last.ckpt`` is written in ``on_train_epoch_end``, when Lightning has counted the epoch as processed but
    not yet as completed. For epoch-based training Lightning closes that gap itself on resume; for
    iteration-based training (``max_steps``, e.g. CRR's phases) it re-enters the finished epoch and draws
    one more batch from a new loader iterator, so the resumed run trains on other batches than an
    uninterrupted one. Closing the gap in the loaded loop state (epoch completed, batch counters of the new
    epoch at zero) gives both cases the state an uninterrupted run has when the next epoch starts.
    """

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        """Edits the checkpoint's loop state before Lightning restores the loops from it."""
        loop = (checkpoint.get("loops") or {}).get("fit_loop") or {}
        epochs, batches = loop.get("epoch_progress"), loop.get("epoch_loop.batch_progress")
        if not epochs or not batches:
            return
        total = epochs["total"]
        if not (total["ready"] == total["started"] == total["processed"] == total["completed"] + 1):
            return  # not saved between "processed" and "completed", i.e. not at an epoch's end
        for part in ("total", "current"):
            epochs[part]["completed"] = epochs[part]["processed"]
        batches["current"] = {key: 0 for key in batches["current"]}
        batches["is_last_batch"] = False


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
    if ckpt:
        _check_checkpoint(ckpt)
    return ckpt


class CheckpointError(RuntimeError):
    """A checkpoint that is refused or unreadable."""


def _check_checkpoint(path: str) -> None:
    """Checks that a checkpoint loads as plain data (``torch.load(weights_only=True)``) before any use.

    A checkpoint is a pickle; loading an untrusted one without ``weights_only`` can execute arbitrary code.
    Every load in this module uses ``weights_only=True``; this check turns a refusal into one clear error
    before anything is built around the file.

    Raises:
        CheckpointError: The file is not a plain-data checkpoint (e.g. a crafted pickle) or is corrupt.
    """
    try:
        try:
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            torch.load(path, map_location="cpu", weights_only=True)  # a file without the zip layout
    except Exception as err:  # noqa: BLE001 - UnpicklingError, RuntimeError, EOFError ...
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CheckpointError(
            f"Refusing to load checkpoint {path}: it does not load with torch.load(weights_only=True) "
            f"({type(err).__name__}: {first}). It may be corrupt, or a pickle that would run code; only use "
            "checkpoints written by this framework or from sources you trust."
        ) from err


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
        trainer.fit(method, datamodule=datamodule, ckpt_path=ckpt if name == names[start] else None, weights_only=True)
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
    refuse_secrets(cfg)
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
            trainer.fit(method, datamodule=datamodule, ckpt_path=ckpt, weights_only=True)
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
        flops = count_flops(method, datamodule.input_size)
        efficiency["flops_per_image"] = flops
        # Papers' "FLOPs" tables (MambaAD, ADer) count multiply-accumulates: 1 MAC = 2 FLOPs.
        efficiency["macs_per_image"] = flops / 2 if flops is not None else None
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
    publish_results(trainer, results)  # e.g. W&B efficiency figures, then the W&B run ends
    if cfg.get("print_table", True):
        print(f"\n{results['method']} on {results['data']} ({results['protocol']['name']} protocol), %:\n")
        print(metrics_markdown(results["per_class"], results["mean"]))
        candidates = [f"checkpoints/{p['name']}/last.ckpt" for p in phases] or ["checkpoints/last.ckpt"]
        # An evaluation-only run (train=false) writes no checkpoint: list only what this run left.
        written = [c for c in candidates if (Path(output_dir) / c).is_file()]
        print(f"Outputs in {output_dir}: {', '.join([*(p.name for p in paths.values()), *written])}")
    return results


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
