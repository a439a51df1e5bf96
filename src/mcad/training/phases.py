"""Fitting a method: in one ``trainer.fit``, or phase after phase for multi-phase methods (CRR).

A method that trains in several consecutive phases (CRR: reconstruction, then the segmentation head with the
reconstruction network frozen) defines ``training_phases()`` returning :class:`Phase` records and
``start_phase(name)``, which must put the method entirely into that phase (optimiser, frozen parts) without
relying on earlier phases having run in this process. Each phase then gets its own Trainer (the run's trainer
config updated with the phase's ``trainer`` entries, e.g. ``max_steps``), its ``data`` settings for its
duration only (e.g. a smaller batch) and its checkpoints in ``checkpoints/<name>/``; every checkpoint records
its phase (``training_phase``). ``ckpt_path`` resumes the phase its checkpoint belongs to and runs the
following ones; ``ckpt_path=last`` picks the latest phase that has a ``last.ckpt``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig

from mcad.data.datamodule import MultiClassDataModule
from mcad.methods.base import Phase
from mcad.utils.checkpoints import load_checkpoint

__all__ = ["FitResult", "Phase", "ResumePoint", "fit", "resolve_checkpoint", "training_phases"]

log = logging.getLogger(__name__)

#: ``callbacks(phase_name_or_None) -> list`` of fresh callbacks for one Trainer.
CallbackFactory = Callable[[str | None], list[L.Callback]]


@dataclass(frozen=True)
class ResumePoint:
    """A checkpoint to continue from: its path and the training phase it records (``None``: single phase)."""

    path: str
    phase: str | None = None


@dataclass
class FitResult:
    """What fitting left: the last trainer, its callbacks, and per-phase efficiency figures."""

    trainer: L.Trainer
    callbacks: list[L.Callback]
    phase_figures: dict[str, Any] = field(default_factory=dict)


def training_phases(method: L.LightningModule) -> list[Phase]:
    """The method's training phases; empty for single-phase methods."""
    phases = getattr(method, "training_phases", None)
    if not callable(phases):
        return []
    return list(phases())


def resolve_checkpoint(ckpt: str | None, output_dir: str | Path, phases: Sequence[Phase] = ()) -> ResumePoint | None:
    """The checkpoint to resume from: ``None``, a given path, or the run's latest ``last.ckpt`` (``last``).

    The file is opened once here (memory-mapped, plain data only), before anything is built around it, to
    refuse a crafted or corrupt file with one clear error and to read its phase tag.

    Raises:
        FileNotFoundError: ``last`` without a ``last.ckpt`` in the run folder.
        CheckpointError: The file is missing or does not load as plain data.
    """
    if not ckpt:
        return None
    if ckpt == "last":
        folder = Path(output_dir) / "checkpoints"
        candidates = [folder / p.name / "last.ckpt" for p in reversed(phases)] or [folder / "last.ckpt"]
        found = next((path for path in candidates if path.is_file()), None)
        if found is None:
            raise FileNotFoundError(
                f"ckpt_path=last but {candidates[0]} does not exist (resume needs hydra.run.dir of that run)."
            )
        ckpt = str(found)
    phase = load_checkpoint(ckpt).get("training_phase")
    return ResumePoint(str(ckpt), str(phase) if phase is not None else None)


def fit(
    cfg: DictConfig,
    method: L.LightningModule,
    datamodule: MultiClassDataModule,
    resume: ResumePoint | None,
    loggers: list[Any],
    callbacks: CallbackFactory,
) -> FitResult:
    """Trains the method: one fit, or its phases in order (from the checkpoint's phase when resuming).

    Lightning restores the checkpoint with ``weights_only=True``.

    Raises:
        ValueError: The checkpoint records a phase the method does not have.
    """
    phases = training_phases(method)
    ckpt = resume.path if resume is not None else None
    if not phases:
        run_callbacks = callbacks(None)
        trainer: L.Trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=run_callbacks)
        trainer.fit(method, datamodule=datamodule, ckpt_path=ckpt, weights_only=True)
        return FitResult(trainer, run_callbacks)
    names = [phase.name for phase in phases]
    start_phase = getattr(method, "start_phase", None)  # what a method with training_phases() also defines
    if not callable(start_phase):
        raise TypeError(f"{type(method).__name__} has training phases but no start_phase(name) method.")
    start = 0
    if resume is not None:
        if resume.phase not in names:
            raise ValueError(f"{ckpt} records training phase {resume.phase!r}, but this method's phases are {names}.")
        start = names.index(resume.phase)
    figures: dict[str, Any] = {}
    result: FitResult | None = None
    for phase in phases[start:]:
        with datamodule.phase_settings(**phase.data):
            start_phase(phase.name)
            phase_callbacks = callbacks(phase.name)
            trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=phase_callbacks, **phase.trainer)
            log.info("Training phase '%s' (%s).", phase.name, ", ".join(f"{k}={v}" for k, v in phase.trainer.items()))
            started = time.perf_counter()
            start_from = ckpt if phase.name == names[start] else None
            trainer.fit(method, datamodule=datamodule, ckpt_path=start_from, weights_only=True)
            figures[f"{phase.name}/train_seconds"] = time.perf_counter() - started
            for cb in phase_callbacks:
                done = getattr(cb, "figures", {}) or {}
                figures.update({f"{phase.name}/{k}": v for k, v in done.items() if k.startswith("train")})
        result = FitResult(trainer, phase_callbacks, figures)
    assert result is not None, "a resumed run with no phase left to train"
    return result
