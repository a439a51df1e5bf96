"""Refuses credentials in a config: they belong in the environment (``WANDB_API_KEY``)."""

from __future__ import annotations

import re
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mcad.config.validate import ConfigError

__all__ = ["refuse_secrets"]

# Config keys that would hold credentials; such values end up in results.json, .hydra/ and loggers.
_SECRET_KEY = re.compile(r"(^|_)(api_?key|password|secret|auth_?token|access_?token)$", re.IGNORECASE)


def refuse_secrets(cfg: DictConfig) -> None:
    """Refuses credentials in the config.

    The resolved config is saved into ``results.json``, ``.hydra/`` and every logger, so a key set there
    would leak. W&B reads its key from the environment (or ``~/.netrc``) by itself.

    Raises:
        ConfigError: A key named like a credential (``api_key``, ``password``, ``access_token`` ...) is set.
    """

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                where = f"{path}.{key}" if path else str(key)
                if _SECRET_KEY.search(str(key)) and value not in (None, ""):
                    raise ConfigError(
                        f"'{where}' looks like a credential: keys and tokens are read from the environment "
                        "only (e.g. WANDB_API_KEY), never from the config, which is saved with the results."
                    )
                walk(value, where)
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{path}[{i}]")

    walk(OmegaConf.to_container(cfg, resolve=False), "")
