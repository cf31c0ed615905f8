"""Bad input to the trainer never hangs and never passes silently: input thread errors, SIGTERM
while waiting for input, corrupt or truncated checkpoints, unreadable files given to `convert`."""

import concurrent.futures
import json
import logging
import os
import re
import shutil
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from minvis_jax import checkpoints
from minvis_jax import config_lib
from minvis_jax import train
from minvis_jax.data import input_pipeline
from test_train import small_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FakeSource:
  """Two-frame videos of one square instance; `load` calls `hook(video, frame)` first."""

  origin = 'fake source'
  has_annotations = True
  num_instances = None

  def __init__(self, hook=None, num_videos=4):
    self.num_videos = num_videos
    self.hook = hook

  def num_frames(self, video):
    del video
    return 2

  def load(self, video, frame):
    if self.hook:
      self.hook(video, frame)
    image = np.full((64, 96, 3), 10 * video + frame, np.uint8)
    masks = np.zeros((1, 64, 96), np.uint8)
    masks[0, 8:40, 8:40] = 1
    return image, masks, np.array([video % 4])


def _first_loads_raise(after):
  """A hook that lets `after` loads through, then raises a reader-style error."""
  count = [0]
  lock = threading.Lock()

  def hook(video, frame):
    with lock:
      count[0] += 1
      if count[0] > after:
        raise ValueError(f'videos.json: video {video} frame {frame}: field "segmentations" broken')
  return hook


# --- 1. The input thread: errors reach the loop, no hang, SIGTERM while waiting. -----------------


@pytest.mark.timeout(60)
def test_zero_workers_is_an_error_not_a_hang():
  c = small_config()
  train_input = input_pipeline.TrainInput(input_pipeline.InputConfig.from_config(c), FakeSource())
  # workers=0 reaches the thread pool only past config validation: its own error, no hang.
  with pytest.raises(ValueError, match=r'max_workers must be greater than 0'):
    next(input_pipeline.iterate(train_input, 0, workers=0))
  # And at config time, naming the key.
  c.data.workers = 0
  with pytest.raises(ValueError, match=r'data\.workers.*0'):
    config_lib.validate(c)
  c = small_config()
  with pytest.raises(ValueError, match=r'data\.workers'):
    config_lib.apply_overrides(c, ['data.workers=0'])


@pytest.mark.timeout(60)
def test_any_producer_error_reaches_the_consumer(monkeypatch):
  c = small_config()
  # A reader error after the first batch: one good batch, then the reader's own message.
  train_input = input_pipeline.TrainInput(input_pipeline.InputConfig.from_config(c),
                                          FakeSource(_first_loads_raise(c.batch_size)))
  batches = input_pipeline.iterate(train_input, 0, workers=2)
  assert next(batches)['image'].shape == (8, 64, 96, 3)
  with pytest.raises(ValueError, match='videos.json: video .* field "segmentations"'):
    next(batches)
  # The pool itself fails to start (what `workers=0` did before it was rejected): no hang either.
  def broken_pool(*args, **kwargs):
    raise RuntimeError('no threads left')
  monkeypatch.setattr(concurrent.futures, 'ThreadPoolExecutor', broken_pool)
  with pytest.raises(RuntimeError, match='no threads left'):
    next(input_pipeline.iterate(train_input, 0, workers=2))


@pytest.mark.timeout(120)
def test_input_error_ends_the_training_run(tmp_path):
  c = small_config()
  source = FakeSource(_first_loads_raise(0))

  def input_fn(start):
    return input_pipeline.iterate(
        input_pipeline.TrainInput(input_pipeline.InputConfig.from_config(c), source), start,
        workers=2)
  with pytest.raises(ValueError, match='videos.json: video') as info:
    train.train(c, str(tmp_path), input_fn=input_fn, total_steps=3)
  assert 'input batch of step 1' in ''.join(getattr(info.value, '__notes__', []))


