"""Model-variable checkpoints (orbax): written by `convert`, read by training init and evaluation.

A model checkpoint is a directory holding the `variables` of `Mask2Former(config.model).apply`
(e.g. {'params': ..., 'frozen': ...}) as an orbax PyTree checkpoint, written atomically, with a
checksum manifest that every load verifies.
"""

import contextlib
import gc
import json
import logging
import os
import re
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointError(ValueError):
  """A checkpoint that cannot be read or does not match its checksums (names directory, array)."""


# ---------------------------------------------------------------------------------------------
# Per-array checksums. Every checkpoint this project writes carries a manifest
# {item: {array path: {shape, dtype, checksum}}} beside its orbax items: `checksums.json` in a
# `save_variables` directory, the `checksums` item (`<step>/checksums/checksums.json`) of a trainer
# step. The checksum is a sum mod 2^64 of a 64-bit mix of (position, 32-bit word) over the array's
# words: any changed word changes it, and being a sum it is computed shard by shard on any mesh and
# any number of processes (FSDP on a pod) without gathering an array on one host.

MANIFEST_FILE = 'checksums.json'
MANIFEST_ITEM = 'checksums'
_FORMAT = 'minvis-jax checksums v1: sum mod 2^64 of splitmix64((word position << 32) | word)'


