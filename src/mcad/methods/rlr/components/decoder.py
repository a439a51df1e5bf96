"""RLR reconstruction network: one transformer per feature level reading a learnable reference.

RLR (ECCV 2024, official code ``hlr7999/RLR``) reconstructs frozen backbone features from a
*learnable reference* instead of from the (possibly anomalous) input itself; see ``docs/methods.md``,
the "Architecture" section of ``src/mcad/methods/rlr/README.md`` and the official ``models/model.py``.
Per level with ``C`` input channels on an ``h x w`` grid (``L = h * w`` tokens) and hidden width ``d``:

* input tokens ``(B, L, C)`` -> 1x1 linear embedding ``C -> d`` + fixed 2-D sinusoidal positions;
* reference ``R`` in ``R^{1 x L x C}`` (one token per position, *input-feature* space, ``N(0, 1)``
  init) with its own embedding; embedded once and fed unchanged to every layer;
* ``N`` layers of ``x <- LN(2 * LCA(x, R_e) + 1 * MLKA(x, R_e))`` (no residual from ``x``) followed
  by ``x <- LN(x + FFN(x))``;
* final LayerNorm and a linear projection ``d -> C``.

Shapes use row-major tokens (``features.permute(0, 2, 3, 1).reshape(B, h * w, C)``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal, overload

import torch
from timm.layers import Mlp
from torch import Tensor, nn

from mcad.methods.rlr.components.attention import (
    LocalCrossAttention,
    MaskedLearnableKeyAttention,
    complement_window_mask,
    local_window_mask,
)
from mcad.methods.rlr.components.positional import PositionalEncoding2D

#: Window side of LCA/MLKA per square grid side, as hard-coded in RLR ``models/model.py``. Typed like a
#: ``window_size_map``, whose keys may also be ``(h, w)`` grids.
DEFAULT_WINDOW_SIZES: dict[int | tuple[int, int], int] = {16: 5, 32: 7, 64: 11}


def rlr_hidden_dim(out_index: int, base: int = 128) -> int:
    """RLR's hidden-width rule ``d = base * 2 ** (out_index - 1)`` (RLR ``trainer.py::build_model``).

    ``out_index`` is the timm stage index of the level (EfficientNet/ResNet stage ``i`` has stride
    ``2 ** (i + 1)``): stage 2 (stride 8) -> 256, stage 3 (stride 16) -> 512, stage 1 -> 128.

    Args:
        out_index: timm ``out_indices`` entry of the level (>= 1 for the default base).
        base: Width of stage 1.

    Returns:
        The hidden width ``d``.

    """
    if out_index < 1:
        raise ValueError(f"The RLR width rule is defined for out_index >= 1, got {out_index}.")
    return int(base * 2 ** (out_index - 1))


def out_index_from_stride(stride: int) -> int:
    """Returns the timm CNN stage index ``i`` of a feature map with stride ``2 ** (i + 1)``."""
    i = math.log2(stride) - 1
    if stride <= 1 or not float(i).is_integer():
        raise ValueError(f"Stride {stride} is not a power of two >= 2.")
    return int(i)


def resolve_window_size(
    grid_size: tuple[int, int], window_size_map: Mapping[int | tuple[int, int], int] | None = None
) -> int:
    """Looks up the LCA/MLKA window side of a grid.

    Args:
        grid_size: ``(h, w)``.
        window_size_map: Map from a square grid side (or an ``(h, w)`` tuple) to the window side;
            defaults to :data:`DEFAULT_WINDOW_SIZES`.

    Returns:
        The window side ``k``.

    Raises:
        KeyError: The grid is not in the map (the official code only knows 16, 32 and 64).

    """
    table = DEFAULT_WINDOW_SIZES if window_size_map is None else window_size_map
    h, w = grid_size
    if (h, w) in table:
        return int(table[(h, w)])
    if h == w and h in table:
        return int(table[h])
    raise KeyError(
        f"No RLR window size for a {h}x{w} grid (known: {sorted(table, key=str)}); pass window_size(s) "
        "explicitly or extend window_size_map."
    )


class TokenEmbedding(nn.Module):
    """Per-token linear embedding ``C -> d`` plus a fixed 2-D sinusoidal position encoding.

    Equivalent to RLR's ``models/embedding.py::Embedding2D`` (a kernel-1 ``Conv1d`` is a per-token
    linear map): the weight gets ``kaiming_normal_(mode="fan_in", nonlinearity="leaky_relu")``; the
    bias keeps the default ``U(-1/sqrt(C), 1/sqrt(C))``, identical for ``Conv1d(k=1)`` and ``Linear``.

    Args:
        in_channels: ``C``.
        dim: ``d`` (multiple of 4 for the 2-D encoding).
        grid_size: ``(h, w)``.
        dropout: Dropout after adding the positions (RLR: 0).

    """

    def __init__(self, in_channels: int, dim: int, grid_size: tuple[int, int], dropout: float = 0.0) -> None:
        super().__init__()
        self.proj = nn.Linear(in_channels, dim)
        nn.init.kaiming_normal_(self.proj.weight, mode="fan_in", nonlinearity="leaky_relu")
        self.pos = PositionalEncoding2D(dim, grid_size)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tokens: Tensor) -> Tensor:
        """Embeds ``(B, L, C)`` tokens to ``(B, L, d)``."""
        return self.dropout(self.pos(self.proj(tokens)))


class RLRLayer(nn.Module):
    """One RLR encoder layer in the official "parallel" mode.

    ``x <- LN1(g_lca * LCA(x, R_e) + g_mlka * MLKA(x, R_e))`` then ``x <- LN2(x + FFN(x))``.
    As in RLR ``models/model.py::EncoderLayer.forward``: the two branches are fused with the fixed
    gates 2 and 1 and there is *no residual from x* around the attention fusion, so after the first
    layer the input is only visible through MLKA's values outside each position's window.

    Args:
        dim: Hidden width ``d``.
        num_heads: Attention heads (RLR: 8).
        ffn_ratio: FFN width as a multiple of ``d`` (RLR: 4).
        dropout: Dropout on attention weights, branch outputs and FFN (RLR: 0).
        use_lca: Include the LCA branch (ablation).
        use_mlka: Include the MLKA branch (ablation).
        gates: Fixed weights ``(g_lca, g_mlka)`` of the branch sum (RLR: ``(2, 1)``).
        attention_residual: Deviation for ablations: add ``x`` to the branch sum before ``LN1``
            (RLR: ``False``).

    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        ffn_ratio: float = 4.0,
        dropout: float = 0.0,
        use_lca: bool = True,
        use_mlka: bool = True,
        gates: tuple[float, float] = (2.0, 1.0),
        attention_residual: bool = False,
    ) -> None:
        super().__init__()
        if not (use_lca or use_mlka):
            raise ValueError("An RLR layer needs at least one of LCA and MLKA.")
        self.lca = LocalCrossAttention(dim, num_heads, dropout) if use_lca else None
        self.mlka = MaskedLearnableKeyAttention(dim, num_heads, dropout) if use_mlka else None
        self.gates = (float(gates[0]), float(gates[1]))
        self.attention_residual = attention_residual
        self.dropout = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(dim)
        # RLR models/model.py::Mlp: Linear - GELU - Linear - Dropout (no dropout between the linears).
        self.ffn = Mlp(dim, int(round(ffn_ratio * dim)), act_layer=nn.GELU, drop=(0.0, dropout))
        self.norm2 = nn.LayerNorm(dim)

    def forward(
        self, x: Tensor, reference: Tensor, lca_mask: Tensor | None = None, mlka_mask: Tensor | None = None
    ) -> Tensor:
        """Runs the layer.

        Args:
            x: Tokens ``(B, L, d)``.
            reference: Embedded reference ``(1 or B, L, d)``.
            lca_mask: Bool ``(L, L)`` LCA mask (``True`` = may attend).
            mlka_mask: Bool ``(L, L)`` MLKA mask.

        Returns:
            ``(B, L, d)``.

        """
        fused = x if self.attention_residual else None
        if self.lca is not None:
            branch = self.gates[0] * self.dropout(self.lca(x, reference, lca_mask))
            fused = branch if fused is None else fused + branch
        if self.mlka is not None:
            branch = self.gates[1] * self.dropout(self.mlka(x, reference, mlka_mask))
            fused = branch if fused is None else fused + branch
        x = self.norm1(fused)
        return self.norm2(x + self.ffn(x))


