"""Building blocks of experiment configs: model presets and the default training recipe.

Experiment files in `configs/` compose these; modules never read configs except at the edges.
"""

import ml_collections
import numpy as np

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
  return validate(module.get_config(arg or None), source=spec)


# Fields that take a count or 'auto' (ConfigDict would lock them to the type of the default).
_INT_OR_AUTO = ('inference.window',)


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
    try:
      if key in _INT_OR_AUTO:
        with node.ignore_type():
          node[leaf] = value
      else:
        node[leaf] = value
    except TypeError as e:   # ConfigDict's type check: a str or float where an int belongs
      raise ValueError(f'override {item!r}: {e}') from None
  return validate(config, source='--set ' + ' --set '.join(overrides)) if overrides else config


# ---------------------------------------------------------------------------------------------
# Validation of the values that shape the model, the input and the loop: a bad value fails here,
# naming its key, rather than as a shape error deep inside the model.


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_number(x) -> bool:
  return (_is_int(x) or isinstance(x, (float, np.floating))) and np.isfinite(x)


def _get(config, key: str):
  node = config
  for part in key.split('.'):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return _MISSING
    node = node[part]
  return node


_MISSING = object()


def validate(config: ml_collections.ConfigDict, source: str = 'config'
             ) -> ml_collections.ConfigDict:
  """Checks the values that shape the model, the input and the loop; returns `config`.

  Keys a config does not have are skipped (partial configs, e.g. of a converted checkpoint).
  Raises ValueError naming `source`, the key and the value.
  """
  def fail(key, value, expected):
    raise ValueError(f'{source}: {key}={value!r}: expected {expected}')

  def check(key, ok, expected):
    value = _get(config, key)
    if value is not _MISSING and not ok(value):
      fail(key, value, expected)
    return value

  positive_int = lambda x: _is_int(x) and x >= 1  # noqa: E731
  divisibility = check('data.size_divisibility', lambda x: positive_int(x) and x % 32 == 0,
                       'a positive multiple of 32 (the stride of res5)')
  if divisibility is _MISSING:
    divisibility = 32
  check('data.canvas', lambda x: isinstance(x, (tuple, list)) and len(x) == 2 and all(
      positive_int(v) and v % divisibility == 0 for v in x),
      f'a pair (height, width) of positive multiples of data.size_divisibility={divisibility}')
  sizes = lambda x: isinstance(x, (tuple, list)) and len(x) >= 1 and all(  # noqa: E731
      positive_int(v) for v in x)
  check('data.min_size_train', sizes, 'a non-empty tuple of positive integers (short sides)')
  for key in ('data.max_size_train', 'data.min_size_test', 'data.max_size_test',
              'data.max_instances', 'data.workers', 'model.num_classes', 'model.num_queries',
              'model.hidden_dim', 'model.mask_dim', 'model.enc_heads', 'model.dec_heads',
              'model.enc_points', 'model.enc_ffn_dim', 'model.dec_ffn_dim',
              'model.num_feature_levels', 'loss.num_points', 'batch_size', 'log_every',
              'checkpoint.every_steps', 'checkpoint.keep', 'inference.top_k'):
    check(key, positive_int, 'an integer >= 1')
  check('inference.window', lambda x: x == 'auto' or positive_int(x), "an integer >= 1 or 'auto'")
  check('inference.tracker', lambda x: x in ('minvis', 'memory'), "'minvis' or 'memory'")
  check('inference.memory_momentum', lambda x: _is_number(x) and 0 <= x < 1, 'a number in [0, 1)')
  check('inference.memory_min_score', lambda x: _is_number(x) and 0 <= x <= 1,
        'a number in [0, 1]')
  for key in ('eval.every_steps', 'eval.max_videos', 'data.slot_multiple'):
    check(key, lambda x: _is_int(x) and x >= 0, 'an integer >= 0')
  for key in ('model.enc_layers', 'model.dec_layers', 'total_steps', 'optim.warmup_steps'):
    check(key, lambda x: _is_int(x) and x >= 0, 'an integer >= 0')
  check('model.num_feature_levels', lambda x: x <= 3, 'at most 3 (res3..res5)')
  for heads in ('model.enc_heads', 'model.dec_heads'):
    n, dim = _get(config, heads), _get(config, 'model.hidden_dim')
    if _MISSING not in (n, dim) and dim % n:
      fail(heads, n, f'a divisor of model.hidden_dim={dim}')
  check('model.dtype', lambda x: x in ('float32', 'bfloat16'), "'float32' or 'bfloat16'")
  check('model.backbone.name', lambda x: x in ('resnet', 'swin'), "'resnet' or 'swin'")
  check('data.annotation_fraction', lambda x: _is_number(x) and 0 < x <= 1, 'a number in (0, 1]')
  for key in ('data.mean', 'data.std'):
    check(key, lambda x: isinstance(x, (tuple, list)) and len(x) == 3 and all(
        _is_number(v) for v in x), 'three finite numbers (R, G, B)')
  check('data.std', lambda x: all(v > 0 for v in x), 'positive values')
  for key in ('data.flip', 'data.crop', 'mesh.fsdp', 'init.reinit_class_head'):
    check(key, lambda x: isinstance(x, bool), 'True or False')
  for key in ('optim.lr', 'optim.weight_decay', 'optim.clip_norm', 'optim.backbone_lr_mult',
              'optim.decay_factor', 'loss.class_weight', 'loss.mask_weight', 'loss.dice_weight',
              'loss.no_object_weight'):
    check(key, lambda x: _is_number(x) and x >= 0, 'a finite number >= 0')
  check('optim.lr', lambda x: x > 0, 'a positive learning rate')
  for key in ('optim.b1', 'optim.b2', 'loss.importance_sample_ratio'):
    check(key, lambda x: _is_number(x) and 0 <= x <= 1, 'a number in [0, 1]')
  check('loss.oversample_ratio', lambda x: _is_number(x) and x >= 1, 'a number >= 1')
  check('optim.decay_steps', lambda x: isinstance(x, (tuple, list)) and all(
      _is_int(v) and v >= 1 for v in x), 'a tuple of positive step numbers')
  check('mesh.model', positive_int, 'an integer >= 1')
  data = check('mesh.data', lambda x: _is_int(x) and (x == -1 or x >= 1),
               '-1 (all devices the model axis leaves) or an integer >= 1')
  batch = _get(config, 'batch_size')
  if _MISSING not in (data, batch) and data != -1 and batch % data:
    fail('batch_size', batch, f'a multiple of mesh.data={data}')
  return config