def _words(block: np.ndarray) -> np.ndarray:
  """[...] array -> uint32 words [..., k] of its bytes (k = ceil(itemsize / 4))."""
  block = np.ascontiguousarray(block)
  size = block.dtype.itemsize
  if size % 4 == 0:
    return block.reshape(-1).view(np.uint32).reshape(block.shape + (size // 4,))
  unsigned = {1: np.uint8, 2: np.uint16}[size]
  return block.view(unsigned).astype(np.uint32)[..., None]


_MASK = (1 << 64) - 1
_CHUNK = 1 << 16   # words hashed at a time: the uint64 temporaries stay in cache


def _mix_sum(words: np.ndarray, positions) -> int:
  """sum mod 2^64 of splitmix64((position << 32) | word) over flat uint32 `words`; `positions` is
  an int (the first word's position, the rest follow) or a uint64 array like `words`."""
  total = 0
  ramp = np.arange(min(_CHUNK, words.size), dtype=np.uint64)
  for c in range(0, words.size, _CHUNK):
    w = words[c:c + _CHUNK]
    if isinstance(positions, int):
      x = ramp[:w.size] + np.uint64(positions + c)
    else:
      x = positions[c:c + _CHUNK].copy()
    x <<= np.uint64(32)
    x |= w
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xbf58476d1ce4e5b9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94d049bb133111eb)
    x ^= x >> np.uint64(31)
    total += int(x.sum(dtype=np.uint64))
  return total & _MASK


def _block_checksum(block: np.ndarray, index: tuple, shape: tuple) -> int:
  """Partial checksum of `block` = global_array[index] (index: slices) of a `shape` array."""
  words = _words(block)
  k = words.shape[-1]
  starts = [sl.indices(n)[0] if isinstance(sl, slice) else 0 for sl, n in zip(index, shape)]
  if block.ndim == 0 or tuple(block.shape[1:]) == tuple(shape[1:]):
    # Whole rows (an unsharded array, a shard of the first axis): positions are contiguous.
    first = starts[0] * int(np.prod(shape[1:], dtype=np.int64)) * k if block.ndim else 0
    return _mix_sum(words.reshape(-1), first)
  positions = np.zeros(words.shape, np.uint64)
  stride = k
  for d in reversed(range(block.ndim)):
    axis = np.arange(starts[d], starts[d] + block.shape[d], dtype=np.uint64) * np.uint64(stride)
    positions += axis.reshape([-1 if e == d else 1 for e in range(block.ndim + 1)])
    stride *= shape[d]
  positions += np.arange(k, dtype=np.uint64)
  return _mix_sum(words.reshape(-1), positions.reshape(-1))


def _path_name(path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path)


def checksums(tree) -> dict:
  """{array path: {'shape', 'dtype', 'checksum'}} of a pytree of numpy or (sharded) jax arrays.

  Sharded arrays are hashed shard by shard (one replica of each); with several processes the
  partial sums are added across processes, so every process returns the same manifest.
  """
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  partial = [0] * len(leaves)
  entries = {}
  multi = False
  for i, (path, x) in enumerate(leaves):
    if isinstance(x, jax.Array):
      multi |= not x.is_fully_addressable
      for shard in x.addressable_shards:
        if shard.replica_id == 0:
          partial[i] = (partial[i] + _block_checksum(np.asarray(shard.data), shard.index,
                                                     x.shape)) & _MASK
    else:
      x = np.asarray(x)
      partial[i] = _block_checksum(x, (slice(None),) * x.ndim, x.shape)
    entries[_path_name(path)] = {'shape': list(x.shape), 'dtype': str(np.dtype(x.dtype))}
  if multi:
    from jax.experimental import multihost_utils  # noqa: PLC0415
    # Two uint32 halves: jax arrays carry no uint64 without x64.
    halves = np.array([[p >> 32 for p in partial], [p & 0xffffffff for p in partial]], np.uint32)
    gathered = np.asarray(multihost_utils.process_allgather(halves)).astype(object)
    partial = list((gathered[:, 0] * (1 << 32) + gathered[:, 1]).sum(axis=0))
  for (name, entry), value in zip(entries.items(), partial):
    entry['checksum'] = f'{int(value) & _MASK:016x}'
  return entries


def manifest(items: dict) -> dict:
  """The JSON manifest of {item name: pytree}."""
  return {'format': _FORMAT, 'items': {name: checksums(tree) for name, tree in items.items()}}


def read_manifest(path: str) -> dict | None:
  """{item: {array path: entry}} of a manifest file, None if there is no such file."""
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      data = json.load(f)
    if data.get('format') != _FORMAT or not isinstance(data.get('items'), dict):
      raise ValueError(f'unknown format {data.get("format")!r}')
    for item, entries in data['items'].items():
      for name, entry in (entries.items() if isinstance(entries, dict) else [(item, None)]):
        if not (isinstance(entry, dict) and isinstance(entry.get('shape'), list)
                and isinstance(entry.get('dtype'), str) and isinstance(entry.get('checksum'), str)):
          raise ValueError(f'item {item!r}, array {name!r}: expected {{shape, dtype, checksum}}')
    return data['items']
  except (OSError, ValueError, AttributeError) as e:
    raise CheckpointError(f'{path}: unreadable checksum manifest ({e})') from None


def find_manifest(directory: str) -> tuple[str, dict] | None:
  """(manifest file, {array path: entry}) of a `save_variables` directory or of one item directory
  (`<step>/variables`) of a trainer checkpoint; None for checkpoints written without one."""
  directory = os.path.abspath(directory)
  own = os.path.join(directory, MANIFEST_FILE)
  items = read_manifest(own)
  if items is not None:
    return own, items.get('variables', {})
  parent, item = os.path.split(directory)
  beside = os.path.join(parent, MANIFEST_ITEM, MANIFEST_FILE)
  items = read_manifest(beside)
  if items is not None:
    if item not in items:
      raise CheckpointError(f'{beside}: no checksums for item {item!r}')
    return beside, items[item]
  return None


def check_shapes(directory: str, tree, expected: dict, hint: str = '') -> None:
  """Raises CheckpointError if the arrays of `tree` (arrays or ShapeDtypeStructs) are not the
  arrays a manifest's {array path: entry} lists, with the same shapes and dtypes."""
  got = {_path_name(p): (list(x.shape), str(np.dtype(x.dtype)))
         for p, x in jax.tree_util.tree_leaves_with_path(tree)}
  want = {name: (e['shape'], e['dtype']) for name, e in expected.items()}
  for name in sorted(set(got) | set(want)):
    if got.get(name) != want.get(name):
      saved = 'absent' if name not in want else f'{want[name][1]}{want[name][0]}'
      wanted = 'absent' if name not in got else f'{got[name][1]}{got[name][0]}'
      raise CheckpointError(f'{directory}: array {name} is {saved} in the checkpoint but {wanted} '
                            f'here{hint}')


def verify(directory: str, tree, expected: dict | None, manifest_file: str = '') -> None:
  """Raises CheckpointError naming `directory` and the array if `tree` differs from `expected`
  (a manifest's {array path: entry}); warns when there is no manifest (older checkpoints)."""
  if expected is None:
    logging.warning('%s: checkpoint without a checksum manifest (written before minvis-jax '
                    'wrote one); loading it unverified', directory)
    return
  got = checksums(tree)
  for name in sorted(set(got) | set(expected)):
    if name not in expected or name not in got:
      problem = 'not in the checksum manifest' if name in got else 'missing'
      raise CheckpointError(f'{directory}: array {name} is {problem} ({manifest_file})')
    want, have = expected[name], got[name]
    if (list(want.get('shape', [])), want.get('dtype')) != (have['shape'], have['dtype']):
      raise CheckpointError(f'{directory}: array {name} is {have["dtype"]}{have["shape"]}, the '
                            f'manifest says {want.get("dtype")}{want.get("shape")}')
    if want.get('checksum') != have['checksum']:
      raise CheckpointError(
          f'{directory}: array {name} does not match its checksum in {manifest_file} (stored '
          f'{want.get("checksum")}, read {have["checksum"]}): the checkpoint is corrupt')


def _write_json_atomically(path: str, data) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(data, f, indent=1)
  os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Reading orbax checkpoints with errors that name the checkpoint and the array.


class _DropMissingMetadataWarning(logging.Filter):
  """Orbax warns on every restore of an item directory (`<step>/variables`) that its
  `_CHECKPOINT_METADATA` (kept one level up, in the step directory) does not exist."""

  def filter(self, record):
    return '_CHECKPOINT_METADATA' not in record.getMessage()


def _from_orbax(unraisable) -> bool:
  code = getattr(unraisable.object, 'cr_code', None)
  return code is not None and 'orbax' in code.co_filename


@contextlib.contextmanager
def reading(directory: str):
  """Silences orbax's missing-metadata warning; a TensorStore read error (a truncated or missing
  array file: a 60-line spec dump) becomes one CheckpointError naming the checkpoint and array."""
  quiet = _DropMissingMetadataWarning()
  loggers = [logging.getLogger('absl'), logging.getLogger()]
  for logger in loggers:
    logger.addFilter(quiet)
  # After a failed read, orbax's other pending reads are dropped with the failure's traceback, and
  # each one would print the same dump as an "exception ignored" message.
  hook = sys.unraisablehook
  sys.unraisablehook = lambda u: None if _from_orbax(u) else hook(u)
  failure = None
  try:
    yield
  except CheckpointError:
    raise
  except Exception as e:  # noqa: BLE001  (TensorStore raises bare Exception / ValueError)
    text = str(e)
    arrays = re.findall(r"'path': '([^/'][^']*?)/?'", text)
    root = e
    while root.__cause__ is not None:   # TensorStore's own message says what is wrong
      root = root.__cause__
    first = str(root).strip().splitlines()[0] if str(root).strip() else type(root).__name__
    first = first.split(' See full TensorStore details')[0][:300]
    what = f'array {arrays[-1]}' if arrays else 'its arrays'
    failure = (f'{directory}: cannot read {what} (a truncated, missing or corrupt file?): '
               f'{first}')
  finally:
    for logger in loggers:
      logger.removeFilter(quiet)
    if failure:
      gc.collect()   # the dropped reads go now, while the hook above keeps them quiet
    sys.unraisablehook = hook
  if failure:
    raise CheckpointError(failure) from None


# ---------------------------------------------------------------------------------------------
# Model-variable checkpoints.


def save_variables(path: str, variables) -> None:
  """Writes `variables` (a pytree of arrays) to the new directory `path` (atomically), with its
  checksum manifest `path/checksums.json`."""
  path = os.path.abspath(path)
  # In the dtypes JAX gives them back (int64 -> int32 without x64), so the checksums match.
  variables = jax.tree.map(
      lambda x: np.asarray(x, jax.dtypes.canonicalize_dtype(np.asarray(x).dtype)), variables)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, variables)
    ckptr.wait_until_finished()
  # Written after orbax's rename: a crash in between leaves a complete checkpoint that loads with
  # a warning (no manifest), never a manifest without its checkpoint.
  _write_json_atomically(os.path.join(path, MANIFEST_FILE), manifest({'variables': variables}))


