"""The map-style dataset shared by every format, with a decoded-image cache."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2
from torch.utils.data import Dataset

from mcad.data.io import DataError, image_size, load_image, load_mask
from mcad.data.records import SampleRecord
from mcad.utils.files import atomic_write

log = logging.getLogger(__name__)


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """Resizes to ``size×size`` (aspect ratio not kept, as in RD/ADer/RLR), area filter when shrinking."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    shrinking = image.shape[0] > size or image.shape[1] > size
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Bilinear mask resize (the evaluator binarises later with the protocol's gt threshold)."""
    if mask.shape[0] == size and mask.shape[1] == size:
        return mask
    return cv2.resize(mask, (size, size), interpolation=cv2.INTER_LINEAR)


class DecodedCache:
    """Stores decoded, resized images as ``.npy`` files so an epoch is not decode-bound.

    The key hashes the file's path, size and modification time and the target size, so an edited
    file or another resolution never hits a stale entry. Files are written to a temporary name and
    renamed, so concurrent workers and interrupted runs never read a partial array.
    """

    def __init__(self, folder: str | Path, size: int) -> None:
        self.folder = Path(folder).expanduser()
        self.size = size
        self.folder.mkdir(parents=True, exist_ok=True)

    def _path(self, source: str, kind: str) -> Path:
        stat = os.stat(source)
        key = f"{os.path.abspath(source)}|{stat.st_size}|{stat.st_mtime_ns}|{self.size}|{kind}|v1"
        return self.folder / f"{hashlib.sha1(key.encode()).hexdigest()}.npy"

    def get(self, source: str, kind: str, decode: Callable[[str], np.ndarray]) -> np.ndarray:
        """Returns the cached array, decoding and storing it on a miss."""
        path = self._path(source, kind)
        try:
            return np.load(path)
        except (FileNotFoundError, ValueError, OSError):
            pass
        array = decode(source)
        atomic_write(path, lambda fh: np.save(fh, array), binary=True)
        return array


class AnomalyDataset(Dataset):
    """Samples of one split over several classes.

    Each item is a dict with ``image`` (3×H×W float, normalised), ``mask`` (1×H×W float in [0, 1],
    bilinear-resized), ``label``, ``class_id``, ``class_name``, ``path``, ``index`` (position in this
    split), ``defect_type``; optionally ``image_aug`` (a contrastive view) and ``synthetic_image`` /
    ``synthetic_mask`` (an image-level synthesizer's output).

    Args:
        records: The samples.
        class_names: All classes of the run; ``class_id`` indexes this list.
        load_size: Images and masks are resized to ``load_size×load_size`` at decode time.
        transform: Albumentations pipeline applied after resizing (crop, to tensor).
        normalizer: Turns uint8 image tensors into normalised float tensors.
        cache: Optional decoded-image cache.
        synthesizer: Optional image-level anomaly synthesizer ``(uint8 image, rng) -> (image, mask)``.
        view_transform: Optional pipeline producing ``image_aug``.
        view_from_original: Hand ``view_transform`` the decoded file at its own resolution (decoded again
            for every item, not cached) instead of the ``load_size`` image: CCL's official view is cut
            from the full-resolution image (spec E-CCL5).
    """

    def __init__(
        self,
        records: Sequence[SampleRecord],
        class_names: Sequence[str],
        load_size: int,
        transform: A.Compose,
        normalizer: Normalizer,
        cache: DecodedCache | None = None,
        synthesizer: Callable[[np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]] | None = None,
        view_transform: A.Compose | None = None,
        view_from_original: bool = False,
    ) -> None:
        self.records = list(records)
        self.class_names = list(class_names)
        self.class_index = {c: i for i, c in enumerate(self.class_names)}
        self.load_size = load_size
        self.transform = transform
        self.normalizer = normalizer
        self.cache = cache
        self.synthesizer = synthesizer
        self.view_transform = view_transform
        self.view_from_original = view_from_original

    def __len__(self) -> int:
        return len(self.records)

    def _decode_image(self, path: str) -> np.ndarray:
        return resize_image(load_image(path), self.load_size)

    def _decode_mask(self, path: str) -> np.ndarray:
        return resize_mask(load_mask(path), self.load_size)

    def load(self, index: int, original: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Returns the resized uint8 image and mask of a sample (through the cache if enabled).

        Args:
            index: The sample.
            original: The sample's file already decoded at full resolution, if the caller has it: a cache
                miss (or no cache) resizes it instead of decoding the file a second time.
        """
        rec = self.records[index]
        decode_image = self._decode_image if original is None else lambda _: resize_image(original, self.load_size)
        if self.cache is not None:
            image = self.cache.get(rec.image_path, "image", decode_image)
            mask = self.cache.get(rec.mask_path, "mask", self._decode_mask) if rec.mask_path else None
        else:
            image = decode_image(rec.image_path)
            mask = self._decode_mask(rec.mask_path) if rec.mask_path else None
        if mask is None:
            mask = np.zeros(image.shape[:2], np.uint8)
        return image, mask

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        """One sample; ``key`` is its index, or ``(index, sample_seed)`` from the training sampler.

        With a ``sample_seed`` (:class:`~mcad.data.datamodule.EpochSeededSampler`), the synthetic anomaly
        and the augmented view are drawn from it, so they do not depend on the loader worker or on how
        many samples that worker produced before (exact resume, any ``num_workers``). A plain index falls
        back to the worker's torch RNG.
        """
        index, sample_seed = key if isinstance(key, tuple) else (key, None)
        rec = self.records[index]
        # The view's full-resolution source (E-CCL5) is decoded once and also feeds a cache miss.
        original = load_image(rec.image_path) if self.view_transform is not None and self.view_from_original else None
        image, mask = self.load(index, original)
        targets: dict[str, np.ndarray] = {"image": image, "mask": mask}
        # Independent streams for the synthesizer and the view.
        seeds = np.random.SeedSequence(sample_seed).generate_state(2) if sample_seed is not None else None
        if self.synthesizer is not None:
            # Without a sample seed: torch's RNG, seeded per worker by Lightning.
            seed = int(seeds[0]) if seeds is not None else int(torch.randint(0, 2**62, ()).item())
            synthetic, synthetic_mask = self.synthesizer(image, np.random.default_rng(seed))
            targets["synthetic_image"] = synthetic
            targets["synthetic_mask"] = (np.asarray(synthetic_mask) * 255).astype(np.uint8)
        out = self.transform(**targets)
        item: dict[str, Any] = {
            "image": self.normalizer(out["image"]),
            "mask": out["mask"].float().div_(255.0).unsqueeze(0),
            "label": rec.label,
            "class_id": self.class_index[rec.class_name],
            "class_name": rec.class_name,
            "path": rec.image_path,
            "index": index,
            "defect_type": rec.defect_type,
        }
        if self.synthesizer is not None:
            item["synthetic_image"] = self.normalizer(out["synthetic_image"])
            item["synthetic_mask"] = out["synthetic_mask"].float().div_(255.0).unsqueeze(0)
        if self.view_transform is not None:
            if seeds is not None:
                self.view_transform.set_random_seed(int(seeds[1]))
            item["image_aug"] = self.view_transform(image=image if original is None else original)["image"]
        return item

    def validate(self, num_threads: int = 4, decode: bool = False) -> None:
        """Checks every file before training: readable headers and masks the size of their images.

        Args:
            num_threads: Checking threads.
            decode: Also decode every image and mask completely, so that a truncated or corrupt file
                stops the run now rather than in the middle of training. Needed when there is no decoded
                cache (:meth:`prefill_cache` decodes everything otherwise).

        Raises:
            DataError: Naming the first offending file.
        """

        def check(rec: SampleRecord) -> None:
            if decode:
                load_image(rec.image_path)
                if rec.mask_path is not None:
                    load_mask(rec.mask_path)
            size = image_size(rec.image_path)
            if rec.mask_path is not None:
                mask_size = image_size(rec.mask_path)
                if mask_size != size:
                    raise DataError(
                        f"Mask {rec.mask_path} is {mask_size[0]}x{mask_size[1]} but its image {rec.image_path} "
                        f"is {size[0]}x{size[1]}."
                    )

        with ThreadPoolExecutor(num_threads) as pool:
            list(pool.map(check, self.records))

    def prefill_cache(self, num_threads: int = 4) -> None:
        """Decodes every sample once (in threads; OpenCV and PIL release the GIL) into the cache.

        This also surfaces corrupt or truncated files before any training step.
        """
        if self.cache is None:
            return
        with ThreadPoolExecutor(num_threads) as pool:
            list(pool.map(self.load, range(len(self))))


class Normalizer:
    """uint8 ``C×H×W`` tensor -> normalised float tensor.

    In torch: several times faster than albumentations' ``Normalize`` on the loader's hot path.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.scale = (255.0 * torch.tensor(std, dtype=torch.float32)).view(-1, 1, 1)
        self.shift = (255.0 * torch.tensor(mean, dtype=torch.float32)).view(-1, 1, 1)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return (image.float() - self.shift) / self.scale


def build_transform(crop_size: int | None, extra_targets: bool = False) -> A.Compose:
    """Geometric steps (optional centre crop) and conversion to uint8 tensors; images are resized."""
    steps: list[A.BasicTransform] = []
    if crop_size:
        steps.append(A.CenterCrop(crop_size, crop_size))
    steps.append(ToTensorV2())
    targets = {"synthetic_image": "image", "synthetic_mask": "mask"} if extra_targets else {}
    return A.Compose(steps, additional_targets=targets)
