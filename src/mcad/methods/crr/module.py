"""Lightning glue of CRR: two training phases, losses, optimisers and anomaly maps.

Phase ``stage1`` (reconstruction + repair, ``docs/methods.md``; official ``dinomaly_realiad_uni_first.py``):
bottleneck and decoder learn to reconstruct the clean image's encoder features from the clean image
*and* from its synthetic twin (the repair term). Phase ``stage2`` (segmentation; official
``dinomaly_realiad_uni_second.py``): the reconstruction network is frozen (eval mode, no gradients) and
the segmentation head learns the synthetic mask from the normalised encoder ⊙ decoder features of the
synthetic image. ``mcad.train`` runs the phases one after the other (``training_phases`` /
``start_phase``), one checkpoint folder each. At test time the method returns the reconstruction map
and, once stage II has started, the segmentation probability; their fusion (0.7 · recon + 0.3 · seg,
``protocol.seg_weight``), smoothing and image score belong to the shared evaluation protocol.

Dinomaly (``method=dinomaly``; guojiajeremy/Dinomaly ``dinomaly_{mvtec,visa}_uni.py``) is this module with
the repair term, the feature masking and stage II switched off: ``repair=False`` (stage I trains on the
clean image alone, no synthesis), ``decoder.mask_ratio=0`` (plain dropout bottleneck, Dinomaly's ``bMlp``),
``seg_head=None`` and ``stage2_steps=0``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mcad.data.requests import DataRequest
from mcad.evaluation.protocol import AnomalyMaps
from mcad.losses.focal import focal_loss
from mcad.losses.hard_mining import global_cosine_hard_mining, hard_mining_p
from mcad.methods.base import AnomalyModule, Phase
from mcad.methods.crr.model import CRRModel, CRROutput
from mcad.methods.plugins.base import Batch, ContrastiveFeatures

__all__ = ["CRRModule"]

STAGE1, STAGE2 = "stage1", "stage2"


def _default_loss() -> Callable[..., Tensor]:
    """CRR's stage-I loss when ``loss`` is a plug-in or absent: hard-mined global cosine, factor 0.1."""
    return functools.partial(global_cosine_hard_mining, factor=0.1)