def load_variables(path: str):
  """Reads a checkpoint written by `save_variables` (or a trainer step's `variables` item) as numpy
  arrays, verified against its checksum manifest."""
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f'{path}: no such checkpoint directory')
  found = find_manifest(path)
  with reading(path), ocp.StandardCheckpointer() as ckptr:
    # An explicit single-device target: the checkpoint may come from another topology (a pod, other
    # processes, another mesh), which a restore without a target refuses.
    tree = ckptr.metadata(path)
    tree = getattr(tree, 'item_metadata', tree)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
    variables = jax.tree.map(np.asarray, ckptr.restore(path, target))
  verify(path, variables, found and found[1], found and found[0])
  return variables


# A trainer work directory holds `config.json` and `checkpoints/<step>/{variables,train}` (orbax
# CheckpointManager items): `variables` as above, `train` the step and optimizer state.
CONFIG_FILE = 'config.json'
CHECKPOINT_SUBDIR = 'checkpoints'


def save_config(directory: str, config) -> None:
  """Writes `config` (a ConfigDict) as `directory/config.json`, atomically."""
  os.makedirs(directory, exist_ok=True)
  tmp = os.path.join(directory, CONFIG_FILE + '.tmp')
  with open(tmp, 'w') as f:
    f.write(config.to_json(indent=2))
  os.replace(tmp, os.path.join(directory, CONFIG_FILE))


