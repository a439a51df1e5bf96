"""Loss plug-ins: extra loss terms any contrastive method can carry (``loss=ccl``)."""

from mcad.methods.plugins.base import Batch, ContrastiveFeatures, ContrastiveMethod, LossPlugin
from mcad.methods.plugins.ccl import CCLPlugin

__all__ = ["Batch", "CCLPlugin", "ContrastiveFeatures", "ContrastiveMethod", "LossPlugin"]