class CRRModule(AnomalyModule):
    """Collaborative Reconstruction and Repair, multi-class.

    Args:
        backbone: Frozen encoder (``backbone`` config group): DINOv2-reg ViT-B/14 blocks 2..9 in the paper;
            any :class:`~mcad.models.backbones.TimmBackbone` works (CNN levels are adapted by ``CRRModel``).
        decoder: Partial building the reconstruction network around the backbone,
            ``decoder(backbone) -> CRRModel`` (``decoder=crr``: bottleneck, masking, decoder blocks,
            groups, ``mask_at_test``).
        seg_head: Partial building the stage-II segmentation head, called with ``in_channels``
            (= number of groups × decoder width), or ``None`` for a reconstruction-only model (Dinomaly;
            needs ``stage2_steps=0``).
        optimizer: Partial stage-I optimiser over bottleneck + decoder (StableAdamW 2e-3, betas
            (0.9, 0.999), wd 1e-4, eps 1e-10, AMSGrad).
        scheduler: Partial stage-I schedule called with ``(optimizer, total_steps)``, stepped every
            iteration (warm-up 100 + cosine to 0.1×), or ``None``.
        seg_optimizer: Partial stage-II optimiser over the segmentation head (Adam 1e-4).
        seg_scheduler: Partial stage-II schedule called with ``(optimizer, total_steps)``, or ``None``
            (official: a MultiStepLR whose milestones are never reached, i.e. constant).
        stage1_steps: Stage-I iterations (10 000 for MVTec AD / VisA, A-CRR1; 50 000 for Real-IAD).
            0 skips the phase (its weights must then come from ``ckpt_path``).
        stage2_steps: Stage-II iterations (8 000); 0 skips stage II and the method is reconstruction-only.
        stage2_batch_size: Stage-II batch size (8), or ``None`` to keep ``data.batch_size``.
        stage2_grad_clip: Whether ``trainer.gradient_clip_val`` also applies in stage II (official: no,
            the clipping line is commented out in the stage-II script).
        hard_mining_final: Final hard-mining fraction p (0.9).
        hard_mining_ramp: Iterations over which p rises linearly from 0 (1 000).
        seg_threshold: The synthetic mask, bilinearly resized to the head's output, is 1 where
            ``>= seg_threshold`` (0.5).
        repair: Add the repair term (CRR). False: stage I is Dinomaly's loss on the clean image alone and
            needs no synthetic images.
        loss: Stage-I loss ``loss(enc_groups, dec_groups, p=...)`` (``loss=hard_mining``), or a loss
            plug-in (``loss=ccl``) whose terms are added in stage I to the default hard-mined loss.
        synthesizer: The image-level synthesizer (``synthesizer=perlin``). The method asks the data layer for
            it (:meth:`data_request`), which then adds ``synthetic_image`` / ``synthetic_mask`` to every
            training batch; needed by the repair term and stage II, not requested without them (Dinomaly).
        protocol: Evaluation protocol (``protocol=dinomaly``).
        on_nonfinite: ``raise`` or ``skip`` batches with a NaN/Inf loss.
    """

    loss_fn: Callable[..., Tensor]  # never None here: the base builds default_loss when loss is a plug-in
    seg_head_active: Tensor  # the buffer registered in __init__

    def __init__(
        self,
        backbone: nn.Module,
        decoder: Callable[..., CRRModel] | None,
        seg_head: Callable[..., nn.Module] | None,
        optimizer: Callable[..., Any],
        scheduler: Callable[..., Any] | None = None,
        seg_optimizer: Callable[..., Any] | None = None,
        seg_scheduler: Callable[..., Any] | None = None,
        stage1_steps: int = 10_000,
        stage2_steps: int = 8_000,
        stage2_batch_size: int | None = 8,
        stage2_grad_clip: bool = False,
        hard_mining_final: float = 0.9,
        hard_mining_ramp: int = 1000,
        seg_threshold: float = 0.5,
        repair: bool = True,
        loss: Any = None,
        synthesizer: Any = None,
        protocol: Any = None,
        on_nonfinite: str = "raise",
    ) -> None:
        super().__init__(protocol=protocol, on_nonfinite=on_nonfinite, loss=loss, default_loss=_default_loss)
        if stage1_steps < 0 or stage2_steps < 0:
            raise ValueError(f"stage1_steps and stage2_steps must be >= 0, got {stage1_steps}, {stage2_steps}.")
        if seg_head is None and stage2_steps > 0:
            raise ValueError("method.seg_head=null (reconstruction only) needs method.stage2_steps=0.")
        self.model: CRRModel = (decoder or CRRModel)(backbone)
        in_channels = len(self.model.groups) * self.model.embed_dim
        self.seg_head: nn.Module | None = seg_head(in_channels=in_channels) if seg_head is not None else None
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.seg_optimizer_factory = seg_optimizer or functools.partial(torch.optim.Adam, lr=1e-4)
        self.seg_scheduler_factory = seg_scheduler
        self.stage1_steps, self.stage2_steps = int(stage1_steps), int(stage2_steps)
        self.stage2_batch_size, self.stage2_grad_clip = stage2_batch_size, stage2_grad_clip
        self.hard_mining_final, self.hard_mining_ramp = hard_mining_final, hard_mining_ramp
        self.seg_threshold = seg_threshold
        self.repair = bool(repair)
        self.synthesizer = synthesizer
        # Saved with the weights: whether stage II has started, i.e. whether the segmentation head is
        # part of the inference path (a stage-I checkpoint evaluates as reconstruction only).
        self.register_buffer("seg_head_active", torch.tensor(False))
        self.phase = STAGE1
        self.start_phase(STAGE1)

    # ---------------------------------------------------------------------------- phases
    def training_phases(self) -> list[Phase]:
        """Stage I then stage II, each for a fixed number of iterations (see ``mcad.training.phases``)."""
        phases = []
        if self.stage1_steps > 0:
            phases.append(Phase(STAGE1, trainer={"max_steps": self.stage1_steps, "max_epochs": -1}))
        if self.stage2_steps > 0:
            data = {"batch_size": self.stage2_batch_size} if self.stage2_batch_size else {}
            phases.append(Phase(STAGE2, trainer={"max_steps": self.stage2_steps, "max_epochs": -1}, data=data))
        return phases

    def start_phase(self, name: str) -> None:
        """Switches trainable parts: stage I trains bottleneck + decoder, stage II only the seg head."""
        if name not in (STAGE1, STAGE2):
            raise ValueError(f"Unknown CRR training phase '{name}' (known: {STAGE1}, {STAGE2}).")
        self.phase = name
        stage2 = name == STAGE2
        for p in self.model.trainable_parameters():
            p.requires_grad_(not stage2)
        if self.seg_head is not None:
            self.seg_head.requires_grad_(stage2)  # unused in stage I: no gradient, no optimiser state
        if stage2:
            self.seg_head_active.fill_(True)
        self.train(self.training)

    def train(self, mode: bool = True) -> CRRModule:
        """Keeps the reconstruction network in eval mode during stage II (official ``model.eval()``)."""
        super().train(mode)
        if self.phase == STAGE2:
            self.model.eval()
        return self

    def data_request(self) -> DataRequest:
        """The synthesizer when training uses synthetic images (repair term or stage II), merged with the plug-in's."""
        request = super().data_request()
        if self.synthesizer is not None and (self.repair or self.stage2_steps > 0):
            request = request.merge(DataRequest(synthesizer=self.synthesizer))
        return request

    # ---------------------------------------------------------------------------- training
    def _synthetic(self, batch: Batch) -> tuple[Tensor, Tensor]:
        if "synthetic_image" not in batch:
            raise RuntimeError(
                "CRR trains on synthetic anomalies: select an image-level synthesizer (synthesizer=perlin)."
            )
        return batch["synthetic_image"], batch["synthetic_mask"]

    def training_losses(self, batch: Batch) -> dict[str, Tensor]:
        """Stage I: hard-mined cosine on the clean image + repair term; stage II: focal loss."""
        if self.phase == STAGE2:
            synthetic, mask = self._synthetic(batch)
            logits = self.segmentation_logits(synthetic)
            target = F.interpolate(mask.float(), size=logits.shape[-2:], mode="bilinear", align_corners=False)
            return {"loss": focal_loss(logits, (target >= self.seg_threshold).float())}
        return self._stage1(batch)[0]

    def _stage1(self, batch: Batch) -> tuple[dict[str, Tensor], CRROutput]:
        """Stage-I losses and the forward pass they came from (over ``[x; x~]``, or ``x`` without repair)."""
        images = batch["image"]
        b = images.shape[0]
        p = hard_mining_p(self.global_step, self.hard_mining_final, self.hard_mining_ramp)
        self.log("train/hard_mining_p", p, on_step=True, on_epoch=False, batch_size=b)
        if not self.repair:
            # Dinomaly: the hard-mined loss between E(x) and D(x) alone (``dinomaly_mvtec_uni.py``).
            out = self.model(images)
            return {"loss": self.loss_fn(out.encoder, out.decoder, p=p)}, out
        synthetic, _ = self._synthetic(batch)
        # One pass over [x; x~] equals the official two passes: the frozen encoder is per-sample (eval
        # BatchNorm / LayerNorm), masks and dropout are drawn per element, and the hard-mining
        # thresholds are computed per loss call on each half separately, as there.
        out = self.model(torch.cat([images, synthetic]))
        enc_clean = [e[:b] for e in out.encoder]
        normal = self.loss_fn(enc_clean, [d[:b] for d in out.decoder], p=p)
        # Repair: the decoder output of x~ is pulled to the encoder features of the CLEAN x; E(x~) is unused.
        repair = self.loss_fn(enc_clean, [d[b:] for d in out.decoder], p=p)
        return {"loss": normal + repair, "normal": normal, "repair": repair}, out

    def contrastive_forward(self, batch: Batch) -> tuple[dict[str, Tensor], ContrastiveFeatures]:
        """Stage I's losses and, for a plug-in, the bottleneck output of both views (one pass each).

        The clean view's features come from the stage-I pass itself; the augmented view runs only the frozen
        encoder and the bottleneck MLP (no decoder blocks), so a plug-in costs one encoder pass per step. The
        dense features are the bottleneck's output map (what the decoder reads, the analogue of CCL's projected
        maps), the embedding its spatial mean, and the views are matched on the bottleneck's frozen input (the
        mean of the encoder levels).
        """
        losses, out = self._stage1(batch)
        b = batch["image"].shape[0]
        fused_aug, bottleneck_aug = self.model.bottleneck_maps(batch["image_aug"])
        dense, fused = out.bottleneck[:b], out.fused[:b]
        features = ContrastiveFeatures(
            dense=[dense], dense_aug=[bottleneck_aug], embedding=dense.mean(dim=(2, 3)),
            embedding_aug=bottleneck_aug.mean(dim=(2, 3)), correspondence=[fused], correspondence_aug=[fused_aug],
        )  # fmt: skip
        return losses, features

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor | None:
        """Stage I through the base (adds loss plug-in terms); stage II: the focal loss alone."""
        if self.phase == STAGE1:
            return super().training_step(batch, batch_idx)
        losses = self.training_losses(batch)
        if not self.check_losses(losses, batch):
            return None
        self.log("train/seg_focal", losses["loss"].detach(), on_step=True, on_epoch=True, prog_bar=True,
                 batch_size=len(batch["image"]))  # fmt: skip
        return losses["loss"]

    def configure_gradient_clipping(
        self, optimizer: Any, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        """Stage I clips the gradient norm (``trainer.gradient_clip_val``, 0.1); stage II does not."""
        if self.phase == STAGE2 and not self.stage2_grad_clip:
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self) -> Any:
        """The current phase's optimiser (and per-iteration schedule): stage I StableAdamW, stage II Adam."""
        total = int(self.trainer.estimated_stepping_batches)
        if self.phase == STAGE2:
            if self.seg_head is None:
                raise RuntimeError("CRR stage II needs a segmentation head, but method.seg_head is null.")
            optimizer = self.seg_optimizer_factory(self.seg_head.parameters())
            scheduler = self.seg_scheduler_factory(optimizer, total_steps=total) if self.seg_scheduler_factory else None
        else:
            params = list(self.model.trainable_parameters())
            if self.loss_plugin is not None:
                params += [p for p in self.loss_plugin.parameters() if p.requires_grad]
            optimizer = self.optimizer_factory(params)
            scheduler = self.scheduler_factory(optimizer, total_steps=total) if self.scheduler_factory else None
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---------------------------------------------------------------------------- inference and hooks
    def segmentation_logits(self, images: Tensor) -> Tensor:
        """Seg-head logits ``(B, 2, H, W)`` of a batch; the reconstruction network runs without gradients."""
        if self.seg_head is None:
            raise RuntimeError("CRR segmentation logits need a segmentation head, but method.seg_head is null.")
        with torch.no_grad():
            out = self.model(images)
            seg_input = CRRModel.seg_input(out.encoder, out.decoder)
        return self.seg_head(seg_input)

    def anomaly_maps(self, images: Tensor) -> AnomalyMaps:
        """Reconstruction map and, once stage II has started, the segmentation probability.

        The reconstruction map is ``mean_g(1 - cos)`` on the token grid; the segmentation map is the head's
        anomalous-class softmax probability. The protocol upsamples and fuses them.
        """
        out = self.model(images)
        recon = CRRModel.reconstruction_map(out.encoder, out.decoder)
        seg = None
        if self.seg_head is not None and bool(self.seg_head_active):
            seg = torch.softmax(self.seg_head(CRRModel.seg_input(out.encoder, out.decoder)), dim=1)[:, 1:]
        return AnomalyMaps(recon, seg)

    def parameter_counts(self) -> dict[str, int]:
        """Totals plus the two trained parts separately (reconstruction network, segmentation head)."""
        recon = sum(p.numel() for p in self.model.trainable_parameters())
        seg = sum(p.numel() for p in self.seg_head.parameters()) if self.seg_head is not None else 0
        total = sum(p.numel() for p in self.parameters())
        return {
            "params_total": total,
            "params_trainable": recon + seg,
            "params_reconstruction": recon,
            "params_seg_head": seg,
            "params_frozen_backbone": sum(p.numel() for p in self.model.backbone.parameters()),
        }
