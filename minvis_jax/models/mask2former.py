"""The Mask2Former image instance segmentation model (SPEC 2), as MinVIS uses it."""

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from minvis_jax.models.backbone import make_backbone
from minvis_jax.models.pixel_decoder import PixelDecoder
from minvis_jax.models.transformer_decoder import TransformerDecoder


class Mask2Former(nn.Module):
  """images [B, H, W, 3] (normalised, zero padded, H and W multiples of 32) -> predictions.

  Returns {'pred_logits' [B, Q, K+1], 'pred_masks' [B, Q, H/4, W/4], 'pred_embds' [B, Q, C],
  'aux_outputs': [{'pred_logits', 'pred_masks'}] earliest first} (all float32).
  """
  config: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, images: jnp.ndarray, train: bool = False):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    if images.ndim != 4 or images.shape[1] % 32 or images.shape[2] % 32:
      raise ValueError(f'images must be [B, H, W, 3] with H, W multiples of 32; got {images.shape}')
    features = make_backbone(cfg.backbone, dtype, name='backbone')(images.astype(dtype),
                                                                   train=train)
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
