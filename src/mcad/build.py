"""Builds a run's method and data module from its config groups (shared by every entry point).

Each group builds one thing: ``backbone`` the frozen feature extractor (once), ``decoder`` the method's
decoder (a partial the method completes), ``loss`` the method's loss or a loss plug-in, ``synthesizer`` an
anomaly synthesizer, ``protocol`` the evaluation protocol, ``data`` the data module. The method then
declares what it (and its plug-in) needs from the data layer, and the data module receives that request,
merged with the backbone's normalisation, before anything is set up.
"""

from __future__ import annotations

import inspect
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig

from mcad.config import ConfigError
from mcad.data.datamodule import MultiClassDataModule
from mcad.data.requests import DataRequest
from mcad.methods.base import AnomalyModule

__all__ = ["build_components"]

# Groups whose object is handed to the method's constructor when the group is set.
_METHOD_PARTS = ("decoder", "loss", "synthesizer")


def _instantiate_optional(node: DictConfig | None) -> Any:
    if node is None or node.get("_target_") is None:
        return None
    # _convert_="all": plain lists and dicts reach the modules, so that no OmegaConf object (e.g. an
    # optimiser's betas) ends up in a checkpoint, which torch.load(weights_only=True) would refuse.
    return instantiate(node, _convert_="all")


def build_components(cfg: DictConfig) -> tuple[AnomalyModule, MultiClassDataModule]:
    """The method and the data module of a config (nothing is trained or loaded from a checkpoint).

    Raises:
        ConfigError: A group is set that the method does not take (e.g. a synthesizer for RD).
        ValueError: The method cannot be built on the backbone (both sides of the mismatch are named).
    """
    backbone = instantiate(cfg.backbone)
    datamodule: MultiClassDataModule = instantiate(cfg.data)
    accepted = inspect.signature(get_object(cfg.method._target_)).parameters
    parts: dict[str, Any] = {"backbone": backbone, "protocol": instantiate(cfg.protocol)}
    for group in _METHOD_PARTS:
        value = _instantiate_optional(cfg.get(group))
        if value is None:
            continue
        if group not in accepted:
            raise ConfigError(
                f"{cfg.method._target_} takes no {group}, but the {group} group is set to {cfg[group]._target_}: "
                f"drop it ({group}=none) or choose a method that uses one."
            )
        parts[group] = value
    try:
        method: AnomalyModule = instantiate(cfg.method, _convert_="all", **parts)
    except InstantiationException as err:
        # A method's build-time check (e.g. decoder widths vs backbone levels) raises ValueError; name the
        # backbone's side of the mismatch too, whichever method raised it.
        cause = err.__cause__
        if not isinstance(cause, ValueError):
            raise
        raise ValueError(
            f"Cannot build {cfg.method.get('_target_')} on backbone {cfg.backbone.get('model_name')} "
            f"(backbone.out_indices={list(getattr(backbone, 'out_indices', []))}: feature widths "
            f"{list(getattr(backbone, 'channels', []))}, strides {list(getattr(backbone, 'strides', []))}): {cause}"
        ) from cause
    normalization = DataRequest(normalization=(tuple(backbone.mean), tuple(backbone.std)))
    datamodule.configure(normalization.merge(method.data_request()))
    return method, datamodule