@pytest.mark.timeout(300)
def test_sigterm_while_waiting_for_input_saves_and_exits(tmp_path):
  c = small_config()
  c.checkpoint.every_steps = 1000
  release = threading.Event()
  loads = [0]
  lock = threading.Lock()

  def hook(video, frame):
    del video, frame
    with lock:
      loads[0] += 1
      stuck = loads[0] > 2 * c.batch_size
    # From the third batch on the reader never returns (a dead NFS mount); on old code the test
    # fails after 60 s instead of hanging.
    if stuck and not release.wait(60):
      raise TimeoutError('SIGTERM did not interrupt the wait for input')

  train_input = input_pipeline.TrainInput(input_pipeline.InputConfig.from_config(c),
                                          FakeSource(hook))

  def input_fn(start):
    inner = input_pipeline.iterate(train_input, start, workers=2, prefetch=1)
    for i, batch in enumerate(inner):
      yield batch
      if i == 1:   # the loop asks for the third batch: it blocks, and SIGTERM comes meanwhile
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()

  handler = signal.getsignal(signal.SIGTERM)
  try:
    start = time.perf_counter()
    state = train.train(c, str(tmp_path), input_fn=input_fn, total_steps=1000)
    elapsed = time.perf_counter() - start
  finally:
    release.set()
  assert int(state.step) == 2
  saved = sorted(int(d) for d in os.listdir(tmp_path / 'checkpoints') if d.isdigit())
  assert saved == [2]
  assert elapsed < 200
  assert signal.getsignal(signal.SIGTERM) is handler
  _, variables = checkpoints.load_for_inference(str(tmp_path))
  np.testing.assert_array_equal(variables['params']['decoder']['query_feat'],
                                np.asarray(state.params['decoder']['query_feat']))


# --- 4. Checkpoints: checksums, corruption, truncation, older checkpoints. --------------------


def _variables(seed=0):
  rng = np.random.default_rng(seed)
  # Random float32 does not compress: zstd stores it raw, so flipped bytes decode without an error.
  return {'params': {'w': rng.normal(size=(64, 256)).astype(np.float32),
                     'b': {'bias': rng.normal(size=(7,)).astype(np.float32)}},
          'frozen': {'mean': np.arange(5, dtype=np.float32)}}


def _largest_array_file(directory):
  files = [os.path.join(root, f) for root, _, names in os.walk(directory) for f in names
           if os.path.basename(root) == 'd']
  return max(files, key=os.path.getsize)


