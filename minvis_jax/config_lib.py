"""Experiment configs: find and load them (`--config`), apply `--set` overrides, validate.

The configs themselves (and every default) live in configs/, importable as `minvis_jax.configs`;
modules never read configs except at the edges.
"""

import ast
import contextlib
import importlib.machinery
import importlib.util
import os
import sys
import traceback

import ml_collections
import numpy as np

import minvis_jax
from minvis_jax import tracking
from minvis_jax.models.mask2former import REID_INPUTS
from minvis_jax.models.mask2former import REMAT


def configs_dir() -> str:
  """The folder of the shipped experiment configs: `minvis_jax/configs` in an installed package (the
  wheel maps the top-level `configs/` there), else `configs/` beside the package in a checkout."""
  package = os.path.dirname(os.path.abspath(__file__))
  for path in (os.path.join(package, 'configs'), os.path.join(os.path.dirname(package), 'configs')):
    if os.path.isfile(os.path.join(path, 'common.py')):
      return path
  raise FileNotFoundError(f'{package}: no configs folder beside or inside the package (a broken '
                          f'install?)')


def register_configs_package() -> None:
  """Makes `configs_dir()` importable as the package `minvis_jax.configs`.

  An installed wheel has it already. In a source checkout the folder sits beside the package (or an
  editable install of another checkout maps the name to that checkout's folder): the package is
  then created from the folder with importlib, with no `sys.path` edit. Runs on import of this
  module, so every config loaded through `load_config` and any module importing `config_lib` first
  can `from minvis_jax.configs import common`.
  """
  path = configs_dir()
  module = sys.modules.get('minvis_jax.configs')
  if module is None:
    spec = importlib.util.find_spec('minvis_jax.configs')
    if spec is not None and _same_dirs(spec.submodule_search_locations, path):
      return
  elif _same_dirs(getattr(module, '__path__', None), path):
    return
  init = os.path.join(path, '__init__.py')
  spec = importlib.util.spec_from_file_location('minvis_jax.configs', init,
                                                submodule_search_locations=[path])
  module = importlib.util.module_from_spec(spec)
  for name in [n for n in sys.modules if n.startswith('minvis_jax.configs.')]:
    del sys.modules[name]   # submodules of another checkout's folder
  sys.modules['minvis_jax.configs'] = module
  spec.loader.exec_module(module)
  minvis_jax.configs = module


def _same_dirs(locations, path: str) -> bool:
  locations = list(locations or ())
  return len(locations) == 1 and os.path.realpath(locations[0]) == os.path.realpath(path)


def config_names() -> list[str]:
  """Names of the shipped configs, e.g. ['coco', 'minvis', 'tiny']."""
  return sorted(f[:-3] for f in os.listdir(configs_dir())
                if f.endswith('.py') and f not in ('__init__.py', 'common.py'))


