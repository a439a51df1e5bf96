"""Fault tolerance: a run killed with SIGKILL in the middle of an epoch resumes with `ckpt_path=last` and ends
with exactly the metrics of an uninterrupted run (same seed, CPU, deterministic mode)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch
from reliability_helpers import TINY, metrics_of, run_train

KILL = "+callbacks.kill._target_=reliability_helpers.KillDuringEpoch"


def _checkpoint(run_dir: Path, phase: str | None = None) -> dict:
    path = run_dir / "checkpoints" / (phase or "") / "last.ckpt"
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path, cache_dir):
    # Loader workers on: their RNG and the decoded cache must not change what a resumed run sees.
    overrides = [*TINY, "trainer.max_epochs=4", "data.num_workers=2"]
    full = tmp_path / "full"
    done = run_train(overrides, full, cache_dir)
    assert done.returncode == 0, done.stderr[-4000:]

    run = tmp_path / "killed"
    killed = run_train([*overrides, KILL, "+callbacks.kill.epoch=2", "+callbacks.kill.batch=1"], run, cache_dir)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-4000:]
    assert _checkpoint(run)["epoch"] == 1  # saved at the end of epoch 1; epoch 2 died after one step
    assert not (run / "results.json").exists()

    resumed = run_train([*overrides, "ckpt_path=last"], run, cache_dir)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert _checkpoint(run)["global_step"] == _checkpoint(full)["global_step"]
    assert metrics_of(run) == metrics_of(full)  # exactly equal, every class and metric


# A tiny two-phase CRR on Lite0 (tests/methods/test_crr_train.py's architecture) on the tiny synthetic data:
# stage I 6 steps (2 epochs of 3 batches), stage II 9 steps at batch 4 (6 batches per epoch).
CRR = [
    "method=crr",
    "backbone=tf_efficientnet_lite0",
    "data.crop_size=null",
    "decoder.embed_dim=64",
    "method.seg_head.base_width=8",
    "method.seg_head.num_stages=2",
    "method.seg_head.final_width=8",
    "method.seg_head.output_size=[64,64]",
    "method.hard_mining_ramp=10",
    "method.scheduler.warmup_steps=3",
    "method.stage1_steps=6",
    "method.stage2_steps=9",
    "method.stage2_batch_size=4",
    *[o for o in TINY if not o.startswith("experiment=")],
]


@pytest.fixture(scope="module")
def crr_full(tmp_path_factory, cache_dir):
    run = tmp_path_factory.mktemp("crr") / "full"
    done = run_train(CRR, run, cache_dir)
    assert done.returncode == 0, done.stderr[-4000:]
    return run


@pytest.mark.slow
@pytest.mark.parametrize("phase, epoch", [("stage1", 1), ("stage2", 1)])
def test_crr_killed_in_a_stage_resumes_that_stage(tmp_path, cache_dir, crr_full, phase, epoch):
    # CRR's random feature masking, dropout and Perlin anomalies must continue as in the uninterrupted run.
    run = tmp_path / "killed"
    kill = [KILL, f"+callbacks.kill.epoch={epoch}", "+callbacks.kill.batch=1", f"+callbacks.kill.phase={phase}"]
    killed = run_train([*CRR, *kill], run, cache_dir)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-4000:]
    assert _checkpoint(run, phase)["training_phase"] == phase
    stage1_before = _checkpoint(run, "stage1")

    resumed = run_train([*CRR, "ckpt_path=last"], run, cache_dir)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    log = resumed.stdout + resumed.stderr
    assert ("Training phase 'stage1'" in log) == (phase == "stage1")  # stage I is not redone after it ended
    assert "Training phase 'stage2'" in log
    for stage in ("stage1", "stage2"):
        assert _checkpoint(run, stage)["global_step"] == _checkpoint(crr_full, stage)["global_step"]
    if phase == "stage2":
        assert _checkpoint(run, "stage1")["global_step"] == stage1_before["global_step"]
    assert metrics_of(run) == metrics_of(crr_full)  # exactly equal
