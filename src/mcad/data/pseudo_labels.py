"""Pseudo-class labels for CCL (``loss.label_source=kmeans``; docs/codes.md A-CCL3, E-CCL3).

The first official CCL code (LGC-AD/AD-LGC v1 204b215, ``data/ad_dataset.py::DefaultAD.get_label_dict``,
commented out there) replaces the category label by a K-means cluster id computed on ImageNet ResNet-18
global-average-pooled features (512-d; Resize 256 + CenterCrop 256 + ImageNet normalisation) with
``KMeans(n_clusters=15, random_state=0)``. We use k = number of classes (E-CCL3) and a fixed ``n_init``.

:func:`compute_pseudo_labels` is the whole orchestration (extractor, inputs, k-means, cache, agreement
with the classes); the data module calls it while it is set up, before any loader exists, whenever a
:class:`~mcad.data.requests.PseudoLabels` request is present.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from mcad.data.io import DataError, load_image
from mcad.data.requests import PseudoLabels
from mcad.utils.files import atomic_write

__all__ = [
    "compute_pseudo_labels",
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


def _resize_shorter_and_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Torchvision's ``Resize(size)`` (shorter side, PIL bilinear) then ``CenterCrop(size)`` on a uint8 image."""
    from PIL import Image

    h, w = image.shape[:2]
    # torchvision keeps the aspect ratio and truncates the longer side's length (int()).
    new_h, new_w = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BILINEAR))
    # CenterCrop rounds the offsets as torchvision does: int(round((dim - size) / 2)).
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return resized[top : top + size, left : left + size]


def pseudo_label_batches(
    image_paths: Sequence[str], size: int, mean: Sequence[float], std: Sequence[float], batch_size: int = 32
) -> Iterator[Tensor]:
    """The images, decoded from their files, resized and cropped as the official pseudo-label loader does.

    Yields normalised ``(B, 3, size, size)`` float tensors in file order.
    """
    shift = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    scale = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    for start in range(0, len(image_paths), batch_size):
        chunk = image_paths[start : start + batch_size]
        arrays = [_resize_shorter_and_crop(load_image(p), size) for p in chunk]
        batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255.0)
        yield (batch - shift) / scale


def compute_pseudo_labels(
    image_paths: Sequence[str],
    class_ids: Sequence[int],
    request: PseudoLabels,
    device: torch.device | str = "cpu",
) -> tuple[np.ndarray, dict[str, Any]]:
    """k-means pseudo classes of the training images, with their agreement with the real classes.

    Args:
        image_paths: The training images, in dataset order.
        class_ids: Their class ids (for k = number of classes and the adjusted Rand index).
        request: Extractor, k and k-means settings, cache folder.
        device: Where the extractor runs.

    Returns:
        ``(labels, info)``: ``(N,)`` int64 pseudo classes and a record for ``results.json`` (source, k,
        extractor, adjusted Rand index, cluster sizes).

    Raises:
        DataError: k is below 2 (a single pseudo class gives a contrastive loss no negatives).
    """
    present = sorted(set(int(c) for c in class_ids))
    k = request.num_clusters or len(present)
    if k < 2:
        raise DataError(
            f"loss.label_source=kmeans with k = number of classes = {k} gives a single pseudo class; set "
            "loss.kmeans_clusters=2 or more."
        )
    key = cache_key(
        "ccl-kmeans-v2", request.name, request.input_size, k, request.seed, request.n_init, list(image_paths)
    )

    def compute() -> np.ndarray:
        built = request.extractor()
        extractor = built.to(str(device))  # the module itself (nn.Module.to), typed without mean/std
        batches = pseudo_label_batches(image_paths, request.input_size, built.mean, built.std)
        features = extract_global_features(extractor, batches, device=device)
        return kmeans_pseudo_labels(features, k, seed=request.seed, n_init=request.n_init)

    if request.cache_dir is None:
        labels = np.asarray(compute(), dtype=np.int64)
    else:
        path = Path(request.cache_dir).expanduser() / "pseudo_labels" / f"{key[:24]}.npz"
        labels = cached_pseudo_labels(path, compute, key=key)
    info = {
        "source": "kmeans", "num_classes": len(present), "num_clusters": k, "features": request.name,
        "adjusted_rand_index": adjusted_rand_index(list(class_ids), labels),
        "cluster_sizes": np.bincount(labels, minlength=k).tolist(),
    }  # fmt: skip
    return labels, info