class RLRLevelModel(nn.Module):
    """The RLR model of one feature level (RLR ``models/model.py::RLR``).

    Args:
        in_channels: Feature channels ``C`` (input and output width).
        grid_size: ``(h, w)`` of the level's feature map; the reference has ``h * w`` tokens.
        hidden_dim: Transformer width ``d`` (multiple of 4 and of ``num_heads``).
        num_layers: Number of :class:`RLRLayer` (RLR README: 4; code default 3).
        num_heads: Attention heads.
        ffn_ratio: FFN width multiple.
        window_size: LCA/MLKA window side; ``None`` looks the grid up in ``window_size_map``.
        window_size_map: Grid side -> window side (default :data:`DEFAULT_WINDOW_SIZES`).
        use_lca: Include LCA in every layer.
        use_mlka: Include MLKA in every layer.
        gates: Fixed branch weights ``(g_lca, g_mlka)``.
        dropout: Dropout everywhere (RLR: 0).
        attention_residual: See :class:`RLRLayer` (deviation; default off).
        reference_std: Standard deviation of the reference initialisation (RLR: ``randn``, i.e. 1).

    """

    def __init__(
        self,
        in_channels: int,
        grid_size: tuple[int, int] | int,
        hidden_dim: int,
        num_layers: int = 4,
        num_heads: int = 8,
        ffn_ratio: float = 4.0,
        window_size: int | None = None,
        window_size_map: Mapping[int | tuple[int, int], int] | None = None,
        use_lca: bool = True,
        use_mlka: bool = True,
        gates: tuple[float, float] = (2.0, 1.0),
        dropout: float = 0.0,
        attention_residual: bool = False,
        reference_std: float = 1.0,
    ) -> None:
        super().__init__()
        if isinstance(grid_size, int):
            grid_size = (grid_size, grid_size)
        self.in_channels = int(in_channels)
        self.grid_size = (int(grid_size[0]), int(grid_size[1]))
        self.hidden_dim = int(hidden_dim)
        self.num_tokens = self.grid_size[0] * self.grid_size[1]
        self.window_size = (
            int(window_size) if window_size is not None else resolve_window_size(self.grid_size, window_size_map)
        )
        self.embedding = TokenEmbedding(in_channels, hidden_dim, self.grid_size, dropout)
        # One learnable token per spatial position, in the *input* feature space (C channels),
        # shared by every image and class; RLR initialises it with torch.randn.
        self.reference = nn.Parameter(torch.randn(1, self.num_tokens, in_channels) * reference_std)
        self.reference_embedding = TokenEmbedding(in_channels, hidden_dim, self.grid_size, dropout)
        self.layers = nn.ModuleList(
            RLRLayer(hidden_dim, num_heads, ffn_ratio, dropout, use_lca, use_mlka, gates, attention_residual)
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(hidden_dim)
        self.projection = nn.Linear(hidden_dim, in_channels)
        # Masks depend only on the grid: build once, share across layers, never checkpoint them.
        h, w = self.grid_size
        self.register_buffer("lca_mask", local_window_mask(h, w, self.window_size), persistent=False)
        self.register_buffer("mlka_mask", complement_window_mask(h, w, self.window_size), persistent=False)

    def embedded_reference(self) -> Tensor:
        """Returns the embedded reference ``(1, L, d)`` (batch-independent, computed once per forward)."""
        return self.reference_embedding(self.reference)

    def forward(self, tokens: Tensor, return_hidden: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Reconstructs the level's tokens.

        Args:
            tokens: Input tokens ``(B, L, C)`` (possibly jittered).
            return_hidden: Also return the last hidden tokens (after the final LayerNorm).

        Returns:
            Reconstructed tokens ``(B, L, C)``, plus hidden tokens ``(B, L, d)`` if requested.

        """
        if tokens.shape[1:] != (self.num_tokens, self.in_channels):
            raise ValueError(f"Expected tokens (B, {self.num_tokens}, {self.in_channels}), got {tuple(tokens.shape)}.")
        x = self.embedding(tokens)
        ref = self.embedded_reference()
        for layer in self.layers:
            x = layer(x, ref, self.lca_mask, self.mlka_mask)
        hidden = self.norm(x)
        out = self.projection(hidden)
        return (out, hidden) if return_hidden else out

    def extra_repr(self) -> str:
        """Summary shown in the module's ``repr``."""
        return f"grid_size={self.grid_size}, window_size={self.window_size}"


def _maps_to_tokens(x: Tensor) -> Tensor:
    b, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(b, h * w, c)


def _tokens_to_maps(x: Tensor, grid_size: tuple[int, int]) -> Tensor:
    b, _, c = x.shape
    return x.transpose(1, 2).reshape(b, c, *grid_size)


class RLRDecoder(nn.Module):
    """One independent :class:`RLRLevelModel` per feature level (``decoder=rlr``).

    Args:
        in_channels: Channels ``C_i`` of every level.
        grid_sizes: ``(h_i, w_i)`` of every level (ints for square grids).
        num_layers: Layers per level (RLR README: 4).
        hidden_dims: Explicit widths ``d_i``; if ``None``, RLR's rule
            ``d_i = hidden_base * 2 ** (out_indices[i] - 1)`` (:func:`rlr_hidden_dim`).
        out_indices: timm stage index of every level for the width rule; default: consecutive
            indices ending at 3 (``[2, 3]`` for two levels, the paper's EfficientNet-B6 stages;
            ``[1, 2, 3]`` for RLR's ``feature_levels=3``).
        hidden_base: Width of stage 1 in the rule.
        num_heads: Attention heads.
        ffn_ratio: FFN width multiple.
        window_sizes: Per-level window side overrides (entries may be ``None`` = use the map).
        window_size_map: Grid side -> window side (default :data:`DEFAULT_WINDOW_SIZES`).
        use_lca: Include LCA (ablation).
        use_mlka: Include MLKA (ablation).
        gates: Fixed branch weights ``(g_lca, g_mlka)``.
        dropout: Dropout (RLR: 0).
        attention_residual: Deviation: residual around the attention fusion (RLR: off).
        reference_std: Standard deviation of every level's reference initialisation (RLR: ``randn``, 1).

    """

    def __init__(
        self,
        in_channels: Sequence[int],
        grid_sizes: Sequence[tuple[int, int] | int],
        num_layers: int = 4,
        hidden_dims: Sequence[int] | None = None,
        out_indices: Sequence[int] | None = None,
        hidden_base: int = 128,
        num_heads: int = 8,
        ffn_ratio: float = 4.0,
        window_sizes: Sequence[int | None] | None = None,
        window_size_map: Mapping[int | tuple[int, int], int] | None = None,
        use_lca: bool = True,
        use_mlka: bool = True,
        gates: tuple[float, float] = (2.0, 1.0),
        dropout: float = 0.0,
        attention_residual: bool = False,
        reference_std: float = 1.0,
    ) -> None:
        super().__init__()
        n = len(in_channels)
        if len(grid_sizes) != n:
            raise ValueError(f"{n} channel entries but {len(grid_sizes)} grid sizes.")
        self.in_channels = [int(c) for c in in_channels]
        self.grid_sizes = [(g, g) if isinstance(g, int) else (int(g[0]), int(g[1])) for g in grid_sizes]
        if hidden_dims is None:
            if out_indices is None:
                out_indices = list(range(4 - n, 4))
            if len(out_indices) != n:
                raise ValueError(f"{n} levels but {len(out_indices)} out_indices.")
            hidden_dims = [rlr_hidden_dim(i, hidden_base) for i in out_indices]
        if len(hidden_dims) != n:
            raise ValueError(f"{n} levels but {len(hidden_dims)} hidden_dims.")
        self.hidden_dims = [int(d) for d in hidden_dims]
        window_sizes = list(window_sizes) if window_sizes is not None else [None] * n
        if len(window_sizes) != n:
            raise ValueError(f"{n} levels but {len(window_sizes)} window sizes.")
        self.levels = nn.ModuleList(
            RLRLevelModel(
                c,
                g,
                d,
                num_layers=num_layers,
                num_heads=num_heads,
                ffn_ratio=ffn_ratio,
                window_size=k,
                window_size_map=window_size_map,
                use_lca=use_lca,
                use_mlka=use_mlka,
                gates=gates,
                dropout=dropout,
                attention_residual=attention_residual,
                reference_std=reference_std,
            )
            for c, g, d, k in zip(self.in_channels, self.grid_sizes, self.hidden_dims, window_sizes)
        )

    @classmethod
    def for_backbone(
        cls,
        channels: Sequence[int],
        strides: Sequence[int],
        image_size: int | tuple[int, int],
        **kwargs,
    ) -> RLRDecoder:
        """Builds the decoder for a CNN backbone's levels at a given input size.

        Grid sizes are ``image_size // stride`` and, unless ``hidden_dims`` is given, the width rule
        uses the stage index ``log2(stride) - 1`` (stride 8 -> d = 256, stride 16 -> d = 512).

        Args:
            channels: Channels of the backbone's levels (``backbone.channels``).
            strides: Their strides (``backbone.strides``).
            image_size: Input image side or ``(H, W)``.
            **kwargs: Further :class:`RLRDecoder` arguments.

        Returns:
            The decoder.

        """
        hgt, wid = (image_size, image_size) if isinstance(image_size, int) else image_size
        grids = [(hgt // s, wid // s) for s in strides]
        if "hidden_dims" not in kwargs and "out_indices" not in kwargs:
            kwargs["out_indices"] = [out_index_from_stride(s) for s in strides]
        return cls(channels, grids, **kwargs)

    def forward_with_hidden(self, features: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Reconstructs every level and also returns the last hidden tokens as maps.

        Args:
            features: Level inputs ``(B, C_i, h_i, w_i)``.

        Returns:
            ``(reconstructions (B, C_i, h_i, w_i), hidden maps (B, d_i, h_i, w_i))``.

        """
        if len(features) != len(self.levels):
            raise ValueError(f"Expected {len(self.levels)} feature maps, got {len(features)}.")
        recons, hiddens = [], []
        for index, feat in enumerate(features):
            out, hidden = self.forward_level(index, feat, return_hidden=True)
            recons.append(out)
            hiddens.append(hidden)
        return recons, hiddens

    @overload
    def forward_level(self, index: int, feature: Tensor, return_hidden: Literal[False] = False) -> Tensor: ...

    @overload
    def forward_level(self, index: int, feature: Tensor, return_hidden: Literal[True]) -> tuple[Tensor, Tensor]: ...

    @overload
    def forward_level(
        self, index: int, feature: Tensor, return_hidden: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]: ...

    def forward_level(self, index: int, feature: Tensor, return_hidden: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Reconstructs one level (the levels are independent models).

        Args:
            index: Level index.
            feature: The level's input ``(B, C_i, h_i, w_i)``.
            return_hidden: Also return the last hidden tokens as a ``(B, d_i, h_i, w_i)`` map.

        Returns:
            The reconstruction ``(B, C_i, h_i, w_i)``, plus the hidden map if requested.

        """
        level = self.levels[index]
        assert isinstance(level, RLRLevelModel)  # the only kind of module in self.levels
        if tuple(feature.shape[-2:]) != level.grid_size:
            raise ValueError(f"Level {index} expects a {level.grid_size} map, got {tuple(feature.shape[-2:])}.")
        out, hidden = level(_maps_to_tokens(feature), return_hidden=True)
        out = _tokens_to_maps(out, level.grid_size)
        return (out, _tokens_to_maps(hidden, level.grid_size)) if return_hidden else out

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        """Reconstructs every level.

        Args:
            features: Level inputs ``(B, C_i, h_i, w_i)``.

        Returns:
            Reconstructions ``(B, C_i, h_i, w_i)``.

        """
        return self.forward_with_hidden(features)[0]
