"""The Mask2Former image instance segmentation model (docs/method.md §2), as MinVIS uses it."""

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp

from minvis_jax.models import backbone as backbone_lib
from minvis_jax.models.pixel_decoder import PixelDecoder
from minvis_jax.models.transformer_decoder import TransformerDecoder


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The model's architecture, built once from `config.model` (`from_config`).

  Frozen and hashable, so it can be a static argument of jitted functions. The values of the
  recipe live in configs/common.py; this class has no defaults.
  """
  backbone: backbone_lib.BackboneConfig
  num_classes: int                   # K; the class head outputs K + 1 (last = no object)
  num_queries: int
  hidden_dim: int                    # C of the pixel decoder and the transformer decoder
  mask_dim: int
  enc_layers: int                    # pixel decoder (MSDeformAttn encoder)
  enc_heads: int
  enc_ffn_dim: int
  enc_points: int
  num_feature_levels: int
  dec_layers: int                    # masked-attention layers (dec_layers + 1 prediction sets)
  dec_heads: int
  dec_ffn_dim: int
  dtype: str                         # compute dtype 'float32' | 'bfloat16'; parameters stay float32

  @classmethod
  def from_config(cls, model: 'Mapping[str, Any] | ModelConfig') -> 'ModelConfig':
    """`config.model` (a ConfigDict or mapping, as in configs/common.py) -> ModelConfig; a
    ModelConfig is returned as it is. Keys the model does not read (none today) are ignored."""
    if isinstance(model, ModelConfig):
      return model
    names = [f.name for f in dataclasses.fields(cls) if f.name != 'backbone']
    missing = [n for n in names + ['backbone'] if n not in model]
    if missing:
      raise ValueError(f'model config: missing {", ".join(missing)}')
    return cls(backbone=backbone_lib.backbone_config(model['backbone']),
               **{n: str(model[n]) if n == 'dtype' else int(model[n]) for n in names})


class Mask2Former(nn.Module):
  """images [B, H, W, 3] (normalised, zero padded, H and W multiples of 32) -> predictions.

  Returns {'pred_logits' [B, Q, K+1], 'pred_masks' [B, Q, H/4, W/4], 'pred_embds' [B, Q, C],
  'aux_outputs': [{'pred_logits', 'pred_masks'}] earliest first} (all float32).
  """
  config: ModelConfig

  @nn.compact
  def __call__(self, images: jnp.ndarray, train: bool = False):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    if images.ndim != 4 or images.shape[1] % 32 or images.shape[2] % 32:
      raise ValueError(f'images must be [B, H, W, 3] with H, W multiples of 32; got {images.shape}')
    features = backbone_lib.make_backbone(cfg.backbone, dtype, name='backbone')(
        images.astype(dtype), train=train)
    mask_features, multi_scale = PixelDecoder(
        dim=cfg.hidden_dim, mask_dim=cfg.mask_dim, layers=cfg.enc_layers, heads=cfg.enc_heads,
        points=cfg.enc_points, ffn_dim=cfg.enc_ffn_dim, levels=cfg.num_feature_levels,
        dtype=dtype, name='pixel_decoder')(features)
    preds, embds = TransformerDecoder(
        num_classes=cfg.num_classes, num_queries=cfg.num_queries, dim=cfg.hidden_dim,
        heads=cfg.dec_heads, ffn_dim=cfg.dec_ffn_dim, layers=cfg.dec_layers, mask_dim=cfg.mask_dim,
        dtype=dtype, name='decoder')(multi_scale, mask_features)
    out = dict(preds[-1])
    out['pred_embds'] = embds
    out['aux_outputs'] = preds[:-1]
    return out
