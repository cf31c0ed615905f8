"""Checkpoints: the trainer's steps (save, verified restore, resume with another model), reading
errors that name the checkpoint and the array, config.json, the list of finished steps."""

import json
import logging
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minvis_jax import checkpoints
from minvis_jax import train
from support import bad_inputs


def test_truncated_array_file_names_checkpoint_and_array(tmp_path):
  path = str(tmp_path / 'ckpt')
  checkpoints.save_variables(path, bad_inputs.variables())
  data = bad_inputs.largest_array_file(path)
  with open(data, 'r+b') as f:
    f.truncate(os.path.getsize(data) // 2)
  with pytest.raises(checkpoints.CheckpointError) as info:
    checkpoints.load_variables(path)
  message = str(info.value)
  assert message.startswith(f'{path}: cannot read array params.w'), message
  assert message.count('\n') == 0 and len(message) < 500, message   # no TensorStore spec dump


def _toy_state(seed=0):
  v = bad_inputs.variables(seed)
  return train.TrainState(step=jnp.int32(3), params=v['params'], frozen=v['frozen'],
                          opt_state={'mu': jax.tree.map(lambda x: x * 0.5, v['params'])})


def test_trainer_checkpoints_are_verified_on_resume_and_load_quietly(tmp_path, caplog, tiny_config):
  c = tiny_config
  manager = checkpoints.checkpoint_manager(str(tmp_path), c.checkpoint.keep)
  state = _toy_state()
  checkpoints.save_state(manager, state)
  manager.wait_until_finished()
  step_dir = tmp_path / 'checkpoints' / '3'
  manifest = json.loads((step_dir / 'checksums' / 'checksums.json').read_text())
  assert set(manifest['items']) == {'variables', 'train'}
  assert {'step', 'opt_state/mu/w'} <= set(manifest['items']['train'])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), state)
  restored = checkpoints.restore_state(manager, abstract)
  np.testing.assert_array_equal(np.asarray(restored.opt_state['mu']['w']),
                                state.opt_state['mu']['w'])
  # Loading the variables item prints no orbax _CHECKPOINT_METADATA warning.
  with caplog.at_level(logging.INFO):
    checkpoints.load_for_inference(str(tmp_path))
  assert not [r for r in caplog.records if '_CHECKPOINT_METADATA' in r.getMessage()]
  # A step written before the manifest existed resumes, with a warning.
  shutil.copytree(step_dir, tmp_path / 'saved_step')
  shutil.rmtree(step_dir / 'checksums')
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    restored = checkpoints.restore_state(manager, abstract)
  assert int(restored.step) == 3
  assert any('without a checksum manifest' in r.getMessage() for r in caplog.records)
  shutil.rmtree(step_dir)
  shutil.copytree(tmp_path / 'saved_step', step_dir)
  # Corruption of the optimizer state: resume refuses, naming the step and the array.
  bad_inputs.flip_bytes(bad_inputs.largest_array_file(step_dir / 'train'))
  with pytest.raises(checkpoints.CheckpointError,
                     match=re.escape(str(step_dir / 'train')) + r': array opt_state/mu/w does not '
                     r'match its checksum.*Move .*3 away'):
    checkpoints.restore_state(manager, abstract)
  # A truncated file of the variables item: named as well.
  data = bad_inputs.largest_array_file(step_dir / 'variables')
  with open(data, 'r+b') as f:
    f.truncate(10)
  with pytest.raises(checkpoints.CheckpointError, match=re.escape(str(step_dir)) + ': cannot read'):
    checkpoints.restore_state(manager, abstract)
  manager.close()


def test_resume_with_another_model_and_bad_manifest_or_config_json(tmp_path, tiny_config):
  c = tiny_config
  manager = checkpoints.checkpoint_manager(str(tmp_path), c.checkpoint.keep)
  state = _toy_state()
  checkpoints.save_state(manager, state)
  manager.wait_until_finished()
  step_dir = tmp_path / 'checkpoints' / '3'
  # Resuming with another model: named before any read, with the shapes on both sides.
  other = state.replace(params={**state.params, 'w': np.zeros((64, 128), np.float32)})
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), other)
  with pytest.raises(checkpoints.CheckpointError,
                     match=re.escape(str(step_dir / 'variables')) + r': array params/w is '
                     r'float32\[64, 256\] in the checkpoint but float32\[64, 128\] here \(config'):
    checkpoints.restore_state(manager, abstract)
  manager.close()
  # A manifest whose entries are not {shape, dtype, checksum}.
  manifest = step_dir / 'checksums' / 'checksums.json'
  data = json.loads(manifest.read_text())
  data['items']['variables']['params/w'] = [64, 256]
  manifest.write_text(json.dumps(data))
  with pytest.raises(checkpoints.CheckpointError,
                     match=re.escape(str(manifest)) + r": unreadable checksum .*'params/w'"):
    checkpoints.load_variables(str(step_dir / 'variables'))
  # config.json of a work directory: JSON that is not a config, or a config with a bad value.
  config_file = tmp_path / 'config.json'
  config_file.write_text('[1, 2]')
  with pytest.raises(ValueError, match=re.escape(str(config_file)) + ': expected a JSON object'):
    checkpoints.read_config(str(tmp_path))
  c.data.canvas = (64, 96)
  bad = json.loads(c.to_json())
  bad['data']['canvas'] = [64]
  config_file.write_text(json.dumps(bad))
  with pytest.raises(ValueError, match=re.escape(str(config_file)) + r': data.canvas=\[64\]'):
    checkpoints.read_config(str(tmp_path))


