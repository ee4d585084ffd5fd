"""EDM diffusion networks (Karras et al. 2022), written from the paper, with the official parameter names."""
from stages.edm.networks import MODEL_TYPES, EDMPrecond
from stages.edm.unets import DhariwalUNet, SongUNet

__all__ = ["MODEL_TYPES", "DhariwalUNet", "EDMPrecond", "SongUNet"]
