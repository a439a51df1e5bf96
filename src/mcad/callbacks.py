"""Lightning callbacks shared by every run."""

from __future__ import annotations

import resource
import sys
import time
from typing import Any

import lightning as L
import torch


def peak_host_memory_mb() -> float:
    """Peak resident set size of this process so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


class EfficiencyMonitor(L.Callback):
    """Measures train wall time, train and test images/s and peak memory.

    Train images/s counts the images of the training batches over the time of the training epochs
    (data loading included, validation excluded); test images/s likewise over the test loop.
    The figures are in ``self.figures`` and end up in ``results.json``.
    """

    def __init__(self) -> None:
        self.figures: dict[str, Any] = {}
        self._train_images = 0
        self._train_seconds = 0.0
        self._test_images = 0
        self._epoch_start: float | None = None

    @staticmethod
    def _now(pl_module: L.LightningModule) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_start = time.perf_counter()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_start = self._now(pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        self._train_images += len(batch["image"])

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A run resumed from an end-of-epoch checkpoint finishes that epoch's end without starting it.
        if self._epoch_start is not None:
            self._train_seconds += self._now(pl_module) - self._epoch_start
        self._epoch_start = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        world = max(1, trainer.world_size)
        self.figures["train_wall_seconds"] = time.perf_counter() - self._fit_start
        self.figures["train_images"] = self._train_images * world
        self.figures["train_images_per_second"] = (
            self._train_images * world / self._train_seconds if self._train_seconds > 0 else None
        )
        self._record_memory(pl_module)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._test_images = 0
        self._test_start = self._now(pl_module)

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:  # fmt: skip
        self._test_images += len(batch["image"])

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        seconds = self._now(pl_module) - self._test_start
        world = max(1, trainer.world_size)
        self.figures["test_seconds"] = seconds
        self.figures["test_images_per_second"] = self._test_images * world / seconds if seconds > 0 else None
        self._record_memory(pl_module)

    def _record_memory(self, pl_module: L.LightningModule) -> None:
        self.figures["peak_host_memory_mb"] = peak_host_memory_mb()
        if pl_module.device.type == "cuda":
            self.figures["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated(pl_module.device) / 2**20


class ChannelsLast(L.Callback):
    """Keeps the module's 4-D weights in channels-last (NHWC) memory format for training and inference.

    Convolutions on tensor cores (bf16/fp16 on recent NVIDIA GPUs) run on NHWC; with NCHW weights and
    activations cuDNN transposes around every convolution. A convolution with channels-last weights
    returns channels-last activations, so converting the weights is enough. Enabled by ``channels_last=true``
    (off by default: it changes speed only, and on CPU it rarely helps).
    """

    @staticmethod
    def _convert(pl_module: L.LightningModule) -> None:
        pl_module.to(memory_format=torch.channels_last)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._convert(pl_module)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._convert(pl_module)

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._convert(pl_module)
