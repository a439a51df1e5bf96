"""The map-style dataset shared by every format, with a decoded-image cache.

The input geometry (``data.geometry``, :mod:`mcad.data.geometry`) is applied here: images are resized to
the geometry's load size at decode time (cached), then ``keep_aspect`` pads them to the square canvas and
``tile`` either draws one random tile (training) or keeps the whole working image (testing, prediction;
the evaluator cuts and stitches the tiles). Every item says where its content sits in the model input
(``placement``), so that maps can be evaluated without padding and brought back to the image's own size.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from mcad.data.geometry import Geometry, Placement, pad_to_canvas
from mcad.data.io import DataError, image_size, load_image, load_mask
from mcad.data.records import SampleRecord
from mcad.data.requests import ImageSynthesizer
from mcad.data.transforms import IMAGE_FILTERS, Normalizer, Resize, resize_image
from mcad.utils.files import atomic_write

__all__ = ["AnomalyDataset", "DecodedCache", "collate_samples"]

log = logging.getLogger(__name__)


class DecodedCache:
    """Stores decoded, resized images as ``.npy`` files so an epoch is not decode-bound.

    The key hashes the file's path, size and modification time and the resizing (size and filter), so an
    edited file or another resolution never hits a stale entry. Files are written to a temporary name and
    renamed, so concurrent workers and interrupted runs never read a partial array.
    """

    def __init__(self, folder: str | Path, resize: Resize) -> None:
        self.folder = Path(folder).expanduser()
        self.resize = resize
        self.folder.mkdir(parents=True, exist_ok=True)

    def _path(self, source: str, kind: str) -> Path:
        stat = os.stat(source)
        tag = self.resize.cache_tag(kind)
        key = f"{os.path.abspath(source)}|{stat.st_size}|{stat.st_mtime_ns}|{tag}|{kind}|v2"
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


def collate_samples(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batches items like ``default_collate``, keeping tensors of different shapes as lists.

    ``data.geometry=tile`` tests whole images at their working resolution, which differs between images of
    different sizes; a batch then holds lists of ``image`` / ``mask`` / ``tile_grid`` tensors.
    """
    batch: dict[str, Any] = {}
    for key in items[0]:
        values = [item[key] for item in items]
        first = values[0]
        if isinstance(first, torch.Tensor) and any(v.shape != first.shape for v in values):
            batch[key] = values
        else:
            batch[key] = default_collate(values)
    return batch


