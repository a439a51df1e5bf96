"""Helpers of the reliability tests: tiny runs through the real entry points (in process and `python train.py`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
from PIL import Image

from helpers import TINY as SHARED_TINY

REPO_ROOT = Path(__file__).resolve().parents[2]

# The shared tiny run with a few more images (12 train, 3 + 4 test per class), deterministic algorithms and
# a log line every step.
TINY = [
    *SHARED_TINY,
    "data.options.num_train=12",
    "data.options.num_test_good=3",
    "data.options.num_test_defect=4",
    "trainer.deterministic=true",
    "trainer.log_every_n_steps=1",
]

RESULT_FILES = ("results.json", "metrics.csv", "metrics.md")


def train_command(overrides: list[str], run_dir: Path, cache: Path) -> list[str]:
    """``python train.py <overrides>`` writing into ``run_dir`` with a shared data cache."""
    return [
        sys.executable,
        str(REPO_ROOT / "train.py"),
        *overrides,
        f"hydra.run.dir={run_dir}",
        f"paths.cache_dir={cache}",
    ]


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a `python train.py` child: one thread (shared CI cores), no W&B network."""
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"})
    # Test-only callbacks (KillDuringEpoch) are importable by the child.
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(Path(__file__).parent), str(Path(__file__).parents[1]), env.get("PYTHONPATH")])
    )
    env.update(extra)
    return env


def run_train(overrides: list[str], run_dir: Path, cache: Path, timeout: float = 900, **env: str):
    """Runs `python train.py` to the end and returns the CompletedProcess (stdout and stderr captured)."""
    return subprocess.run(
        train_command(overrides, run_dir, cache),
        cwd=REPO_ROOT,
        env=subprocess_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
        # Its own process group: KillDuringEpoch kills that group, never the test runner.
        start_new_session=True,
    )


def metrics_of(run_dir: Path) -> dict:
    """The per-class and mean metrics of a finished run's results.json."""
    data = json.loads((run_dir / "results.json").read_text())
    return {"per_class": data["per_class"], "mean": data["mean"]}


def assert_no_results(run_dir: Path) -> None:
    """A failed run must not leave files that make it look finished."""
    left = [name for name in RESULT_FILES if (run_dir / name).exists()]
    assert not left, f"a failed run left {left} in {run_dir}"
    assert not (run_dir / "checkpoints" / "last.ckpt").exists()


def save_image(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    """Writes an image file (parents created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    (Image.fromarray(array, mode) if mode else Image.fromarray(array)).save(path)
    return path


def make_folder_dataset(root: Path, classes=("a", "b"), size: int = 32, n_train: int = 4) -> Path:
    """A small MVTec-layout dataset: textured normal images, a bright square as the defect."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        base = (rng.random((size, size, 3)) * 60 + 60 + 40 * c).astype(np.uint8)
        for i in range(n_train):
            save_image(root / name / "train" / "good" / f"{i:03d}.png", np.roll(base, i, axis=1))
        for i in range(2):
            save_image(root / name / "test" / "good" / f"{i:03d}.png", np.roll(base, i + 7, axis=0))
            image = base.copy()
            image[8:16, 8:16] = 255
            save_image(root / name / "test" / "crack" / f"{i:03d}.png", image)
            mask = np.zeros((size, size), np.uint8)
            mask[8:16, 8:16] = 255
            save_image(root / name / "ground_truth" / "crack" / f"{i:03d}_mask.png", mask)
    return root


class KillDuringEpoch(L.Callback):
    """Test-only callback: SIGKILLs the run's process group at a given batch of a given epoch.

    Injected into `python train.py` with ``+callbacks.kill._target_=reliability_helpers.KillDuringEpoch``
    (``PYTHONPATH`` includes this folder), so the kill lands mid-epoch deterministically however fast the
    machine is; SIGKILL cannot be caught, so the effect is the same as a kill from outside (or a node loss).

    Args:
        epoch: The epoch (0-based) in which to die; the checkpoint of the epoch before exists by then.
        batch: The batch index at whose start to die.
        phase: Only in this training phase (the method's ``phase`` attribute, e.g. CRR's ``stage2``).
    """

    def __init__(self, epoch: int = 1, batch: int = 1, phase: str | None = None) -> None:
        self.epoch, self.batch, self.phase = epoch, batch, phase

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if self.phase is not None and getattr(pl_module, "phase", None) != self.phase:
            return
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            os.killpg(os.getpgid(0), signal.SIGKILL)
