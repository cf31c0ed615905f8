"""minvis-jax: MinVIS video instance segmentation in JAX/Flax."""

__version__ = "0.1.0"
