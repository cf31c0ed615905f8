"""Per-array checksums of checkpoints: a manifest written beside every checkpoint and verified on
every load, computed shard by shard on any mesh and any number of processes."""

import json
import logging

import jax
from jax.experimental import multihost_utils
import numpy as np

from minvis_jax import paths


class CheckpointError(ValueError):
  """A checkpoint that cannot be read or does not match its checksums (names directory, array)."""


# Every checkpoint this project writes carries a manifest
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
  if not paths.exists(path):
    return None
  try:
    with paths.open(path) as f:
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
  directory = paths.abspath(directory)
  own = paths.join(directory, MANIFEST_FILE)
  items = read_manifest(own)
  if items is not None:
    return own, items.get('variables', {})
  parent, item = paths.split(directory)
  beside = paths.join(parent, MANIFEST_ITEM, MANIFEST_FILE)
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
