"""CCL as a loss plug-in (``loss=ccl``): the class-aware contrastive terms on any contrastive method.

The plug-in asks the data layer (one :class:`~mcad.data.requests.DataRequest`) for CCL's augmented second
view, batches that hold at least two contrast classes, and, for ``label_source=kmeans``, k-means pseudo
classes computed before any loader exists; every training sample then carries its ``contrast_label``. From
the method's one-pass :class:`~mcad.methods.plugins.base.ContrastiveFeatures` it computes the terms of
:class:`~mcad.losses.ccl.CCLLoss`. ``method=ccl_rd`` (CCL around RD, the official configuration) uses this
same plug-in; its features are CCL's projected teacher maps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Literal

from torch import Tensor

from mcad.data.requests import DataRequest, FeatureExtractor, PseudoLabels, SecondView
from mcad.losses.ccl import CCLLoss
from mcad.methods.plugins.base import Batch, ContrastiveFeatures, LossPlugin

__all__ = ["CCLPlugin"]

LabelSource = Literal["gt", "kmeans"]
Correspondence = Literal["auto", "dense"]
ViewSource = Literal["original", "resized"]


def _extractor_name(factory: Callable[[], FeatureExtractor]) -> str:
    """A stable description of a (partial) extractor factory, for results and the pseudo-label cache key."""
    if isinstance(factory, partial):
        options = ",".join(f"{k}={v}" for k, v in sorted(factory.keywords.items()))
        return f"{getattr(factory.func, '__name__', factory.func)}({options})"
    return str(getattr(factory, "__name__", factory))


class CCLPlugin(LossPlugin):
    """CCL's dense and global class-aware contrastive terms, from any method's contrastive features.

    Args:
        terms: The loss terms (weights, temperatures, global formula, dense levels).
        label_source: ``gt`` (the object category) or ``kmeans`` (pseudo classes, docs/codes.md A-CCL3).
        kmeans_backbone: Builds the frozen feature extractor for the pseudo labels (official v1: ImageNet
            ResNet-18 ``layer4``, 512-d); only built when ``label_source=kmeans``.
        kmeans_clusters: Number of clusters; ``None`` = number of classes in the training set (E-CCL3; the
            official code hard-codes 15).
        kmeans_seed: K-means ``random_state`` (official 0).
        kmeans_n_init: K-means restarts (pinned: scikit-learn's default changed in 1.4).
        cache_dir: Pseudo labels are cached under ``<cache_dir>/pseudo_labels``; ``None`` = no cache.
        correspondence: ``auto`` (match the views on the method's frozen correspondence features when it has
            them, else on its detached dense features) or ``dense`` (always the dense features).
        view_crop_scale: RandomResizedCrop area range of the second view (official RD recipe 0.8-1.0).
        view_rotate_limit: Rotation range of the second view in degrees (RD recipe 15).
        view_blur_kernel: Gaussian-blur kernel of the second view (RD recipe 23).
        view_source: ``original`` (official, E-CCL5): the second view is cut from the decoded file at its own
            resolution; ``resized``: from the ``data.image_size`` image (no second decode per item).
    """

    def __init__(
        self,
        terms: CCLLoss | None = None,
        label_source: LabelSource = "gt",
        kmeans_backbone: Callable[[], FeatureExtractor] | None = None,
        kmeans_clusters: int | None = None,
        kmeans_seed: int = 0,
        kmeans_n_init: int = 10,
        cache_dir: str | None = None,
        correspondence: Correspondence = "auto",
        view_crop_scale: Sequence[float] = (0.8, 1.0),
        view_rotate_limit: float = 15.0,
        view_blur_kernel: int = 23,
        view_source: ViewSource = "original",
    ) -> None:
        super().__init__()
        if label_source not in ("gt", "kmeans"):
            raise ValueError(f"loss.label_source must be 'gt' or 'kmeans', got {label_source!r}.")
        if correspondence not in ("auto", "dense"):
            raise ValueError(f"loss.correspondence must be 'auto' or 'dense', got {correspondence!r}.")
        if view_source not in ("original", "resized"):
            raise ValueError(f"loss.view_source must be 'original' or 'resized', got {view_source!r}.")
        if kmeans_clusters is not None and kmeans_clusters < 2:
            raise ValueError(f"loss.kmeans_clusters must be >= 2 (contrast needs two classes), got {kmeans_clusters}.")
        if label_source == "kmeans" and kmeans_backbone is None:
            raise ValueError("loss.label_source=kmeans needs loss.kmeans_backbone (a frozen feature extractor).")
        self.terms = terms if terms is not None else CCLLoss()
        self.label_source: LabelSource = label_source
        self.correspondence: Correspondence = correspondence
        view = SecondView(
            crop_scale=(float(view_crop_scale[0]), float(view_crop_scale[1])),
            rotate_limit=float(view_rotate_limit),
            blur_kernel=int(view_blur_kernel),
            from_original=view_source == "original",
        )
        pseudo = None
        if label_source == "kmeans":
            assert kmeans_backbone is not None
            pseudo = PseudoLabels(
                extractor=kmeans_backbone, name=_extractor_name(kmeans_backbone), num_clusters=kmeans_clusters,
                seed=int(kmeans_seed), n_init=int(kmeans_n_init), cache_dir=cache_dir,
            )  # fmt: skip
        self._request = DataRequest(second_view=view, mixed_batches=True, pseudo_labels=pseudo)

    def data_request(self) -> DataRequest:
        """The second view, mixed-class batches and (``kmeans``) the pseudo labels."""
        return self._request

    def forward(self, features: ContrastiveFeatures, batch: Batch) -> dict[str, Tensor]:
        """The weighted CCL terms of a training batch.

        Returns:
            ``{"ccl_dense": lambda_d * L_dense, "ccl_global": lambda_g * L_global}`` (a disabled term is 0).
        """
        labels = batch["contrast_label"]
        corr, corr_aug = features.correspondence, features.correspondence_aug
        if self.correspondence == "dense" or corr is None or corr_aug is None:
            corr = [f.detach() for f in features.dense]
            corr_aug = [f.detach() for f in features.dense_aug]
        out = self.terms(
            corr, corr_aug, features.dense, features.dense_aug, features.embedding, features.embedding_aug, labels
        )
        return {"ccl_dense": out["dense"], "ccl_global": out["global"]}
