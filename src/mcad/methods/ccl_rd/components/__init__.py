"""Blocks only CCL-on-RD uses: RD++ projection layers and CCL's feature noise."""

from mcad.methods.ccl_rd.components.noise import NOISE_TRIGGER_PROB, feature_noise_
from mcad.methods.ccl_rd.components.projection import MultiProjectionLayer, ProjLayer, projection_param_count

__all__ = ["NOISE_TRIGGER_PROB", "MultiProjectionLayer", "ProjLayer", "feature_noise_", "projection_param_count"]
