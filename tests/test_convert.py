"""Checkpoint import without torch: reading weight files (safetensors, detectron2 .pkl), their
one-line errors, and the package's re-exports. The comparisons against HF transformers are in
test_convert_vs_hf.py."""

import pickle
import re

import numpy as np
import pytest
from safetensors.numpy import save_file

from minvis_jax import convert
from minvis_jax.convert import hf


def test_package_reexports_one_hf_weight_file_list():
  assert convert.HF_WEIGHT_FILES is hf.HF_WEIGHT_FILES
  assert convert.HF_WEIGHT_FILES[0] == 'model.safetensors'


def test_unreadable_checkpoint_files_name_the_file(tmp_path):
  state = {'a.weight': np.arange(4096, dtype=np.float32).reshape(64, 64),
           'b.bias': np.ones(3, np.float32)}
  good = {}
  save_file(state, str(tmp_path / 'good.safetensors'))
  with open(tmp_path / 'good.pkl', 'wb') as f:
    pickle.dump({'model': state, '__author__': 'test'}, f)
  for name in ('good.safetensors', 'good.pkl'):
    good[name] = convert.read_state_dict(str(tmp_path / name))
    assert set(good[name]) == set(state)
    np.testing.assert_array_equal(good[name]['a.weight'], state['a.weight'])
  cases = {}
  for name in good:   # truncated to half
    data = (tmp_path / name).read_bytes()
    cases['truncated_' + name] = data[:len(data) // 2]
  cases['empty.safetensors'] = b''
  cases['text.safetensors'] = b'{"not": "a checkpoint"}'
  cases['text.pkl'] = b'hello, this is not a pickle\n'
  cases['list.pkl'] = pickle.dumps([1, 2, 3])
  cases['strings.pkl'] = pickle.dumps({'model': {'a.weight': 'oops'}})
  for name, data in cases.items():
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ': ') as info:
      convert.read_state_dict(str(path))
    assert len(str(info.value)) < 400 and '\n' not in str(info.value), str(info.value)
  with pytest.raises(ValueError, match=r"strings.pkl: entry 'a.weight' is not a numeric array"):
    convert.read_state_dict(str(tmp_path / 'strings.pkl'))