def _flip_bytes(path):
  data = bytearray(open(path, 'rb').read())
  for i in range(len(data) // 2, len(data) // 2 + 8):
    data[i] ^= 0x5A
  open(path, 'wb').write(bytes(data))   # same size


def test_save_variables_writes_checksums_and_load_verifies_them(tmp_path):
  path = str(tmp_path / 'ckpt')
  checkpoints.save_variables(path, _variables())
  manifest = json.loads(open(os.path.join(path, 'checksums.json')).read())
  entries = manifest['items']['variables']
  assert set(entries) == {'params/w', 'params/b/bias', 'frozen/mean'}
  assert entries['params/w']['shape'] == [64, 256] and entries['params/w']['dtype'] == 'float32'
  loaded = checkpoints.load_variables(path)
  np.testing.assert_array_equal(loaded['params']['w'], _variables()['params']['w'])
  # 64-bit leaves come back as JAX gives them (32-bit without x64), and verify.
  wide = {'params': {'f': np.arange(3.0), 'i': np.arange(4), 'b': np.array([True, False])}}
  checkpoints.save_variables(str(tmp_path / 'wide'), wide)
  loaded = checkpoints.load_variables(str(tmp_path / 'wide'))['params']
  assert (loaded['f'].dtype, loaded['i'].dtype, loaded['b'].dtype) == (np.float32, np.int32, bool)
  np.testing.assert_array_equal(loaded['i'], np.arange(4))
  # Same-size corruption inside the orbax array file: an error naming the directory and the array.
  _flip_bytes(_largest_array_file(path))
  with pytest.raises(checkpoints.CheckpointError,
                     match=re.escape(path) + r': array params/w does not match its checksum'):
    checkpoints.load_variables(path)
  with pytest.raises(checkpoints.CheckpointError, match='params/w does not match'):
    checkpoints.load_for_inference(path)


def test_checksums_do_not_depend_on_the_sharding():
  x = np.random.default_rng(1).normal(size=(16, 8, 12)).astype(np.float32)
  want = checkpoints.checksums({'x': x, 'n': np.int32(3)})
  mesh = jax.make_mesh((4, 2), ('data', 'model'))
  for spec in (P('data'), P(None, 'data', 'model'), P('model', None, 'data'), P()):
    sharded = jax.device_put(x, NamedSharding(mesh, spec))
    assert checkpoints.checksums({'x': sharded, 'n': jnp.int32(3)}) == want, spec
  # Any changed element, or two swapped elements, changes the checksum.
  y = x.copy()
  y[3, 2, 1] = np.nextafter(y[3, 2, 1], np.float32(10))
  z = x.copy()
  z[0, 0, 0], z[0, 0, 1] = x[0, 0, 1], x[0, 0, 0]
  for other in (y, z):
    assert checkpoints.checksums({'x': other})['x'] != want['x']


def test_truncated_array_file_names_checkpoint_and_array(tmp_path):
  path = str(tmp_path / 'ckpt')
  checkpoints.save_variables(path, _variables())
  data = _largest_array_file(path)
  with open(data, 'r+b') as f:
    f.truncate(os.path.getsize(data) // 2)
  with pytest.raises(checkpoints.CheckpointError) as info:
    checkpoints.load_variables(path)
  message = str(info.value)
  assert message.startswith(f'{path}: cannot read array params.w'), message
  assert message.count('\n') == 0 and len(message) < 500, message   # no TensorStore spec dump


def test_checkpoint_without_manifest_loads_with_a_warning(tmp_path, caplog):
  path = str(tmp_path / 'old')
  checkpoints.save_variables(path, _variables())
  os.remove(os.path.join(path, 'checksums.json'))
  with caplog.at_level(logging.WARNING):
    loaded = checkpoints.load_variables(path)
  np.testing.assert_array_equal(loaded['frozen']['mean'], np.arange(5))
  assert any('without a checksum manifest' in r.getMessage() and path in r.getMessage()
             for r in caplog.records)


def _toy_state(seed=0):
  v = _variables(seed)
  return train.TrainState(step=jnp.int32(3), params=v['params'], frozen=v['frozen'],
                          opt_state={'mu': jax.tree.map(lambda x: x * 0.5, v['params'])})


def test_trainer_checkpoints_are_verified_on_resume_and_load_quietly(tmp_path, caplog):
  c = small_config()
  manager = train.checkpoint_manager(str(tmp_path), c)
  state = _toy_state()
  train.save_state(manager, state)
  manager.wait_until_finished()
  step_dir = tmp_path / 'checkpoints' / '3'
  manifest = json.loads((step_dir / 'checksums' / 'checksums.json').read_text())
  assert set(manifest['items']) == {'variables', 'train'}
  assert {'step', 'opt_state/mu/w'} <= set(manifest['items']['train'])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), state)
  restored = train.restore_state(manager, abstract)
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
    restored = train.restore_state(manager, abstract)
  assert int(restored.step) == 3
  assert any('without a checksum manifest' in r.getMessage() for r in caplog.records)
  shutil.rmtree(step_dir)
  shutil.copytree(tmp_path / 'saved_step', step_dir)
  # Corruption of the optimizer state: resume refuses, naming the step and the array.
  _flip_bytes(_largest_array_file(step_dir / 'train'))
  with pytest.raises(checkpoints.CheckpointError,
                     match=re.escape(str(step_dir / 'train')) + r': array opt_state/mu/w does not '
                     r'match its checksum.*Move .*3 away'):
    train.restore_state(manager, abstract)
  # A truncated file of the variables item: named as well.
  data = _largest_array_file(step_dir / 'variables')
  with open(data, 'r+b') as f:
    f.truncate(10)
  with pytest.raises(checkpoints.CheckpointError, match=re.escape(str(step_dir)) + ': cannot read'):
    train.restore_state(manager, abstract)
  manager.close()


def test_resume_with_another_model_and_bad_manifest_or_config_json(tmp_path):
  c = small_config()
  manager = train.checkpoint_manager(str(tmp_path), c)
  state = _toy_state()
  train.save_state(manager, state)
  manager.wait_until_finished()
  step_dir = tmp_path / 'checkpoints' / '3'
  # Resuming with another model: named before any read, with the shapes on both sides.
  other = state.replace(params={**state.params, 'w': np.zeros((64, 128), np.float32)})
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), other)
  with pytest.raises(checkpoints.CheckpointError,
                     match=re.escape(str(step_dir / 'variables')) + r': array params/w is '
                     r'float32\[64, 256\] in the checkpoint but float32\[64, 128\] here \(config'):
    train.restore_state(manager, abstract)
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


def test_train_validates_its_arguments_before_any_work(tmp_path):
  c = small_config()
  with pytest.raises(ValueError, match=r'total_steps=-1: expected an integer >= 0'):
    train.train(c, str(tmp_path / 'a'), total_steps=-1)
  c.data.canvas = (64, 100)   # set in code, not through --set: train() checks it too
  with pytest.raises(ValueError, match=r'data.canvas=\(64, 100\)'):
    train.train(c, str(tmp_path / 'b'))
  assert not os.path.exists(tmp_path / 'a') and not os.path.exists(tmp_path / 'b')
