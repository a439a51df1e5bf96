"""Blocks only RLR uses: the per-level learnable-reference decoder, its attention and positions."""
