"""Start-up validation of a composed config: misspelt keys and wrong types fail before any work.

Every node with a ``_target_`` is checked against the target's signature: a key the target does not
accept is an error naming the key, its path and the accepted keys; a value whose type contradicts a
simple annotation (int, float, bool, str, list, dict, optionals of these) is an error naming the key
and both types. Top-level keys are checked against :data:`TOP_LEVEL_KEYS`.
"""

from __future__ import annotations

import difflib
import inspect
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf

TOP_LEVEL_KEYS = {
    "task_name", "seed", "train", "test", "ckpt_path", "print_table", "optimized_metric",
    "method", "backbone", "decoder", "synthesizer", "loss", "protocol", "data", "trainer",
    "logger", "callbacks", "paths", "extras", "tags", "visualize", "count_flops",
    "channels_last", "method_name",
}  # fmt: skip
_HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}


class ConfigError(ValueError):
    """A config key or value that cannot work, found before any training."""


def _suggest(key: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, list(options), n=1)
    return f" Did you mean '{close[0]}'?" if close else ""


def _type_ok(value: Any, annotation: Any) -> bool:
    """Whether ``value`` fits a simple annotation; unknown annotations always pass."""
    if annotation is inspect.Parameter.empty or annotation is Any or value is None and _allows_none(annotation):
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        # NoneType is not an "unknown" annotation: without this, Optional[int] accepted any value.
        return any(_type_ok(value, a) for a in typing.get_args(annotation) if a is not type(None))
    target = origin or annotation
    if target is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if target is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if target is bool:
        return isinstance(value, bool)
    if target is str:
        return isinstance(value, str)
    if target in (list, tuple, Sequence, typing.Sequence):
        return isinstance(value, list | tuple | ListConfig)
    if target in (dict, Mapping, typing.Mapping):
        return isinstance(value, dict | DictConfig)
    return True


def _allows_none(annotation: Any) -> bool:
    return annotation is None or type(None) in typing.get_args(annotation)


def _check_target(node: DictConfig, path: str) -> None:
    target_name = node.get("_target_")
    if target_name is None:
        return
    try:
        target = get_object(target_name)
    except Exception as err:  # noqa: BLE001 - hydra raises several types
        raise ConfigError(f"{path}._target_: cannot import '{target_name}' ({err}).") from err
    func = target.__init__ if inspect.isclass(target) else target
    try:
        signature = inspect.signature(func)
        hints = typing.get_type_hints(func)
    except (TypeError, ValueError, NameError):
        return
    params = {k: p for k, p in signature.parameters.items() if k != "self"}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    for key in node:
        if key in _HYDRA_KEYS:
            continue
        if key not in params:
            raise ConfigError(
                f"Unknown key '{path}.{key!s}' for {target_name}.{_suggest(str(key), list(params))} "
                f"Accepted keys: {', '.join(params)}."
            )
        value = OmegaConf.to_object(node[key]) if OmegaConf.is_config(node[key]) else node[key]
        if isinstance(value, dict) and "_target_" in value:
            continue
        annotation = hints.get(key, params[key].annotation)
        if not _type_ok(value, annotation):
            raise ConfigError(
                f"Wrong type for '{path}.{key}': got {type(value).__name__} ({value!r}), "
                f"{target_name} expects {annotation}."
            )


def _walk(node: Any, path: str) -> None:
    if isinstance(node, DictConfig):
        _check_target(node, path)
        for key in node:
            _walk(node._get_node(key), f"{path}.{key!s}" if path else str(key))
    elif isinstance(node, ListConfig):
        for i, item in enumerate(node):
            _walk(item, f"{path}[{i}]")


def validate_config(cfg: DictConfig) -> None:
    """Checks top-level keys and every ``_target_`` node (values are resolved first).

    Raises:
        ConfigError: The first problem found, with the key's full path.
    """
    for key in cfg:
        if key not in TOP_LEVEL_KEYS and key != "hydra":
            raise ConfigError(f"Unknown top-level key '{key!s}'.{_suggest(str(key), sorted(TOP_LEVEL_KEYS))}")
    resolved = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    _walk(resolved, "")
