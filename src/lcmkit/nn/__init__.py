"""Layers shared by the UNet and the VAE. Attribute names are the diffusers checkpoint keys."""

from lcmkit.nn.attention import Attention
from lcmkit.nn.embeddings import TimestepEmbedding, timestep_features
from lcmkit.nn.resnet import ResnetBlock2D
from lcmkit.nn.sampling import Downsample2D, Upsample2D

__all__ = [
    "Attention",
    "Downsample2D",
    "ResnetBlock2D",
    "TimestepEmbedding",
    "Upsample2D",
    "timestep_features",
]
