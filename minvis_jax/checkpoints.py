"""Checkpoints (orbax): model variables, the trainer's steps, and loading a model for inference.

A model checkpoint is a directory holding the `variables` of `Mask2Former(config.model).apply`
(e.g. {'params': ..., 'frozen': ...}) as an orbax PyTree checkpoint, written atomically, with a
checksum manifest (checksums.py) that every load verifies. A trainer work directory holds
`config.json` and `checkpoints/<step>/{variables,train,checksums}` (orbax CheckpointManager items:
`variables` as above, `train` the step and optimizer state), so evaluation reads the variables
alone.
"""

import contextlib
import json
import logging
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from minvis_jax import checksums
from minvis_jax import config_lib
from minvis_jax import metrics_writer
from minvis_jax import paths
from minvis_jax import user_input
from minvis_jax.models import Mask2Former
from minvis_jax.models import ModelConfig

CheckpointError = checksums.CheckpointError

CONFIG_FILE = 'config.json'
CHECKPOINT_SUBDIR = 'checkpoints'
# The weight files of a Hugging Face model folder (a checkpoint to convert, not to load).
HF_WEIGHT_FILES = ('model.safetensors', 'pytorch_model.bin', 'model.safetensors.index.json')


# ---------------------------------------------------------------------------------------------
# Reading orbax checkpoints with errors that name the checkpoint and the array.


class _DropMissingMetadataWarning(logging.Filter):
  """Orbax warns on every restore of an item directory (`<step>/variables`) that its
  `_CHECKPOINT_METADATA` (kept one level up, in the step directory) does not exist."""

  def filter(self, record):
    return '_CHECKPOINT_METADATA' not in record.getMessage()


@contextlib.contextmanager
def reading(directory: str):
  """Silences orbax's missing-metadata warning; a TensorStore read error (a truncated or missing
  array file: a 60-line spec dump) becomes one CheckpointError naming the checkpoint and array.

  Only the errors TensorStore raises for a bad file (ValueError, OSError; orbax re-raises them as
  the cause of a bare Exception) are translated, anything else passes through. After one, orbax's
  other pending reads of the same restore may still log their own failure.
  """
  quiet = _DropMissingMetadataWarning()
  logger = logging.getLogger('absl')   # orbax logs through absl
  logger.addFilter(quiet)
  try:
    yield
  except CheckpointError:
    raise
  except Exception as e:   # narrowed below by the type of its root cause
    root = e
    while root.__cause__ is not None:   # TensorStore's own error says what is wrong
      root = root.__cause__
    if not isinstance(root, (ValueError, OSError)):
      raise
    raise CheckpointError(_read_failure(directory, e, root)) from None
  finally:
    logger.removeFilter(quiet)


def _read_failure(directory: str, e: BaseException, root: BaseException) -> str:
  """One line from TensorStore's error: the array it names and the first line of its cause."""
  arrays = re.findall(r"'path': '([^/'][^']*?)/?'", str(e))
  first = str(root).strip().splitlines()[0] if str(root).strip() else type(root).__name__
  first = first.split(' See full TensorStore details')[0][:300]
  what = f'array {arrays[-1]}' if arrays else 'its arrays'
  return f'{directory}: cannot read {what} (a truncated, missing or corrupt file?): {first}'


# ---------------------------------------------------------------------------------------------
# Model-variable checkpoints.


def save_variables(path: str, variables) -> None:
  """Writes `variables` (a pytree of arrays) to the new directory `path` (atomically), with its
  checksum manifest `path/checksums.json`."""
  path = paths.abspath(path)
  # In the dtypes JAX gives them back (int64 -> int32 without x64), so the checksums match.
  variables = jax.tree.map(
      lambda x: np.asarray(x, jax.dtypes.canonicalize_dtype(np.asarray(x).dtype)), variables)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, variables)
    ckptr.wait_until_finished()
  # Written after orbax's rename: a crash in between leaves a complete checkpoint that loads with
  # a warning (no manifest), never a manifest without its checkpoint.
  metrics_writer.write_json(paths.join(path, checksums.MANIFEST_FILE),
                            checksums.manifest({'variables': variables}), indent=1)


