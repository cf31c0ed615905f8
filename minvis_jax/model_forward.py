"""The live Flax model as the per-frame forward of the video predictor and of the online tracker,
and the predictor of an experiment config (neither imports model code, so an exported model runs
without it: docs/export.md)."""

import functools

import jax
import ml_collections
import numpy as np

from minvis_jax import online
from minvis_jax import predictor
from minvis_jax import tracking
from minvis_jax.models import Mask2Former
from minvis_jax.models import ModelConfig


@functools.lru_cache(maxsize=16)
def forward(model_config: ModelConfig) -> predictor.Forward:
  """`Mask2Former(model_config).apply` as a `predictor.Forward` (one object per config, so every
  predictor of a config shares its compiled step)."""
  return predictor.Forward(Mask2Former(model_config).apply, model_config.num_queries,
                           model_config.hidden_dim,
                           model_config.reid_dim if model_config.reid else 0)


def from_config(config: ml_collections.ConfigDict, variables,
                devices=None) -> predictor.VideoPredictor:
  """The predictor of a full experiment config: `config.model` and `config.inference` (window,
  top_k, tracker); `devices`: this process's devices to use (default: all local devices)."""
  inf = config.inference
  return predictor.VideoPredictor(forward(ModelConfig.from_config(config.model)), variables,
                                  inf.window, inf.top_k, tracking.tracker_from_config(config),
                                  devices)


def online_tracker(config: ml_collections.ConfigDict, variables,
                   summary: bool = False) -> online.OnlineTracker:
  """The online tracker (docs/online.md) of a full experiment config: `config.model`, `config.data`
  (input transform) and `config.inference` (tracker, top_k, online_* rules)."""
  return online.OnlineTracker(
      frame_forward(ModelConfig.from_config(config.model), variables),
      tracking.tracker_from_config(config), online.input_spec_from_config(config.data),
      online.rules_from_config(config), config.inference.top_k, summary)


@functools.lru_cache(maxsize=16)
def _apply_fn(model_config: ModelConfig):
  """The jitted forward of a model config, shared by every forward built for it (one compile)."""
  return jax.jit(Mask2Former(model_config).apply)


def frame_forward(model_config: ModelConfig, variables, device=None) -> online.Forward:
  """images float32 [N, Hp, Wp, 3] -> {'pred_logits' [N, Q, K+1], 'pred_masks' [N, Q, Hp/4,
  Wp/4], 'pred_embds' [N, Q, C]} on `device` (default: the first local device); jitted once per
  input shape. What the online tracker calls when it runs from a checkpoint."""
  device = device or jax.local_devices()[0]
  variables = jax.device_put(variables, device)
  apply = _apply_fn(model_config)

  def forward(images: np.ndarray) -> dict:
    return apply(variables, jax.device_put(np.asarray(images, np.float32), device))
  return forward
