"""Checkpoint evaluation: the watcher (`evaluate --watch`) and evaluation inside `train`."""

import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from minvis_jax import checkpoints
from minvis_jax import cli
from minvis_jax import config_lib
from minvis_jax import evaluate
from minvis_jax import train
from minvis_jax import watch
from minvis_jax import ytvis_eval
from minvis_jax.data import synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The tiny config at the synthetic videos' own 64x96 size, one encoder/decoder layer, 8 queries.
OVERRIDES = ['data.canvas=(64,96)', 'data.min_size_train=(64,)', 'data.max_size_train=96',
             'data.min_size_test=64', 'data.max_size_test=96', 'data.max_instances=4',
             'loss.num_points=256', 'data.workers=1', 'model.enc_layers=1', 'model.dec_layers=1',
             'model.num_queries=8', 'inference.window=4', 'inference.top_k=5',
             'eval.every_steps=0']


def small_config(data_dir):
  c = config_lib.load_config(os.path.join(REPO, 'configs', 'tiny.py'))
  config_lib.apply_overrides(c, OVERRIDES + [f'data.manual_dir={data_dir}'])
  c.mesh.data = 1
  return c


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp('synthetic')
  synthetic.generate(str(out), 'train', num_videos=4, num_frames=3, height=64, width=96, seed=1)
  synthetic.generate(str(out), 'valid', num_videos=2, num_frames=3, height=64, width=96, seed=2)
  return str(out)


def _rows(path):
  return [json.loads(line) for line in open(path) if line.strip()]


