"""Run folders: where a run's config and checkpoints are, its reuse by later commands, failure records.

A training run writes ``results.json`` into its folder (``outputs/<task>/<date>/`` or a multirun job's
folder), or ``failed.json`` when a job of a multirun raised (:func:`record_failure`), so the sweep goes on
and ``mcad-report`` marks the job. ``mcad-eval``, ``mcad-predict`` and ``mcad-export`` find a checkpoint's
run (:func:`find_run_dir`), reuse its config (:func:`load_run_config`) and rebuild its method with the
checkpoint's weights (:func:`load_trained_method`).
"""

from __future__ import annotations

import json
import logging
import os
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from mcad.utils.files import atomic_write_text

if TYPE_CHECKING:  # mcad-report reads failure records from here: no torch / lightning import at start-up
    from mcad.data.datamodule import MultiClassDataModule
    from mcad.methods.base import AnomalyModule

__all__ = [
    "FAILED_FILE",
    "RESULTS_FILE",
    "RunNotFoundError",
    "clear_failure",
    "find_run_dir",
    "in_multirun",
    "load_run_config",
    "load_trained_method",
    "output_dir_of",
    "record_failure",
    "run_choices",
    "set_hydra_choices",
]

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
FAILED_FILE = "failed.json"


# ----------------------------------------------------------------------------------------- failures
def in_multirun() -> bool:
    """Whether this process runs a job of a Hydra multirun (``-m``), by any launcher."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def record_failure(output_dir: str | Path, err: BaseException) -> Path:
    """Writes ``failed.json`` (error type, message, traceback, overrides) into a job's directory.

    Called by the training entry point when a job of a multirun raises, so that the sweep goes on and
    ``mcad-report`` shows the job as failed. Also ends an open W&B run with exit code 1, so that the next
    job of the sweep does not log into it.

    Returns:
        The path written.
    """
    overrides: list[str] = []
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task)
    except ValueError:  # no Hydra context (direct call)
        pass
    record = {
        "status": "failed",
        "error_type": type(err).__name__,
        "message": str(err),
        "traceback": "".join(traceback.format_exception(type(err), err, err.__traceback__)),
        "overrides": overrides,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    path = Path(output_dir) / FAILED_FILE
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")
    log.error("Job failed (%s: %s); recorded in %s. The sweep continues.", record["error_type"], err, path)
    log.error("%s", record["traceback"])
    from mcad.logging import finish_wandb

    finish_wandb(exit_code=1)
    return path


def clear_failure(output_dir: str | Path) -> None:
    """Removes a ``failed.json`` left by an earlier attempt of a job that has now succeeded."""
    (Path(output_dir) / FAILED_FILE).unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------- reuse
class RunNotFoundError(FileNotFoundError):
    """The training run of a checkpoint (its saved config) cannot be found."""


def find_run_dir(ckpt_path: str | Path) -> Path:
    """The run folder of a checkpoint: the closest parent holding ``.hydra/config.yaml`` or ``results.json``.

    Raises:
        RunNotFoundError: No such parent within four levels (pass ``run_dir=`` explicitly).
    """
    ckpt = Path(ckpt_path).expanduser().resolve()
    for parent in list(ckpt.parents)[:4]:
        if (parent / ".hydra" / "config.yaml").is_file() or (parent / "results.json").is_file():
            return parent
    raise RunNotFoundError(
        f"Cannot find the training run of {ckpt}: no parent folder holds .hydra/config.yaml or results.json. "
        "Pass run_dir=<the run's folder>."
    )


def _saved_config(run_dir: Path) -> tuple[DictConfig, str | None]:
    """The run's config and, if it was saved resolved, its original output folder."""
    hydra_cfg = run_dir / ".hydra" / "config.yaml"
    if hydra_cfg.is_file():
        loaded = OmegaConf.load(hydra_cfg)
        if not isinstance(loaded, DictConfig):
            raise TypeError(f"{hydra_cfg} holds a list, not a run config.")
        return loaded, None
    results = run_dir / "results.json"
    if results.is_file():
        config = json.loads(results.read_text()).get("config")
        if config:
            cfg = OmegaConf.create(config)
            return cfg, OmegaConf.select(cfg, "paths.output_dir", default=None)
    raise RunNotFoundError(f"{run_dir} has neither .hydra/config.yaml nor a results.json with its config.")