def resolve_config(spec: str) -> tuple[str, str]:
  """'name[:arg]' or 'path/to/config.py[:arg]' -> (config file path, arg).

  A path that exists wins; otherwise a bare name (`minvis`, `minvis.py`) is a shipped config, so the
  same spec works from any directory and after a pip install.
  """
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
  flags do (see `resolve_config`). The file may `from minvis_jax.configs import common`."""
  register_configs_package()
  path, arg = resolve_config(spec)
  # An explicit loader: a config file need not end in .py.
  loader = importlib.machinery.SourceFileLoader('_minvis_config', path)
  module_spec = importlib.util.spec_from_file_location('_minvis_config', path, loader=loader)
  module = importlib.util.module_from_spec(module_spec)
  with _user_code(path, 'loading'):
    module_spec.loader.exec_module(module)
  if not callable(getattr(module, 'get_config', None)):
    raise ValueError(f'{path}: a config file must define get_config(arg=None)')
  with _user_code(path, 'get_config'):
    config = module.get_config(arg or None)
  if not isinstance(config, (ml_collections.ConfigDict, dict)):
    raise ValueError(f'{path}: get_config returned {type(config).__name__}, expected an '
                     f'ml_collections.ConfigDict')
  return validate(config, source=spec)


@contextlib.contextmanager
def _user_code(path: str, what: str):
  """A config file's own failure (a syntax error, a NameError...) as one ValueError naming the
  file and line; ValueError and OSError (already naming what is wrong) pass through."""
  try:
    yield
  except SyntaxError as e:
    raise ValueError(f'{e.filename or path}:{e.lineno}: syntax error in the config: {e.msg}'
                     ) from None
  except (ValueError, OSError):
    raise
  except Exception as e:   # anything the user's code raises
    tb = traceback.extract_tb(e.__traceback__)
    line = next((f.lineno for f in reversed(tb) if os.path.abspath(f.filename)
                 == os.path.abspath(path)), None)
    raise ValueError(f'{path}{f":{line}" if line else ""}: {what} failed: '
                     f'{type(e).__name__}: {e}') from None


register_configs_package()


# Fields that take a count or 'auto' (ConfigDict would lock them to the type of the default).
_INT_OR_AUTO = ('inference.window',)


def apply_overrides(config: ml_collections.ConfigDict, overrides) -> ml_collections.ConfigDict:
  """Applies 'a.b=value' strings (command-line --set) in place; values parse as Python literals."""
  for item in overrides:
    key, sep, text = item.partition('=')
    if not sep:
      raise ValueError(f'override {item!r}: expected key=value')
    parent, _, leaf = key.rpartition('.')
    node, path = config, ''
    for part in filter(None, parent.split('.')):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        raise ValueError(f'override {item!r}: config has no field {path + part!r}')
      node, path = node[part], f'{path}{part}.'
    if not isinstance(node, ml_collections.ConfigDict):
      raise ValueError(f'override {item!r}: config field {parent!r} is a '
                       f'{type(node).__name__}, not a group of fields')
    if not leaf or leaf not in node:
      raise ValueError(f'override {item!r}: config has no field {key!r}')
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    if isinstance(node[leaf], ml_collections.ConfigDict):
      raise ValueError(f'override {item!r}: {key!r} is a group of fields; set one of them '
                       f'({", ".join(sorted(node[leaf].keys()))})')
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


def _validate_reid(config, check, fail, positive_int) -> None:
  """The re-identification keys (model.reid*, reid.*, inference.embedding)."""
  for key in ('model.reid', 'model.reid_detach'):
    check(key, lambda x: isinstance(x, bool), 'True or False')
  check('model.reid_dim', positive_int, 'an integer >= 1')
  check('model.reid_input', lambda x: x in REID_INPUTS, f'one of {REID_INPUTS}')
  check('reid.move_count', positive_int, 'an integer >= 1')
  for key in ('reid.con_weight', 'reid.aux_weight'):
    check(key, lambda x: _is_number(x) and x >= 0, 'a finite number >= 0')
  for key in ('reid.move_prob', 'reid.cover_prob'):
    check(key, lambda x: _is_number(x) and 0 <= x <= 1, 'a number in [0, 1]')
  embedding = check('inference.embedding', lambda x: x in tracking.EMBEDDINGS,
                    f'one of {tracking.EMBEDDINGS}')
  if embedding == 'reid' and _get(config, 'model.reid') is not True:
    fail('inference.embedding', embedding, "'decoder': the model has no reid head (model.reid)")
  batch = _get(config, 'batch_size')
  if _get(config, 'model.reid') is True and batch is not _MISSING and batch % 2:
    fail('batch_size', batch, 'an even number with model.reid (two views of each frame)')


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
  check('inference.tracker', lambda x: x in tracking.TRACKERS, f'one of {tracking.TRACKERS}')
  check('inference.memory_momentum', lambda x: _is_number(x) and 0 <= x < 1, 'a number in [0, 1)')
  check('inference.memory_min_score', lambda x: _is_number(x) and 0 <= x <= 1,
        'a number in [0, 1]')
  for key in ('inference.ctvis_score', 'inference.ctvis_match'):
    check(key, lambda x: _is_number(x) and 0 <= x <= 1, 'a number in [0, 1]')
  for key in ('inference.ctvis_retire_frames', 'inference.ctvis_cache'):
    check(key, positive_int, 'an integer >= 1')
  check('inference.ctvis_max_tracks', lambda x: _is_int(x) and x >= 0,
        'an integer >= 0 (0: twice model.num_queries)')
  check('inference.online_report_score', lambda x: _is_number(x) and 0 <= x <= 1,
        'a number in [0, 1]')
  check('inference.online_retire_frames', positive_int, 'an integer >= 1')
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
  check('model.remat', lambda x: x in REMAT, f'one of {REMAT}')
  check('data.annotation_fraction', lambda x: _is_number(x) and 0 < x <= 1, 'a number in (0, 1]')
  for key in ('data.mean', 'data.std'):
    check(key, lambda x: isinstance(x, (tuple, list)) and len(x) == 3 and all(
        _is_number(v) for v in x), 'three finite numbers (R, G, B)')
  check('data.std', lambda x: all(v > 0 for v in x), 'positive values')
  _validate_reid(config, check, fail, positive_int)
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
  _validate_backbone(config, fail)
  data = check('mesh.data', lambda x: _is_int(x) and (x == -1 or x >= 1),
               '-1 (all devices) or an integer >= 1')
  batch = _get(config, 'batch_size')
  if _MISSING not in (data, batch) and data != -1 and batch % data:
    fail('batch_size', batch, f'a multiple of mesh.data={data}')
  steps = check('optim.accumulate_steps', positive_int, 'an integer >= 1 (microbatches a step)')
  if _MISSING not in (steps, batch) and batch % (steps * (1 if data in (-1, _MISSING) else data)):
    fail('batch_size', batch, f'a multiple of optim.accumulate_steps={steps} x mesh.data={data}')
  if steps not in (_MISSING, 1) and _get(config, 'model.reid') is True:
    fail('optim.accumulate_steps', steps, '1 with model.reid (a microbatch would split the view '
         'pairs)')
  return config


def _validate_backbone(config: ml_collections.ConfigDict, fail) -> None:
  """The backbone's structure: four stages (res2..res5) of positive sizes, Swin's heads dividing
  each stage's channels."""
  backbone = _get(config, 'model.backbone')
  if not isinstance(backbone, ml_collections.ConfigDict):
    return
  def stages(key):
    value = backbone.get(key)
    if value is not None and not (isinstance(value, (tuple, list)) and len(value) == 4 and all(
        _is_int(v) and v >= 1 for v in value)):
      fail(f'model.backbone.{key}', value, 'four positive integers (stages res2..res5)')
    return value
  stages('depths')
  stages('widths')
  heads = stages('num_heads')
  for key in ('stem_width', 'embed_dim', 'window_size', 'patch_size'):
    value = backbone.get(key)
    if value is not None and not (_is_int(value) and value >= 1):
      fail(f'model.backbone.{key}', value, 'an integer >= 1')
  dim = backbone.get('embed_dim')
  if heads is not None and dim is not None:
    for i, n in enumerate(heads):
      if (dim * 2 ** i) % n:
        fail('model.backbone.num_heads', heads, f'divisors of the stage widths embed_dim * 2**i '
             f'(stage {i}: {dim * 2 ** i})')
  rate = backbone.get('drop_path_rate')
  if rate is not None and not (_is_number(rate) and 0 <= rate < 1):
    fail('model.backbone.drop_path_rate', rate, 'a number in [0, 1)')
