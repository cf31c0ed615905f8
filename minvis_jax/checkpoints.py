"""Model-variable checkpoints (orbax): written by `convert`, read by training init and evaluation.

A model checkpoint is a directory holding the `variables` of `Mask2Former(config.model).apply`
(e.g. {'params': ..., 'frozen': ...}) as an orbax PyTree checkpoint, written atomically.
"""

import os

import jax
import numpy as np
import orbax.checkpoint as ocp


def save_variables(path: str, variables) -> None:
  """Writes `variables` (a pytree of arrays) to the new directory `path`, atomically."""
  path = os.path.abspath(path)
  variables = jax.tree.map(np.asarray, variables)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, variables)
    ckptr.wait_until_finished()


def load_variables(path: str):
  """Reads a checkpoint written by `save_variables` as numpy arrays."""
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f'{path}: no such checkpoint directory')
  with ocp.StandardCheckpointer() as ckptr:
    # An explicit single-device target: the checkpoint may come from another topology (a pod, other
    # processes, another mesh), which a restore without a target refuses.
    tree = ckptr.metadata(path)
    tree = getattr(tree, 'item_metadata', tree)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
    return jax.tree.map(np.asarray, ckptr.restore(path, target))


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
  try:
    with open(path) as f:
      return ml_collections.ConfigDict(json.load(f))
  except json.JSONDecodeError as e:
    raise ValueError(f'{path}: not a valid config JSON ({e})') from None


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
