"""Building blocks of experiment configs: model presets and the default training recipe.

Experiment files in `configs/` compose these; modules never read configs except at the edges.
"""

import ml_collections

IMAGE_MEAN = (123.675, 116.28, 103.53)
IMAGE_STD = (58.395, 57.12, 57.375)


def resnet_backbone(depth: int = 50) -> ml_collections.ConfigDict:
  """detectron2-layout ResNet: stride in the 3x3 conv, frozen BN."""
  depths = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}[depth]
  return ml_collections.ConfigDict(dict(
      name='resnet',
      depths=depths,                     # bottleneck blocks per stage res2..res5
      stem_width=64,                     # channels of the 7x7/2 stem
      widths=(256, 512, 1024, 2048),     # output channels of res2..res5 (bottleneck = width // 4)
  ))


def swin_backbone(size: str = 'L') -> ml_collections.ConfigDict:
  """Swin-T/S/B/L with detectron2 semantics (window 7 for T/S, 12 for B/L at 384 pretraining)."""
  embed_dim, depths, heads, window = {
      'T': (96, (2, 2, 6, 2), (3, 6, 12, 24), 7),
      'S': (96, (2, 2, 18, 2), (3, 6, 12, 24), 7),
      'B': (128, (2, 2, 18, 2), (4, 8, 16, 32), 12),
      'L': (192, (2, 2, 18, 2), (6, 12, 24, 48), 12),
  }[size]
  return ml_collections.ConfigDict(dict(
      name='swin',
      embed_dim=embed_dim,
      depths=depths,
      num_heads=heads,
      window_size=window,
      patch_size=4,
      mlp_ratio=4.0,
      drop_path_rate=0.3,
  ))


def mask2former_model(backbone: ml_collections.ConfigDict, num_classes: int = 40,
                      num_queries: int = 100) -> ml_collections.ConfigDict:
  """Mask2Former instance-segmentation head on top of `backbone` (SPEC 2 defaults)."""
  return ml_collections.ConfigDict(dict(
      backbone=backbone,
      num_classes=num_classes,           # K; the class head outputs K + 1 (last = no object)
      num_queries=num_queries,
      hidden_dim=256,                    # C of pixel decoder and transformer decoder
      mask_dim=256,
      # Pixel decoder (MSDeformAttn encoder).
      enc_layers=6,
      enc_heads=8,
      enc_ffn_dim=1024,
      enc_points=4,
      num_feature_levels=3,
      # Transformer decoder.
      dec_layers=9,                      # masked-attention layers (10 prediction sets)
      dec_heads=8,
      dec_ffn_dim=2048,
      # 'float32' or 'bfloat16' compute; parameters stay float32.
      dtype='float32',
  ))


def tiny_model(num_classes: int = 40) -> ml_collections.ConfigDict:
  """A small model with the full architecture, for tests and the CPU demo."""
  backbone = ml_collections.ConfigDict(dict(
      name='resnet', depths=(1, 1, 1, 1), stem_width=16, widths=(32, 64, 128, 256)))
  model = mask2former_model(backbone, num_classes=num_classes, num_queries=20)
  model.update(dict(hidden_dim=64, mask_dim=64, enc_layers=2, enc_heads=4, enc_ffn_dim=128,
                    enc_points=4, dec_layers=3, dec_heads=4, dec_ffn_dim=128))
  return model


def loss_config() -> ml_collections.ConfigDict:
  """Set criterion weights and point sampling (SPEC 3)."""
  return ml_collections.ConfigDict(dict(
      class_weight=2.0,
      mask_weight=5.0,
      dice_weight=5.0,
      no_object_weight=0.1,
      num_points=12544,
      oversample_ratio=3.0,
      importance_sample_ratio=0.75,
  ))


def configs_dir() -> str:
  """The folder of the shipped experiment configs: `minvis_jax/configs` in an installed package (the
  wheel maps the top-level `configs/` there), else `configs/` beside the package in a checkout."""
  import os
  package = os.path.dirname(os.path.abspath(__file__))
  for path in (os.path.join(package, 'configs'), os.path.join(os.path.dirname(package), 'configs')):
    if os.path.isfile(os.path.join(path, 'common.py')):
      return path
  raise FileNotFoundError(f'{package}: no configs folder beside or inside the package (a broken '
                          f'install?)')


def config_names() -> list[str]:
  """Names of the shipped configs, e.g. ['coco', 'minvis', 'tiny']."""
  import os
  return sorted(f[:-3] for f in os.listdir(configs_dir())
                if f.endswith('.py') and f not in ('__init__.py', 'common.py'))


def resolve_config(spec: str) -> tuple[str, str]:
  """'name[:arg]' or 'path/to/config.py[:arg]' -> (config file path, arg).

  A path that exists wins; otherwise a bare name (`minvis`, `minvis.py`) is a shipped config, so the
  same spec works from any directory and after a pip install.
  """
  import os
  path, _, arg = spec.partition(':')
  if os.path.isfile(path):
    return path, arg
  name = path[:-3] if path.endswith('.py') else path
  if name and os.sep not in name and '/' not in name:
    shipped = os.path.join(configs_dir(), name + '.py')
    if name != 'common' and os.path.isfile(shipped):
      return shipped, arg
  hint = f'shipped configs: {", ".join(config_names())} (e.g. --config minvis:dataset=ovis)'
  raise FileNotFoundError(f'{path}: no such config file or shipped config; {hint}')


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Loads 'name[:arg]' or 'path/to/config.py[:arg]' by calling its get_config(arg), as --config
  flags do (see `resolve_config`)."""
  import importlib.machinery
  import importlib.util
  path, arg = resolve_config(spec)
  # An explicit loader: a config file need not end in .py.
  loader = importlib.machinery.SourceFileLoader('_minvis_config', path)
  module_spec = importlib.util.spec_from_file_location('_minvis_config', path, loader=loader)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, 'get_config'):
    raise ValueError(f'{path}: a config file must define get_config(arg=None)')
  return module.get_config(arg or None)


def apply_overrides(config: ml_collections.ConfigDict, overrides) -> ml_collections.ConfigDict:
  """Applies 'a.b=value' strings (command-line --set) in place; values parse as Python literals."""
  import ast
  for item in overrides:
    key, sep, text = item.partition('=')
    if not sep:
      raise ValueError(f'override {item!r}: expected key=value')
    parent, _, leaf = key.rpartition('.')
    node = config
    for part in filter(None, parent.split('.')):
      if part not in node:
        raise ValueError(f'override {item!r}: config has no field {part!r}')
      node = node[part]
    if leaf not in node:
      raise ValueError(f'override {item!r}: config has no field {key!r}')
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    if isinstance(node[leaf], tuple) and isinstance(value, list):
      value = tuple(value)
    node[leaf] = value
  return config
