"""What a method or a loss plug-in asks of the data layer, as one typed request.

A method (and its plug-in) never sets attributes of the data module. It declares its needs in a
:class:`DataRequest`; the training entry point merges the method's and the plug-in's requests and hands the
result to :meth:`~mcad.data.datamodule.MultiClassDataModule.configure` once, before any loader exists.
Everything a request can ask for is here:

* ``normalization``: the backbone's mean / std (unless the data config fixes them);
* ``synthesizer``: an image-level anomaly synthesizer; batches then carry ``synthetic_image`` /
  ``synthetic_mask`` (CRR);
* ``second_view``: an augmented second view of every training image, batch key ``image_aug`` (CCL);
* ``mixed_batches``: every training batch holds at least two contrast classes (CCL's negatives);
* ``pseudo_labels``: k-means pseudo classes of the training images, computed when the data module is set
  up (before any loader) and carried by every training sample as ``contrast_label`` instead of its class id.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from typing import Protocol, runtime_checkable

import numpy as np
from torch import Tensor, nn

__all__ = ["DataRequest", "FeatureExtractor", "ImageSynthesizer", "PseudoLabels", "SecondView"]


@runtime_checkable
class ImageSynthesizer(Protocol):
    """An image-level anomaly synthesizer: ``(uint8 H×W×3 image, rng) -> (image, mask in [0, 1])``."""

    level: str  # "image"

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]: ...


class FeatureExtractor(Protocol):
    """A frozen feature extractor: ``(B, 3, H, W) -> [(B, C_i, h_i, w_i), ...]`` with ImageNet-style stats."""

    mean: Sequence[float]
    std: Sequence[float]

    def __call__(self, images: Tensor) -> list[Tensor]: ...

    def to(self, device: str) -> nn.Module: ...


@dataclass(frozen=True)
class SecondView:
    """CCL's augmented second view (``image_aug``): RandomResizedCrop, flips, colour jitter, grey, blur, rotation.

    Attributes:
        crop_scale: RandomResizedCrop area range (official RD recipe 0.8-1.0; ViTAD+CCL 0.7-1.0).
        rotate_limit: Rotation range in degrees (RD recipe 15; ViTAD+CCL 30).
        blur_kernel: Gaussian-blur kernel (RD recipe 23).
        from_original: Cut the view from the decoded file at its own resolution (official) instead of the
            ``data.image_size`` image the clean view uses (cheaper: no second decode per item).
    """

    crop_scale: tuple[float, float] = (0.8, 1.0)
    rotate_limit: float = 15.0
    blur_kernel: int = 23
    from_original: bool = True


@dataclass(frozen=True)
class PseudoLabels:
    """k-means pseudo classes on the global features of a frozen extractor (CCL's ``label_source=kmeans``).

    Attributes:
        extractor: Builds the extractor; the global average pool of its last level is clustered
            (official: ImageNet ResNet-18 ``layer4``).
        name: The extractor's name (recorded, and part of the cache key).
        num_clusters: ``k``; ``None`` = the number of classes of the training set.
        seed: K-means ``random_state`` (official 0).
        n_init: K-means restarts (pinned: scikit-learn's default changed in 1.4).
        input_size: The images are resized (shorter side, PIL bilinear) and centre-cropped to this size, as
            the official ``Resize(256) + CenterCrop(256)``.
        cache_dir: Labels are cached under ``<cache_dir>/pseudo_labels``; ``None`` = no cache.
    """

    extractor: Callable[[], FeatureExtractor]
    name: str
    num_clusters: int | None = None
    seed: int = 0
    n_init: int = 10
    input_size: int = 256
    cache_dir: str | None = None


@dataclass(frozen=True)
class DataRequest:
    """Everything a method or plug-in needs from the data layer (see the module docstring)."""

    normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    synthesizer: ImageSynthesizer | None = None
    second_view: SecondView | None = None
    mixed_batches: bool = False
    pseudo_labels: PseudoLabels | None = None

    def merge(self, other: DataRequest) -> DataRequest:
        """Both requests at once; two different values for the same need are an error.

        Raises:
            ValueError: Naming the need that two parts of the run asked for differently.
        """
        merged = {}
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if f.name == "mixed_batches":
                merged[f.name] = mine or theirs
            elif mine is not None and theirs is not None and mine != theirs:
                raise ValueError(
                    f"Two parts of the run ask the data layer for different '{f.name}': {mine} vs {theirs}."
                )
            else:
                merged[f.name] = mine if mine is not None else theirs
        return replace(self, **merged)
