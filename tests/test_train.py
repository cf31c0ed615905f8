"""Trainer: optimizer groups, schedule, sharded step equivalence, NaN stop, checkpoints, resume,
input errors and SIGTERM while waiting for input, argument checks."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minvis_jax import checkpoints
from minvis_jax import train
from minvis_jax.data import input_pipeline
from minvis_jax.data import synthetic
from support import bad_inputs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_batch(c, seed=0):
  rng = np.random.default_rng(seed)
  b, n, (h, w) = c.batch_size, c.data.max_instances, c.data.canvas
  return {'image': rng.integers(0, 256, (b, h, w, 3), dtype=np.uint8),
          'image_size': np.tile(np.array([[h - 4, w - 8]], np.int32), (b, 1)),
          'labels': rng.integers(0, c.model.num_classes, (b, n)).astype(np.int32),
          'masks': (rng.random((b, n, h, w)) > 0.6).astype(np.uint8),
          'valid': rng.random((b, n)) > 0.4}


def test_decay_mask_and_groups():
  params = {'backbone': {'stem': {'kernel': 1.0}, 'norm': {'scale': 1.0, 'bias': 1.0}},
            'decoder': {'query_feat': 1.0, 'class_embed': {'kernel': 1.0, 'bias': 1.0},
                        'decoder_norm': {'scale': 1.0}}}
  mask = train.decay_mask(params)
  assert mask['backbone']['stem']['kernel'] and mask['decoder']['class_embed']['kernel']
  assert not any([mask['backbone']['norm']['scale'], mask['backbone']['norm']['bias'],
                  mask['decoder']['query_feat'], mask['decoder']['class_embed']['bias'],
                  mask['decoder']['decoder_norm']['scale']])
  groups = train.param_groups(params)
  assert groups['backbone']['stem']['kernel'] == 'backbone'
  assert groups['decoder']['query_feat'] == 'head'


def test_optimizer_matches_hand_computed_adamw(tiny_config):
  c = tiny_config.optim
  c.lr, c.weight_decay, c.backbone_lr_mult, c.clip_norm = 0.5, 0.1, 0.1, 0.0
  c.warmup_steps, c.decay_steps = 0, ()
  params = {'backbone': {'kernel': jnp.array([2.0]), 'bias': jnp.array([2.0])},
            'head': {'kernel': jnp.array([2.0]), 'bias': jnp.array([2.0])}}
  grads = jax.tree.map(lambda x: jnp.array([0.3]), params)
  tx = train.make_optimizer(c)
  updates, _ = tx.update(grads, tx.init(params), params)
  # First Adam step: m_hat / sqrt(v_hat) = sign(g) (eps aside); decoupled decay lr * wd * p.
  adam = 1.0 * 0.3 / (0.3 + 1e-8)
  expected = {'backbone': {'kernel': -0.05 * (adam + 0.1 * 2.0), 'bias': -0.05 * adam},
              'head': {'kernel': -0.5 * (adam + 0.1 * 2.0), 'bias': -0.5 * adam}}
  for group in expected:
    for name, value in expected[group].items():
      np.testing.assert_allclose(updates[group][name], [value], rtol=1e-5)


def test_clipping_is_global_over_all_parameters(tiny_config):
  c = tiny_config.optim
  c.lr, c.weight_decay, c.clip_norm = 1.0, 0.0, 1e-8
  c.backbone_lr_mult, c.warmup_steps, c.decay_steps = 1.0, 0, ()
  params = {'backbone': {'kernel': jnp.zeros(1)}, 'head': {'kernel': jnp.zeros(1)}}
  grads = {'backbone': {'kernel': jnp.array([3e-8])}, 'head': {'kernel': jnp.array([4e-8])}}
  tx = train.make_optimizer(c)
  updates, _ = tx.update(grads, tx.init(params), params)
  # Gradients this small are comparable to Adam's eps (1e-8), so the first update -g / (|g| + eps)
  # shows the clipped gradient: global norm 5e-8 -> 1e-8 scales both by 1/5 (a per-leaf clip would
  # instead cut each leaf to 1e-8 and give -0.5 for both).
  for name, g in (('backbone', 3e-8 / 5), ('head', 4e-8 / 5)):
    np.testing.assert_allclose(updates[name]['kernel'], [-g / (g + 1e-8)], rtol=1e-4)


def test_learning_rate_schedule(tiny_config):
  c = tiny_config.optim
  c.lr, c.warmup_steps, c.decay_steps, c.decay_factor = 1.0, 4, (10, 20), 0.1
  lr = train.learning_rate_schedule(c)
  np.testing.assert_allclose([lr(s) for s in (0, 3, 9, 10, 19, 20, 25)],
                             [0.25, 1.0, 1.0, 0.1, 0.1, 0.01, 0.01], rtol=1e-6)


def test_slot_count():
  valid = np.zeros((3, 8), bool)
  assert train.used_slots(valid) == 0
  valid[1, 2] = valid[2, 4] = True   # holes are kept: only trailing unused slots go
  assert train.used_slots(valid) == 5
  assert [train.slot_count(u, 8, 4) for u in (0, 1, 4, 5, 8)] == [4, 4, 4, 8, 8]
  assert [train.slot_count(u, 7, 4) for u in (0, 5, 7)] == [4, 7, 7]
  assert [train.slot_count(u, 25, 1) for u in (0, 3, 25)] == [1, 3, 25]


def test_trimmed_target_slots_give_the_same_step(tiny_config):
  """A batch whose images use 3 of 8 slots runs on 4 slots (slot_multiple 2) and updates the
  parameters as the untrimmed step does."""
  c = tiny_config
  c.data.max_instances = 8
  batch = random_batch(c, seed=3)
  batch['valid'][:, 3:] = False
  batch['valid'][0, 2] = True
  results = []
  for multiple in (0, 2):
    c.data.slot_multiple = multiple
    trainer = train.Trainer(c, mesh=train.make_mesh(c.mesh, jax.devices()[:1]))
    global_batch = trainer.global_batch(batch)
    assert global_batch['masks'].shape[1] == (8 if multiple == 0 else 4)
    state, metrics = trainer.step(trainer.init_state(), global_batch)
    results.append((jax.device_get(metrics), jax.device_get(state.params)))
  (metrics0, params0), (metrics1, params1) = results
  assert metrics0['num_masks'] == metrics1['num_masks'] == batch['valid'].sum()
  for name in ('loss', 'loss_ce', 'loss_mask', 'loss_dice', 'grad_norm'):
    np.testing.assert_allclose(metrics1[name], metrics0[name], rtol=1e-5, err_msg=name)
  for a, b in zip(jax.tree.leaves(params1), jax.tree.leaves(params0)):
    np.testing.assert_allclose(a, b, atol=5e-5, rtol=1e-5)   # see the 8-device test on Adam


def test_fsdp_spec_shards_largest_divisible_dimension():
  assert train._fsdp_spec((3, 3, 64, 256), 8) == jax.sharding.PartitionSpec(None, None, None,
                                                                             'data')
  assert train._fsdp_spec((7, 9), 8) == jax.sharding.PartitionSpec()


def test_data_parallel_step_moves_no_activations_between_devices(tiny_config):
  """With the batch sharded and the parameters replicated, the model's forward and backward are
  local to each device: the only collectives are the gradient reductions (and the criterion's small
  index arrays). A gather from a table flattened over the batch (the deformable sampling once did)
  makes XLA all-gather every device's activations instead."""
  assert jax.device_count() == 8
  c = tiny_config
  c.mesh.data = 8
  trainer = train.Trainer(c, mesh=train.make_mesh(c.mesh, jax.devices()))
  hlo = trainer.step.lower(trainer.abstract_state, trainer.global_batch(random_batch(c))).compile()
  moves = [line for line in hlo.as_text().splitlines()
           if re.search(r' (all-gather|all-to-all|collective-permute)(-start)?\(', line)
           and 'Mask2Former' in line]
  assert not moves, moves[:3]
  assert 'all-reduce' in hlo.as_text()   # the gradients are reduced (the check sees the HLO)


