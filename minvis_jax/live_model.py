"""The per-frame forward of a live Flax model, as `online.Forward`: what the online tracker calls
when it runs from a checkpoint rather than an exported artifact."""

import functools

import jax
import numpy as np

from minvis_jax import online
from minvis_jax.models import Mask2Former
from minvis_jax.models import ModelConfig


@functools.lru_cache(maxsize=16)
def _apply_fn(model_config: ModelConfig):
  """The jitted forward of a model config, shared by every forward built for it (one compile)."""
  return jax.jit(Mask2Former(model_config).apply)


def frame_forward(model_config: ModelConfig, variables, device=None) -> online.Forward:
  """images float32 [N, Hp, Wp, 3] -> {'pred_logits' [N, Q, K+1], 'pred_masks' [N, Q, Hp/4,
  Wp/4], 'pred_embds' [N, Q, C]} on `device` (default: the first local device); jitted once per
  input shape."""
  device = device or jax.local_devices()[0]
  variables = jax.device_put(variables, device)
  apply = _apply_fn(model_config)

  def forward(images: np.ndarray) -> dict:
    return apply(variables, jax.device_put(np.asarray(images, np.float32), device))
  return forward
