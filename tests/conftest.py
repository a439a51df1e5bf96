"""Shared fixtures: Hydra composition through the compose API and small, fast data settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from omegaconf import DictConfig

from helpers import REAL_DATA, compose_config, threads

# Small synthetic runs: 4 classes x (12 train, 4 + 4 test) images at 128 px.
FAST_DATA = [
    "data=synthetic",
    "data.image_size=128",
    "data.batch_size=8",
    "data.eval_batch_size=16",
    "data.num_workers=0",
    "data.options.num_train=12",
    "data.options.num_test_good=4",
    "data.options.num_test_defect=4",
    "data.options.image_size=128",
    "trainer.enable_progress_bar=false",
    "print_table=false",
]


@pytest.fixture
def fast_data() -> list[str]:
    """Overrides for small, fast synthetic runs."""
    return list(FAST_DATA)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache (synthetic data, decoded images) for the whole session."""
    env = os.environ.get("MCAD_TEST_CACHE")
    return Path(env) if env else tmp_path_factory.mktemp("mcad-cache")


@pytest.fixture
def make_config(tmp_path: Path, cache_dir: Path):
    """``make_config(overrides) -> DictConfig`` writing into this test's tmp folder."""

    def _make(overrides: list[str], output_dir: Path | None = None) -> DictConfig:
        return compose_config(overrides, output_dir or tmp_path / "run", cache_dir)

    return _make


@pytest.fixture
def two_threads():
    """Two torch threads for the test (the CI machine's cores), restored afterwards."""
    with threads(2):
        yield


@pytest.fixture
def real_data_root() -> Path:
    """The real MVTec-layout images beside the repository; skipped when absent (a user's clone)."""
    if not (REAL_DATA / "bottle" / "train" / "good").is_dir():
        pytest.skip(f"real data not found at {REAL_DATA} (only present beside the project's CI checkout)")
    return REAL_DATA
