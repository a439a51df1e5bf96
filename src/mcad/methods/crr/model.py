"""CRR reconstruction network as a plain `nn.Module` (no Lightning, no config).

Paraphrase of `ViTill` in CRR's `models/uad.py` with the stage-I/II scripts' construction
(Qiqigeww/CRR-MUAD @ cbd2a12; parent guojiajeremy/Dinomaly; docs/methods.md, the method README):

    frozen encoder -> L feature levels (DINOv2 ViT-B/14 reg4: outputs of blocks 2..9)
    bottleneck input = mean of the L levels' tokens
    NoisyBottleneck (feature mask 0.4 + dropout MLP) -> 8 linear-attention ViT blocks
    decoder outputs, REVERSED (last block first), are grouped like the encoder levels:
        E_1 = mean(levels 0..3), D_1 = mean(reversed decoder 0..3)   (shallow <-> last decoder blocks)
        E_2 = mean(levels 4..7), D_2 = mean(reversed decoder 4..7)
    reconstruction map = mean_g (1 - cos_C(E_g, D_g));  seg input = cat_g -(E^_g * D^_g), E detached.

Backbone contract: `backbone(images)` returns a list of L feature maps `(B, C_i, h_i, w_i)`. An entry may
also be a tuple `(map, prefix_tokens (B, P, C_i))` - the format of timm's
`forward_intermediates(return_prefix_tokens=True)`, which `TimmBackbone(prefix_tokens=True)` returns (the
default of `conf/backbone/vit_base_patch14_reg4_dinov2.yaml`) - in which case the prefix (CLS + register)
tokens are carried through bottleneck and decoder and dropped before reshaping, exactly as `ViTill` does
(789 tokens at 392 px). With plain maps the decoder sees patch tokens only.

CNN backbones (levels of different widths and/or resolutions) are adapted as follows:

* every level is resampled to one token grid (`token_grid`: the coarsest level's grid by default;
  bilinear with antialiasing, i.e. area-like when shrinking);
* every level whose width differs from `embed_dim` goes through a FIXED random semi-orthogonal 1x1
  projection to `embed_dim` (a buffer, not a parameter). It must not be trainable: the encoder side is the
  regression target, and a learnable target projection can collapse (e.g. to a constant map) and make the
  cosine loss trivially zero. With C_i <= embed_dim the projection is an exact isometry, so cosine
  distances between encoder features are unchanged; with C_i > embed_dim it is a norm-preserving-in-
  expectation Johnson-Lindenstrauss projection;
* `embed_dim` defaults to max(C_i) rounded up to a multiple of 64; levels are split into two loose groups
  (first half shallow, second half deep) and the reversed decoder outputs into as many contiguous chunks.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from mcad.methods.crr.components.bottleneck import NoisyBottleneck
from mcad.methods.crr.components.linear_attention import LinearAttentionBlock
from mcad.methods.crr.components.resample import resample_to_grid

__all__ = ["CRRModel", "CRROutput", "l2_normalize", "split_contiguous"]

Level = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def l2_normalize(x: torch.Tensor, dim: int = 1, eps: float = 1e-12) -> torch.Tensor:
    """Divide by the L2 norm plus `eps` along `dim` (CRR `uad.py::l2_normalize`: eps added, not clamped)."""
    return x / (x.pow(2).sum(dim=dim, keepdim=True).sqrt() + eps)


def split_contiguous(n: int, parts: int) -> list[list[int]]:
    """Split `range(n)` into `parts` contiguous chunks, earlier chunks one longer if uneven."""
    if not 1 <= parts <= n:
        raise ValueError(f"cannot split {n} items into {parts} non-empty parts")
    base, extra = divmod(n, parts)
    out, start = [], 0
    for i in range(parts):
        size = base + (1 if i < extra else 0)
        out.append(list(range(start, start + size)))
        start += size
    return out


def _default_heads(dim: int) -> int:
    # 64-wide heads like ViT-S/B/L (384/6, 768/12, 1024/16); else the largest divisor <= dim // 64.
    target = max(1, dim // 64)
    return next(h for h in range(target, 0, -1) if dim % h == 0)


def _fixed_projection(c_in: int, c_out: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if c_in <= c_out:
        q, _ = torch.linalg.qr(torch.randn(c_out, c_in, generator=g, dtype=torch.float64))
        return q.T.contiguous().float()  # (c_in, c_out), orthonormal rows: exact isometry
    q, _ = torch.linalg.qr(torch.randn(c_in, c_out, generator=g, dtype=torch.float64))
    return (q * math.sqrt(c_in / c_out)).float()  # orthonormal columns, rescaled to keep E||y||^2


@dataclass
class CRROutput:
    """One forward pass of the CRR reconstruction network.

    Attributes:
        encoder: Encoder group maps ``E_g`` ``(B, D, h, w)`` (frozen, the reconstruction targets).
        decoder: Decoder group maps ``D_g`` ``(B, D, h, w)``.
        fused: The bottleneck's input, the mean of the encoder levels, as a ``(B, D, h, w)`` map (frozen).
        bottleneck: The bottleneck's output (masked, noisy MLP) as a ``(B, D, h, w)`` map: what the decoder
            blocks read.
    """

    encoder: list[torch.Tensor]
    decoder: list[torch.Tensor]
    fused: torch.Tensor
    bottleneck: torch.Tensor


class CRRModel(nn.Module):
    """Frozen encoder + noisy bottleneck + linear-attention decoder with loose group reconstruction.

    Args:
        backbone: A frozen feature extractor, `backbone(images) -> list[(B, C_i, h_i, w_i)]` (entries may be
            `(map, prefix_tokens)` tuples, see the module docstring); `TimmBackbone` freezes itself and stays
            in eval mode, and its features are read without gradients here.
        embed_dim: Decoder width D. None: the common level width if all levels share it (ViT), else
            max(C_i) rounded up to a multiple of 64.
        num_decoder_blocks: Number of decoder blocks (8 in CRR).
        groups: Encoder level indices per group; None splits the L levels into two contiguous halves
            (CRR: [[0, 1, 2, 3], [4, 5, 6, 7]] for blocks 2..9).
        decoder_groups: Indices into the REVERSED decoder outputs per group; None splits them into
            `len(groups)` contiguous chunks (CRR: [[0, 1, 2, 3], [4, 5, 6, 7]]).
        mask_ratio: Bottleneck feature-mask ratio (0.4 in CRR).
        dropout: Bottleneck dropout (0.2 for MVTec/VisA per Dinomaly; 0.4 in CRR's Real-IAD scripts).
        mask_at_test: Bottleneck eval behaviour, see `NoisyBottleneck` (False: deterministic expectation;
            True: official random mask at test time).
        mask_rng: Source of the mask's random numbers, see `NoisyBottleneck` (`"cpu"`: as the official
            `bMlp6`, so equal seeds give equal masks; `"device"`: drawn on the input's device).
        num_heads: Decoder heads; None: D // 64 (12 for ViT-B).
        mlp_ratio: Decoder MLP ratio (4).
        bottleneck_ratio: Bottleneck hidden width / D (4).
        token_grid: Common token grid for levels of different resolutions: `"coarsest"`, `"finest"` or
            an explicit `(h, w)`.
        channels: Level widths; read from `backbone.channels` when None, else probed with a 224x224 input.
        projection_seed: Seed of the fixed level projections (only used when widths differ from D).
    """

    def __init__(
        self,
        backbone: nn.Module,
        embed_dim: int | None = None,
        num_decoder_blocks: int = 8,
        groups: Sequence[Sequence[int]] | None = None,
        decoder_groups: Sequence[Sequence[int]] | None = None,
        mask_ratio: float = 0.4,
        dropout: float = 0.2,
        mask_at_test: bool = False,
        mask_rng: Literal["cpu", "device"] = "cpu",
        num_heads: int | None = None,
        mlp_ratio: float = 4.0,
        bottleneck_ratio: float = 4.0,
        token_grid: Literal["coarsest", "finest"] | Sequence[int] = "coarsest",
        channels: Sequence[int] | None = None,
        projection_seed: int = 0,
    ) -> None:
        super().__init__()
        self.backbone = backbone

        if channels is None:
            channels = getattr(backbone, "channels", None)
        if channels is None:
            with torch.no_grad():
                feats = backbone(torch.zeros(1, 3, 224, 224))
            channels = [(f[0] if isinstance(f, (tuple, list)) else f).shape[1] for f in feats]
        self.channels = [int(c) for c in channels]
        num_levels = len(self.channels)
        if num_levels == 0:
            raise ValueError("backbone provides no feature levels")
        if embed_dim is None:
            same_width = len(set(self.channels)) == 1
            embed_dim = self.channels[0] if same_width else 64 * math.ceil(max(self.channels) / 64)
        self.embed_dim = int(embed_dim)

        if groups is None:
            groups = split_contiguous(num_levels, min(2, num_levels))
        if decoder_groups is None:
            decoder_groups = split_contiguous(num_decoder_blocks, len(groups))
        self.groups = [list(map(int, g)) for g in groups]
        self.decoder_groups = [list(map(int, g)) for g in decoder_groups]
        if len(self.groups) != len(self.decoder_groups):
            raise ValueError(f"groups has {len(self.groups)} groups but decoder_groups has {len(self.decoder_groups)}")
        for name, gs, n in (
            ("groups", self.groups, num_levels),
            ("decoder_groups", self.decoder_groups, num_decoder_blocks),
        ):
            for g in gs:
                if not g or any(not 0 <= i < n for i in g):
                    raise ValueError(f"{name} entry {g} must be a non-empty list of indices in [0, {n})")

        if isinstance(token_grid, str):
            if token_grid not in ("coarsest", "finest"):
                raise ValueError(f"token_grid must be 'coarsest', 'finest' or (h, w), got {token_grid!r}")
            self.token_grid: str | tuple[int, int] = token_grid
        else:
            self.token_grid = (int(token_grid[0]), int(token_grid[1]))

        # Fixed (non-trainable) width adapters, one per level; empty tensor = identity.
        self.projections = [c != self.embed_dim for c in self.channels]
        for i, c in enumerate(self.channels):
            w = _fixed_projection(c, self.embed_dim, projection_seed + i) if c != self.embed_dim else torch.empty(0)
            self.register_buffer(f"level_proj_{i}", w)

        heads = num_heads or _default_heads(self.embed_dim)
        if self.embed_dim % heads != 0:
            raise ValueError(f"embed_dim={self.embed_dim} is not divisible by num_heads={heads}")
        self.bottleneck = NoisyBottleneck(
            self.embed_dim,
            hidden_dim=int(self.embed_dim * bottleneck_ratio),
            mask_ratio=mask_ratio,
            dropout=dropout,
            mask_at_test=mask_at_test,
            mask_rng=mask_rng,
        )
        self.decoder = nn.ModuleList(
            LinearAttentionBlock(self.embed_dim, heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_eps=1e-8)
            for _ in range(num_decoder_blocks)
        )
        self.reset_parameters()

    # ------------------------------------------------------------------ setup
    def reset_parameters(self) -> None:
        """Official init of the trainable part: Linear trunc-normal(0.01, +-0.03), bias 0; LayerNorm (1, 0)."""
        for m in self.trainable_modules().modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.01, a=-0.03, b=0.03)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def trainable_modules(self) -> nn.ModuleList:
        """The modules stage I optimises (bottleneck + decoder)."""
        return nn.ModuleList([self.bottleneck, self.decoder])

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of `trainable_modules()`."""
        return self.trainable_modules().parameters()

    # ------------------------------------------------------------------ forward
    def _target_grid(self, sizes: list[tuple[int, int]]) -> tuple[int, int]:
        if isinstance(self.token_grid, tuple):
            return self.token_grid
        pick = min if self.token_grid == "coarsest" else max
        return pick(sizes, key=lambda s: s[0] * s[1])

    def encode(self, images: torch.Tensor) -> tuple[list[torch.Tensor], tuple[int, int], int]:
        """Run the frozen backbone and adapt its levels to tokens of width D on one grid.

        Returns:
            `(tokens, (h, w), num_prefix)`: per level `(B, num_prefix + h*w, D)`, prefix tokens first.
        """
        with torch.no_grad():
            feats = self.backbone(images)
        if len(feats) != len(self.channels):
            raise ValueError(f"backbone returned {len(feats)} levels, expected {len(self.channels)}")
        maps, prefixes = [], []
        for f in feats:
            if isinstance(f, (tuple, list)):
                maps.append(f[0])
                prefixes.append(f[1])
            else:
                maps.append(f)
                prefixes.append(None)
        grid = self._target_grid([tuple(m.shape[-2:]) for m in maps])
        num_prefix = 0 if prefixes[0] is None else prefixes[0].shape[1]
        tokens = []
        for i, (m, pre) in enumerate(zip(maps, prefixes)):
            if m.shape[1] != self.channels[i]:
                raise ValueError(f"level {i}: backbone width {m.shape[1]} != declared channels {self.channels[i]}")
            if (0 if pre is None else pre.shape[1]) != num_prefix:
                raise ValueError("all levels must carry the same number of prefix tokens")
            if tuple(m.shape[-2:]) != grid:
                m = resample_to_grid(m, grid)
            t = m.flatten(2).transpose(1, 2)  # (B, h*w, C_i)
            if pre is not None:
                t = torch.cat([pre, t], dim=1)
            if self.projections[i]:
                t = t @ getattr(self, f"level_proj_{i}").to(t.dtype)
            tokens.append(t.detach())
        return tokens, grid, num_prefix

    def forward(self, images: torch.Tensor) -> CRROutput:
        """Reconstruct the grouped encoder features.

        Args:
            images: `(B, 3, H, W)` normalised images.

        Returns:
            The encoder and decoder group maps, `(B, D, h, w)` each (encoder maps carry no grad), and the
            bottleneck's input and output as maps.
        """
        tokens, (h, w), num_prefix = self.encode(images)
        fused = torch.stack(tokens, dim=1).mean(dim=1)
        x = self.bottleneck(fused)
        bottleneck = x
        dec = []
        for blk in self.decoder:
            x = blk(x)
            dec.append(x)
        dec = dec[::-1]  # last decoder block pairs with the shallowest encoder group

        def to_map(t: torch.Tensor) -> torch.Tensor:
            t = t[:, num_prefix:, :]
            return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], h, w).contiguous()

        enc_groups = [to_map(torch.stack([tokens[i] for i in g], 1).mean(1)) for g in self.groups]
        dec_groups = [to_map(torch.stack([dec[i] for i in g], 1).mean(1)) for g in self.decoder_groups]
        return CRROutput(encoder=enc_groups, decoder=dec_groups, fused=to_map(fused), bottleneck=to_map(bottleneck))

    def bottleneck_maps(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The bottleneck's input and output as ``(B, D, h, w)`` maps, without running the decoder blocks.

        What a contrastive plug-in needs of a second view: the frozen encoder and the (cheap) bottleneck MLP.
        """
        tokens, (h, w), num_prefix = self.encode(images)
        fused = torch.stack(tokens, dim=1).mean(dim=1)
        bottleneck = self.bottleneck(fused)

        def to_map(t: torch.Tensor) -> torch.Tensor:
            t = t[:, num_prefix:, :]
            return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], h, w).contiguous()

        return to_map(fused), to_map(bottleneck)

    # ------------------------------------------------------------------ heads / hooks
    @staticmethod
    def seg_input(enc_groups: Sequence[torch.Tensor], dec_groups: Sequence[torch.Tensor]) -> torch.Tensor:
        """Segmentation-net input: cat over groups of -(E^ * D^), channel-L2-normalised, E detached.

        Summing a group's channels gives -cos(E, D); shape `(B, G*D, h, w)`.
        """
        return torch.cat([-(l2_normalize(e.detach()) * l2_normalize(d)) for e, d in zip(enc_groups, dec_groups)], dim=1)

    @staticmethod
    def reconstruction_map(
        enc_groups: Sequence[torch.Tensor],
        dec_groups: Sequence[torch.Tensor],
        out_size: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Mean over groups of 1 - cos_C(E_g, D_g), `(B, 1, h, w)`; bilinear (align_corners) to `out_size`."""
        maps = torch.stack(
            [1.0 - F.cosine_similarity(e, d, dim=1) for e, d in zip(enc_groups, dec_groups)], dim=1
        ).mean(dim=1, keepdim=True)
        if out_size is not None:
            maps = F.interpolate(maps, size=tuple(out_size), mode="bilinear", align_corners=True)
        return maps
