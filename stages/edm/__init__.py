"""EDM diffusion networks (Karras et al. 2022) with official parameter names."""
from stages.edm.networks import MODEL_TYPES, DhariwalUNet, EDMPrecond, SongUNet

__all__ = ["MODEL_TYPES", "DhariwalUNet", "EDMPrecond", "SongUNet"]
