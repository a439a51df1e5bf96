"""The config folder, start-up validation of composed configs, and the credential guard."""

from __future__ import annotations

import os
from pathlib import Path

from mcad.config.secrets import refuse_secrets
from mcad.config.validate import ConfigError, validate_config

__all__ = ["ConfigError", "config_dir", "refuse_secrets", "validate_config"]


def config_dir() -> str:
    """The ``conf/`` folder: ``$MCAD_CONFIG_DIR`` or the repository's (editable install)."""
    env = os.environ.get("MCAD_CONFIG_DIR")
    candidates = [Path(env)] if env else []
    candidates += [Path(__file__).resolve().parents[3] / "conf", Path.cwd() / "conf"]
    for path in candidates:
        if (path / "train.yaml").is_file():
            return str(path)
    raise FileNotFoundError(
        "Cannot find the config folder (conf/train.yaml). Install mcad in editable mode from its "
        "repository (pip install -e .) or set MCAD_CONFIG_DIR."
    )
