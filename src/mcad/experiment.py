"""The end of every run that tests a method: test loop, results files, run page, printed table.

Shared by ``mcad-train`` (after training) and ``mcad-eval`` (a checkpoint re-evaluated), so that both write
the same ``results.json`` / ``metrics.csv`` / ``metrics.md`` / ``curves.json`` / ``report.html``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf

from mcad.data.datamodule import MultiClassDataModule
from mcad.evaluation.results import metrics_markdown, write_results
from mcad.logging import publish_results, write_run_page
from mcad.methods.base import AnomalyModule
from mcad.training.efficiency import efficiency_figures

__all__ = ["test_and_record"]


def test_and_record(
    cfg: DictConfig,
    method: AnomalyModule,
    datamodule: MultiClassDataModule,
    trainer: L.Trainer,
    callbacks: Sequence[L.Callback] = (),
    phase_figures: dict[str, Any] | None = None,
    train_seconds: float = 0.0,
    checkpoints: Sequence[str] = (),
) -> dict[str, Any]:
    """Tests the method under its protocol and writes the run's results (rank 0 only).

    Args:
        cfg: The run's config (saved into ``results.json``).
        method: The trained method.
        datamodule: Its data module.
        trainer: The trainer that tests (its callbacks record curves, overlays, efficiency).
        callbacks: Callbacks whose ``figures`` go into the efficiency record.
        phase_figures: Per-phase training figures of a multi-phase run.
        train_seconds: Wall time of training.
        checkpoints: Checkpoint files (relative to the run folder) to list with the outputs.

    Returns:
        The results dict (empty on other ranks).
    """
    output_dir = Path(cfg.paths.output_dir)
    trainer.test(method, datamodule=datamodule, verbose=False)
    if not trainer.is_global_zero:
        return {}
    assert method.test_results is not None
    flops_size = datamodule.input_size if cfg.get("count_flops", True) else None
    results: dict[str, Any] = {
        "method": str(cfg.get("method_name") or type(method).__name__),
        "data": datamodule.name,
        "classes": list(datamodule.class_names),
        "backbone": cfg.backbone.get("model_name"),
        "seed": cfg.seed,
        "protocol": method.protocol.to_dict(),
        "per_class": method.test_results["per_class"],
        "mean": method.test_results["mean"],
        "efficiency": efficiency_figures(method, callbacks, phase_figures or {}, train_seconds, flops_size),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    if datamodule.contrast_label_info is not None:  # CCL: category or pseudo labels, with their agreement
        results["class_labels"] = datamodule.contrast_label_info
    paths = write_results(output_dir, results)
    publish_results(trainer, results)  # e.g. W&B efficiency figures, then the W&B run ends
    write_run_page(output_dir)
    if cfg.get("print_table", True):
        print(f"\n{results['method']} on {results['data']} ({results['protocol']['name']} protocol), %:\n")
        print(metrics_markdown(results["per_class"], results["mean"]))
        # An evaluation-only run writes no checkpoint: list only what this run left.
        written = [c for c in checkpoints if (output_dir / c).is_file()]
        print(f"Outputs in {output_dir}: {', '.join([*(p.name for p in paths.values()), *written])}")
    return results
