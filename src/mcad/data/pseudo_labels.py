"""Pseudo-class labels for CCL (``ccl.label_source: kmeans``; spec §3.7, §7 A-CCL3, §9 E-CCL3).

The first official CCL code (LGC-AD/AD-LGC v1 204b215, ``data/ad_dataset.py::DefaultAD.get_label_dict``,
commented out there) replaces the category label by a K-means cluster id computed on ImageNet ResNet-18
global-average-pooled features (512-d; Resize 256 + CenterCrop 256 + ImageNet normalisation) with
``KMeans(n_clusters=15, random_state=0)``. We use k = number of classes (E-CCL3) and a fixed ``n_init``.

Typical use::

    backbone = timm.create_model("resnet18", pretrained=True, features_only=True, out_indices=[4])
    key = cache_key("resnet18.tv_in1k", 256, k, seed, sorted_image_paths)
    labels = cached_pseudo_labels(
        cache_dir / f"pseudo_{key[:16]}.npz",
        lambda: kmeans_pseudo_labels(extract_global_features(backbone, loader), k, seed),
        key=key,
    )
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from mcad.utils.files import atomic_write

__all__ = [
    "kmeans_pseudo_labels",
    "adjusted_rand_index",
    "extract_global_features",
    "cached_pseudo_labels",
    "cache_key",
]


def kmeans_pseudo_labels(features: np.ndarray, k: int, seed: int = 0, n_init: int = 10) -> np.ndarray:
    """Cluster (N, D) features into ``k`` pseudo classes with scikit-learn K-means.

    Args:
        features: (N, D) float array (e.g. GAP features of every training image, in dataset order).
        k: Number of clusters (= number of categories of the dataset, e.g. 15 MVTec AD / 12 VisA).
        seed: ``random_state`` (official: 0).
        n_init: Number of k-means++ restarts. Fixed explicitly because scikit-learn changed its default
            (10 before 1.4, ``"auto"`` = 1 for k-means++ since); 10 = the default when the official code
            was written and more robust.

    Returns:
        (N,) int64 cluster ids in ``[0, k)``.
    """
    from sklearn.cluster import KMeans  # local import: scikit-learn is only needed for pseudo labels

    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {x.shape}")
    if not 1 <= k <= x.shape[0]:
        raise ValueError(f"k must be in [1, N={x.shape[0]}], got {k}")
    km = KMeans(n_clusters=k, n_init=n_init, random_state=seed)
    return km.fit_predict(x).astype(np.int64)


def adjusted_rand_index(true: np.ndarray | list[int], pred: np.ndarray | list[int]) -> float:
    """Adjusted Rand index between two labelings (scikit-learn); 1 = identical partitions, ~0 = random."""
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(np.asarray(true).ravel(), np.asarray(pred).ravel()))


def _batch_images(item: Any, image_key: str) -> Tensor:
    if isinstance(item, Tensor):
        return item
    if isinstance(item, Mapping):
        return item[image_key]
    if isinstance(item, (tuple, list)):
        return item[0]
    raise TypeError(f"cannot find an image batch in an item of type {type(item).__name__}")


@torch.no_grad()
def extract_global_features(
    backbone: nn.Module,
    images_iterable: Iterable[Any],
    device: torch.device | str | None = None,
    image_key: str = "image",
) -> np.ndarray:
    """Global-average-pooled features of the LAST level returned by ``backbone(images) -> list[Tensor]``.

    The backbone is put in eval mode for the extraction (BatchNorm running stats, no dropout) and its
    previous mode is restored afterwards. For the official recipe pass a ResNet-18 feature extractor whose
    last returned level is ``layer4`` (e.g. timm ``features_only=True, out_indices=[4]``) and images
    resized/cropped to 256 with ImageNet normalisation.

    Args:
        backbone: Module returning a list (or tuple) of (B, C, h, w) maps; a single tensor is accepted too.
        images_iterable: Iterable of image batches: a (B, 3, H, W) tensor, a tuple/list whose first element
            is that tensor, or a mapping holding it under ``image_key`` (e.g. a DataLoader).
        device: Device to run on; default = device of the backbone's first parameter (CPU if none).
        image_key: Key of the image batch for mapping items.

    Returns:
        (N, C_last) float32 array in iteration order.
    """
    if device is None:
        first = next(backbone.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    was_training = backbone.training
    backbone.eval()
    feats: list[np.ndarray] = []
    try:
        for item in images_iterable:
            images = _batch_images(item, image_key).to(device)
            out = backbone(images)
            last = out if isinstance(out, Tensor) else out[-1]
            pooled = last.float().mean(dim=(-2, -1)) if last.dim() == 4 else last.float().flatten(1)
            feats.append(pooled.cpu().numpy())
    finally:
        backbone.train(was_training)
    if not feats:
        raise ValueError("images_iterable yielded no batches")
    return np.concatenate(feats, axis=0).astype(np.float32)


def cache_key(*parts: Any) -> str:
    """SHA-256 hex digest of JSON-serialisable ``parts`` (use for everything the labels depend on).

    E.g. backbone/weights tag, input size, k, seed, n_init and the ordered list of image paths. Non-JSON
    objects are stringified with ``str`` — do not pass numpy arrays (their ``str`` is truncated).
    """
    payload = json.dumps(list(parts), sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def cached_pseudo_labels(
    cache_path: str | os.PathLike[str],
    compute_fn: Callable[[], np.ndarray],
    key: str | None = None,
) -> np.ndarray:
    """Load pseudo labels from an ``.npz`` cache, or compute and store them.

    The file holds ``labels`` and ``key``. With ``key`` given (e.g. from :func:`cache_key`) a cached file is
    used only if its stored key matches; otherwise it is recomputed and overwritten. With ``key=None`` any
    existing file is trusted (the caller encodes the hash in ``cache_path``). Writes are atomic (temporary
    file + ``os.replace``), so concurrent runs never read a half-written cache.

    Args:
        cache_path: Path of the ``.npz`` file (parent directories are created).
        compute_fn: Zero-argument callable returning the (N,) integer labels.
        key: Hash identifying the inputs of ``compute_fn``.

    Returns:
        (N,) int64 labels.
    """
    path = Path(cache_path)
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as data:
                stored_key = str(data["key"]) if "key" in data.files else ""
                if key is None or stored_key == key:
                    return data["labels"].astype(np.int64)
        except (OSError, ValueError, KeyError):
            pass  # unreadable / foreign file: recompute and overwrite
    labels = np.asarray(compute_fn()).astype(np.int64).ravel()
    atomic_write(path, lambda fh: np.savez(fh, labels=labels, key=np.asarray("" if key is None else key)), binary=True)
    return labels