@pytest.mark.slow
def test_eight_devices_equal_one_device_and_fsdp(tiny_config):
  assert jax.device_count() == 8
  c = tiny_config
  batch = random_batch(c)
  results = []
  for devices, fsdp in ((jax.devices()[:1], False), (jax.devices(), False), (jax.devices(), True)):
    c.mesh.fsdp, c.mesh.data = fsdp, len(devices)
    trainer = train.Trainer(c, mesh=train.make_mesh(c.mesh, devices))
    state = trainer.init_state()
    for _ in range(2):
      state, metrics = trainer.step(state, trainer.global_batch(batch))
    if fsdp:
      specs = {x.sharding.spec for x in jax.tree.leaves(state.params)}
      assert jax.sharding.PartitionSpec() in specs and len(specs) > 1   # some leaves sharded
    results.append((float(metrics['loss']), jax.device_get(state.params)))
  (loss1, params1), *others = results
  assert np.isfinite(loss1)
  for loss, params in others:
    np.testing.assert_allclose(loss, loss1, rtol=1e-5)
    # Adam divides by sqrt(v): a parameter whose gradient is near 0 moves by lr-sized steps whose
    # size depends on the summation order of the gradient, which differs with the sharding (and
    # with the host CPU's vector width): 1.4e-5 on one bias element on this session's host.
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params1)):
      np.testing.assert_allclose(a, b, atol=5e-5, rtol=1e-5)