def read_config(directory: str):
  """The ConfigDict saved by `save_config` in `directory`, or None if there is none."""
  import json  # noqa: PLC0415

  import ml_collections  # noqa: PLC0415
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.exists(path):
    return None
  from minvis_jax import config_lib  # noqa: PLC0415
  try:
    with open(path) as f:
      data = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f'{path}: not a valid config JSON ({e})') from None
  if not isinstance(data, dict):
    raise ValueError(f'{path}: expected a JSON object (a config), got {type(data).__name__}')
  return config_lib.validate(ml_collections.ConfigDict(data), source=path)


def _latest_step_dir(directory: str) -> str | None:
  root = os.path.join(directory, CHECKPOINT_SUBDIR)
  if not os.path.isdir(root):
    return None
  steps = [int(d) for d in os.listdir(root) if d.isdigit()]
  return os.path.join(root, str(max(steps))) if steps else None


def load_for_inference(path: str):
  """(config or None, variables) from any model checkpoint this project writes.

  `path` may be a trainer work directory (latest step), one step directory of it, or a directory
  written by `save_variables` (e.g. by `convert`). The config is the `config.json` found in `path`
  or in the work directory above a step directory; None when there is none.
  """
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f'{path}: no such checkpoint directory')
  config = read_config(path)
  step_dir = _latest_step_dir(path)
  if step_dir is None and os.path.isdir(os.path.join(path, 'variables')):
    step_dir = path
    config = config or read_config(os.path.dirname(os.path.dirname(path)))
  if step_dir is not None:
    return config, load_variables(os.path.join(step_dir, 'variables'))
  if os.path.isdir(os.path.join(path, CHECKPOINT_SUBDIR)):
    raise FileNotFoundError(f'{path}: work directory without any finished checkpoint')
  return config, load_variables(path)
