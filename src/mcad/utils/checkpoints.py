"""The one way this project reads a checkpoint or weights file: plain data only, one error type, one load.

Checkpoints are pickles; loading an untrusted one without ``weights_only`` can execute arbitrary code. Every
checkpoint, run checkpoint, official checkpoint and backbone weights file goes through :func:`load_checkpoint`
(``torch.load(weights_only=True)``, memory-mapped when the file allows it, so that reading one entry of a
large file does not read all of it) or, for ``.safetensors``, through safetensors. A refusal or a corrupt
file becomes one :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["CheckpointError", "load_checkpoint", "load_state_dict_file", "unwrap_state_dict"]


class CheckpointError(RuntimeError):
    """A checkpoint or weights file that is missing, refused (not plain data) or unreadable."""


def _numpy_scalar_globals() -> list[Any]:
    """NumPy scalars and dtypes, which official trainers save as metrics (e.g. RLR's best AUROC values).

    They rebuild a number from its bytes and run no code; allowed under both module names NumPy 1 and 2 use.
    """
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    scalar = core.multiarray.scalar
    allowed: list[Any] = [scalar, np.dtype, (scalar, "numpy.core.multiarray.scalar")]
    allowed.append((scalar, "numpy._core.multiarray.scalar"))
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        allowed += [getattr(dtypes, n) for n in ("Float64DType", "Float32DType", "Int64DType", "BoolDType")]
    return allowed


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Loads a torch checkpoint as plain data (tensors, containers, numbers, strings, NumPy scalars).

    Args:
        path: A file written by ``torch.save`` (Lightning checkpoints, ``.pth`` / ``.pt`` / ``.bin``).

    Returns:
        The loaded object (a dict for every format this project reads).

    Raises:
        CheckpointError: The file is missing, is not plain data (e.g. a crafted pickle), or is corrupt.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"Checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(_numpy_scalar_globals()):
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as err:
                if "mmap" not in str(err):
                    raise
                obj = torch.load(path, map_location="cpu", weights_only=True)  # a file without the zip layout
    except Exception as err:  # noqa: BLE001 - UnpicklingError, RuntimeError, EOFError ...
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CheckpointError(
            f"Refusing to load {path}: it does not load with torch.load(weights_only=True) "
            f"({type(err).__name__}: {first}). It may be corrupt, or a pickle that would run code; only use "
            "files written by this framework or from sources you trust (convert them to safetensors if needed)."
        ) from err
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} does not hold a checkpoint dict (found {type(obj).__name__}).")
    return obj


def unwrap_state_dict(obj: dict[str, Any], path: str | Path = "") -> dict[str, Tensor]:
    """The state dict inside a checkpoint dict (under ``state_dict`` / ``model`` / ``module``, or itself).

    Raises:
        CheckpointError: No dict of tensors is found.
    """
    for key in ("state_dict", "model", "module"):
        if key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    tensors = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if not tensors:
        raise CheckpointError(f"{path or 'The checkpoint'} holds no tensors (keys: {list(obj)[:5]}).")
    return tensors


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """A state dict from a local weights file: ``.safetensors`` or any torch file (unwrapped, plain data).

    Raises:
        CheckpointError: See :func:`load_checkpoint`.
    """
    path = Path(path).expanduser()
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise CheckpointError(f"Weights file not found: {path}")
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
            raise CheckpointError(f"Cannot read {path} as safetensors ({type(err).__name__}: {err}).") from err
    return unwrap_state_dict(load_checkpoint(path), path)