def test_non_finite_loss_stops_before_a_bad_save(tmp_path, monkeypatch, tiny_config):
  c = tiny_config
  c.checkpoint.every_steps = 1
  real = train.criterion.set_criterion

  def poisoned(outputs, targets, key, loss_config):
    loss, terms = real(outputs, targets, key, loss_config)
    return jnp.where(targets['labels'][0, 0] == 99, jnp.nan, loss), terms

  monkeypatch.setattr(train.criterion, 'set_criterion', poisoned)

  def input_fn(start):
    for step in range(start, 100):
      batch = random_batch(c, step)
      if step == 2:
        batch['labels'][0, 0] = 99
      yield batch

  with pytest.raises(train.NonFiniteLossError, match='non-finite loss nan .* at step 3'):
    train.train(c, str(tmp_path), input_fn=input_fn, total_steps=5)
  saved = sorted(int(d) for d in os.listdir(tmp_path / 'checkpoints') if d.isdigit())
  assert saved[-1] == 2
  _, variables = checkpoints.load_for_inference(str(tmp_path))
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(variables))


def test_init_checkpoint_is_placed_with_state_shardings(tmp_path, tiny_config):
  c = tiny_config
  c.mesh.fsdp = True
  coco = c.copy_and_resolve_references()
  coco.model.num_classes += 3   # pretrained on another label set: its class head is dropped
  other = jax.eval_shape(lambda: train.init_variables(coco, jax.random.PRNGKey(123)))
  pretrained = jax.tree.map(
      lambda x: np.random.default_rng(x.size).normal(size=x.shape).astype(x.dtype), other)
  path = str(tmp_path / 'pretrained')
  checkpoints.save_variables(path, pretrained)
  c.init.checkpoint = path
  c.init.reinit_class_head = True
  c.mesh.data = jax.device_count()   # FSDP over 8 devices: most leaves are really sharded
  mesh = train.make_mesh(c.mesh)
  random_state = train.Trainer(_without_init(c), mesh).init_state()
  state = train.Trainer(c, mesh).init_state()
  flat = lambda t: dict(jax.tree_util.tree_leaves_with_path(t))  # noqa: E731
  got, want, rand = flat(state.params), flat(pretrained['params']), flat(random_state.params)
  for path_, x in got.items():
    ref = rand if 'class_embed' in jax.tree_util.keystr(path_) else want
    np.testing.assert_array_equal(np.asarray(x), np.asarray(ref[path_]), err_msg=str(path_))
  for path_, x in flat(state.frozen).items():
    np.testing.assert_array_equal(np.asarray(x), flat(pretrained['frozen'])[path_])
  assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(state.params))
  # Same shardings as the random state, so the jitted step takes it as is.
  assert jax.tree.map(lambda x: x.sharding, state) == jax.tree.map(lambda x: x.sharding,
                                                                   random_state)
  # A checkpoint of another model: a clear error naming it.
  c.model.num_queries = 6
  with pytest.raises(ValueError, match='pretrained: variables do not match config.model'):
    train.Trainer(c, mesh).init_state()


def _without_init(c):
  c = c.copy_and_resolve_references()
  c.init.checkpoint = ''
  return c


