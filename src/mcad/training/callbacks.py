"""Lightning callbacks every training run carries: efficiency figures, exact resume, phase tags, NHWC.

* :class:`EfficiencyMonitor`: train wall time, images/s, peak memory (into ``results.json``);
* :class:`GlobalRNGState`, :class:`ResumeAtEpochBoundary`: a resumed run continues exactly like an
  uninterrupted one;
* :class:`PhaseTag`: every checkpoint records its training phase;
* :class:`ChannelsLast`: ``channels_last=true``.
"""

from __future__ import annotations

import random
import resource
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import psutil
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig

__all__ = [
    "ChannelsLast",
    "EfficiencyMonitor",
    "GlobalRNGState",
    "PhaseTag",
    "ResumeAtEpochBoundary",
    "run_callbacks",
]


def run_callbacks(cfg: DictConfig, phase: str | None = None) -> list[L.Callback]:
    """Fresh callbacks for one Trainer: the ``callbacks`` group, the workflow's, and the exact-resume pair.

    In a training phase the checkpoints go to ``checkpoints/<phase>/`` and record the phase.
    """
    from mcad.logging import workflow_callbacks

    callbacks = [instantiate(node) for node in (cfg.get("callbacks") or {}).values() if node and node.get("_target_")]
    # visualize=true -> PNG overlays; a W&B logger -> its dashboard panels; channels_last (mcad.logging).
    callbacks += workflow_callbacks(cfg, callbacks)
    callbacks += [GlobalRNGState(), ResumeAtEpochBoundary()]
    if phase is not None:
        for cb in callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.dirpath:
                cb.dirpath = str(Path(cb.dirpath) / phase)
        callbacks.append(PhaseTag(phase))
    return callbacks


def peak_host_memory_mb() -> float:
    """Peak resident set size of this process so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


class EfficiencyMonitor(L.Callback):
    """Measures train wall time, train and test images/s and peak memory.

    Train images/s counts the images of the training batches over the time of the training epochs
    (data loading included, validation excluded); test images/s likewise over the test loop.
    Per test image: ``test_seconds_per_image`` (the test loop's wall time over its images),
    ``test_tiles_per_image`` (the method's forward passes per image: the tiles of ``data.geometry=tile``,
    else 1) and ``test_geometry``; ``test_peak_gpu_memory_mb`` is the peak of the test loop alone (the
    statistics are reset when it starts), ``test_peak_rss_mb`` the largest resident memory seen after a test
    batch (a lower bound of the test loop's host peak), while ``peak_host_memory_mb`` is the process's peak
    so far.
    The figures are in ``self.figures`` and end up in ``results.json``.
    """

    def __init__(self) -> None:
        self.figures: dict[str, Any] = {}
        self._train_images = 0
        self._train_seconds = 0.0
        self._test_images = 0
        self._test_tiles = 0
        self._test_geometry: str | None = None
        self._test_rss = 0.0
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
        self._test_tiles = 0
        self._test_rss = 0.0
        if pl_module.device.type == "cuda":
            # Training's peak is already recorded (on_fit_end): the test loop's own peak is measured.
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        self._test_start = self._now(pl_module)

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:  # fmt: skip
        self._test_images += len(batch["image"])
        tiles = outputs.get("tiles") if isinstance(outputs, dict) else None
        self._test_tiles += int(tiles.sum()) if isinstance(tiles, torch.Tensor) else len(batch["image"])
        geometry = batch.get("geometry") if isinstance(batch, dict) else None
        self._test_geometry = str(geometry[0]) if geometry else "squash"
        self._test_rss = max(self._test_rss, psutil.Process().memory_info().rss / 2**20)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        seconds = self._now(pl_module) - self._test_start
        world = max(1, trainer.world_size)
        self.figures["test_seconds"] = seconds
        self.figures["test_images_per_second"] = self._test_images * world / seconds if seconds > 0 else None
        # Per-process figures: every rank tests its share in the same wall time.
        images = self._test_images
        self.figures["test_seconds_per_image"] = seconds / (images * world) if images else None
        self.figures["test_tiles_per_image"] = self._test_tiles / images if images else None
        self.figures["test_geometry"] = self._test_geometry
        self.figures["test_peak_rss_mb"] = self._test_rss or None
        if pl_module.device.type == "cuda":
            self.figures["test_peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated(pl_module.device) / 2**20
        self._record_memory(pl_module)

    def _record_memory(self, pl_module: L.LightningModule) -> None:
        self.figures["peak_host_memory_mb"] = peak_host_memory_mb()
        if pl_module.device.type == "cuda":
            # The statistics are reset when testing starts: keep the larger of the training and test peaks.
            peak = torch.cuda.max_memory_allocated(pl_module.device) / 2**20
            self.figures["peak_gpu_memory_mb"] = max(peak, self.figures.get("peak_gpu_memory_mb") or 0.0)


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


class PhaseTag(L.Callback):
    """Writes the training phase into every checkpoint, so that a resume knows which phase it continues."""

    def __init__(self, phase: str) -> None:
        self.phase = phase

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint["training_phase"] = self.phase


class GlobalRNGState(L.Callback):
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
        # legacy=True is NumPy's default, spelled out: the stubs type a bare call as the dict form.
        legacy = np.random.get_state(legacy=True)
        if not isinstance(legacy, tuple):  # the dict form: the global generator is not MT19937
            raise TypeError("NumPy's global random generator has no legacy (MT19937) state to save")
        kind, keys, pos, has_gauss, gauss = legacy
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


class ResumeAtEpochBoundary(L.Callback):
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
