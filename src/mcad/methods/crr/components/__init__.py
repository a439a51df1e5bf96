"""Blocks only CRR uses (Dinomaly is CRR with its additions off).

The noisy bottleneck, the linear-attention decoder block and the stage-II segmentation head.
"""
