"""CRR - Collaborative Reconstruction and Repair (pure-PyTorch parts; see README.md)."""

from mcad.methods.crr.model import CRRModel, l2_normalize, split_contiguous

__all__ = ["CRRModel", "l2_normalize", "split_contiguous"]
