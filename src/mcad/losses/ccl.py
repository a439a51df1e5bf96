"""CCL — class-aware contrastive learning terms, as a plug-in for any dense-feature UAD method.

CCL (arXiv 2412.04769; spec ``methods.md`` §3, §7 A-CCL1/2, §9 E-CCL*) adds two supervised contrastive terms
to a reconstruction model, both driven by the object-category label of each training image (or a k-means
pseudo label), never by the normal/anomalous flag:

* a **dense (local) term** on multi-level projected feature maps of two views of each image
  (:func:`dense_class_contrastive_loss`), and
* a **global term** on a pooled embedding of the two views (:func:`supcon_loss` by default;
  :func:`ccl_head_global_loss` and :func:`ccl_v1_global_loss` reproduce the two official code versions).

The official code additionally perturbs the projected clean-view features with Gaussian noise
(:func:`feature_noise_`). :class:`CCLLoss` bundles the terms with their weights and switches.

Nothing here depends on RD: a method only needs to expose, for the clean and the augmented view,
(i) dense features used to find correspondences (RD: the frozen teacher's maps), (ii) trainable dense
features to contrast (RD: the projection-layer outputs), and (iii) a global embedding (RD: GAP of the OCBE
output).

Official references (LGC-AD/AD-LGC): ``loss/base_loss.py`` (``DenseLoss``, ``SCLLoss``) at v1 204b215 and
HEAD 6502f68; ``model/lgc.py::LGC.train_forward`` (v1) / ``model/rd.py::RDLGC.train_forward`` (HEAD) for the
noise. The official ``temperature`` constructor default is 0.1, but every config sets 0.05; 0.05 is our
default.

Numerics: every term is evaluated in float32 (inputs are up-cast) because with τ = 0.05 the logits reach
±20 and ``exp`` of them overflows float16 under autocast; the formulas are written with ``logsumexp`` /
``log_softmax`` so they equal the official expressions without their overflow risk.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mcad.data.augment import contrastive_view_transform
from mcad.data.io import DataError
from mcad.data.pseudo_labels import adjusted_rand_index, cache_key, cached_pseudo_labels, kmeans_pseudo_labels
from mcad.methods.base import LossPlugin

log = logging.getLogger(__name__)

__all__ = [
    "GlobalCL",
    "CCLLoss",
    "CCLPlugin",
    "dense_class_contrastive_loss",
    "dense_correspondence",
    "sample_other_class_indices",
    "supcon_loss",
    "ccl_head_global_loss",
    "ccl_v1_global_loss",
    "feature_noise_",
    "NOISE_TRIGGER_PROB",
]

GlobalCL = Literal["supcon", "ccl_head", "ccl_v1"]

#: P[N(0,1) > 0.5] — the per-iteration probability that the official code perturbs the features (≈ 0.3085).
NOISE_TRIGGER_PROB: float = 0.5 * math.erfc(0.5 / math.sqrt(2.0))

# The official dense InfoNCE adds this constant to the denominator (`loss/base_loss.py::DenseLoss`).
_DENSE_EPS = 1e-6


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------
def _as_list(x: Tensor | Sequence[Tensor]) -> list[Tensor]:
    return [x] if isinstance(x, Tensor) else list(x)


def _labels_1d(labels: Tensor | Sequence[int]) -> Tensor:
    labels = torch.as_tensor(labels)
    if labels.dim() != 1:
        labels = labels.reshape(-1)
    return labels


def _graph_zero(*tensors: Tensor) -> Tensor:
    """A float32 scalar exactly equal to +0.0 that is connected to the graph of ``tensors``.

    Returning a plain constant would leave the trainable parameters behind ``tensors`` without a gradient
    (``None``), which breaks DDP's unused-parameter check and gradient clipping bookkeeping; ``0·sum`` gives
    them an all-zero gradient instead. The trailing ``+ 0.0`` turns a possible ``-0.0`` into ``+0.0``.
    """
    device = tensors[0].device if tensors else None
    zero = torch.zeros((), dtype=torch.float32, device=device)
    for t in tensors:
        if t.requires_grad:
            zero = zero + t.float().sum() * 0.0
    return zero + 0.0


def _check_levels(*levels: list[Tensor]) -> None:
    n = len(levels[0])
    if n == 0:
        raise ValueError("need at least one feature level")
    if any(len(lv) != n for lv in levels):
        raise ValueError(f"all feature lists must have the same number of levels, got {[len(v) for v in levels]}")


# ----------------------------------------------------------------------------------------------------------
# dense (local) class-aware contrastive term
# ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def dense_correspondence(feat: Tensor, feat_aug: Tensor, chunk_size: int | None = 1024) -> Tensor:
    """For every location i of ``feat`` the index of the most cosine-similar location of ``feat_aug``.

    ``j*(i) = argmax_j <f_i/|f_i|, f'_j/|f'_j|>`` per sample (ties → first index, as ``torch.argmax``).

    Args:
        feat: (B, C, h, w) features of the clean view (official: raw teacher features).
        feat_aug: (B, C, h, w) features of the augmented view.
        chunk_size: Query locations processed at once. The full (B, hw, hw) similarity matrix of the
            official code is ~1 GiB for B=16 at 64×64; chunking over queries gives the same argmax with
            bounded memory. ``None`` = no chunking.

    Returns:
        (B, hw) int64 indices into the flattened (row-major) spatial grid of ``feat_aug``.
    """
    q = F.normalize(feat.float().flatten(2), p=2, dim=1)  # (B, C, N)
    k = F.normalize(feat_aug.float().flatten(2), p=2, dim=1)  # (B, C, N)
    n = q.shape[-1]
    step = n if chunk_size is None else max(1, int(chunk_size))
    out = []
    for start in range(0, n, step):
        sim = torch.einsum("bci,bcj->bij", q[:, :, start : start + step], k)  # (B, chunk, N)
        out.append(sim.argmax(dim=-1))
    return torch.cat(out, dim=1)


def sample_other_class_indices(
    labels: Tensor | Sequence[int], generator: torch.Generator | None = None
) -> Tensor | None:
    """Draw, for every sample b, one uniformly random batch index n(b) whose label differs from ``labels[b]``.

    Mirrors the official per-sample loop (``loss/base_loss.py::DenseLoss.densecl``): for b = 0..B-1 in
    order, one ``torch.randint(0, #candidates, (1,))`` draw among the other-class indices (ascending).

    Args:
        labels: (B,) integer class labels.
        generator: Optional **CPU** generator; ``None`` uses the global CPU RNG like the official code.

    Returns:
        (B,) int64 CPU tensor, or ``None`` if some sample has no other-class partner (i.e. the batch holds a
        single class).
    """
    lab = _labels_1d(labels).detach().cpu()
    out = torch.empty(lab.numel(), dtype=torch.long)
    for b in range(lab.numel()):
        candidates = torch.nonzero(lab != lab[b], as_tuple=False).flatten()
        if candidates.numel() == 0:
            return None
        pick = torch.randint(0, candidates.numel(), (1,), generator=generator)
        out[b] = candidates[pick]
    return out


def _dense_level_loss(
    t: Tensor,
    t_aug: Tensor,
    p: Tensor,
    p_aug: Tensor,
    labels: Tensor,
    tau: float,
    generator: torch.Generator | None,
    chunk_size: int | None,
) -> Tensor:
    if t.shape[0] != p.shape[0] or t.shape[-2:] != p.shape[-2:]:
        raise ValueError(f"teacher {tuple(t.shape)} and projected {tuple(p.shape)} maps must share B, h, w")
    if t.shape != t_aug.shape or p.shape != p_aug.shape:
        raise ValueError("clean and augmented maps of a level must have identical shapes")
    if labels.numel() != p.shape[0]:
        raise ValueError(f"{labels.numel()} labels for a batch of {p.shape[0]}")

    # Negatives first: the official loop returns 0 for the whole level as soon as one sample has no
    # other-class partner, which happens iff the batch contains a single class.
    neg_idx = sample_other_class_indices(labels, generator)
    if neg_idx is None:
        return _graph_zero(p, p_aug)

    # Correspondence from the (frozen, raw) teacher features of the two views; no gradient flows here.
    j_star = dense_correspondence(t, t_aug, chunk_size)  # (B, N)

    q = F.normalize(p.float().flatten(2), p=2, dim=1)  # (B, C, N)
    k = F.normalize(p_aug.float().flatten(2), p=2, dim=1)  # (B, C, N)
    k_matched = k.gather(2, j_star.unsqueeze(1).expand(-1, k.shape[1], -1))
    s_pos = (q * k_matched).sum(dim=1) / tau  # (B, N)
    # Negative: augmented view of ONE other-class image, at the SAME spatial index (not matched).
    s_neg = (q * k[neg_idx.to(k.device)]).sum(dim=1) / tau  # (B, N)

    # -log(e^{s+} / (e^{s+} + e^{s-} + 1e-6)) written as logsumexp(s+, s-, log 1e-6) - s+ (same value).
    log_eps = torch.full_like(s_pos, math.log(_DENSE_EPS))
    loss = torch.logsumexp(torch.stack([s_pos, s_neg, log_eps]), dim=0) - s_pos
    return loss.mean()


def dense_class_contrastive_loss(
    teacher_clean: Tensor | Sequence[Tensor],
    teacher_aug: Tensor | Sequence[Tensor],
    proj_clean: Tensor | Sequence[Tensor],
    proj_aug: Tensor | Sequence[Tensor],
    class_labels: Tensor | Sequence[int],
    tau: float = 0.05,
    generator: torch.Generator | None = None,
    chunk_size: int | None = 1024,
) -> Tensor:
    r"""Dense class-aware contrastive loss (CCL local term, official ``DenseLoss``).

    Per level, with channel-L2-normalised maps and flattened locations i:

    * correspondence ``j*(i) = argmax_j <T_i, T'_j>`` from the teacher maps of the two views;
    * positive ``s+ = cos(P_i, P'_{j*(i)}) / τ``;
    * one random other-class sample ``n(b)`` per sample b (re-drawn for every level, as the official
      per-level call does), negative ``s- = cos(P_{b,i}, P'_{n(b),i}) / τ`` at the same index i;
    * ``L = mean_{b,i} -log(e^{s+} / (e^{s+} + e^{s-} + 1e-6))``.

    The result is the mean over levels. If the batch contains a single class a level's loss is exactly 0
    (official early return); the zero stays connected to the graph so that the projection parameters get
    zero (not missing) gradients.

    Args:
        teacher_clean: Per-level (B, C_k, h_k, w_k) correspondence features of the clean view (no grad
            needed; official: raw frozen-teacher maps).
        teacher_aug: Same for the augmented view.
        proj_clean: Per-level (B, D_k, h_k, w_k) trainable features of the clean view (official: projected
            teacher maps **after** the in-place feature noise).
        proj_aug: Same for the augmented view.
        class_labels: (B,) integer class (or pseudo-class) labels.
        tau: Temperature (official configs: 0.05).
        generator: Optional CPU generator for the negative draws (default: global RNG, as official).
        chunk_size: See :func:`dense_correspondence`.

    Returns:
        Scalar float32 loss.
    """
    tc, ta, pc, pa = (_as_list(x) for x in (teacher_clean, teacher_aug, proj_clean, proj_aug))
    _check_levels(tc, ta, pc, pa)
    labels = _labels_1d(class_labels)
    losses = [
        _dense_level_loss(t, t_k, p, p_k, labels, tau, generator, chunk_size) for t, t_k, p, p_k in zip(tc, ta, pc, pa)
    ]
    return torch.stack(losses).mean()


# ----------------------------------------------------------------------------------------------------------
# global class-aware contrastive terms
# ----------------------------------------------------------------------------------------------------------
def _flat_embed(g: Tensor) -> Tensor:
    # Accept (B, D) as well as un-squeezed GAP outputs (B, D, 1, 1).
    return F.normalize(g.float().flatten(1), p=2, dim=1)


def supcon_loss(
    g: Tensor,
    g_aug: Tensor | None,
    labels: Tensor | Sequence[int],
    tau: float = 0.05,
) -> Tensor:
    r"""Supervised contrastive loss (Khosla et al. 2020, :math:`\mathcal{L}^{sup}_{out}`), default global term.

    On the 2B L2-normalised vectors ``z = [g; g']`` with labels ``[y; y]``, for every anchor i:
    ``P(i) = {p != i : y_p = y_i}``, ``A(i) = {a != i}`` (self excluded from numerator AND denominator) and

    ``L = mean_i  -1/|P(i)| Σ_{p∈P(i)} log( exp(z_i·z_p/τ) / Σ_{a∈A(i)} exp(z_i·z_a/τ) )``.

    This is the paper's equation; the reference implementation's extra ``τ/base_τ`` factor is not applied.
    Spec §7 A-CCL1 makes this the default (``global_cl="supcon"``).

    Args:
        g: (B, D) (or (B, D, 1, 1)) global embeddings of the clean view.
        g_aug: Embeddings of the augmented view, or ``None`` for single-view SupCon (then anchors without
            any positive are left out of the mean; if there is none at all the loss is a graph-connected 0).
        labels: (B,) integer labels.
        tau: Temperature.

    Returns:
        Scalar float32 loss.
    """
    y = _labels_1d(labels).to(g.device)
    z = _flat_embed(g) if g_aug is None else torch.cat([_flat_embed(g), _flat_embed(g_aug)], dim=0)
    if g_aug is not None:
        y = torch.cat([y, y], dim=0)
    if y.numel() != z.shape[0]:
        raise ValueError(f"{y.numel()} labels for {z.shape[0]} embeddings")
    n = z.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    logits = z @ z.T / tau
    log_denom = torch.logsumexp(logits.masked_fill(eye, float("-inf")), dim=1, keepdim=True)
    log_prob = logits - log_denom
    pos = (y[:, None] == y[None, :]) & ~eye
    n_pos = pos.sum(dim=1)
    valid = n_pos > 0
    if not bool(valid.any()):
        return _graph_zero(z)
    mean_log_prob_pos = (log_prob * pos).sum(dim=1)[valid] / n_pos[valid]
    return -mean_log_prob_pos.mean()


def ccl_head_global_loss(g: Tensor, labels: Tensor | Sequence[int], tau: float = 0.05) -> Tensor:
    r"""Global term of the later official code (HEAD 6502f68 ``loss/base_loss.py::SCLLoss``), reproduced exactly.

    Single view only. With ``Z = ĝ ĝᵀ / τ`` (ĝ L2-normalised), ``log_p = log_softmax(Z, dim=-1)`` (self
    included in the denominator), ``pos_ij = [y_i = y_j]`` (diagonal included) and ``neg = 1 - pos``:

    ``L = mean_i[-Σ_j pos_ij log_p_ij / (Σ_j pos_ij + 1e-6)] + mean_i[-Σ_j neg_ij log_p_ij / (Σ_j neg_ij + 1e-6)]``.

    Note the second term also *rewards* probability mass on negatives (spec §3.4(c), §7 A-CCL1); kept as an
    option (``global_cl="ccl_head"``) for faithfulness, not as the default.

    Args:
        g: (B, D) global embeddings of the clean view.
        labels: (B,) integer labels.
        tau: Temperature.

    Returns:
        Scalar float32 loss.
    """
    z = _flat_embed(g)
    y = _labels_1d(labels).to(z.device)
    log_prob = F.log_softmax(z @ z.T / tau, dim=-1)
    pos = (y[:, None] == y[None, :]).float()
    neg = 1.0 - pos
    pos_term = -(pos * log_prob).sum(dim=-1) / (pos.sum(dim=-1) + 1e-6)
    neg_term = -(neg * log_prob).sum(dim=-1) / (neg.sum(dim=-1) + 1e-6)
    return pos_term.mean() + neg_term.mean()


def ccl_v1_global_loss(g: Tensor, g_aug: Tensor, labels: Tensor | Sequence[int], tau: float = 0.05) -> Tensor:
    r"""Global term of the first official code (v1 204b215 ``loss/base_loss.py::SCLLoss``), reproduced exactly.

    On ``z = [g; g']`` (L2-normalised) with labels ``[y; y]``, ``Z = z zᵀ / τ``; positives = same label,
    self excluded; but the softmax denominator runs over ALL columns including self, and the loss is a single
    average over all positive pairs (not per anchor):

    ``L = -Σ_{i,j} pos_ij · log( e^{Z_ij} / Σ_k e^{Z_ik} ) / Σ_{i,j} pos_ij``.

    Args:
        g: (B, D) global embeddings of the clean view.
        g_aug: (B, D) global embeddings of the augmented view.
        labels: (B,) integer labels.
        tau: Temperature.

    Returns:
        Scalar float32 loss.
    """
    z = torch.cat([_flat_embed(g), _flat_embed(g_aug)], dim=0)
    y = _labels_1d(labels).to(z.device)
    y = torch.cat([y, y], dim=0)
    log_prob = F.log_softmax(z @ z.T / tau, dim=-1)
    pos = (y[:, None] == y[None, :]).float()
    pos.fill_diagonal_(0.0)
    return -(pos * log_prob).sum() / pos.sum()


# ----------------------------------------------------------------------------------------------------------
# feature noise
# ----------------------------------------------------------------------------------------------------------
def feature_noise_(
    features: list[Tensor],
    prob_apply: float | None = None,
    generator: torch.Generator | None = None,
    mask_prob: float = 0.5,
    std: float = 1.0,
    inplace: bool = True,
) -> bool:
    """Randomly perturb multi-level features with masked Gaussian noise, in place (official CCL noise).

    Once per call (= per training iteration) decide whether to perturb. If so, for every level draw
    ``noise ~ N(0, std²)`` of the feature's shape and a per-sample, per-location Bernoulli(``mask_prob``)
    mask of shape (B, 1, H, W) shared by all channels, and add ``noise · mask``.

    Official (``model/lgc.py`` / ``model/rd.py`` ``train_forward``): ``torch.randn(1) > 0.5`` decides
    (probability :data:`NOISE_TRIGGER_PROB` ≈ 0.31), ``randint(0, 2, (B, 1, H, W))`` is the mask, and the
    noise is added with ``+=`` to the projected **clean-view** features only — i.e. in place, so the OCBE,
    the student and the dense contrastive loss all see the noisy maps. The caller applies it only in
    training mode.

    In-place semantics: with ``inplace=True`` (default, faithful) each tensor is modified with ``add_`` —
    every reference to it sees the noise, and autograd treats the add as identity (fine for outputs of
    non-in-place ops such as :class:`~mcad.models.blocks.projection.ProjLayer`; it raises for leaf tensors
    that require grad). With ``inplace=False`` the list entries are replaced by new tensors instead (the
    list itself is still mutated; other references to the old tensors keep the clean values).

    Args:
        features: List of (B, C, H, W) tensors; modified in place.
        prob_apply: ``None`` = official rule (one N(0,1) draw compared with 0.5); otherwise the
            probability of perturbing (one U(0,1) draw ``< prob_apply``).
        generator: Optional generator for all draws (made on its device, then moved to each feature's
            device). ``None``: global CPU RNG for the decision (as official), each feature's device RNG for
            noise and mask.
        mask_prob: Probability that a location is perturbed (official 0.5).
        std: Noise standard deviation (official 1).
        inplace: See above.

    Returns:
        Whether the noise was applied.
    """
    gen_device = generator.device if generator is not None else torch.device("cpu")
    if prob_apply is None:
        apply = bool(torch.randn(1, generator=generator, device=gen_device).item() > 0.5)
    else:
        apply = bool(torch.rand(1, generator=generator, device=gen_device).item() < prob_apply)
    if not apply:
        return False
    for idx, f in enumerate(features):
        b, _, h, w = f.shape
        if generator is None:
            noise = torch.randn_like(f)
            mask = torch.rand((b, 1, h, w), device=f.device) < mask_prob
        else:
            noise = torch.randn(f.shape, generator=generator, device=gen_device, dtype=f.dtype).to(f.device)
            mask = (torch.rand((b, 1, h, w), generator=generator, device=gen_device) < mask_prob).to(f.device)
        delta = noise.mul_(std) * mask.to(f.dtype)
        if inplace:
            f.add_(delta)
        else:
            features[idx] = f + delta
    return True


# ----------------------------------------------------------------------------------------------------------
# combined module
# ----------------------------------------------------------------------------------------------------------
class CCLLoss(nn.Module):
    """The two CCL contrastive terms with weights and switches (the reconstruction loss stays with the method).

    ``total = lambda_dense · L_dense + lambda_global · L_global`` (official: both weights 1, both τ 0.05).

    Args:
        lambda_dense: Weight of the dense term.
        lambda_global: Weight of the global term.
        use_dense: Enable the dense term.
        use_global: Enable the global term.
        global_cl: ``"supcon"`` (default, Khosla SupCon on both views), ``"ccl_head"`` (later official code,
            clean view only) or ``"ccl_v1"`` (first official code).
        tau_dense: Temperature of the dense term.
        tau_global: Temperature of the global term.
        chunk_size: Query chunk of the dense correspondence search (memory only, no effect on values).
        dense_levels: Indices (shallow = 0) of the feature levels the dense term averages over; ``None`` =
            every level (official). Levels left out still feed the reconstruction and the global term.
    """

    def __init__(
        self,
        lambda_dense: float = 1.0,
        lambda_global: float = 1.0,
        use_dense: bool = True,
        use_global: bool = True,
        global_cl: GlobalCL = "supcon",
        tau_dense: float = 0.05,
        tau_global: float = 0.05,
        chunk_size: int | None = 1024,
        dense_levels: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if dense_levels is not None:
            dense_levels = sorted({int(i) for i in dense_levels})
            if not dense_levels or dense_levels[0] < 0:
                raise ValueError(f"dense_levels must be null or non-empty level indices >= 0, got {dense_levels}")
        if global_cl not in ("supcon", "ccl_head", "ccl_v1"):
            raise ValueError(f"global_cl must be 'supcon', 'ccl_head' or 'ccl_v1', got {global_cl!r}")
        if tau_dense <= 0 or tau_global <= 0:
            raise ValueError("temperatures must be positive")
        self.lambda_dense = float(lambda_dense)
        self.lambda_global = float(lambda_global)
        self.use_dense = bool(use_dense)
        self.use_global = bool(use_global)
        self.global_cl: GlobalCL = global_cl
        self.tau_dense = float(tau_dense)
        self.tau_global = float(tau_global)
        self.chunk_size = chunk_size
        self.dense_levels = dense_levels
        #: Number of training batches seen with fewer than two classes (dense term is 0 on those).
        self.single_class_batches = 0
        self._warned_single_class = False

    def extra_repr(self) -> str:
        """Options shown in ``repr(module)``."""
        return (
            f"use_dense={self.use_dense}, lambda_dense={self.lambda_dense}, tau_dense={self.tau_dense}, "
            f"use_global={self.use_global}, lambda_global={self.lambda_global}, tau_global={self.tau_global}, "
            f"global_cl={self.global_cl!r}, dense_levels={self.dense_levels}"
        )

    def _check_batch_classes(self, labels: Tensor) -> None:
        if not (self.training and (self.use_dense or self.use_global)):
            return
        if torch.unique(labels).numel() >= 2:
            return
        self.single_class_batches += 1
        if not self._warned_single_class:
            self._warned_single_class = True
            warnings.warn(
                "CCLLoss: a training batch contains a single class label; the dense contrastive term is 0 "
                "for it and the global term has no negatives. Use a batch mixing classes (shuffled "
                "multi-class sampler) or check the label source. (Warned once; see "
                "`CCLLoss.single_class_batches` for the count.)",
                RuntimeWarning,
                stacklevel=3,
            )

    def forward(
        self,
        teacher_clean: Sequence[Tensor],
        teacher_aug: Sequence[Tensor],
        proj_clean: Sequence[Tensor],
        proj_aug: Sequence[Tensor],
        global_clean: Tensor,
        global_aug: Tensor | None,
        class_labels: Tensor | Sequence[int],
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """Compute the enabled terms.

        Args:
            teacher_clean: Per-level correspondence features, clean view (see
                :func:`dense_class_contrastive_loss`).
            teacher_aug: Same, augmented view.
            proj_clean: Per-level trainable features, clean view (after feature noise).
            proj_aug: Same, augmented view.
            global_clean: (B, D) global embedding of the clean view.
            global_aug: (B, D) global embedding of the augmented view (ignored by ``"ccl_head"``; may be
                ``None`` only for ``"ccl_head"`` or single-view ``"supcon"``).
            class_labels: (B,) integer (pseudo-)class labels.
            generator: Optional CPU generator for the dense term's negative draws.

        Returns:
            ``{"dense": λ_d·L_dense, "global_": λ_g·L_global, "total": sum}``; a disabled term is a constant
            float32 zero.
        """
        labels = _labels_1d(class_labels)
        self._check_batch_classes(labels)
        device = global_clean.device
        zero = torch.zeros((), dtype=torch.float32, device=device)

        dense = zero
        if self.use_dense:
            levels = [teacher_clean, teacher_aug, proj_clean, proj_aug]
            if self.dense_levels is not None:
                if self.dense_levels[-1] >= len(proj_clean):
                    raise ValueError(
                        f"loss.dense_levels={self.dense_levels} but the method exposes {len(proj_clean)} levels "
                        f"(valid indices 0..{len(proj_clean) - 1})."
                    )
                levels = [[maps[i] for i in self.dense_levels] for maps in levels]
            dense = self.lambda_dense * dense_class_contrastive_loss(
                *levels,
                labels,
                tau=self.tau_dense,
                generator=generator,
                chunk_size=self.chunk_size,
            )

        glob = zero
        if self.use_global:
            if self.global_cl == "supcon":
                glob = supcon_loss(global_clean, global_aug, labels, tau=self.tau_global)
            elif self.global_cl == "ccl_head":
                glob = ccl_head_global_loss(global_clean, labels, tau=self.tau_global)
            else:
                if global_aug is None:
                    raise ValueError("global_cl='ccl_v1' needs the augmented view's global embedding")
                glob = ccl_v1_global_loss(global_clean, global_aug, labels, tau=self.tau_global)
            glob = self.lambda_global * glob

        return {"dense": dense, "global_": glob, "total": dense + glob}


# ----------------------------------------------------------------------------------------------------------
# loss plug-in (`loss=ccl`): labels, second view and the two terms for any method
# ----------------------------------------------------------------------------------------------------------
LabelSource = Literal["gt", "kmeans"]
Correspondence = Literal["auto", "dense"]
ViewSource = Literal["original", "resized"]


def _make_view_transform(
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    crop_scale: tuple[float, float],
    rotate_limit: float,
    blur_kernel: int,
) -> Any:
    """The datamodule's ``view_transform_factory``: the CCL view pipeline, seeded from torch.

    Seeding from ``torch.initial_seed()`` (the run's ``seed`` after ``seed_everything``) makes runs
    with ``num_workers=0`` reproducible; loader workers re-seed it (``worker_init_fn``).
    """
    return contrastive_view_transform(
        image_size, mean, std, crop_scale=crop_scale, rotate_limit=rotate_limit, blur_kernel=blur_kernel,
        seed=int(torch.initial_seed() % 2**32),
    )  # fmt: skip


def _normalised_batches(dataset: Any, mean: Sequence[float], std: Sequence[float], batch_size: int) -> Iterator[Tensor]:
    """The training images of ``dataset`` in order, without any augmentation, normalised with ``mean``/``std``.

    Reads through the dataset's decoded cache and its deterministic transform (resize, optional centre
    crop), so the clustered images are exactly the clean views the method trains on.
    """
    shift = 255.0 * torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    scale = 255.0 * torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    for start in range(0, len(dataset), batch_size):
        stop = min(start + batch_size, len(dataset))
        images = [dataset.transform(image=dataset.load(i)[0])["image"] for i in range(start, stop)]
        yield (torch.stack(images).float() - shift) / scale


class CCLPlugin(LossPlugin):
    """CCL as a loss plug-in (``loss=ccl``): the two class-aware contrastive terms on any method.

    The plug-in asks the data layer for CCL's augmented second view (``image_aug``, spec §3.3) and for
    batches that hold at least two classes, provides each sample's class label (ground-truth category or
    k-means pseudo class) and computes :class:`CCLLoss` from the method's feature hooks:

    * dense term: ``method.dense_features`` of both views are contrasted; the argmax correspondence
      between the views comes from ``method.correspondence_features`` (e.g. a frozen teacher) when the
      method provides it, else from the (detached) dense features themselves;
    * global term: ``method.global_embedding`` of both views.

    The generic path costs extra forward passes (clean and augmented view through each hook). A method
    that wraps CCL natively (``method=ccl_rd``) computes the features in its own two-view pass and calls
    :meth:`batch_labels` and :attr:`terms` directly, so the loss functions are shared, not duplicated.

    Args:
        lambda_dense: Weight of the dense term (official 1).
        lambda_global: Weight of the global term (official 1).
        use_dense: Enable the dense term.
        use_global: Enable the global term.
        global_cl: ``supcon`` (default, spec A-CCL1), ``ccl_head`` (later official code) or ``ccl_v1``.
        tau_dense: Dense temperature (official configs 0.05).
        tau_global: Global temperature (official configs 0.05).
        chunk_size: Query chunk of the correspondence search (memory only).
        dense_levels: Level indices the dense term uses (``None`` = all, official); see :class:`CCLLoss`.
        label_source: ``gt`` (category index from the data layer) or ``kmeans`` (pseudo classes, A-CCL3).
        kmeans_backbone: Partial building the frozen feature extractor for the pseudo labels (a
            :class:`~mcad.models.backbones.TimmBackbone`); the GAP of its last level is clustered.
            Official v1: ImageNet ResNet-18 ``layer4`` (512-d). Only built when ``label_source=kmeans``.
        kmeans_clusters: Number of clusters; ``None`` = number of classes in the training set (E-CCL3;
            the official code hard-codes 15).
        kmeans_seed: K-means ``random_state`` (official 0).
        kmeans_n_init: K-means restarts (pinned: scikit-learn's default changed in 1.4).
        cache_dir: Pseudo labels are cached under ``<cache_dir>/pseudo_labels`` keyed by the feature
            extractor, the sizes, the k-means settings and the ordered training file list; ``None`` = no cache.
        correspondence: ``auto`` (the method's ``correspondence_features`` if it has them, else its dense
            features) or ``dense`` (always the dense features).
        view_crop_scale: RandomResizedCrop area range of the second view (official RD recipe 0.8-1.0;
            ViTAD+CCL 0.7-1.0).
        view_rotate_limit: Rotation range of the second view in degrees (RD recipe 15; ViTAD+CCL 30).
        view_blur_kernel: Gaussian-blur kernel of the second view (RD recipe 23).
        view_source: ``original`` (official, E-CCL5): the second view is cut from the decoded file at its
            own resolution, as torchvision's RandomResizedCrop on the PIL image; ``resized``: from the
            ``data.image_size`` image the clean view uses (cheaper: no second decode per item).
    """

    def __init__(
        self,
        lambda_dense: float = 1.0,
        lambda_global: float = 1.0,
        use_dense: bool = True,
        use_global: bool = True,
        global_cl: GlobalCL = "supcon",
        tau_dense: float = 0.05,
        tau_global: float = 0.05,
        chunk_size: int | None = 1024,
        dense_levels: Sequence[int] | None = None,
        label_source: LabelSource = "gt",
        kmeans_backbone: Callable[[], nn.Module] | None = None,
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
        self.terms = CCLLoss(
            lambda_dense=lambda_dense, lambda_global=lambda_global, use_dense=use_dense, use_global=use_global,
            global_cl=global_cl, tau_dense=tau_dense, tau_global=tau_global, chunk_size=chunk_size,
            dense_levels=dense_levels,
        )  # fmt: skip
        self.label_source: LabelSource = label_source
        self.kmeans_backbone = kmeans_backbone
        self.kmeans_clusters = kmeans_clusters
        self.kmeans_seed = int(kmeans_seed)
        self.kmeans_n_init = int(kmeans_n_init)
        self.cache_dir = cache_dir
        self.correspondence = correspondence
        self.view_options = {
            "crop_scale": (float(view_crop_scale[0]), float(view_crop_scale[1])),
            "rotate_limit": float(view_rotate_limit),
            "blur_kernel": int(view_blur_kernel),
        }
        self.view_source: ViewSource = view_source
        self._datamodule: Any = None
        self._pseudo: Tensor | None = None  # (N,) pseudo label of every training sample index
        self.label_info: dict[str, Any] = {"source": label_source}

    # ------------------------------------------------------------------------------------ data wiring
    def configure_datamodule(self, datamodule: Any) -> None:
        """Requests the augmented view (``image_aug``) and batches holding at least two classes."""
        datamodule.view_transform_factory = functools.partial(_make_view_transform, **self.view_options)
        datamodule.view_from_original = self.view_source == "original"
        datamodule.mixed_batches = True  # on top of data.sampler's order (random or class_balanced)
        self._datamodule = datamodule

    def setup(self, method: Any) -> None:
        """Checks the classes of the training set and, for ``kmeans``, computes the pseudo labels.

        Called once at the start of training (:meth:`AnomalyModule.on_fit_start`), after the data
        module is set up and before the training loader is built.

        Raises:
            DataError: The training set holds a single class and ``label_source=gt`` (no negatives), or
                k-means would have fewer than two clusters.
        """
        dm = self._datamodule
        if dm is None:
            trainer = getattr(method, "_trainer", None)
            dm = getattr(trainer, "datamodule", None) if trainer is not None else None
        dataset = getattr(dm, "train_dataset", None)
        if dataset is None:
            raise RuntimeError("loss=ccl needs the training data module (built by mcad.train.build_components).")
        class_ids = np.array([dataset.class_index[r.class_name] for r in dataset.records], dtype=np.int64)
        present = sorted({r.class_name for r in dataset.records})
        if self.label_source == "gt":
            if len(present) < 2:
                raise DataError(
                    f"CCL with loss.label_source=gt needs at least two object classes in the training set: its "
                    f"negatives are images of another class, but the training set only holds {present}. Train "
                    "on several classes, or use loss.label_source=kmeans loss.kmeans_clusters=2 (or more)."
                )
            self._pseudo = None
            self.label_info = {"source": "gt", "num_classes": len(present)}
            return
        k = self.kmeans_clusters or len(present)
        if k < 2:
            raise DataError(
                f"loss.label_source=kmeans with k = number of classes = {k} gives a single pseudo class "
                f"(training set: {present}); set loss.kmeans_clusters=2 or more."
            )
        labels, extractor = self._kmeans_labels(dataset, k, method.device)
        ari = adjusted_rand_index(class_ids, labels)
        counts = np.bincount(labels, minlength=k).tolist()
        log.info("CCL pseudo labels: k-means (k=%d) on %s features of %d training images; adjusted Rand index "
                 "against the classes = %.4f; cluster sizes %s", k, extractor, len(labels), ari, counts)  # fmt: skip
        self._pseudo = torch.from_numpy(labels)
        self.label_info = {
            "source": "kmeans", "num_classes": len(present), "num_clusters": k, "features": extractor,
            "adjusted_rand_index": ari, "cluster_sizes": counts,
        }  # fmt: skip
        if getattr(dm, "mixed_batches", False) or getattr(dm, "sampler", None) == "mixed_class":
            # Mix pseudo classes, which are what the contrastive terms see.
            dm.sampler_labels = labels.tolist()

    def _kmeans_labels(self, dataset: Any, k: int, device: torch.device) -> tuple[np.ndarray, str]:
        if self.kmeans_backbone is None:
            raise ValueError("loss.label_source=kmeans needs loss.kmeans_backbone (a frozen feature extractor).")
        backbone = self.kmeans_backbone().to(device)
        extractor = str(getattr(backbone, "model_name", type(backbone).__name__))
        options = {k_: str(v) for k_, v in sorted(getattr(self.kmeans_backbone, "keywords", {}).items())}
        crop = getattr(dataset.transform, "transforms", None)
        key = cache_key(
            "ccl-kmeans-v1", extractor, options, list(getattr(backbone, "out_indices", [])), dataset.load_size,
            str(crop), k, self.kmeans_seed, self.kmeans_n_init, [r.image_path for r in dataset.records],
        )  # fmt: skip

        def compute() -> np.ndarray:
            from mcad.data.pseudo_labels import extract_global_features

            mean = getattr(backbone, "mean", (0.485, 0.456, 0.406))
            std = getattr(backbone, "std", (0.229, 0.224, 0.225))
            features = extract_global_features(backbone, _normalised_batches(dataset, mean, std, 32), device=device)
            return kmeans_pseudo_labels(features, k, seed=self.kmeans_seed, n_init=self.kmeans_n_init)

        if self.cache_dir is None:
            return np.asarray(compute(), dtype=np.int64), extractor
        path = Path(self.cache_dir).expanduser() / "pseudo_labels" / f"{key[:24]}.npz"
        return cached_pseudo_labels(path, compute, key=key), extractor

    def batch_labels(self, batch: dict[str, Any]) -> Tensor:
        """``(B,)`` class labels of a training batch: ``class_id`` (gt) or the pseudo label of ``index``."""
        device = batch["image"].device
        if self.label_source == "gt":
            return torch.as_tensor(batch["class_id"]).to(device)
        if self._pseudo is None:
            raise RuntimeError("loss.label_source=kmeans: pseudo labels are computed at fit start (CCLPlugin.setup).")
        return self._pseudo[torch.as_tensor(batch["index"]).cpu()].to(device)

    def extra_results(self) -> dict[str, Any]:
        """``{"class_labels": ...}`` for results.json (label source, k, adjusted Rand index)."""
        return {"class_labels": dict(self.label_info)}

    # ------------------------------------------------------------------------------------ loss
    def forward(self, method: Any, batch: dict[str, Any]) -> dict[str, Tensor]:
        """The weighted CCL terms of a training batch, from the method's feature hooks.

        Returns:
            ``{"ccl_dense": λ_d·L_dense, "ccl_global": λ_g·L_global}`` (a disabled term is 0).
        """
        if "image_aug" not in batch:
            raise RuntimeError(
                "loss=ccl needs the augmented view batch['image_aug']: the data module was not configured "
                "by the plug-in (AnomalyModule.configure_datamodule, called by mcad.train.build_components)."
            )
        images, images_aug = batch["image"], batch["image_aug"]
        labels = self.batch_labels(batch)
        dense = dense_aug = corr = corr_aug = None
        if self.terms.use_dense:
            dense, dense_aug = method.dense_features(images), method.dense_features(images_aug)
            corr = corr_aug = None
            if self.correspondence == "auto":
                corr = method.correspondence_features(images)
                corr_aug = method.correspondence_features(images_aug) if corr is not None else None
            if corr is None:
                corr, corr_aug = [f.detach() for f in dense], [f.detach() for f in dense_aug]
        g = g_aug = None
        if self.terms.use_global:
            g = method.global_embedding(images)
            if self.terms.global_cl != "ccl_head":
                g_aug = method.global_embedding(images_aug)
        if g is None:
            g = images.new_zeros(len(images), 1)  # CCLLoss only reads its device
        out = self.terms(corr, corr_aug, dense, dense_aug, g, g_aug, labels)
        return {"ccl_dense": out["dense"], "ccl_global": out["global_"]}
