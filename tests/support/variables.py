"""Random model variables without running the model's (slow, eager) init."""

import jax
import numpy as np

from minvis_jax.models import Mask2Former
from minvis_jax.models import ModelConfig


def random_variables(model_config, seed: int = 0) -> dict:
  """Random variables of the model's structure (`model_config`: a ModelConfig or `config.model`):
  kernels ~ N(0, 1/fan_in), norms at identity, frozen BatchNorm statistics mean 0 / variance 1."""
  shapes = jax.eval_shape(Mask2Former(ModelConfig.from_config(model_config)).init,
                          jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3), np.float32))
  rng = np.random.default_rng(seed)

  def make(path, leaf):
    name = str(getattr(path[-1], 'key', path[-1]))
    if name in ('scale', 'var'):
      return np.ones(leaf.shape, leaf.dtype)
    if name in ('bias', 'mean'):
      return np.zeros(leaf.shape, leaf.dtype)
    fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 1
    return (rng.normal(size=leaf.shape) / np.sqrt(fan_in)).astype(leaf.dtype)
  return jax.tree_util.tree_map_with_path(make, shapes)