def load_variables(path: str):
  """Reads a checkpoint written by `save_variables` (or a trainer step's `variables` item) as numpy
  arrays, verified against its checksum manifest."""
  path = paths.abspath(path)
  if not paths.isdir(path):
    raise FileNotFoundError(f'{path}: no such checkpoint directory')
  found = checksums.find_manifest(path)
  with reading(path), ocp.StandardCheckpointer() as ckptr:
    # An explicit single-device target: the checkpoint may come from another topology (a pod, other
    # processes, another mesh), which a restore without a target refuses.
    tree = ckptr.metadata(path)
    tree = getattr(tree, 'item_metadata', tree)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
    variables = jax.tree.map(np.asarray, ckptr.restore(path, target))
  checksums.verify(path, variables, found and found[1], found and found[0])
  return variables


# ---------------------------------------------------------------------------------------------
# Trainer work directories.


def save_config(directory: str, config: ml_collections.ConfigDict) -> None:
  """Writes `config` as `directory/config.json`, atomically (fsync, then rename). The text is
  `config.to_json(indent=2)`'s (ConfigDict's encoder turns tuples and the like into JSON)."""
  metrics_writer.write_json(paths.join(directory, CONFIG_FILE), json.loads(config.to_json()),
                            indent=2)


def read_config(directory: str) -> ml_collections.ConfigDict | None:
  """The ConfigDict saved by `save_config` in `directory`, or None if there is none."""
  path = paths.join(directory, CONFIG_FILE)
  if not paths.exists(path):
    return None
  try:
    with paths.open(path, 'rb') as f:
      data = user_input.parse_json(f.read(), path, 'config')
  except UnicodeDecodeError as e:
    raise ValueError(f'{path}: not a valid config JSON ({e})') from None
  if not isinstance(data, dict):
    raise ValueError(f'{path}: expected a JSON object (a config), got {type(data).__name__}')
  return config_lib.validate(ml_collections.ConfigDict(data), source=path)


def finished_steps(workdir: str) -> list[int]:
  """Steps of `workdir/checkpoints` that orbax has finalised (never `<step>.orbax-checkpoint-tmp-*`
  directories of a save in progress), ascending; [] when there is no such folder."""
  root = paths.join(workdir, CHECKPOINT_SUBDIR)
  try:
    names = paths.listdir(root)
  except FileNotFoundError:
    return []
  steps = []
  for name in names:
    path = paths.join(root, name)
    try:
      if name.isdigit() and ocp.path.step.is_path_finalized(path):
        steps.append(int(name))
    except (FileNotFoundError, NotADirectoryError):   # deleted (keep-last-N) while we looked
      continue
  return sorted(steps)


def checkpoint_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
  """The trainer's manager of `workdir/checkpoints/<step>/{variables,train,checksums}`, keeping the
  last `keep` steps. Orbax writes each step to a `<step>.orbax-checkpoint-tmp-*` directory and
  renames it when complete, so a run killed during a save leaves only that temporary directory,
  which restore never considers."""
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True,
                                         create=True)
  handlers = {'variables': ocp.StandardCheckpointHandler(),
              'train': ocp.StandardCheckpointHandler(),
              checksums.MANIFEST_ITEM: ocp.JsonCheckpointHandler(checksums.MANIFEST_FILE)}
  return ocp.CheckpointManager(paths.join(paths.abspath(workdir), CHECKPOINT_SUBDIR),
                               options=options, item_handlers=handlers)


def _items(state) -> dict:
  return {'variables': {'params': state.params, 'frozen': state.frozen},
          'train': {'step': state.step, 'opt_state': state.opt_state}}


def save_state(manager: ocp.CheckpointManager, state, step: int | None = None) -> None:
  """Saves a `train.TrainState` (step, params, frozen, opt_state) as step `step` (default:
  `state.step`) asynchronously, with the checksums of every array (computed now, before the next
  step donates the state's buffers)."""
  items = _items(state)
  manager.save(int(state.step) if step is None else step, args=ocp.args.Composite(
      variables=ocp.args.StandardSave(items['variables']),
      train=ocp.args.StandardSave(items['train']),
      **{checksums.MANIFEST_ITEM: ocp.args.JsonSave(checksums.manifest(items))}))


