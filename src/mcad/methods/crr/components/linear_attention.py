"""Linear attention and the pre-norm ViT decoder block built on it (Dinomaly / CRR decoder).

Paraphrase of `LinearAttention2`, `Mlp` and `Block` in CRR's `models/vision_transformer.py`
(Qiqigeww/CRR-MUAD @ cbd2a12, inherited from guojiajeremy/Dinomaly). Linear attention replaces
softmax(QK^T)V with phi(Q)(phi(K)^T V) normalised row-wise by phi(Q) sum_s phi(K_s), phi(x) = elu(x) + 1.
Its cost is linear in the number of tokens and - the reason Dinomaly picked it - it cannot focus
sharply on one token, which makes identity-mapping shortcuts through the decoder harder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import nn

__all__ = ["LinearAttention", "LinearAttentionBlock"]


class LinearAttention(nn.Module):
    """Multi-head linear attention with the elu+1 feature map.

    Args:
        dim: Token width C.
        num_heads: Number of heads; must divide `dim`.
        qkv_bias: Bias in the fused qkv projection (True in CRR).
        proj_drop: Dropout after the output projection.

    Shapes:
        `(B, N, C) -> (B, N, C)`.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"LinearAttention: dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend over all tokens of `x` `(B, N, C)`."""
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, h, N, d)
        q = F.elu(q) + 1.0
        k = F.elu(k) + 1.0
        kv = k.transpose(-2, -1) @ v  # (B, h, d, d): sum_s phi(k_s) v_s^T
        # No epsilon: phi > 0, so the normaliser is strictly positive (the official code has none either).
        z = q @ k.sum(dim=-2, keepdim=True).transpose(-2, -1)  # (B, h, N, 1)
        out = (q @ kv) / z
        out = out.transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(out))


class LinearAttentionBlock(nn.Module):
    """Pre-norm ViT block with linear attention: x + Attn(LN(x)), then x + MLP(LN(x)).

    Args:
        dim: Token width.
        num_heads: Attention heads.
        mlp_ratio: Hidden width of the MLP relative to `dim` (4 in CRR).
        qkv_bias: Bias in the qkv projection (True in CRR).
        drop: Dropout after the attention projection and in the MLP (0 in CRR).
        norm_eps: LayerNorm epsilon (1e-8 in CRR, not PyTorch's 1e-5).

    Shapes:
        `(B, N, C) -> (B, N, C)`.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        norm_eps: float = 1e-8,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = LinearAttention(dim, num_heads=num_heads, qkv_bias=qkv_bias, proj_drop=drop)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        # Linear - GELU - Dropout - Linear - Dropout, as the official Mlp (and timm's).
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block to tokens `(B, N, C)`."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))
