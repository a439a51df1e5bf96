"""CCL: the class-aware contrastive loss terms (pure loss code, no data or model plumbing).

CCL (arXiv 2412.04769, ICCV 2025; official code LGC-AD/AD-LGC) adds two supervised contrastive terms to a
reconstruction model, both driven by a class label of each training image (its object category, or a
k-means pseudo class), never by the normal/anomalous flag:

* a **dense (local) term** on multi-level trainable feature maps of two views of each image
  (:func:`dense_class_contrastive_loss`), matched location by location on frozen features;
* a **global term** on a pooled embedding (:func:`ccl_head_global_loss`, the code released with the ICCV
  version and the default; :func:`ccl_v1_global_loss`, the first released code; :func:`supcon_loss`,
  Khosla et al.'s SupCon on both views, not an official formula).

:class:`CCLLoss` bundles the terms with their weights and switches. Where the features come from (one
forward pass of each view of the method) is the plug-in's business (:mod:`mcad.methods.plugins.ccl`).

Official references: ``loss/base_loss.py`` (``DenseLoss``, ``SCLLoss``) at v1 204b215 and HEAD 6502f68. The
official ``temperature`` constructor default is 0.1, but every config sets 0.05; 0.05 is our default.

Numerics: every term is evaluated in float32 (inputs are up-cast) because with tau = 0.05 the logits reach
+-20 and ``exp`` of them overflows float16 under autocast; the formulas are written with ``logsumexp`` /
``log_softmax`` so they equal the official expressions without their overflow risk.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "GLOBAL_CL",
    "CCLLoss",
    "GlobalCL",
    "ccl_head_global_loss",
    "ccl_v1_global_loss",
    "dense_class_contrastive_loss",
    "dense_correspondence",
    "sample_other_class_indices",
    "supcon_loss",
]

GlobalCL = Literal["ccl_head", "ccl_v1", "supcon"]
GLOBAL_CL: tuple[str, ...] = ("ccl_head", "ccl_v1", "supcon")

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


def sample_other_class_indices(labels: Tensor | Sequence[int]) -> Tensor | None:
    """Draw, for every sample b, one uniformly random batch index n(b) whose label differs from ``labels[b]``.

    Mirrors the official per-sample loop (``loss/base_loss.py::DenseLoss.densecl``): for b = 0..B-1 in
    order, one ``torch.randint(0, #candidates, (1,))`` draw among the other-class indices (ascending).

    Args:
        labels: (B,) integer class labels.

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
        pick = torch.randint(0, candidates.numel(), (1,))  # the global CPU RNG, as the official loop
        out[b] = candidates[pick]
    return out


def _dense_level_loss(
    t: Tensor,
    t_aug: Tensor,
    p: Tensor,
    p_aug: Tensor,
    labels: Tensor,
    tau: float,
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
    neg_idx = sample_other_class_indices(labels)
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
        chunk_size: See :func:`dense_correspondence`.

    Returns:
        Scalar float32 loss.
    """
    tc, ta, pc, pa = (_as_list(x) for x in (teacher_clean, teacher_aug, proj_clean, proj_aug))
    _check_levels(tc, ta, pc, pa)
    labels = _labels_1d(class_labels)
    losses = [_dense_level_loss(t, t_k, p, p_k, labels, tau, chunk_size) for t, t_k, p, p_k in zip(tc, ta, pc, pa)]
    return torch.stack(losses).mean()


# ----------------------------------------------------------------------------------------------------------
# global class-aware contrastive terms
# ----------------------------------------------------------------------------------------------------------
def _flat_embed(g: Tensor) -> Tensor:
    # Accept (B, D) as well as un-squeezed GAP outputs (B, D, 1, 1).
    return F.normalize(g.float().flatten(1), p=2, dim=1)


def supcon_loss(g: Tensor, g_aug: Tensor, labels: Tensor | Sequence[int], tau: float = 0.05) -> Tensor:
    r"""Supervised contrastive loss over both views (Khosla et al. 2020, :math:`\mathcal{L}^{sup}_{out}`).

    On the 2B L2-normalised vectors ``z = [g; g']`` with labels ``[y; y]``, for every anchor i:
    ``P(i) = {p != i : y_p = y_i}``, ``A(i) = {a != i}`` (self excluded from numerator AND denominator) and

    ``L = mean_i  -1/|P(i)| sum_{p in P(i)} log( exp(z_i.z_p/tau) / sum_{a in A(i)} exp(z_i.z_a/tau) )``.

    Not an official CCL formula (``global_cl=supcon``, an option): the paper's equation written as standard
    SupCon. Every anchor has a positive (its other view), so the mean runs over all 2B anchors.

    Args:
        g: (B, D) (or (B, D, 1, 1)) global embeddings of the clean view.
        g_aug: Embeddings of the augmented view.
        labels: (B,) integer labels.
        tau: Temperature.

    Returns:
        Scalar float32 loss.
    """
    z = torch.cat([_flat_embed(g), _flat_embed(g_aug)], dim=0)
    y = _labels_1d(labels).to(z.device)
    y = torch.cat([y, y], dim=0)
    if y.numel() != z.shape[0]:
        raise ValueError(f"{y.numel() // 2} labels for {z.shape[0] // 2} embeddings")
    eye = torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
    logits = z @ z.T / tau
    log_prob = logits - torch.logsumexp(logits.masked_fill(eye, float("-inf")), dim=1, keepdim=True)
    pos = (y[:, None] == y[None, :]) & ~eye
    return -((log_prob * pos).sum(dim=1) / pos.sum(dim=1)).mean()


def ccl_head_global_loss(g: Tensor, labels: Tensor | Sequence[int], tau: float = 0.05) -> Tensor:
    r"""Global term of the later official code (HEAD 6502f68 ``loss/base_loss.py::SCLLoss``), reproduced exactly.

    Single view only. With ``Z = ĝ ĝᵀ / τ`` (ĝ L2-normalised), ``log_p = log_softmax(Z, dim=-1)`` (self
    included in the denominator), ``pos_ij = [y_i = y_j]`` (diagonal included) and ``neg = 1 - pos``:

    ``L = mean_i[-Σ_j pos_ij log_p_ij / (Σ_j pos_ij + 1e-6)] + mean_i[-Σ_j neg_ij log_p_ij / (Σ_j neg_ij + 1e-6)]``.

    The second term also *rewards* probability mass on negatives (docs/codes.md A-CCL1); it is nevertheless
    the formula of the code released with the ICCV version, hence the default (``global_cl="ccl_head"``).

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
# combined module
# ----------------------------------------------------------------------------------------------------------
class CCLLoss(nn.Module):
    """The two CCL contrastive terms with weights and switches (the reconstruction loss stays with the method).

    ``total = lambda_dense * L_dense + lambda_global * L_global`` (official: both weights 1, both tau 0.05).

    Args:
        lambda_dense: Weight of the dense term.
        lambda_global: Weight of the global term.
        use_dense: Enable the dense term.
        use_global: Enable the global term.
        global_cl: ``ccl_head`` (default: the code released with the ICCV version, clean view only),
            ``ccl_v1`` (the first released code, both views) or ``supcon`` (SupCon on both views; no official
            run used it).
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
        global_cl: GlobalCL = "ccl_head",
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
        if global_cl not in GLOBAL_CL:
            raise ValueError(f"global_cl must be one of {GLOBAL_CL}, got {global_cl!r}")
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

    @property
    def needs_augmented_embedding(self) -> bool:
        """Whether the global term reads the augmented view's embedding (``ccl_head`` does not)."""
        return self.use_global and self.global_cl != "ccl_head"

    def extra_repr(self) -> str:
        """Options shown in ``repr(module)``."""
        return (
            f"use_dense={self.use_dense}, lambda_dense={self.lambda_dense}, tau_dense={self.tau_dense}, "
            f"use_global={self.use_global}, lambda_global={self.lambda_global}, tau_global={self.tau_global}, "
            f"global_cl={self.global_cl!r}, dense_levels={self.dense_levels}"
        )

    def forward(
        self,
        correspondence: Sequence[Tensor],
        correspondence_aug: Sequence[Tensor],
        dense: Sequence[Tensor],
        dense_aug: Sequence[Tensor],
        embedding: Tensor,
        embedding_aug: Tensor | None,
        labels: Tensor | Sequence[int],
    ) -> dict[str, Tensor]:
        """Computes the enabled terms.

        Args:
            correspondence: Per-level features the two views are matched on, clean view (official: the
                frozen teacher's maps; see :func:`dense_class_contrastive_loss`).
            correspondence_aug: Same, augmented view.
            dense: Per-level trainable features, clean view (official: the projected maps after the noise).
            dense_aug: Same, augmented view.
            embedding: (B, D) global embedding of the clean view.
            embedding_aug: (B, D) global embedding of the augmented view; may be ``None`` for ``ccl_head``.
            labels: (B,) integer (pseudo-)class labels.

        Returns:
            ``{"dense": lambda_d * L_dense, "global": lambda_g * L_global}``; a disabled term is a float32 zero.
        """
        labels = _labels_1d(labels)
        zero = torch.zeros((), dtype=torch.float32, device=embedding.device)
        out = {"dense": zero, "global": zero}
        if self.use_dense:
            levels = [correspondence, correspondence_aug, dense, dense_aug]
            if self.dense_levels is not None:
                if self.dense_levels[-1] >= len(dense):
                    raise ValueError(
                        f"loss.terms.dense_levels={self.dense_levels} but the method exposes {len(dense)} levels "
                        f"(valid indices 0..{len(dense) - 1})."
                    )
                levels = [[maps[i] for i in self.dense_levels] for maps in levels]
            teacher, teacher_aug, proj, proj_aug = levels
            out["dense"] = self.lambda_dense * dense_class_contrastive_loss(
                teacher, teacher_aug, proj, proj_aug, labels, tau=self.tau_dense, chunk_size=self.chunk_size
            )
        if self.use_global:
            if self.global_cl == "ccl_head":
                glob = ccl_head_global_loss(embedding, labels, tau=self.tau_global)
            else:
                if embedding_aug is None:
                    raise ValueError(f"global_cl={self.global_cl!r} needs the augmented view's global embedding")
                rule = supcon_loss if self.global_cl == "supcon" else ccl_v1_global_loss
                glob = rule(embedding, embedding_aug, labels, tau=self.tau_global)
            out["global"] = self.lambda_global * glob
        return out
