"""Fixtures of the workflow tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from workflow_helpers import TINY, compose_config

from mcad.train import train


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> tuple[Path, dict[str, Any]]:
    """One tiny trained RD run shared by the eval / predict / export tests: ``(run dir, results)``."""
    run = tmp_path_factory.mktemp("tiny-rd") / "run"
    results = train(compose_config(["method=rd", *TINY], run, cache_dir))
    return run, results
