"""Backbone modules from `config.model.backbone` ConfigDicts, for the backbone tests."""

from minvis_jax import config_lib  # noqa: F401  (registers minvis_jax.configs in a checkout)
from minvis_jax.configs import common
from minvis_jax.models import backbone as backbone_lib


def make_backbone(cfg, dtype: str = 'float32'):
  """The backbone module of `config.model.backbone` (a ConfigDict)."""
  return backbone_lib.make_backbone(backbone_lib.backbone_config(cfg), dtype)


def backbone_channels(cfg) -> tuple[int, int, int, int]:
  """Channels (c2, c3, c4, c5) of res2..res5."""
  if cfg.name == 'resnet':
    return tuple(int(w) for w in cfg.widths)
  return tuple(int(cfg.embed_dim * 2 ** i) for i in range(4))


def swin_config(embed_dim=32, depths=(2, 2, 2, 2), heads=(1, 2, 2, 4), window=3):
  """A small Swin backbone config (Swin-T's recipe with these sizes)."""
  cfg = common.swin_backbone('T')
  cfg.update(dict(embed_dim=embed_dim, depths=depths, num_heads=heads, window_size=window))
  return cfg