def test_finished_steps_skip_saves_in_progress_and_load_takes_the_latest(tmp_path):
  workdir = str(tmp_path / 'run')
  assert checkpoints.finished_steps(workdir) == []
  for step in (2, 10, 6):
    checkpoints.save_variables(os.path.join(workdir, 'checkpoints', str(step), 'variables'),
                               bad_inputs.variables(step))
  os.makedirs(os.path.join(workdir, 'checkpoints', '12.orbax-checkpoint-tmp-1700000000',
                           'variables'))   # a save in progress
  assert checkpoints.finished_steps(workdir) == [2, 6, 10]   # numeric order, not by name
  _, variables = checkpoints.load_for_inference(workdir)
  np.testing.assert_array_equal(variables['params']['w'], bad_inputs.variables(10)['params']['w'])


@pytest.mark.parametrize('key, value, message', [
    ('dec_layers', 2, r'array params/decoder/layer_2/\S+ is stored but the model of \S+config.json '
     r'has no such parameter; check model.dec_layers \(\d+ extra, 0 missing'),
    ('dec_layers', 4, r'the model of \S+config.json needs params/decoder/layer_3/\S+, which is not '
     r'stored; check model.dec_layers \(0 extra, \d+ missing'),
    ('enc_layers', 1, r'array params/pixel_decoder/encoder_layer_1/\S+ is stored .* check '
     r'model.enc_layers'),
    ('num_classes', 7, r'array params/decoder/class_embed/bias is stored as \(5,\) but the model '
     r'of \S+ has \(8,\); check model.num_classes'),
])
def test_loading_is_strict_both_ways_naming_the_array_and_the_config_key(tmp_path, tiny_checkpoint,
                                                                         key, value, message):
  """A config.json that disagrees with the arrays beside it (e.g. dec_layers=2 where 3 layers are
  stored): one error naming the checkpoint, the first extra / missing / reshaped array and the key,
  never a run with arrays ignored."""
  _, config, variables = tiny_checkpoint
  path = str(tmp_path / 'ckpt')
  checkpoints.save_variables(path, variables)
  config = config.copy_and_resolve_references()
  config.model[key] = value
  checkpoints.save_config(path, config)
  with pytest.raises(ValueError, match=re.escape(path) + ': ' + message):
    checkpoints.load_model(path, '')


def test_check_variables_allows_missing_parts_a_caller_initialises(tiny_checkpoint):
  _, config, variables = tiny_checkpoint
  expected = checkpoints.model_shapes(config.model)
  assert expected == checkpoints.variable_shapes(variables)
  expected['params/reid_head/kernel'] = (64, 32)
  with pytest.raises(ValueError, match='needs params/reid_head/kernel, which is not stored; check '
                     r'model \(0 extra, 1 missing'):
    checkpoints.check_variables(variables, expected, 'ckpt', 'cfg')
  checkpoints.check_variables(variables, expected, 'ckpt', 'cfg', allow_missing=('params/reid',))


def test_a_config_json_without_a_buildable_model_names_the_file(tmp_path, tiny_checkpoint):
  _, config, variables = tiny_checkpoint
  path = str(tmp_path / 'ckpt')
  checkpoints.save_variables(path, variables)
  data = json.loads(config.to_json())
  del data['model']['hidden_dim']
  (tmp_path / 'ckpt' / 'config.json').write_text(json.dumps(data))
  with pytest.raises(ValueError, match=re.escape(f'{path}/config.json') + r': model config does '
                     r"not build a model \(\w+Error: .*hidden_dim"):
    checkpoints.load_model(path, '')
  del data['model']
  (tmp_path / 'ckpt' / 'config.json').write_text(json.dumps(data))
  with pytest.raises(ValueError, match=re.escape(f'{path}/config.json') + ': no "model" group'):
    checkpoints.load_model(path, '')


def test_variables_and_config_in_a_bucket_load_like_local_ones(tiny_checkpoint, gcs_bucket):
  """What `convert --out gs://...` and `infer/evaluate --checkpoint gs://...` do: write a model
  checkpoint (orbax arrays through TensorStore, the manifest and config.json through the path
  layer) to a bucket and load it back, verified against its checksums."""
  local, config, variables = tiny_checkpoint
  url = f'{gcs_bucket}/models/tiny'
  checkpoints.save_variables(url, variables)
  checkpoints.save_config(url, config)
  got_config, got = checkpoints.load_for_inference(url)
  assert got_config.to_dict() == checkpoints.load_for_inference(local)[0].to_dict()
  for x, y in zip(jax.tree.leaves(variables), jax.tree.leaves(got)):
    np.testing.assert_array_equal(np.asarray(x), y)
  checkpoints.check_checkpoint_kind(url)   # a checkpoint, not weights to convert
  with pytest.raises(FileNotFoundError, match=rf'^{gcs_bucket}/models/none: no such checkpoint'):
    checkpoints.load_for_inference(f'{gcs_bucket}/models/none')
