"""Flax models: backbones, pixel decoder, transformer decoder and the full Mask2Former."""

from minvis_jax.models.mask2former import Mask2Former
from minvis_jax.models.mask2former import ModelConfig

__all__ = ['Mask2Former', 'ModelConfig']
