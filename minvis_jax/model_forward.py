"""The live Flax model as the video predictor's per-frame forward, and the predictor of an
experiment config (the predictor itself imports no model code, so an exported model runs without
it: docs/export.md)."""

import functools

import ml_collections

from minvis_jax import predictor
from minvis_jax import tracking
from minvis_jax.models import Mask2Former
from minvis_jax.models import ModelConfig


@functools.lru_cache(maxsize=16)
def forward(model_config: ModelConfig) -> predictor.Forward:
  """`Mask2Former(model_config).apply` as a `predictor.Forward` (one object per config, so every
  predictor of a config shares its compiled step)."""
  return predictor.Forward(Mask2Former(model_config).apply, model_config.num_queries,
                           model_config.hidden_dim)


def from_config(config: ml_collections.ConfigDict, variables,
                devices=None) -> predictor.VideoPredictor:
  """The predictor of a full experiment config: `config.model` and `config.inference` (window,
  top_k, tracker); `devices`: this process's devices to use (default: all local devices)."""
  inf = config.inference
  return predictor.VideoPredictor(forward(ModelConfig.from_config(config.model)), variables,
                                  inf.window, inf.top_k, tracking.tracker_from_config(config),
                                  devices)
