"""Checksum manifests: written with every checkpoint, verified on every load, independent of the
sharding."""

import json
import logging
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from minvis_jax import checkpoints
from minvis_jax import checksums
from support import bad_inputs


def test_save_variables_writes_checksums_and_load_verifies_them(tmp_path):
  path = str(tmp_path / 'ckpt')
  checkpoints.save_variables(path, bad_inputs.variables())
  manifest = json.loads(open(os.path.join(path, 'checksums.json')).read())
  entries = manifest['items']['variables']
  assert set(entries) == {'params/w', 'params/b/bias', 'frozen/mean'}
  assert entries['params/w']['shape'] == [64, 256] and entries['params/w']['dtype'] == 'float32'
  loaded = checkpoints.load_variables(path)
  np.testing.assert_array_equal(loaded['params']['w'], bad_inputs.variables()['params']['w'])
  # 64-bit leaves come back as JAX gives them (32-bit without x64), and verify.
  wide = {'params': {'f': np.arange(3.0), 'i': np.arange(4), 'b': np.array([True, False])}}
  checkpoints.save_variables(str(tmp_path / 'wide'), wide)
  loaded = checkpoints.load_variables(str(tmp_path / 'wide'))['params']
  assert (loaded['f'].dtype, loaded['i'].dtype, loaded['b'].dtype) == (np.float32, np.int32, bool)
  np.testing.assert_array_equal(loaded['i'], np.arange(4))
  # Same-size corruption inside the orbax array file: an error naming the directory and the array.
  bad_inputs.flip_bytes(bad_inputs.largest_array_file(path))
  with pytest.raises(checkpoints.CheckpointError,
                     match=re.escape(path) + r': array params/w does not match its checksum'):
    checkpoints.load_variables(path)
  with pytest.raises(checkpoints.CheckpointError, match='params/w does not match'):
    checkpoints.load_for_inference(path)


def test_checksums_do_not_depend_on_the_sharding():
  x = np.random.default_rng(1).normal(size=(16, 8, 12)).astype(np.float32)
  want = checksums.checksums({'x': x, 'n': np.int32(3)})
  mesh = jax.make_mesh((4, 2), ('data', 'model'))
  for spec in (P('data'), P(None, 'data', 'model'), P('model', None, 'data'), P()):
    sharded = jax.device_put(x, NamedSharding(mesh, spec))
    assert checksums.checksums({'x': sharded, 'n': jnp.int32(3)}) == want, spec
  # Any changed element, or two swapped elements, changes the checksum.
  y = x.copy()
  y[3, 2, 1] = np.nextafter(y[3, 2, 1], np.float32(10))
  z = x.copy()
  z[0, 0, 0], z[0, 0, 1] = x[0, 0, 1], x[0, 0, 0]
  for other in (y, z):
    assert checksums.checksums({'x': other})['x'] != want['x']


def test_checkpoint_without_manifest_loads_with_a_warning(tmp_path, caplog):
  path = str(tmp_path / 'old')
  checkpoints.save_variables(path, bad_inputs.variables())
  os.remove(os.path.join(path, 'checksums.json'))
  with caplog.at_level(logging.WARNING):
    loaded = checkpoints.load_variables(path)
  np.testing.assert_array_equal(loaded['frozen']['mean'], np.arange(5))
  assert any('without a checksum manifest' in r.getMessage() and path in r.getMessage()
             for r in caplog.records)
