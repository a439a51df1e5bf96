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

import math
import warnings
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "GlobalCL",
    "CCLLoss",
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
    ) -> None:
        super().__init__()
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
        #: Number of training batches seen with fewer than two classes (dense term is 0 on those).
        self.single_class_batches = 0
        self._warned_single_class = False

    def extra_repr(self) -> str:
        """Options shown in ``repr(module)``."""
        return (
            f"use_dense={self.use_dense}, lambda_dense={self.lambda_dense}, tau_dense={self.tau_dense}, "
            f"use_global={self.use_global}, lambda_global={self.lambda_global}, tau_global={self.tau_global}, "
            f"global_cl={self.global_cl!r}"
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
            dense = self.lambda_dense * dense_class_contrastive_loss(
                teacher_clean,
                teacher_aug,
                proj_clean,
                proj_aug,
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