def restore_state(manager: ocp.CheckpointManager, abstract_state, step: int | None = None):
  """Restores step `step` (default: the latest) onto the shardings of `abstract_state` (a
  `train.TrainState` of ShapeDtypeStructs, any mesh), verified against its checksums; returns a
  state of the same type. A corrupt or unreadable step raises CheckpointError naming it and the
  array."""
  step = manager.latest_step() if step is None else step
  step_dir = paths.join(str(manager.directory), str(step))
  a = _items(abstract_state)
  manifest_file = paths.join(step_dir, checksums.MANIFEST_ITEM, checksums.MANIFEST_FILE)
  expected = checksums.read_manifest(manifest_file)
  if expected is not None:   # a resume with another model or optimizer: say so before reading
    for item in ('variables', 'train'):
      checksums.check_shapes(paths.join(step_dir, item), a[item], expected.get(item, {}),
                             ' (config.model / config.optim differ from the run that saved it)')
  try:
    with reading(step_dir):
      restored = manager.restore(step, args=ocp.args.Composite(
          variables=ocp.args.StandardRestore(a['variables']),
          train=ocp.args.StandardRestore(a['train'])))
    for item in ('variables', 'train'):
      checksums.verify(paths.join(step_dir, item), restored[item],
                       None if expected is None else expected.get(item, {}), manifest_file)
  except CheckpointError as e:
    raise CheckpointError(
        f'{e}. Move {step_dir} away to resume from the checkpoint before it.') from None
  v, t = restored['variables'], restored['train']
  return abstract_state.replace(step=t['step'], params=v['params'], frozen=v['frozen'],
                                opt_state=t['opt_state'])


# ---------------------------------------------------------------------------------------------
# Loading a model for inference and evaluation.


def load_for_inference(path: str):
  """(config or None, variables) from any model checkpoint this project writes.

  `path` may be a trainer work directory (latest step), one step directory of it, or a directory
  written by `save_variables` (e.g. by `convert`). The config is the `config.json` found in `path`
  or in the work directory above a step directory; None when there is none.
  """
  path = paths.abspath(path)
  if not paths.isdir(path):
    raise FileNotFoundError(f'{path}: no such checkpoint directory')
  config = read_config(path)
  steps = finished_steps(path)
  step_dir = paths.join(path, CHECKPOINT_SUBDIR, str(steps[-1])) if steps else None
  if step_dir is None and paths.isdir(paths.join(path, 'variables')):
    step_dir = path
    config = config or read_config(paths.dirname(paths.dirname(path)))
  if step_dir is not None:
    return config, load_variables(paths.join(step_dir, 'variables'))
  if paths.isdir(paths.join(path, CHECKPOINT_SUBDIR)):
    raise FileNotFoundError(f'{path}: work directory without any finished checkpoint')
  return config, load_variables(path)


_WEIGHT_FILES = {'.safetensors': 'hf', '.bin': 'hf', '.pkl': 'detectron2', '.pth': 'detectron2',
                 '.pt': 'detectron2'}


def check_checkpoint_kind(path: str) -> None:
  """A clear error when `path` is not a minvis-jax checkpoint but, e.g., weights to convert."""
  convert = 'convert it first: minvis-jax convert --source {} --input {} --output CKPT'
  if paths.isfile(path):
    ext = paths.splitext(path)[1].lower()
    if ext in _WEIGHT_FILES:
      raise ValueError(f'{path}: a {ext} weights file, not a minvis-jax checkpoint directory; '
                       + convert.format(_WEIGHT_FILES[ext], path))
    raise ValueError(f'{path}: a file, not a minvis-jax checkpoint directory')
  if not paths.isdir(path):
    return  # load_for_inference names the missing path
  if any(paths.isfile(paths.join(path, f)) for f in HF_WEIGHT_FILES):
    raise ValueError(f'{path}: an HF model folder, not a minvis-jax checkpoint; '
                     + convert.format('hf', path))
  markers = ('_METADATA', CHECKPOINT_SUBDIR, 'variables')
  if not any(paths.exists(paths.join(path, m)) for m in markers):
    raise ValueError(f'{path}: not a minvis-jax checkpoint (no orbax _METADATA, no checkpoints/ '
                     f'of a training work directory); write one with minvis-jax convert or train')


# Fields of a model config that fix the weights' shapes and meaning (not dtype or drop-path rate).
ARCHITECTURE_FIELDS = ('num_classes', 'num_queries', 'hidden_dim', 'mask_dim', 'enc_layers',
                       'enc_heads', 'enc_ffn_dim', 'enc_points', 'num_feature_levels',
                       'dec_layers', 'dec_heads', 'dec_ffn_dim')
BACKBONE_ARCHITECTURE_FIELDS = ('name', 'depths', 'stem_width', 'widths', 'embed_dim',
                                'num_heads', 'window_size', 'patch_size')


