"""Deterministic weights and inputs that do not depend on how a model was built.

Parity checks compare our modules with the official code's: both sides must hold the same weights. A
model's own initialisation consumes the global RNG in construction order, so renaming or reordering
sub-modules (a refactor) would change every weight. :func:`seeded_init_` instead fills each tensor of the
state dict from its own generator, keyed by the run seed and the tensor's position among the tensors of
the same shape, so a fixture written once stays valid as long as the tensors themselves (shapes and
their relative order) are unchanged. The fill is scaled like a fan-in initialisation, so activations of
deep networks stay in a sane range.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import Tensor, nn

__all__ = ["seeded_fill", "seeded_images", "seeded_init_", "seeded_tensor"]


def seeded_tensor(shape: tuple[int, ...], seed: int, key: int = 0) -> Tensor:
    """A ``N(0, 1)`` float32 tensor that depends only on ``(shape, seed, key)``."""
    generator = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(key)) % 2**63)
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def seeded_fill(name: str, tensor: Tensor, seed: int, key: int) -> Tensor:
    """Seeded values for one tensor, scaled by its kind (the leaf of ``name``: weight, bias, running stats).

    Part of the fixture format: changing it invalidates ``tests/fixtures/parity``.
    """
    leaf = name.rsplit(".", 1)[-1]
    noise = seeded_tensor(tuple(tensor.shape), seed, key)
    if leaf == "num_batches_tracked" or not tensor.is_floating_point():
        return tensor.clone()
    if leaf == "running_var":
        return 1.0 + 0.1 * noise.abs()
    if leaf == "running_mean":
        return 0.1 * noise
    if tensor.dim() <= 1:
        # Norm scales near 1 (a zero scale would silence a branch), biases and 1-D parameters small.
        return 1.0 + 0.1 * noise if leaf == "weight" else 0.02 * noise
    fan_in = math.prod(tensor.shape[1:])
    return noise / math.sqrt(fan_in)


@torch.no_grad()
def seeded_init_(module: nn.Module, seed: int) -> nn.Module:
    """Overwrites every floating tensor of ``module.state_dict()`` with seeded values (in place).

    Tensors are keyed by their shape and their rank among the state-dict tensors of that shape, not by
    their names, so two implementations with the same tensors in the same relative order (or one
    implementation before and after a renaming) receive identical values.

    Args:
        module: Any module; parameters and buffers are overwritten, integer buffers kept.
        seed: Run seed.

    Returns:
        ``module`` itself.
    """
    rank_of_shape: dict[tuple[int, ...], int] = defaultdict(int)
    state = module.state_dict(keep_vars=True)
    for name, tensor in state.items():
        shape = tuple(tensor.shape)
        rank = rank_of_shape[shape]
        rank_of_shape[shape] += 1
        key = _shape_key(shape, rank)
        tensor.data.copy_(seeded_fill(name, tensor.data, seed, key).to(tensor.dtype))
    return module


def _shape_key(shape: tuple[int, ...], rank: int) -> int:
    # A stable integer for (shape, rank), spelt out so that fixtures do not depend on Python's hash().
    key = 17
    for dim in (*shape, -1, rank):
        key = (key * 1_000_033 + dim + 7) % 2**61
    return key


def seeded_images(seed: int, batch: int, size: int | tuple[int, int], smooth: int = 8) -> Tensor:
    """``(batch, 3, H, W)`` smooth random images, normalised like ImageNet inputs (about zero mean, unit std).

    Smooth structure (noise upsampled from a ``size / smooth`` grid) gives features with spatial
    correlation, closer to real images than white noise, so level-to-level differences show.
    """
    h, w = (size, size) if isinstance(size, int) else size
    coarse = seeded_tensor((batch, 3, max(1, h // smooth), max(1, w // smooth)), seed, key=991)
    fine = seeded_tensor((batch, 3, h, w), seed, key=992)
    up = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    return up + 0.25 * fine
