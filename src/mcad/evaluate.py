"""``mcad-eval ckpt_path=...``: re-evaluates a checkpoint without retraining, optionally under another protocol.

The run's own config is reused: ``<run>/.hydra/config.yaml`` (or the resolved ``config`` in
``<run>/results.json``), where ``<run>`` is the folder above the checkpoint's ``checkpoints/`` (or
``run_dir=``). On top of it:

* ``protocol=<option>`` replaces the protocol by a ``conf/protocol`` option (``protocol=dinomaly_gt0``:
  Dinomaly's gt > 0 binarisation, top-1 % mean score, 5×5 Gaussian), and ``protocol.<key>=...`` edits it;
* ``+set.<key>=<value>`` changes any key of the run's config (``+set.data.root=/data/mvtec``,
  ``+set.trainer.accelerator=cpu``, ``+set.data.eval_batch_size=8``);
* ``visualize=true`` writes the PNG overlays.

The evaluation then runs through :func:`mcad.train.train` with ``train=false`` (weights loaded with
``torch.load(weights_only=True)``), so the results files are the same as a training run's, written into this
command's own output folder (``outputs/eval/<date>/`` or ``hydra.run.dir=...``), never into the training run.
Backbone weights come from the checkpoint (nothing is downloaded).

The helpers :func:`find_run_dir`, :func:`load_run_config` and :func:`load_method` are shared by
``mcad-predict`` and ``mcad-export``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from mcad.train import build_components, config_dir, train

log = logging.getLogger(__name__)


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
        return OmegaConf.load(hydra_cfg), None
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
    cfg, old_output = _saved_config(Path(run_dir))
    container = OmegaConf.to_container(cfg, resolve=False)
    if old_output:
        container = _rebase(container, str(old_output), str(output_dir))
    cfg = OmegaConf.create(container)
    if protocol is not None:
        cfg.protocol = protocol
    if set_values:  # after the protocol option, so that +set.protocol.<key> edits the chosen protocol
        cfg = OmegaConf.merge(cfg, OmegaConf.create(OmegaConf.to_container(OmegaConf.create(set_values))))
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


def load_checkpoint_state(ckpt_path: str | Path) -> dict[str, torch.Tensor]:
    """The ``state_dict`` of a Lightning checkpoint, loaded with ``weights_only=True`` only."""
    path = Path(ckpt_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - UnpicklingError, RuntimeError ...
        raise RuntimeError(
            f"Refusing to load {path}: it does not load with torch.load(weights_only=True) ({type(err).__name__})."
        ) from err
    return state.get("state_dict", state)


def load_method(cfg: DictConfig, ckpt_path: str | Path) -> tuple[L.LightningModule, L.LightningDataModule]:
    """Builds the run's method and data module and loads the checkpoint's weights (eval mode, CPU)."""
    method, datamodule = build_components(cfg)
    method.load_state_dict(load_checkpoint_state(ckpt_path))
    method.eval()
    return method, datamodule


def run_choices(run_dir: str | Path) -> dict[str, Any]:
    """The run's config-group choices (``method: rd`` ...), from ``.hydra/hydra.yaml`` or ``results.json``."""
    run_dir = Path(run_dir)
    hydra_yaml = run_dir / ".hydra" / "hydra.yaml"
    if hydra_yaml.is_file():
        choices = OmegaConf.select(OmegaConf.load(hydra_yaml), "hydra.runtime.choices", default=None)
        if choices is not None:
            return dict(OmegaConf.to_container(choices))
    results = run_dir / "results.json"
    if results.is_file():
        method = json.loads(results.read_text()).get("method")
        if method:
            return {"method": method}
    return {}


def _set_hydra_choices(choices: dict[str, Any]) -> None:
    """Makes the run's group choices visible through ``HydraConfig`` (results' method name, W&B tags)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    hydra_node = HydraConfig.instance().cfg.hydra
    with read_write(hydra_node), open_dict(hydra_node):
        for key, value in choices.items():
            hydra_node.runtime.choices[key] = value


def output_dir_of(cfg: DictConfig) -> Path:
    """``output_dir`` of an entry-point config, else Hydra's run folder."""
    if cfg.get("output_dir"):
        return Path(cfg.output_dir)
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Re-evaluates ``cfg.ckpt_path`` (see the module docstring); returns the results dict."""
    ckpt = Path(cfg.ckpt_path).expanduser().resolve()
    if not ckpt.is_file():
        raise FileNotFoundError(f"Checkpoint not found: {ckpt}")
    run_dir = Path(cfg.run_dir).expanduser() if cfg.get("run_dir") else find_run_dir(ckpt)
    output_dir = output_dir_of(cfg)
    run_cfg = load_run_config(run_dir, output_dir, cfg.get("set"), cfg.get("protocol"))
    with open_dict(run_cfg):
        run_cfg.train = False
        run_cfg.test = True
        run_cfg.ckpt_path = str(ckpt)
        run_cfg.task_name = str(cfg.get("task_name", "eval"))
        run_cfg.visualize = bool(cfg.get("visualize", False))
        run_cfg.print_table = bool(cfg.get("print_table", True))
    choices = run_choices(run_dir)
    if cfg.get("protocol") is not None:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            choices["protocol"] = HydraConfig.get().runtime.choices.get("protocol", cfg.protocol.get("name"))
    _set_hydra_choices(choices)
    log.info("Evaluating %s (run %s) into %s.", ckpt, run_dir, output_dir)
    results = train(run_cfg)
    before = run_dir / "results.json"
    if results and before.is_file() and cfg.get("print_table", True):
        old = json.loads(before.read_text())
        names = [k for k in results["mean"] if k in (old.get("mean") or {})]
        print(f"Training run ({old.get('protocol', {}).get('name')} protocol) -> this evaluation "
              f"({results['protocol']['name']} protocol), mean over classes, %:")  # fmt: skip
        for name in names:
            a, b = old["mean"][name], results["mean"][name]
            fa = "–" if a is None else f"{100 * a:.1f}"
            fb = "–" if b is None or b != b else f"{100 * b:.1f}"
            print(f"  {name:8s} {fa:>6s} -> {fb:>6s}")
    return results


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="eval")
def main(cfg: DictConfig) -> None:
    """Console entry point ``mcad-eval``."""
    evaluate(cfg)


if __name__ == "__main__":
    main()
