"""Run outputs beyond the results files: PNG map overlays, W&B dashboards and their wiring.

* :class:`~mcad.logging.visualize.AnomalyMapVisualizer` (``visualize=true`` or ``callbacks=visualize``);
* :class:`~mcad.logging.wandb_panels.WandbPanels` (added whenever a W&B logger is configured);
* :class:`~mcad.logging.curves.CurveRecorder` (``callbacks=default``): ROC / PRO points into ``curves.json``;
* :func:`write_run_page`: the run's self-contained ``report.html`` (:mod:`mcad.reporting.html`);
* :func:`workflow_callbacks`, :func:`logger_settings`, :func:`publish_results`: the hooks
  :mod:`mcad.train` calls.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

__all__ = ["finish_wandb", "logger_settings", "publish_results", "workflow_callbacks", "write_run_page"]

log = logging.getLogger(__name__)


def workflow_callbacks(cfg: DictConfig, callbacks: list) -> list:
    """Callbacks the run needs beyond its ``callbacks`` group.

    * ``visualize=true``: an :class:`~mcad.logging.visualize.AnomalyMapVisualizer` writing into
      ``<output_dir>/visualizations`` (unless the callbacks group already has one, e.g. ``callbacks=visualize``
      with its own settings);
    * a W&B logger: :class:`~mcad.logging.wandb_panels.WandbPanels` (unless already present);
    * ``channels_last=true``: :class:`~mcad.training.callbacks.ChannelsLast` (unless already present).
    """
    from mcad.logging.visualize import AnomalyMapVisualizer
    from mcad.logging.wandb_panels import WandbPanels, is_wandb_node
    from mcad.training.callbacks import ChannelsLast

    extra: list = []
    if cfg.get("visualize") and not any(isinstance(cb, AnomalyMapVisualizer) for cb in callbacks):
        extra.append(AnomalyMapVisualizer(output_dir=str(Path(cfg.paths.output_dir) / "visualizations")))
    loggers = (cfg.get("logger") or {}).values()
    if any(is_wandb_node(node) for node in loggers) and not any(isinstance(cb, WandbPanels) for cb in callbacks):
        extra.append(WandbPanels())
    if cfg.get("channels_last") and not any(isinstance(cb, ChannelsLast) for cb in callbacks):
        extra.append(ChannelsLast())
    return extra


def logger_settings(cfg: DictConfig, node: DictConfig) -> dict[str, Any]:
    """Extra constructor arguments of a logger (W&B: group, tags, name, job type; others: none)."""
    from mcad.logging.wandb_panels import wandb_logger_settings

    return wandb_logger_settings(cfg, node)


def publish_results(trainer: Any, results: dict[str, Any]) -> None:
    """Hands the final results dict to every callback with an ``on_results(trainer, results)`` method."""
    for cb in getattr(trainer, "callbacks", []):
        hook = getattr(cb, "on_results", None)
        if callable(hook):
            hook(trainer, results)


def finish_wandb(exit_code: int = 0) -> None:
    """Ends the process's open W&B run, if any (no import of wandb when it was never used)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=exit_code)


def write_run_page(output_dir: str | Path) -> Path | None:
    """Writes ``<output_dir>/report.html`` (tables, curves, overlays; no network needed to open it).

    The page is a convenience: a failure to draw it is logged and never loses a finished run.
    """
    from mcad.reporting.html import write_run_html

    try:
        return write_run_html(output_dir)
    except Exception as err:  # noqa: BLE001 - the results files are already written
        log.warning("report.html not written: %s", err)
        return None
