"""Efficiency figures of a run: parameters, FLOPs of the inference path, throughput and memory."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch

__all__ = ["count_flops", "efficiency_figures"]

log = logging.getLogger(__name__)


def count_flops(method: L.LightningModule, input_size: int) -> float | None:
    """FLOPs of the inference path (``anomaly_maps``) for one image, by ``torch.utils.flop_counter``."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = method.training
    method.eval()
    try:
        image = torch.zeros(1, 3, input_size, input_size, device=method.device)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            method.anomaly_maps(image)  # type: ignore[operator]
        return float(counter.get_total_flops())
    except Exception as err:  # noqa: BLE001 - a counting failure must not lose a finished run
        log.warning("FLOP counting failed: %s", err)
        return None
    finally:
        method.train(was_training)


def efficiency_figures(
    method: L.LightningModule,
    callbacks: Sequence[L.Callback],
    phase_figures: dict[str, Any],
    train_seconds: float,
    flops_input_size: int | None,
) -> dict[str, Any]:
    """Parameter counts, the callbacks' figures, whole-run training figures over phases, and FLOPs.

    Args:
        method: The trained method (``parameter_counts()``).
        callbacks: The last trainer's callbacks (those with a ``figures`` dict contribute).
        phase_figures: ``<phase>/<figure>`` entries of a multi-phase run (empty otherwise).
        train_seconds: Wall time of the whole training.
        flops_input_size: Input side for the FLOP count, or ``None`` to skip counting.
    """
    figures: dict[str, Any] = dict(method.parameter_counts())  # type: ignore[operator]
    for cb in callbacks:
        figures.update(getattr(cb, "figures", {}) or {})
    if phase_figures:
        images = [v for k, v in phase_figures.items() if k.endswith("/train_images") and v]
        rates = [v for k, v in phase_figures.items() if k.endswith("/train_images_per_second") and v]
        if images and len(images) == len(rates):
            figures["train_images"] = sum(images)
            figures["train_images_per_second"] = sum(images) / sum(n / r for n, r in zip(images, rates))
        figures["train_wall_seconds"] = train_seconds
        figures.update(phase_figures)
    figures.setdefault("train_wall_seconds", train_seconds)
    if flops_input_size is not None:
        flops = count_flops(method, flops_input_size)
        figures["flops_per_image"] = flops
        # Papers' "FLOPs" tables (MambaAD, ADer) count multiply-accumulates: 1 MAC = 2 FLOPs.
        figures["macs_per_image"] = flops / 2 if flops is not None else None
        figures["flops_input_size"] = flops_input_size
    return figures