def _scalars(event_dir):
  """{tag: {step: value}} of the TensorBoard event files in `event_dir` (TFRecord framing)."""
  from tensorboardX.proto import event_pb2
  out = {}
  for name in os.listdir(event_dir):
    data = open(os.path.join(event_dir, name), 'rb').read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack('<Q', data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      for v in event.summary.value:
        out.setdefault(v.tag, {})[event.step] = v.simple_value
  return out


# --- The watcher in this process, on checkpoints written by hand. ------------------------------


def _save_step(workdir, step, variables):
  checkpoints.save_variables(os.path.join(workdir, 'checkpoints', str(step), 'variables'),
                             variables)


def test_watch_skips_unfinished_and_deleted_checkpoints_and_resumes(tmp_path, data_dir,
                                                                    monkeypatch, caplog):
  config = small_config(data_dir)
  workdir = str(tmp_path / 'run')
  config.total_steps = 6
  checkpoints.save_config(workdir, config)
  base = jax.jit(lambda key: train.init_variables(config, key))(jax.random.PRNGKey(0))
  scaled = lambda s: jax.tree.map(lambda x: np.asarray(x) * (1 + 0.05 * s), base)  # noqa: E731
  _save_step(workdir, 2, scaled(2))
  _save_step(workdir, 6, scaled(6))
  tmp = os.path.join(workdir, 'checkpoints', '4.orbax-checkpoint-tmp-1700000000')
  os.makedirs(os.path.join(tmp, 'variables'))     # a save in progress
  assert checkpoints.finished_steps(workdir) == [2, 6]

  real_load = checkpoints.load_for_inference
  loads = []

  def load(path):   # keep-last-N deletes step 6 just as the watcher starts reading it
    loads.append(os.path.basename(path))
    if path.endswith(os.sep + '6'):
      shutil.rmtree(path)
    return real_load(path)
  monkeypatch.setattr(checkpoints, 'load_for_inference', load)
  dataset = evaluate.load_dataset(config)
  caplog.set_level('INFO')
  added = watch.watch(workdir, config, dataset, poll_s=0.05, grace_s=0.2)
  assert loads == ['2', '6']
  assert [r['step'] for r in added] == [2]
  assert 'step 6: checkpoint' in caplog.text and 'deleted' in caplog.text
  assert "final step 6" in caplog.text                  # a skipped final step also ends the run
  out = tmp_path / 'run' / 'eval'
  metrics = json.loads((out / '2' / 'metrics.json').read_text())
  # The per-step files agree with each other and with the evaluator run on them.
  assert metrics == ytvis_eval.evaluate(dataset.json_path, str(out / '2' / 'results.json'))
  assert added[0] == {'step': 2, **{f'eval/{k}': v for k, v in metrics.items()}}
  assert _rows(tmp_path / 'run' / 'eval.jsonl') == added
  assert json.loads((out / 'best.json').read_text()) == added[0]

  # The trainer resumes to step 10 and writes step 8; a restarted watcher evaluates only 8. A
  # listed step that is gone by the time it is read (deleted while the watcher waited) is skipped.
  config.total_steps = 10
  checkpoints.save_config(workdir, config)
  _save_step(workdir, 8, scaled(8))
  real_steps = checkpoints.finished_steps
  monkeypatch.setattr(checkpoints, 'finished_steps',
                      lambda d: sorted(real_steps(d) + [7]) if d == workdir else real_steps(d))
  loads.clear()
  added = watch.watch(workdir, config, dataset, poll_s=0.05, grace_s=0.2, timeout=0.5)
  assert loads == ['7', '8'] and [r['step'] for r in added] == [8]
  rows = _rows(tmp_path / 'run' / 'eval.jsonl')
  assert [r['step'] for r in rows] == [2, 8]
  best = max(rows, key=lambda r: r['eval/AP'])
  assert json.loads((out / 'best.json').read_text())['step'] == best['step']
  assert 'no new checkpoint' in caplog.text              # step 10 never came: the timeout ends it
  tb = _scalars(os.path.join(workdir, 'tensorboard', 'eval'))
  assert set(tb['eval/AP']) == {2, 8}
  np.testing.assert_allclose(tb['eval/AP50'][8], rows[1]['eval/AP50'], rtol=1e-6)

  # A read that fails while the checkpoint is still there is an error, not a skip.
  def broken(path):
    raise ValueError(f'{path}: corrupt')
  monkeypatch.setattr(checkpoints, 'load_for_inference', broken)
  _save_step(workdir, 10, scaled(10))
  with pytest.raises(ValueError, match='10: corrupt'):
    watch.watch(workdir, config, dataset, poll_s=0.05, grace_s=0.1)


def test_eval_rows_file_and_best(tmp_path):
  path = tmp_path / 'eval.jsonl'
  assert watch.read_eval_rows(str(path)) == []
  path.write_text('{"step": 2, "eval/AP": 0.5}\n{"step": 4, "eval/AP": 0.5}\n{"step": 6, "eva')
  rows = watch.read_eval_rows(str(path))    # a watcher killed mid-line: that line is dropped
  assert [r['step'] for r in rows] == [2, 4]
  assert path.read_text().endswith('0.5}\n')
  assert watch.best_row(rows)['step'] == 2  # ties: the earliest step
  assert watch.best_row(rows + [{'step': 8, 'eval/AP': 0.6}])['step'] == 8
  assert watch.best_row([]) is None
  path.write_text('{"step": 2}\n[1]\n')
  with pytest.raises(ValueError, match='eval.jsonl: line 2 has no integer "step"'):
    watch.read_eval_rows(str(path))


def test_evaluate_command_arguments(tmp_path, capsys):
  assert cli.main(['evaluate']) == 2
  assert 'pass --checkpoint DIR (or --watch WORKDIR)' in capsys.readouterr().err
  assert cli.main(['evaluate', '--watch', str(tmp_path), '--checkpoint', str(tmp_path)]) == 2
  assert 'either --checkpoint DIR or --watch WORKDIR, not both' in capsys.readouterr().err
  start = time.monotonic()
  with pytest.raises(TimeoutError, match='config.json: not written within 0 s'):
    cli.main(['evaluate', '--watch', str(tmp_path), '--timeout', '0.1', '--debug'])
  assert time.monotonic() - start < 10


# --- Evaluation inside train. -------------------------------------------------------------------


def _random_batches(c):
  def batches(start):
    rng = np.random.default_rng(start)
    b, n, (h, w) = c.batch_size, c.data.max_instances, c.data.canvas
    while True:
      yield {'image': rng.integers(0, 256, (b, h, w, 3), dtype=np.uint8),
             'image_size': np.tile(np.array([[h, w]], np.int32), (b, 1)),
             'labels': rng.integers(0, c.model.num_classes, (b, n)).astype(np.int32),
             'masks': (rng.random((b, n, h, w)) > 0.6).astype(np.uint8),
             'valid': rng.random((b, n)) > 0.4}
  return batches


def test_eval_in_train_equals_evaluate_of_the_checkpoint(tmp_path, data_dir):
  c = small_config(data_dir)   # one device: test_train's compiled step (persistent cache)
  c.checkpoint.every_steps = 2
  c.log_every = 1   # a metrics row for each step
  c.eval.update(every_steps=2, split='valid', max_videos=1)
  workdir = tmp_path / 'run'
  state = train.train(c, str(workdir), input_fn=_random_batches(c), total_steps=4)
  lines = _rows(workdir / 'metrics.jsonl')
  evals = [r for r in lines if 'eval/AP' in r]
  assert [r['step'] for r in evals] == [2, 4]
  assert [r['step'] for r in lines if 'loss' in r] == [1, 2, 3, 4]
  assert all('loss' not in r for r in evals)
  # A one-shot `evaluate` of the step-4 checkpoint scores the same.
  out = tmp_path / 'one'
  assert cli.main(['evaluate', '--checkpoint', str(workdir / 'checkpoints' / '4'),
                         '--max_videos', '1', '--out', str(out)]) == 0
  metrics = json.loads((out / 'metrics.json').read_text())
  assert evals[1] == {'step': 4, **{f'eval/{k}': v for k, v in metrics.items()}}
  tb = _scalars(workdir / 'tensorboard')
  assert set(tb['eval/AP']) == {2, 4} and set(tb['train/loss']) == {1, 2, 3, 4}
  np.testing.assert_allclose(tb['eval/AR10'][4], metrics['AR10'], rtol=1e-6)
  # config.json records the run's last step (the watcher's stop), not the config's default.
  assert checkpoints.read_config(str(workdir)).total_steps == 4
  # The same state with its parameters FSDP-sharded over 8 devices (as over the processes of a
  # pod) is gathered for the predictor and scores the same.
  c.mesh.data, c.mesh.fsdp = -1, True
  fsdp = train.Trainer(c)
  sharded = jax.device_put(state, fsdp.state_sharding)
  assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(sharded.params))
  dataset = evaluate.load_dataset(c, 'valid')
  assert train.evaluate_state(c, sharded, fsdp.mesh, dataset) == metrics