class AnomalyDataset(Dataset):
    """Samples of one split over several classes.

    Each item is a dict with ``image`` (3×H×W float, normalised), ``mask`` (1×H×W float in [0, 1], resized
    with the mask filter), ``label``, ``class_id``, ``contrast_label`` (the class id, or a pseudo class when
    the run asked for pseudo labels), ``class_name``, ``path``, ``mask_path`` (``""`` without a mask),
    ``index`` (position in this split), ``defect_type``, ``geometry`` (``data.geometry``), ``placement``
    (``(8,)`` int64, :meth:`~mcad.data.geometry.Placement.to_tensor`: where the image's content sits in
    ``image``); optionally ``image_aug`` (a contrastive view) and ``synthetic_image`` / ``synthetic_mask``
    (an image-level synthesizer's output). With ``geometry=tile`` and whole images (testing) ``image`` is
    the working-resolution image and the item adds ``tile_grid`` (``(T, 2)`` int64 top-left corners of its
    tiles), ``tile_size`` (their side) and ``tile_batch`` (tiles per forward pass).

    Args:
        records: The samples.
        class_names: All classes of the run; ``class_id`` indexes this list.
        resize: How images and masks are resized to the load size at decode time (size and filters).
        transform: Albumentations pipeline applied after resizing (crop, to tensor).
        normalizer: Turns uint8 image tensors into normalised float tensors.
        cache: Optional decoded-image cache.
        synthesizer: Optional image-level anomaly synthesizer ``(uint8 image, rng) -> (image, mask)``.
        view_transform: Optional pipeline producing ``image_aug``.
        view_from_original: Hand ``view_transform`` the decoded file at its own resolution (decoded again
            for every item, not cached) instead of the load-size image: CCL's official view is cut from
            the full-resolution image (docs/codes.md E-CCL5). Only with ``squash``: otherwise the view is
            cut from the model input (the tile or the padded canvas), so that it shows the same content.
        synthesis_filter: Resize filter of the synthesizer's input when it must differ from the clean
            image's (CRR: the clean target through PIL bilinear, the synthetic source through cv2 bilinear,
            docs/codes.md E-CRR4); the file is then decoded again for each item. ``None`` = the clean image.
        geometry: The input geometry (default: ``resize.geometry``, else ``squash`` at ``resize.size``).
        draw_tiles: With ``geometry=tile``: one random tile per item (training; drawn from the sample seed),
            else the whole working image (testing, prediction).
        tile_batch: Tiles per forward pass when whole tiled images are evaluated (``data.eval_batch_size``).
    """

    def __init__(
        self,
        records: Sequence[SampleRecord],
        class_names: Sequence[str],
        resize: Resize,
        transform: A.Compose,
        normalizer: Normalizer,
        cache: DecodedCache | None = None,
        synthesizer: ImageSynthesizer | None = None,
        view_transform: A.Compose | None = None,
        view_from_original: bool = False,
        synthesis_filter: str | None = None,
        geometry: Geometry | None = None,
        draw_tiles: bool = False,
        tile_batch: int = 32,
    ) -> None:
        self.records = list(records)
        self.class_names = list(class_names)
        self.class_index = {c: i for i, c in enumerate(self.class_names)}
        self.class_ids = np.array([self.class_index[r.class_name] for r in self.records], dtype=np.int64)
        #: The label contrastive losses separate, per sample: the class id unless pseudo labels are set.
        self.contrast_labels = self.class_ids.copy()
        self.resize = resize
        self.transform = transform
        self.normalizer = normalizer
        self.cache = cache
        self.synthesizer = synthesizer
        self.view_transform = view_transform
        self.geometry = geometry or resize.geometry or Geometry("squash", resize.size)
        self.view_from_original = view_from_original and self.geometry.kind == "squash"
        if synthesis_filter is not None and synthesis_filter not in IMAGE_FILTERS:
            raise DataError(f"data.synthesis_filter must be one of {IMAGE_FILTERS} or null, got '{synthesis_filter}'.")
        self.synthesis_filter = synthesis_filter if self.geometry.kind == "squash" else None
        self.draw_tiles = draw_tiles and self.geometry.kind == "tile"
        self.tile_batch = int(tile_batch)
        # The normalisation mean as a uint8 colour: keep_aspect's padding, about 0 once normalised.
        self.pad_colour = [int(v) for v in normalizer.shift.view(-1).round().clamp(0, 255).tolist()]
        self._native: dict[int, tuple[int, int]] = {}

    def __len__(self) -> int:
        return len(self.records)

    @property
    def load_size(self) -> int:
        """Side of the images and masks after resizing (before the optional crop)."""
        return self.resize.size

    def native_size(self, index: int) -> tuple[int, int]:
        """``(height, width)`` of the sample's image file (from its header; remembered)."""
        size = self._native.get(index)
        if size is None:
            width, height = image_size(self.records[index].image_path)
            size = self._native[index] = (height, width)
        return size

    def _decode_image(self, path: str) -> np.ndarray:
        return self.resize.image(load_image(path))

    def _decode_mask(self, path: str) -> np.ndarray:
        return self.resize.mask(load_mask(path))

    def load(self, index: int, original: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Returns the resized uint8 image and mask of a sample (through the cache if enabled).

        Args:
            index: The sample.
            original: The sample's file already decoded at full resolution, if the caller has it: a cache
                miss (or no cache) resizes it instead of decoding the file a second time.
        """
        rec = self.records[index]
        decode_image = self._decode_image if original is None else lambda _: self.resize.image(original)
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

        With a ``sample_seed`` (:class:`~mcad.data.datamodule.EpochSeededSampler`), the synthetic anomaly,
        the augmented view and the training tile (``data.geometry=tile``) are drawn from it, so they do not
        depend on the loader worker or on how many samples that worker produced before (exact resume, any
        ``num_workers``). A plain index falls back to the worker's torch RNG.
        """
        index, sample_seed = key if isinstance(key, tuple) else (key, None)
        rec = self.records[index]
        # The view's full-resolution source (E-CCL5) is decoded once and also feeds a cache miss.
        original = load_image(rec.image_path) if self.view_transform is not None and self.view_from_original else None
        image, mask = self.load(index, original)
        # Independent streams for the synthesizer, the view and the training tile.
        seeds = np.random.SeedSequence(sample_seed).generate_state(3) if sample_seed is not None else None
        image, mask, placement = self._place(index, image, mask, seeds)
        targets: dict[str, np.ndarray] = {"image": image, "mask": mask}
        if self.synthesizer is not None:
            # Without a sample seed: torch's RNG, seeded per worker by Lightning.
            seed = int(seeds[0]) if seeds is not None else int(torch.randint(0, 2**62, ()).item())
            source = image
            if self.synthesis_filter is not None:
                decoded = original if original is not None else load_image(rec.image_path)
                source = resize_image(decoded, self.resize.size, self.synthesis_filter)
            synthetic, synthetic_mask = self.synthesizer(source, np.random.default_rng(seed))
            targets["synthetic_image"] = synthetic
            targets["synthetic_mask"] = (np.asarray(synthetic_mask) * 255).astype(np.uint8)
        out = self.transform(**targets)
        item: dict[str, Any] = {
            "image": self.normalizer(out["image"]),
            "mask": out["mask"].float().div_(255.0).unsqueeze(0),
            "label": rec.label,
            "class_id": int(self.class_ids[index]),
            "contrast_label": int(self.contrast_labels[index]),
            "class_name": rec.class_name,
            "path": rec.image_path,
            "mask_path": rec.mask_path or "",
            "index": index,
            "defect_type": rec.defect_type,
            "geometry": self.geometry.kind,
            "placement": placement.to_tensor(),
        }
        if self.geometry.kind == "tile" and not self.draw_tiles:
            item["tile_grid"] = torch.tensor(self.geometry.tile_grid(*image.shape[:2]), dtype=torch.int64)
            item["tile_size"] = self.geometry.size
            item["tile_batch"] = self.tile_batch
        if self.synthesizer is not None:
            item["synthetic_image"] = self.normalizer(out["synthetic_image"])
            item["synthetic_mask"] = out["synthetic_mask"].float().div_(255.0).unsqueeze(0)
        if self.view_transform is not None:
            if seeds is not None:
                self.view_transform.set_random_seed(int(seeds[1]))
            item["image_aug"] = self.view_transform(image=image if original is None else original)["image"]
        return item

    def _place(
        self, index: int, image: np.ndarray, mask: np.ndarray, seeds: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray, Placement]:
        """Applies the geometry after resizing: keep_aspect's padding, or a training tile; and the placement.

        The placement describes the array returned here before the (optional) centre crop of the transform,
        with the crop folded in, i.e. where the content sits in the final ``image`` tensor.
        """
        geometry = self.geometry
        placement = geometry.placement(*self.native_size(index))
        if geometry.kind == "keep_aspect":
            offset = geometry.canvas_offset(*image.shape[:2])
            image = pad_to_canvas(image, geometry.size, offset, self.pad_colour)
            mask = pad_to_canvas(mask, geometry.size, offset, 0)
        elif self.draw_tiles:
            # Without a sample seed: torch's RNG, seeded per worker by Lightning (as the synthesizer).
            seed = int(seeds[2]) if seeds is not None else int(torch.randint(0, 2**62, ()).item())
            rng = np.random.default_rng(seed)
            side = geometry.size
            top = int(rng.integers(0, image.shape[0] - side + 1))
            left = int(rng.integers(0, image.shape[1] - side + 1))
            image = np.ascontiguousarray(image[top : top + side, left : left + side])
            mask = np.ascontiguousarray(mask[top : top + side, left : left + side])
            placement = Placement(placement.original, placement.content, (-top, -left), (side, side))
        return image, mask, placement

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

        def check(index: int) -> None:
            rec = self.records[index]
            if decode:
                load_image(rec.image_path)
                if rec.mask_path is not None:
                    load_mask(rec.mask_path)
            size = image_size(rec.image_path)
            self._native[index] = (size[1], size[0])  # every item's placement needs it: read once here
            if rec.mask_path is not None:
                mask_size = image_size(rec.mask_path)
                if mask_size != size:
                    raise DataError(
                        f"Mask {rec.mask_path} is {mask_size[0]}x{mask_size[1]} but its image {rec.image_path} "
                        f"is {size[0]}x{size[1]}."
                    )

        with ThreadPoolExecutor(num_threads) as pool:
            list(pool.map(check, range(len(self.records))))

    def prefill_cache(self, num_threads: int = 4) -> None:
        """Decodes every sample once (in threads; OpenCV and PIL release the GIL) into the cache.

        This also surfaces corrupt or truncated files before any training step.
        """
        if self.cache is None:
            return
        with ThreadPoolExecutor(num_threads) as pool:
            list(pool.map(self.load, range(len(self))))
