"""The Mask2Former image instance segmentation model (docs/method.md §2), as MinVIS uses it."""

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from minvis_jax.models import backbone as backbone_lib
from minvis_jax.models.pixel_decoder import PixelDecoder
from minvis_jax.models.transformer_decoder import TransformerDecoder

# model.remat: 'backbone' recomputes each backbone block (ResNet bottleneck, Swin block), 'decoder'
# each pixel-decoder encoder layer and transformer-decoder layer, 'all' both; only their inputs
# are kept for the backward pass (less memory for about one more forward of those layers).
REMAT = ('none', 'backbone', 'decoder', 'all')


# What the reid head reads (ModelConfig.reid_input): the decoder's query state, the pixel features
# pooled under the query's mask, or both.
REID_INPUTS = ('query', 'query+mask', 'mask')


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
  # The re-identification head (docs/reid.md). Defaults, unlike the fields above: configs written
  # before it existed (a checkpoint's config.json) build today's model.
  reid: bool = False                 # MLP head on the last decoder layer -> 'pred_reid'
  reid_dim: int = 256                # D of 'pred_reid'
  reid_detach: bool = False          # no gradient from the head into the detector
  reid_input: str = 'query'          # one of REID_INPUTS
  # Rematerialisation (`REMAT`): which layers recompute their activations in the backward pass
  # instead of keeping them. The parameter tree and every output are the same for each value.
  remat: str = 'none'

  @classmethod
  def from_config(cls, model: 'Mapping[str, Any] | ModelConfig') -> 'ModelConfig':
    """`config.model` (a ConfigDict or mapping, as in configs/common.py) -> ModelConfig; a
    ModelConfig is returned as it is. Keys the model does not read (none today) are ignored; the
    reid fields may be absent (then off)."""
    if isinstance(model, ModelConfig):
      return model
    optional = {f.name: f.default for f in dataclasses.fields(cls)
                if f.default is not dataclasses.MISSING}
    names = [f.name for f in dataclasses.fields(cls)
             if f.name != 'backbone' and f.name not in optional]
    missing = [n for n in names + ['backbone'] if n not in model]
    if missing:
      raise ValueError(f'model config: missing {", ".join(missing)}')
    values = {n: str(model[n]) if n == 'dtype' else int(model[n]) for n in names}
    for name, default in optional.items():
      values[name] = type(default)(model.get(name, default))
    if values['reid_input'] not in REID_INPUTS:
      raise ValueError(f'model config: reid_input {values["reid_input"]!r} is not one of '
                       f'{", ".join(REID_INPUTS)}')
    return cls(backbone=backbone_lib.backbone_config(model['backbone']), **values)


class Mask2Former(nn.Module):
  """images [B, H, W, 3] (normalised, zero padded, H and W multiples of 32) -> predictions.

  Returns {'pred_logits' [B, Q, K+1], 'pred_masks' [B, Q, H/4, W/4], 'pred_embds' [B, Q, C],
  'aux_outputs': [{'pred_logits', 'pred_masks'}] earliest first} (all float32), and with
  `config.reid` 'pred_reid' [B, Q, D] (D = reid_dim).
  """
  config: ModelConfig

  @nn.compact
  def __call__(self, images: jnp.ndarray, train: bool = False):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    if images.ndim != 4 or images.shape[1] % 32 or images.shape[2] % 32:
      raise ValueError(f'images must be [B, H, W, 3] with H, W multiples of 32; got {images.shape}')
    if cfg.remat not in REMAT:
      raise ValueError(f'model.remat={cfg.remat!r}: expected one of {REMAT}')
    remat_backbone = cfg.remat in ('backbone', 'all')
    remat_decoder = cfg.remat in ('decoder', 'all')
    features = backbone_lib.make_backbone(cfg.backbone, dtype, name='backbone',
                                          remat=remat_backbone)(images.astype(dtype), train=train)
    mask_features, multi_scale = PixelDecoder(
        dim=cfg.hidden_dim, mask_dim=cfg.mask_dim, layers=cfg.enc_layers, heads=cfg.enc_heads,
        points=cfg.enc_points, ffn_dim=cfg.enc_ffn_dim, levels=cfg.num_feature_levels,
        dtype=dtype, remat=remat_decoder, name='pixel_decoder')(features)
    preds, embds = TransformerDecoder(
        num_classes=cfg.num_classes, num_queries=cfg.num_queries, dim=cfg.hidden_dim,
        heads=cfg.dec_heads, ffn_dim=cfg.dec_ffn_dim, layers=cfg.dec_layers, mask_dim=cfg.mask_dim,
        dtype=dtype, remat=remat_decoder, name='decoder')(multi_scale, mask_features)
    out = dict(preds[-1])
    out['pred_embds'] = embds
    out['aux_outputs'] = preds[:-1]
    if cfg.reid:
      # An add-on: with it off the parameter tree and every output above are exactly as without.
      # The decoder's query state says which slot it is; the pixel features under its mask say
      # what it holds, which stays with the object when it comes back in another slot.
      pooled = lambda: mask_pooled(out['pred_masks'], mask_features).astype(embds.dtype)  # noqa: E731
      head_input = {'query': lambda: embds, 'mask': pooled,
                    'query+mask': lambda: jnp.concatenate([embds, pooled()], axis=-1)
                    }[cfg.reid_input]()
      if cfg.reid_detach:
        head_input = jax.lax.stop_gradient(head_input)
      out['pred_reid'] = ReidHead(cfg.hidden_dim, cfg.reid_dim, dtype, name='reid_head')(
          head_input)
    return out


def mask_pooled(mask_logits: jnp.ndarray, mask_features: jnp.ndarray) -> jnp.ndarray:
  """Pixel features averaged under each query's soft mask: mask_logits [B, Q, h, w],
  mask_features [B, h, w, C] -> [B, Q, C] float32 (weights sigmoid(logit), normalised per query)."""
  weights = jax.nn.sigmoid(mask_logits.astype(jnp.float32))
  weights = weights / jnp.maximum(jnp.sum(weights, axis=(2, 3), keepdims=True), 1e-6)
  return jnp.einsum('bqhw,bhwc->bqc', weights, mask_features.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST)


class ReidHead(nn.Module):
  """Re-identification embedding: 3 Dense layers (ReLU between) on the last decoder layer's
  normalised query states [B, Q, C] -> [B, Q, D] float32, trained by the contrastive loss
  (reid_loss.py). Kernels kaiming-uniform with a = 1 (fan-in variance scaling), biases 0."""
  hidden: int
  out_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.variance_scaling(1.0, 'fan_in', 'uniform')
    for i, d in enumerate((self.hidden, self.hidden, self.out_dim)):
      x = nn.Dense(d, dtype=self.dtype, kernel_init=init, name=f'dense_{i}')(x)
      x = nn.relu(x) if i < 2 else x
    return x.astype(jnp.float32)
