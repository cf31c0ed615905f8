"""Backbone factory: builds the ResNet or Swin module described by config.model.backbone."""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from minvis_jax.models import resnet
from minvis_jax.models import swin


def make_backbone(backbone_config: ml_collections.ConfigDict, dtype: Any = jnp.float32,
                  name: str | None = None) -> nn.Module:
  """Returns a module with `__call__(images [B, H, W, 3], train=False)` -> {'res2'..'res5'} NHWC.

  Strides 4, 8, 16, 32; channels as in `backbone_channels`. H and W must be multiples of 32.
  dtype is the compute dtype (jnp.float32 / jnp.bfloat16 or their names, as in config.model.dtype);
  parameters stay float32. `name` names the submodule when built inside a parent module.
  """
  cfg = backbone_config
  dtype = jnp.dtype(dtype)
  if cfg.name == 'resnet':
    return resnet.ResNet(depths=tuple(cfg.depths), stem_width=cfg.stem_width,
                         widths=tuple(cfg.widths), dtype=dtype, name=name)
  if cfg.name == 'swin':
    return swin.Swin(embed_dim=cfg.embed_dim, depths=tuple(cfg.depths),
                     num_heads=tuple(cfg.num_heads), window_size=cfg.window_size,
                     patch_size=cfg.patch_size, mlp_ratio=cfg.mlp_ratio,
                     drop_path_rate=cfg.drop_path_rate, dtype=dtype, name=name)
  raise ValueError(f"backbone.name must be 'resnet' or 'swin', got {cfg.name!r}")


def backbone_channels(backbone_config: ml_collections.ConfigDict) -> tuple[int, int, int, int]:
  """Channels (c2, c3, c4, c5) of res2..res5."""
  cfg = backbone_config
  if cfg.name == 'resnet':
    return tuple(int(w) for w in cfg.widths)
  if cfg.name == 'swin':
    return tuple(int(cfg.embed_dim * 2 ** i) for i in range(4))
  raise ValueError(f"backbone.name must be 'resnet' or 'swin', got {cfg.name!r}")