def test_checkpoint_restores_onto_another_mesh(tmp_path, tiny_config):
  c = tiny_config
  c.checkpoint.every_steps = 2
  c.log_every = 1   # a metrics row for each step
  batches = lambda start: (random_batch(c, s) for s in range(start, 100))  # noqa: E731
  state = train.train(c, str(tmp_path), input_fn=batches, total_steps=2)
  manager = checkpoints.checkpoint_manager(str(tmp_path), c.checkpoint.keep)
  c.mesh.fsdp, c.mesh.data = True, 4
  other = train.Trainer(c, mesh=train.make_mesh(c.mesh, jax.devices()[:4]))
  restored = checkpoints.restore_state(manager, other.abstract_state)
  manager.close()
  assert int(restored.step) == 2
  assert len(restored.params['decoder']['query_feat'].sharding.device_set) == 4
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  config, variables = checkpoints.load_for_inference(str(tmp_path))
  assert config.batch_size == c.batch_size
  np.testing.assert_array_equal(variables['params']['decoder']['query_feat'],
                                np.asarray(state.params['decoder']['query_feat']))
  lines = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
  assert [m['step'] for m in lines] == [1, 2]
  assert {'loss', 'loss_ce', 'loss_mask', 'loss_dice', 'lr', 'steps_per_s',
          'images_per_s'} <= set(lines[0])
  assert any(f.startswith('events') for f in os.listdir(tmp_path / 'tensorboard'))


@pytest.mark.timeout(120)
def test_input_error_ends_the_training_run(tmp_path, tiny_config):
  c = tiny_config
  source = bad_inputs.FakeSource(bad_inputs.first_loads_raise(0))

  def input_fn(start):
    train_input = input_pipeline.TrainInput(input_pipeline.InputConfig.from_config(c), source)
    return input_pipeline.iterate(train_input, start, workers=2)
  with pytest.raises(ValueError, match='videos.json: video') as info:
    train.train(c, str(tmp_path), input_fn=input_fn, total_steps=3)
  assert 'input batch of step 1' in ''.join(getattr(info.value, '__notes__', []))


@pytest.mark.timeout(300)
def test_sigterm_while_waiting_for_input_saves_and_exits(tmp_path, tiny_config):
  c = tiny_config
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
                                          bad_inputs.FakeSource(hook))

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


def test_train_validates_its_arguments_before_any_work(tmp_path, tiny_config):
  c = tiny_config
  with pytest.raises(ValueError, match=r'total_steps=-1: expected an integer >= 0'):
    train.train(c, str(tmp_path / 'a'), total_steps=-1)
  c.data.canvas = (64, 100)   # set in code, not through --set: train() checks it too
  with pytest.raises(ValueError, match=r'data.canvas=\(64, 100\)'):
    train.train(c, str(tmp_path / 'b'))
  assert not os.path.exists(tmp_path / 'a') and not os.path.exists(tmp_path / 'b')


# --- End to end through the command line, on generated videos. ----------------------------------


@pytest.fixture(scope='module')
def synthetic_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp('synthetic')
  synthetic.generate(str(out), 'train', num_videos=6, num_frames=4, height=64, width=96, seed=1)
  return str(out)


def _train_cmd(workdir, data_dir, steps, *extra):
  return [sys.executable, '-m', 'minvis_jax.cli', 'train', '--config', 'configs/tiny.py',
          '--workdir', str(workdir), '--total_steps', str(steps),
          '--set', f'data.manual_dir={data_dir}', '--set', 'data.canvas=(64,96)',
          '--set', 'data.min_size_train=(64,)', '--set', 'data.max_size_train=96',
          '--set', 'data.max_instances=4', '--set', 'loss.num_points=256',
          '--set', 'data.workers=1', '--set', 'model.enc_layers=1', '--set', 'model.dec_layers=1',
          '--set', 'model.num_queries=8', '--set', 'eval.every_steps=0', *extra]


def _env(devices=1):
  env = dict(os.environ)
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  return env


def _fingerprint(log: str) -> str:
  lines = [line for line in log.splitlines() if 'parameter fingerprint' in line]
  assert lines, log[-3000:]
  return lines[-1].split()[-1]