def test_eval_in_train_fails_early_without_the_split(tmp_path, data_dir):
  c = small_config(data_dir)
  c.eval.update(every_steps=2, split='test')
  with pytest.raises(FileNotFoundError, match=r'eval.every_steps=2: .*test.json: annotation file'):
    train.train(c, str(tmp_path / 'run'), input_fn=_random_batches(c), total_steps=2)


# --- Trainer and watcher side by side (subprocesses). -------------------------------------------


def _env():
  env = dict(os.environ)
  env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=1'
  return env


def _train_cmd(workdir, data_dir, *sets):
  cmd = [sys.executable, '-m', 'minvis_jax.cli', 'train', '--config', 'configs/tiny.py',
         '--workdir', str(workdir)]
  for s in OVERRIDES + [f'data.manual_dir={data_dir}', *sets]:
    cmd += ['--set', s]
  return cmd


def _watch_cmd(workdir, data_dir):
  return [sys.executable, '-m', 'minvis_jax.cli', 'evaluate', '--watch', str(workdir),
          '--manual_dir', data_dir, '--timeout', '300']


@pytest.mark.slow
def test_watcher_beside_training_run(tmp_path, data_dir):
  workdir = tmp_path / 'run'
  log = lambda name: open(tmp_path / f'{name}.log', 'w')  # noqa: E731
  trainer = subprocess.Popen(_train_cmd(workdir, data_dir, 'total_steps=6',
                                        'checkpoint.every_steps=2', 'checkpoint.keep=10'),
                             cwd=REPO, env=_env(), stdout=log('train'), stderr=subprocess.STDOUT)
  watcher = subprocess.Popen(_watch_cmd(workdir, data_dir), cwd=REPO, env=_env(),
                             stdout=log('watch1'), stderr=subprocess.STDOUT)
  procs = [trainer, watcher]
  try:
    # Kill the watcher once it has evaluated a step, then start another.
    jsonl = workdir / 'eval.jsonl'
    deadline = time.time() + 600
    while not (jsonl.exists() and _rows(jsonl)) and time.time() < deadline:
      assert watcher.poll() is None, (tmp_path / 'watch1.log').read_text()[-3000:]
      time.sleep(0.1)
    watcher.send_signal(signal.SIGKILL)
    watcher.wait()
    before = [r['step'] for r in _rows(jsonl)]
    watcher = subprocess.Popen(_watch_cmd(workdir, data_dir), cwd=REPO, env=_env(),
                               stdout=log('watch2'), stderr=subprocess.STDOUT)
    procs.append(watcher)
    assert watcher.wait(timeout=600) == 0, (tmp_path / 'watch2.log').read_text()[-3000:]
    assert trainer.wait(timeout=600) == 0, (tmp_path / 'train.log').read_text()[-3000:]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  second = (tmp_path / 'watch2.log').read_text()
  rows = _rows(jsonl)
  assert [r['step'] for r in rows] == [2, 4, 6], second[-3000:]   # each once, in order
  assert f'evaluated {3 - len(before)} checkpoints' in second
  assert 'final step 6' in second                                # it stopped by itself
  # The watcher's metrics equal a one-shot `evaluate` of the same step (same devices: 1).
  one = subprocess.run([sys.executable, '-m', 'minvis_jax.cli', 'evaluate', '--checkpoint',
                        str(workdir / 'checkpoints' / '4'), '--manual_dir', data_dir,
                        '--out', str(tmp_path / 'one')],
                       cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
  assert one.returncode == 0, one.stderr[-3000:]
  metrics = json.loads((tmp_path / 'one' / 'metrics.json').read_text())
  assert rows[1] == {'step': 4, **{f'eval/{k}': v for k, v in metrics.items()}}
  assert json.loads((workdir / 'eval' / '4' / 'metrics.json').read_text()) == metrics
  assert (json.loads((workdir / 'eval' / '4' / 'results.json').read_text())
          == json.loads((tmp_path / 'one' / 'results.json').read_text()))
  assert json.loads((workdir / 'eval' / 'best.json').read_text()) == max(
      rows, key=lambda r: (r['eval/AP'], -r['step']))


@pytest.mark.slow
def test_eval_in_train_with_two_processes(tmp_path, data_dir):
  workdir = tmp_path / 'multi'
  cmd = ['bash', 'launch/local.sh', '2', '4', 'configs/tiny.py', str(workdir)]
  for s in OVERRIDES + [f'data.manual_dir={data_dir}', 'total_steps=3', 'eval.every_steps=3',
                        'eval.max_videos=1']:
    cmd += ['--set', s]
  result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
  logs = [(workdir / 'logs' / f'process_{i}.log').read_text() for i in range(2)]
  assert result.returncode == 0, result.stderr + logs[0][-3000:] + logs[1][-3000:]
  assert "mesh {'data': 8}, 8 devices" in logs[0]
  # Both processes evaluated (collectives), process 0 alone wrote: one line.
  evals = [r for r in _rows(workdir / 'metrics.jsonl') if 'eval/AP' in r]
  assert [r['step'] for r in evals] == [3]
  out = tmp_path / 'one'
  assert cli.main(['evaluate', '--checkpoint', str(workdir / 'checkpoints' / '3'),
                         '--max_videos', '1', '--out', str(out)]) == 0
  metrics = json.loads((out / 'metrics.json').read_text())
  assert evals[0] == pytest.approx({'step': 3, **{f'eval/{k}': v for k, v in metrics.items()}},
                                   abs=1e-6)


def test_watch_says_at_once_what_it_waits_for_and_refuses_a_mistyped_path(tmp_path, capsys):
  missing = tmp_path / 'no_parent' / 'run'
  assert cli.main(['evaluate', '--watch', str(missing)]) == 2
  assert capsys.readouterr().err == (f'minvis-jax evaluate: error: {missing}: --watch WORKDIR: its '
                                     f'parent {tmp_path / "no_parent"} does not exist (a mistyped '
                                     'path?)\n')
  run = tmp_path / 'run'
  with pytest.raises(TimeoutError):
    cli.main(['evaluate', '--watch', str(run), '--timeout', '0.1', '--debug'])
  assert capsys.readouterr().out.splitlines()[0] == (
      f'waiting for {run / "config.json"}: {run} does not exist yet; it appears when `minvis-jax '
      f'train --workdir {run}` starts (--timeout S to give up)')
  (tmp_path / 'file').write_text('x')
  assert cli.main(['evaluate', '--watch', str(tmp_path / 'file')]) == 2
  assert 'file: --watch WORKDIR is a file, not a work directory' in capsys.readouterr().err


def test_an_eval_jsonl_that_is_not_utf8_names_the_file(tmp_path):
  path = tmp_path / watch.EVAL_JSONL
  path.write_bytes(b'{"step": 1, "eval/AP": 0.5}\n{"step": 2, "x": "\xff"}\n')
  with pytest.raises(ValueError, match=re.escape(str(path)) + r': not UTF-8 text \(byte 46: '
                     'invalid start byte\\); move the file away'):
    watch.read_eval_rows(str(path))


def test_watch_a_run_in_a_bucket(data_dir, gcs_bucket, gcs_emulator, tmp_path):
  """The watcher on a gs:// work directory, the videos read from the bucket too: the steps orbax
  has committed (listed, not probed file by file), its files in the bucket, equal to a local
  watcher's."""
  from support import gcs_emulator as emulator  # noqa: PLC0415
  data = emulator.upload_tree(data_dir, f'{gcs_bucket}/data')
  config = small_config(data)
  config.total_steps = 4
  workdir = f'{gcs_bucket}/run'
  checkpoints.save_config(workdir, config)
  base = jax.jit(lambda key: train.init_variables(config, key))(jax.random.PRNGKey(0))
  # On a bucket orbax marks a finished step with a commit_success.txt object (no rename); step 3
  # is a save in progress: arrays written, no marker yet.
  for step, scale in ((2, 1.0), (3, 1.0), (4, 1.1)):
    _save_step(workdir, step, jax.tree.map(lambda x, s=scale: np.asarray(x) * s, base))
    if step != 3:
      checkpoints.metrics_writer.write_json(f'{workdir}/checkpoints/{step}/commit_success.txt', 1)
  assert checkpoints.finished_steps(workdir) == [2, 4]
  added = watch.watch(workdir, config, evaluate.load_dataset(config), poll_s=0.05, grace_s=0.2)
  assert [r['step'] for r in added] == [2, 4]
  objects = emulator.list_objects(gcs_emulator, gcs_bucket[5:], 'run/')
  assert {'run/eval.jsonl', 'run/eval/best.json', 'run/eval/4/results.json',
          'run/eval/4/metrics.json'} <= set(objects), objects
  assert any(o.startswith('run/tensorboard/eval/events.out.tfevents.') for o in objects), objects
  with checkpoints.paths.open(f'{workdir}/eval.jsonl') as f:
    assert [json.loads(line) for line in f.read().splitlines()] == added

  # The same checkpoints and videos on local disk: the same rows.
  local = str(tmp_path / 'run')
  local_config = small_config(data_dir)
  local_config.total_steps = 4
  checkpoints.save_config(local, local_config)
  _save_step(local, 2, base)
  _save_step(local, 4, jax.tree.map(lambda x: np.asarray(x) * 1.1, base))
  assert watch.watch(local, local_config, evaluate.load_dataset(local_config), poll_s=0.05,
                     grace_s=0.2) == added


@pytest.mark.slow
def test_watch_beside_a_live_training_run_in_a_bucket(data_dir, gcs_bucket, gcs_emulator,
                                                      monkeypatch):
  """`minvis-jax train --workdir gs://...` in a subprocess and the watcher in this process at the
  same time: the watcher evaluates each checkpoint as it appears, every saved step exactly once,
  the same rows as scoring those checkpoints afterwards, and stops by itself after the final
  step (the run's total_steps)."""
  from support import gcs_emulator as emulator  # noqa: PLC0415
  steps, every = 10, 2
  workdir = f'{gcs_bucket}/run'
  cmd = [sys.executable, '-m', 'minvis_jax.cli', 'train', '--config', 'configs/tiny.py',
         '--workdir', workdir, '--total_steps', str(steps)]
  for s in OVERRIDES + [f'data.manual_dir={data_dir}', f'checkpoint.every_steps={every}',
                        'checkpoint.keep=100']:
    cmd += ['--set', s]
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
  trainer = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
  scored_while_training = []
  score = evaluate.score
  monkeypatch.setattr(evaluate, 'score', lambda *a, **k: (
      scored_while_training.append(trainer.poll() is None), score(*a, **k))[1])
  try:
    config = watch.wait_for_config(workdir, timeout=600, poll_s=0.2)
    added = watch.watch(workdir, config, evaluate.load_dataset(config), poll_s=0.2,
                        timeout=300)
  finally:
    out, _ = trainer.communicate(timeout=600)
  assert trainer.returncode == 0, out[-3000:]
  saved = list(range(every, steps + 1, every))
  assert checkpoints.finished_steps(workdir) == saved
  assert [r['step'] for r in added] == saved   # each once, in order; stopped after the last
  assert scored_while_training[0], 'the first checkpoint was scored only after training ended'
  with checkpoints.paths.open(f'{workdir}/eval.jsonl') as f:
    assert [json.loads(line) for line in f.read().splitlines()] == added
  objects = emulator.list_objects(gcs_emulator, gcs_bucket[5:], 'run/eval/')
  assert {f'run/eval/{s}/metrics.json' for s in saved} <= set(objects), objects

  # The same checkpoints scored afterwards: the same rows.
  monkeypatch.setattr(evaluate, 'score', score)
  dataset = evaluate.load_dataset(config)
  for row in added:
    variables = checkpoints.load_for_inference(f'{workdir}/checkpoints/{row["step"]}')[1]
    _, metrics = evaluate.score(config, variables, dataset)
    assert row == pytest.approx({'step': row['step'], **evaluate.eval_scalars(metrics)},
                                abs=1e-9)
