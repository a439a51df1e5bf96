"""The contract between a method and a loss plug-in (``loss=ccl`` on RD, RLR, CRR, ...).

A plug-in adds loss terms to any method's own objective. The two sides meet at one typed seam:

* the method implements :class:`ContrastiveMethod`: ONE hook, :meth:`ContrastiveMethod.contrastive_forward`,
  that computes the method's own training losses and, from the same forward pass of each view, everything a
  contrastive plug-in reads (:class:`ContrastiveFeatures`);
* the plug-in (:class:`LossPlugin`) declares what it needs from the data layer as a
  :class:`~mcad.data.requests.DataRequest` and turns the features into extra loss terms.

The base module (:class:`~mcad.methods.base.AnomalyModule`) wires them: it merges the requests, calls the
hook instead of ``training_losses`` when a plug-in is attached, and adds the plug-in's terms to the total.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

from mcad.data.requests import DataRequest

__all__ = ["Batch", "ContrastiveFeatures", "ContrastiveMethod", "LossPlugin"]

#: A training batch as the data module collates it (``image``, ``image_aug``, ``contrast_label``, ...).
Batch = dict[str, Any]


@dataclass
class ContrastiveFeatures:
    """What a contrastive plug-in reads from one forward pass of the clean and of the augmented view.

    The features are those that enter the method's reconstruction network (the analogue of CCL's projected
    teacher maps) and their pooled embedding (the analogue of the pooled OCBE output); each method's README
    says which tensors it hands over.

    Attributes:
        dense: Per-level trainable maps ``(B, C_i, h_i, w_i)`` of the clean view (with gradients).
        dense_aug: The same maps of the augmented view.
        embedding: ``(B, D)`` global embedding of the clean view (with gradients).
        embedding_aug: The same of the augmented view.
        correspondence: Frozen per-level maps on the grids of ``dense`` to match locations between the
            views (a teacher's maps), or ``None`` to match on the detached dense maps.
        correspondence_aug: The same of the augmented view.
    """

    dense: list[Tensor]
    dense_aug: list[Tensor]
    embedding: Tensor
    embedding_aug: Tensor
    correspondence: list[Tensor] | None = None
    correspondence_aug: list[Tensor] | None = None


@runtime_checkable
class ContrastiveMethod(Protocol):
    """A method that contrastive plug-ins can be attached to."""

    def contrastive_forward(self, batch: Batch) -> tuple[dict[str, Tensor], ContrastiveFeatures]:
        """The method's own losses (with the total under ``loss``) and the plug-in's features, in one pass.

        Args:
            batch: A training batch holding ``image`` and ``image_aug``.
        """
        ...


class LossPlugin(nn.Module):
    """A loss that adds terms to any method's own objective, from :class:`ContrastiveFeatures`."""

    def data_request(self) -> DataRequest:
        """What the plug-in needs from the data layer (a second view, mixed batches, pseudo labels)."""
        return DataRequest()

    def forward(self, features: ContrastiveFeatures, batch: Batch) -> dict[str, Tensor]:
        """Extra loss terms for a training batch (each is added to the total)."""
        raise NotImplementedError
