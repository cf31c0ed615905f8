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
    return ckptr.restore(path)
