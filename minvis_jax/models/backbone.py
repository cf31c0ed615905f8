"""Backbone factory: builds the ResNet or Swin module of a `BackboneConfig`."""

from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp

from minvis_jax.models import resnet
from minvis_jax.models import swin

BackboneConfig = resnet.ResNetConfig | swin.SwinConfig

_KINDS = {'resnet': resnet.ResNetConfig, 'swin': swin.SwinConfig}


def backbone_config(backbone: Mapping[str, Any]) -> BackboneConfig:
  """`config.model.backbone` ({'name': 'resnet' | 'swin', and that backbone's fields}) -> its frozen
  config. Sequences become tuples; keys the backbone does not have are an error."""
  fields = dict(backbone)
  name = fields.pop('name', None)
  if name not in _KINDS:
    raise ValueError(f"model.backbone.name={name!r}: expected one of {sorted(_KINDS)}")
  kind = _KINDS[name]
  try:
    return kind(**{k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in fields.items()})
  except TypeError as e:   # a missing or unknown field
    raise ValueError(f'model.backbone ({name}): {e}') from None


def make_backbone(config: BackboneConfig, dtype: Any = jnp.float32,
                  name: str | None = None, remat: bool = False) -> nn.Module:
  """Returns a module with `__call__(images [B, H, W, 3], train=False)` -> {'res2'..'res5'} NHWC.

  Strides 4, 8, 16, 32. H and W must be multiples of 32. dtype is the compute dtype (jnp.float32 /
  jnp.bfloat16 or their names, as in model.dtype); parameters stay float32. `name` names the
  submodule when built inside a parent module. `remat`: each block (ResNet bottleneck, Swin block)
  recomputes its activations in the backward pass; the same parameters and outputs.
  """
  dtype = jnp.dtype(dtype)
  if isinstance(config, resnet.ResNetConfig):
    return resnet.ResNet(depths=config.depths, stem_width=config.stem_width, widths=config.widths,
                         dtype=dtype, remat=remat, name=name)
  if isinstance(config, swin.SwinConfig):
    return swin.Swin(embed_dim=config.embed_dim, depths=config.depths, num_heads=config.num_heads,
                     window_size=config.window_size, patch_size=config.patch_size,
                     mlp_ratio=config.mlp_ratio, drop_path_rate=config.drop_path_rate, dtype=dtype,
                     remat=remat, name=name)
  raise TypeError(f'expected a ResNetConfig or SwinConfig, got {type(config).__name__}')