def _rebase(node: Any, old: str, new: str) -> Any:
    """Replaces the prefix ``old`` of every string in a container (a resolved config's output paths)."""
    if isinstance(node, dict):
        return {k: _rebase(v, old, new) for k, v in node.items()}
    if isinstance(node, list):
        return [_rebase(v, old, new) for v in node]
    if isinstance(node, str) and (node == old or node.startswith(old.rstrip("/") + "/")):
        return new + node[len(old.rstrip("/")) :]
    return node


def load_run_config(
    run_dir: str | Path,
    output_dir: str | Path,
    set_values: DictConfig | dict | None = None,
    protocol: DictConfig | None = None,
) -> DictConfig:
    """The training run's config, prepared to be used again.

    Args:
        run_dir: The training run's folder.
        output_dir: Where this command writes; every output path of the config points here.
        set_values: Nested values merged into the config (``+set.data.root=...``).
        protocol: A protocol node replacing the run's.

    Returns:
        The config, with ``paths.output_dir = output_dir`` and backbone weights not loaded at build time
        (they come from the checkpoint).
    """
    saved, old_output = _saved_config(Path(run_dir))
    container = OmegaConf.to_container(saved, resolve=False)
    if old_output:
        container = _rebase(container, str(old_output), str(output_dir))
    cfg = OmegaConf.create(container)
    assert isinstance(cfg, DictConfig)  # the container of a DictConfig is a dict
    if protocol is not None:
        cfg.protocol = protocol
    if set_values:  # after the protocol option, so that +set.protocol.<key> edits the chosen protocol
        merged = OmegaConf.merge(cfg, OmegaConf.create(OmegaConf.to_container(OmegaConf.create(set_values))))
        assert isinstance(merged, DictConfig)  # merging into a DictConfig keeps it one
        cfg = merged
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        root = OmegaConf.select(cfg, "paths.root_dir", throw_on_resolution_failure=False)
        if root is None:  # ${hydra:runtime.cwd} without a Hydra context
            cfg.paths.root_dir = os.getcwd()
        # The checkpoint holds the backbone's weights: no download, no local weights file needed.
        cfg.backbone.pretrained = False
        cfg.backbone.weights_path = None
        cfg.backbone.weights_source = None
    return cfg


def load_trained_method(cfg: DictConfig, ckpt_path: str | Path) -> tuple[AnomalyModule, MultiClassDataModule]:
    """Builds the run's method and data module and loads the checkpoint's weights (eval mode, CPU)."""
    # Imported here: mcad-report reads failure records from this module and must not import every method.
    from mcad.build import build_components
    from mcad.utils.checkpoints import load_checkpoint, unwrap_state_dict

    method, datamodule = build_components(cfg)
    method.load_state_dict(unwrap_state_dict(load_checkpoint(ckpt_path), ckpt_path))
    method.eval()
    return method, datamodule


def run_choices(run_dir: str | Path) -> dict[str, Any]:
    """The run's config-group choices (``method: rd`` ...), from ``.hydra/hydra.yaml`` or ``results.json``."""
    run_dir = Path(run_dir)
    hydra_yaml = run_dir / ".hydra" / "hydra.yaml"
    if hydra_yaml.is_file():
        choices = OmegaConf.select(OmegaConf.load(hydra_yaml), "hydra.runtime.choices", default=None)
        if choices is not None:
            container = OmegaConf.to_container(choices)
            if not isinstance(container, dict):
                raise TypeError(f"{hydra_yaml}: hydra.runtime.choices is not a mapping.")
            return {str(k): v for k, v in container.items()}
    results = run_dir / "results.json"
    if results.is_file():
        method = json.loads(results.read_text()).get("method")
        if method:
            return {"method": method}
    return {}


def set_hydra_choices(choices: dict[str, Any]) -> None:
    """Makes the run's group choices visible through ``HydraConfig`` (results' method name, W&B tags)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    # Hydra stores the whole config here as a DictConfig, although the attribute is annotated HydraConf.
    hydra_node = cast(DictConfig, HydraConfig.instance().cfg).hydra
    with read_write(hydra_node), open_dict(hydra_node):
        for key, value in choices.items():
            hydra_node.runtime.choices[key] = value


def output_dir_of(cfg: DictConfig) -> Path:
    """``output_dir`` of an entry-point config, else Hydra's run folder."""
    if cfg.get("output_dir"):
        return Path(cfg.output_dir)
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)