def check_architecture(model, config_model, config_spec: str, origin: str) -> None:
  """ValueError (one line, both values) where the checkpoint's model config (from `origin`, e.g.
  its config.json) and the experiment config's `model` disagree on the architecture."""
  def norm(v):
    return tuple(v) if isinstance(v, (list, tuple)) else v
  pairs = [(k, k, model.get(k), config_model.get(k)) for k in ARCHITECTURE_FIELDS]
  pairs += [(f'backbone.{k}', k, model.backbone.get(k), config_model.backbone.get(k))
            for k in BACKBONE_ARCHITECTURE_FIELDS]
  for key, short, a, b in pairs:
    if norm(a) != norm(b):
      what = {'num_classes': f'{a} classes', 'num_queries': f'{a} queries'}.get(short,
                                                                               f'{key}={a!r}')
      raise ValueError(f'the checkpoint has {what} ({origin}); --config {config_spec} has '
                       f'model.{key}={b!r}')


def load_model(checkpoint: str, config_spec: str) -> tuple[ml_collections.ConfigDict, dict]:
  """(config, variables): the checkpoint's own config unless `config_spec` is given (then its
  architecture must match the checkpoint's config.json, when there is one)."""
  check_checkpoint_kind(checkpoint)
  config, variables = load_for_inference(checkpoint)
  if config_spec:
    own, config = config, config_lib.load_config(config_spec)
    if own is not None and 'model' in own and 'model' in config:
      check_architecture(own.model, config.model, config_spec,
                         f'{checkpoint}/{CONFIG_FILE}')
  if config is None:
    raise ValueError(f'{paths.abspath(checkpoint)}: the checkpoint has no config.json; '
                     f'pass --config')
  source = config_spec or f'{checkpoint}/{CONFIG_FILE}'
  if not isinstance(config.get('model'), ml_collections.ConfigDict):
    raise ValueError(f'{source}: no "model" group of fields: not a minvis-jax config')
  try:
    expected = model_shapes(config.model)
  except (AttributeError, KeyError, TypeError, ValueError) as e:   # a field the model needs
    raise ValueError(f'{source}: model config does not build a model ({type(e).__name__}: '
                     f'{e})') from None
  check_variables(variables, expected, paths.abspath(checkpoint), source)
  return config, variables


# ---------------------------------------------------------------------------------------------
# Strict loading: every stored array is used and every model parameter is found.

# Where a parameter's presence or shape comes from: (path fragment, config key), first match wins.
_PARAM_KEYS = (('class_embed', 'model.num_classes'), ('query', 'model.num_queries'),
               ('pixel_decoder/encoder_layer_', 'model.enc_layers'),
               ('pixel_decoder/input_proj', 'model.num_feature_levels'),
               ('decoder/layer_', 'model.dec_layers'), ('backbone/', 'model.backbone.depths'))


def _param_key(path: str) -> str:
  return next((key for fragment, key in _PARAM_KEYS if fragment in path), 'model')


def model_shapes(model_config: ml_collections.ConfigDict) -> dict[str, tuple[int, ...]]:
  """'params/decoder/...' -> shape of every variable of `Mask2Former(model_config)` (no compute;
  the shapes do not depend on the image size)."""
  model = Mask2Former(ModelConfig.from_config(model_config))
  tree = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
  return variable_shapes(tree)


def variable_shapes(tree) -> dict[str, tuple[int, ...]]:
  return {'/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path): tuple(x.shape)
          for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def check_variables(variables, expected: dict[str, tuple[int, ...]], where: str, source: str,
                    allow_missing: tuple[str, ...] = ()) -> None:
  """ValueError naming the first stored array the model does not have, the first model parameter
  not stored (unless its path starts with one of `allow_missing`: parts a caller initialises,
  e.g. an optional head), or the first shape that differs, with the config key (of `source`) that
  decides it. `variables`: the loaded tree; `expected`: `model_shapes` of the config."""
  stored = variable_shapes(variables)
  extra = sorted(set(stored) - set(expected))
  missing = sorted(p for p in set(expected) - set(stored) if not p.startswith(allow_missing))
  differ = sorted(p for p in set(stored) & set(expected) if stored[p] != expected[p])
  counts = f'({len(extra)} extra, {len(missing)} missing, {len(differ)} of another shape)'
  if extra:
    raise ValueError(f'{where}: array {extra[0]} is stored but the model of {source} has no such '
                     f'parameter; check {_param_key(extra[0])} {counts}')
  if missing:
    raise ValueError(f'{where}: the model of {source} needs {missing[0]}, which is not stored; '
                     f'check {_param_key(missing[0])} {counts}')
  if differ:
    p = differ[0]
    raise ValueError(f'{where}: array {p} is stored as {stored[p]} but the model of {source} '
                     f'has {expected[p]}; check {_param_key(p)} {counts}')
