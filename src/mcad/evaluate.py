"""``mcad-eval ckpt_path=...``: re-evaluates a checkpoint without retraining, optionally under another protocol.

The run's own config is reused: ``<run>/.hydra/config.yaml`` (or the resolved ``config`` in
``<run>/results.json``), where ``<run>`` is the folder above the checkpoint's ``checkpoints/`` (or
``run_dir=``). On top of it:

* ``protocol=<option>`` replaces the protocol by a ``conf/protocol`` option (``protocol=dinomaly_gt0``:
  Dinomaly's gt > 0 binarisation, top-1 % mean score, 5×5 Gaussian), and ``protocol.<key>=...`` edits it;
* ``+set.<key>=<value>`` changes any key of the run's config (``+set.data.root=/data/mvtec``,
  ``+set.trainer.accelerator=cpu``, ``+set.data.eval_batch_size=8``);
* ``visualize=true`` writes the PNG overlays.

The checkpoint's weights are loaded with ``torch.load(weights_only=True)`` and the method is tested by the
same code as after training (:func:`mcad.experiment.test_and_record`), so the results files are the same as
a training run's, written into this command's own output folder (``outputs/eval/<date>/`` or
``hydra.run.dir=...``), never into the training run.
Backbone weights come from the checkpoint (nothing is downloaded).

The run-folder helpers (:func:`mcad.runs.find_run_dir`, :func:`mcad.runs.load_run_config`) are shared
with ``mcad-predict`` and ``mcad-export``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from mcad.config import config_dir, validate_config
from mcad.experiment import test_and_record
from mcad.logging import finish_wandb, logger_settings
from mcad.runs import find_run_dir, load_run_config, load_trained_method, output_dir_of, run_choices, set_hydra_choices
from mcad.training.callbacks import run_callbacks

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Re-evaluates ``cfg.ckpt_path`` (see the module docstring); returns the results dict."""
    ckpt = Path(cfg.ckpt_path).expanduser().resolve()
    if not ckpt.is_file():
        raise FileNotFoundError(f"Checkpoint not found: {ckpt}")
    run_dir = Path(cfg.run_dir).expanduser() if cfg.get("run_dir") else find_run_dir(ckpt)
    output_dir = output_dir_of(cfg)
    run_cfg = load_run_config(run_dir, output_dir, cfg.get("set"), cfg.get("protocol"))
    with open_dict(run_cfg):
        run_cfg.ckpt_path = str(ckpt)
        run_cfg.task_name = str(cfg.get("task_name", "eval"))
        run_cfg.visualize = bool(cfg.get("visualize", False))
        run_cfg.print_table = bool(cfg.get("print_table", True))
    choices = run_choices(run_dir)
    if cfg.get("protocol") is not None:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            choices["protocol"] = HydraConfig.get().runtime.choices.get("protocol", cfg.protocol.get("name"))
    set_hydra_choices(choices)  # W&B tags name the run's method, data and protocol
    log.info("Evaluating %s (run %s) into %s.", ckpt, run_dir, output_dir)
    validate_config(run_cfg)
    L.seed_everything(run_cfg.seed, workers=True)
    method, datamodule = load_trained_method(run_cfg, ckpt)
    loggers = [instantiate(node, **logger_settings(run_cfg, node)) for node in (run_cfg.get("logger") or {}).values()
               if node and node.get("_target_")]  # fmt: skip
    callbacks = run_callbacks(run_cfg)
    trainer = instantiate(run_cfg.trainer, logger=loggers or False, callbacks=callbacks)
    results = test_and_record(run_cfg, method, datamodule, trainer, callbacks)
    finish_wandb()
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