# Runs `minvis-jax ARGS...` with orbax's final rename of step $KILL_IN_SAVE_OF_STEP replaced by
# SIGKILL: the process dies inside that save, with every array written to the temporary directory.
_KILLED_IN_SAVE = """
import os, signal, sys
import socket
from orbax.checkpoint._src.path import atomicity
rename = atomicity.AtomicRenameTemporaryPath.finalize
async def finalize(self):
  if self.get_final().name == os.environ['KILL_IN_SAVE_OF_STEP']:
    os.kill(os.getpid(), signal.SIGKILL)
  return await rename(self)
atomicity.AtomicRenameTemporaryPath.finalize = finalize
from minvis_jax import cli
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_sigkill_during_a_save_then_resume_is_bitwise_equal(tmp_path, synthetic_dir):
  steps, every = 7, 3
  full = subprocess.run(_train_cmd(tmp_path / 'full', synthetic_dir, steps,
                                   '--set', f'checkpoint.every_steps={every}'),
                        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
  assert full.returncode == 0, full.stderr[-3000:]

  # Killed with SIGKILL inside the save of step 6, after step 3 was saved.
  workdir = tmp_path / 'killed'
  cmd = _train_cmd(workdir, synthetic_dir, steps, '--set', f'checkpoint.every_steps={every}')
  assert cmd[1:4] == ['-m', 'minvis_jax.cli', 'train']
  killed = subprocess.run([sys.executable, '-c', _KILLED_IN_SAVE] + cmd[3:], cwd=REPO,
                          env=dict(_env(), KILL_IN_SAVE_OF_STEP=str(2 * every)),
                          capture_output=True, text=True, timeout=600)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  entries = os.listdir(workdir / 'checkpoints')
  assert sorted(d for d in entries if d.isdigit()) == [str(every)], entries
  partial = [d for d in entries if d.startswith(f'{2 * every}.orbax-checkpoint-tmp')]
  assert partial, entries   # the interrupted save left its temporary directory ...
  assert os.listdir(workdir / 'checkpoints' / partial[0] / 'variables')
  # ... which loading ignores: the last complete checkpoint is step 3.
  manager = checkpoints.checkpoint_manager(str(workdir), 2)
  assert manager.latest_step() == every
  manager.close()
  assert checkpoints.finished_steps(str(workdir)) == [every]

  resumed = subprocess.run(_train_cmd(workdir, synthetic_dir, steps,
                                      '--set', f'checkpoint.every_steps={every}'),
                           cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f'steps {every} -> {steps}' in resumed.stdout
  assert _fingerprint(resumed.stdout) == _fingerprint(full.stdout)
  saved = sorted(int(d) for d in os.listdir(workdir / 'checkpoints') if d.isdigit())
  assert saved == [every, 2 * every, steps]
  a = checkpoints.load_for_inference(str(tmp_path / 'full'))[1]
  b = checkpoints.load_for_inference(str(workdir))[1]
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_sigterm_saves_and_exits(tmp_path, synthetic_dir):
  workdir = tmp_path / 'preempted'
  proc = subprocess.Popen(_train_cmd(workdir, synthetic_dir, 1000,
                                     '--set', 'checkpoint.every_steps=1000',
                                     '--set', 'log_every=1'),
                          cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
  metrics = workdir / 'metrics.jsonl'
  deadline = time.time() + 600
  while not (metrics.exists() and metrics.read_text().count('\n') >= 2) and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-3000:]
  saved = [int(d) for d in os.listdir(workdir / 'checkpoints') if d.isdigit()]
  assert len(saved) == 1 and 2 <= saved[0] < 1000, saved


@pytest.mark.slow
def test_two_processes_with_local_launcher(tmp_path, synthetic_dir):
  workdir = tmp_path / 'multi'
  cmd = ['bash', 'launch/local.sh', '2', '4', 'configs/tiny.py', str(workdir)]
  cmd += _train_cmd(workdir, synthetic_dir, 3)[8:]   # the flags after --workdir DIR
  result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
  logs = [(workdir / 'logs' / f'process_{i}.log').read_text() for i in range(2)]
  assert result.returncode == 0, result.stderr + logs[0][-3000:] + logs[1][-3000:]
  assert 'mesh {\'data\': 8}, 8 devices' in logs[0]
  assert _fingerprint(logs[0]) == _fingerprint(logs[1])
  assert 'finished at step 3' in logs[1]
  _, variables = checkpoints.load_for_inference(str(workdir))
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(variables))


@pytest.mark.timeout(600)
def test_a_failed_asynchronous_save_ends_the_run_with_its_error(tmp_path, monkeypatch, tiny_config):
  """orbax finishes a save in its own threads; a failure there (here: the final rename of the last
  step's save fails as on a full disk) ends train() with that error, its threads closed, instead of
  leaving the process waiting for them."""
  from orbax.checkpoint._src.path import atomicity
  rename = atomicity.AtomicRenameTemporaryPath.finalize

  async def finalize(self):
    if self.get_final().name == '4':
      raise OSError(28, 'No space left on device (injected)')
    return await rename(self)
  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, 'finalize', finalize)
  managers = []
  real_manager = checkpoints.checkpoint_manager

  def manager(*args):
    managers.append(real_manager(*args))
    close = managers[-1].close
    managers[-1].close = lambda: (managers.append('closed'), close())
    return managers[-1]
  monkeypatch.setattr(checkpoints, 'checkpoint_manager', manager)
  c = tiny_config
  c.checkpoint.every_steps = 1

  def input_fn(start):
    for step in range(start, 100):
      yield random_batch(c, step)
  with pytest.raises(Exception, match=r'No space left on device \(injected\)'):
    train.train(c, str(tmp_path), input_fn=input_fn, total_steps=4)
  assert checkpoints.finished_steps(str(tmp_path))[-1] == 3
  assert managers[1:] == ['closed']
  # The run is over: no save of it is still being worked on (orbax's threads are closed).
  assert not [t for t in threading.enumerate() if 'checkpoint' in t.name.lower() and t.is_alive()
              and not t.daemon]


@pytest.mark.slow
def test_a_second_trainer_on_the_same_workdir_refuses_to_start(tmp_path, synthetic_dir):
  """Two real `train` processes on one --workdir: the second refuses at once, naming the first's
  host and pid, and the first trains on unharmed."""
  workdir = tmp_path / 'shared'
  first = subprocess.Popen(_train_cmd(workdir, synthetic_dir, 1000, '--set',
                                      'checkpoint.every_steps=1000', '--set', 'log_every=1'),
                           cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
  try:
    metrics = workdir / 'metrics.jsonl'
    deadline = time.time() + 300
    while (not (metrics.exists() and metrics.read_text().count('\n') >= 1)
           and time.time() < deadline and first.poll() is None):
      time.sleep(0.05)
    assert first.poll() is None and metrics.exists()   # the first run is training
    config_before = (workdir / 'config.json').read_text()
    start = time.time()
    second = subprocess.run(_train_cmd(workdir, synthetic_dir, 5), cwd=REPO, env=_env(),
                            capture_output=True, text=True, timeout=300)
    assert second.returncode == 2, second.stderr[-3000:]
    assert re.fullmatch(
        f'minvis-jax train: error: {re.escape(str(workdir))}: in use by another training run '
        rf'\(host {re.escape(socket.gethostname())}, pid {first.pid}, since [0-9 :-]+; lock '
        rf'{re.escape(str(workdir / "train.lock"))}\); wait for it to end or pass another '
        r'--workdir', second.stderr.splitlines()[-1]), second.stderr[-3000:]
    assert time.time() - start < 120
    assert first.poll() is None and (workdir / 'config.json').read_text() == config_before
  finally:
    first.send_signal(signal.SIGTERM)
    out, _ = first.communicate(timeout=300)
  assert first.returncode == 0, out[-3000:]


# As _KILLED_IN_SAVE, for a gs:// work directory: orbax marks a finished step there with a
# commit_success.txt object (a rename is not atomic on a bucket); SIGKILL just before writing it.
_KILLED_IN_BUCKET_SAVE = _KILLED_IN_SAVE.replace('AtomicRenameTemporaryPath',
                                                 'CommitFileTemporaryPath')


@pytest.mark.slow
def test_gcs_workdir_sigkill_during_a_save_then_resume_is_bitwise_equal(tmp_path, synthetic_dir,
                                                                        gcs_bucket, gcs_emulator):
  from support import gcs_emulator as emulator  # noqa: PLC0415
  steps, every = 7, 3
  flags = ('--set', f'checkpoint.every_steps={every}')
  full = subprocess.run(_train_cmd(tmp_path / 'full', synthetic_dir, steps, *flags),
                        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
  assert full.returncode == 0, full.stderr[-3000:]

  workdir = f'{gcs_bucket}/run1'
  cmd = _train_cmd(workdir, synthetic_dir, steps, *flags)
  killed = subprocess.run([sys.executable, '-c', _KILLED_IN_BUCKET_SAVE] + cmd[3:], cwd=REPO,
                          env=dict(_env(), KILL_IN_SAVE_OF_STEP=str(2 * every)),
                          capture_output=True, text=True, timeout=600)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  objects = emulator.list_objects(gcs_emulator, gcs_bucket[5:], 'run1/')
  assert 'run1/config.json' in objects and 'run1/metrics.jsonl' in objects, objects
  assert 'run1/checkpoints/3/commit_success.txt' in objects, objects
  # The interrupted save wrote its arrays but not its commit file: not a finished step.
  assert any(o.startswith('run1/checkpoints/6/variables/') for o in objects), objects
  assert 'run1/checkpoints/6/commit_success.txt' not in objects
  assert checkpoints.finished_steps(workdir) == [every]

  resumed = subprocess.run(cmd, cwd=REPO, env=_env(),
                           capture_output=True, text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f'steps {every} -> {steps}' in resumed.stdout
  assert _fingerprint(resumed.stdout) == _fingerprint(full.stdout)
  assert checkpoints.finished_steps(workdir) == [every, 2 * every, steps]
  a = checkpoints.load_for_inference(str(tmp_path / 'full'))[1]
  config, b = checkpoints.load_for_inference(workdir)
  assert config.total_steps == steps
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  assert not os.path.exists(os.path.join(REPO, 'gs:'))   # no local folder named after the URL


@pytest.mark.parametrize('waits', [True, False])
def test_steps_between_logs_do_not_synchronise(tmp_path, monkeypatch, tiny_config, waits):
  """Off CPU (simulated) the loop neither waits for a step nor fetches anything between log
  steps; on CPU it waits for each step (host memory) and still fetches on log steps only."""
  c = tiny_config
  c.log_every, c.checkpoint.every_steps = 3, 100
  calls = []

  def spy(name, real):
    def wrapped(*args, **kwargs):
      if sys._getframe(1).f_code.co_filename == train.__file__:
        calls.append((name, len(dispatched)))
      return real(*args, **kwargs)
    return wrapped

  monkeypatch.setattr(train, 'waits_for_each_step', lambda mesh: waits)
  monkeypatch.setattr(jax, 'device_get', spy('get', jax.device_get))
  monkeypatch.setattr(jax, 'block_until_ready', spy('block', jax.block_until_ready))
  dispatched = []   # one entry per step dispatched (the loop notes each step's non-finite flag)
  note = train._note_non_finite
  monkeypatch.setattr(train, '_note_non_finite',
                      lambda *a: dispatched.append(1) or note(*a))
  batches = lambda start: (random_batch(c, s) for s in range(start, 100))  # noqa: E731
  train.train(c, str(tmp_path), input_fn=batches, total_steps=6)
  gets = [step for name, step in calls if name == 'get']
  blocks = [step for name, step in calls if name == 'block']
  # Two fetches (the non-finite record and the metrics row) after steps 3 and 6 only.
  assert gets == [3, 3, 6, 6]
  assert blocks == ([0, 1, 2, 3, 4, 5] if waits else [])


def test_bfloat16_compute_trains_like_float32(tiny_config):
  """A few steps on one repeated batch lower the loss in bfloat16 as in float32: the same first
  loss within 5% (bfloat16 rounding of activations) and a drop of at least half float32's."""
  losses = {}
  for dtype in ('float32', 'bfloat16'):
    c = tiny_config.copy_and_resolve_references()
    c.model.dtype = dtype
    c.optim.warmup_steps = 0
    trainer = train.Trainer(c)
    state, batch = trainer.init_state(), trainer.global_batch(random_batch(c, 0))
    losses[dtype] = []
    for _ in range(6):
      state, metrics = trainer.step(state, batch)
      losses[dtype].append(float(metrics['loss']))
  f32, bf16 = losses['float32'], losses['bfloat16']
  assert all(np.isfinite(bf16)), bf16
  assert bf16[0] == pytest.approx(f32[0], rel=0.05)
  assert f32[-1] < f32[0]
  assert f32[0] - bf16[-1] >= 0.5 * (f32[0] - f32[-1]), (f32, bf16)
