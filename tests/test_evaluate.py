"""evaluate.py: data-parallel evaluation (videos over processes, windows over devices, the 1-device
results), `score` and the `evaluate` command."""

import json
import os
import subprocess
import time

import jax
import pytest

from minvis_jax import checkpoints
from minvis_jax import cli
from minvis_jax import config_lib
from minvis_jax import evaluate
from minvis_jax import paths
from minvis_jax import ytvis_eval
from minvis_jax.data import ytvis

from support.tracks import assert_same_tracks  # noqa: E402
from support.variables import random_variables as _random_variables  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LENGTHS = (5, 2, 3, 1)   # frames of the test videos: unequal, so the process balance matters


def test_assign_videos_balances_frames_deterministically():
  frames = [5, 2, 3, 1, 9, 4]
  shares = evaluate.assign_videos(frames, 3)
  assert shares == evaluate.assign_videos(frames, 3)
  assert sorted(i for s in shares for i in s) == list(range(6))
  assert all(s == sorted(s) for s in shares)
  # Longest first to the least loaded: 9 -> p0, 5 -> p1, 4 -> p2, 3 -> p2, 2 -> p1, 1 -> p1.
  assert shares == [[4], [0, 1, 3], [2, 5]]
  assert [sum(frames[i] for i in s) for s in shares] == [9, 8, 7]
  assert evaluate.assign_videos([3, 3], 4) == [[0], [1], [], []]
  assert evaluate.assign_videos(LENGTHS, 2) == [[0, 3], [1, 2]]


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  """(checkpoint dir, data dir, config, variables, 1-device results): a random tiny model and
  generated videos of LENGTHS frames."""
  synthetic = pytest.importorskip('minvis_jax.data.synthetic')
  root = tmp_path_factory.mktemp('sharded')
  data = root / 'data'
  synthetic.generate(str(data), 'valid', num_videos=len(LENGTHS), num_frames=max(LENGTHS),
                     height=64, width=96, seed=1)
  gt = json.loads((data / 'valid.json').read_text())
  for video, n in zip(gt['videos'], LENGTHS):
    video['file_names'], video['length'] = video['file_names'][:n], n
  for a in gt['annotations']:
    n = LENGTHS[[v['id'] for v in gt['videos']].index(a['video_id'])]
    for key in ('segmentations', 'areas', 'bboxes'):
      if a.get(key) is not None:
        a[key] = a[key][:n]
  (data / 'valid.json').write_text(json.dumps(gt))

  config = config_lib.load_config(os.path.join(REPO, 'configs', 'tiny.py'))
  config.inference.top_k = 4
  variables = _random_variables(config.model, seed=2)
  ckpt = str(root / 'model')
  checkpoints.save_variables(ckpt, variables)
  checkpoints.save_config(ckpt, config)
  dataset = ytvis.load_split('synthetic', str(data), 'valid')
  t = time.perf_counter()
  one = evaluate.predict_dataset(config, variables, dataset, progress=False,
                                     devices=jax.devices()[:1])
  print(f'1 device: {sum(LENGTHS) / (time.perf_counter() - t):.2f} frames/s (with compilation)')
  return ckpt, data, config, variables, one


def test_eight_devices_equal_one_device(setup):
  _, data, config, variables, one = setup
  assert len(jax.devices()) == 8
  dataset = ytvis.load_split('synthetic', str(data), 'valid')
  t = time.perf_counter()
  eight = evaluate.predict_dataset(config, variables, dataset, progress=False)
  print(f'8 devices: {sum(LENGTHS) / (time.perf_counter() - t):.2f} frames/s (with compilation)')
  assert [r['video_id'] for r in one] == [v.id for v in dataset.videos for _ in range(4)]
  assert [len(r['segmentations']) for r in one] == [n for n in LENGTHS for _ in range(4)]
  assert_same_tracks(eight, one)


@pytest.mark.slow
def test_two_processes_with_local_launcher_equal_one_device(setup, tmp_path):
  ckpt, data, _, _, one = setup
  out = tmp_path / 'eval'
  cmd = ['bash', 'launch/local_evaluate.sh', '2', '4', str(out), '--checkpoint', ckpt,
         '--manual_dir', str(data)]
  result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
  logs = [(out / 'logs' / f'process_{i}.log').read_text() for i in range(2)]
  assert result.returncode == 0, result.stderr + logs[0][-3000:] + logs[1][-3000:]
  assert 'on 8 devices of 2 processes' in logs[0] and 'AP50' in logs[0]
  assert 'wrote' not in logs[1]   # process 1 ran its videos and wrote nothing
  assert sorted(os.listdir(out)) == ['logs', 'metrics.json', 'results.json']
  assert_same_tracks(json.loads((out / 'results.json').read_text()), one)


CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')


def test_evaluate_on_generated_videos(tiny_checkpoint, tmp_path, capsys):
  synthetic = pytest.importorskip('minvis_jax.data.synthetic')
  ckpt, _, _ = tiny_checkpoint
  data = tmp_path / 'data'
  synthetic.generate(str(data), 'valid', num_videos=2, num_frames=3, height=64, width=96, seed=0)
  out = tmp_path / 'eval'
  assert cli.main(['evaluate',
                                  '--config', os.path.join(CONFIGS, 'tiny.py'),
                                  '--checkpoint', ckpt, '--manual_dir', str(data),
                                  '--out', str(out), '--top_k', '5', '--window', '1']) == 0
  gt = json.load(open(data / 'valid.json'))
  results = json.load(open(out / 'results.json'))
  assert sorted({r['video_id'] for r in results}) == sorted(v['id'] for v in gt['videos'])
  assert len(results) == 2 * 5
  for r in results:
    assert len(r['segmentations']) == 3 and r['segmentations'][0]['size'] == [64, 96]
  metrics = json.load(open(out / 'metrics.json'))
  assert set(metrics) >= {'AP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'AR1', 'AR10'}
  assert metrics == ytvis_eval.evaluate(str(data / 'valid.json'), str(out / 'results.json'))
  printed = capsys.readouterr().out
  assert 'AP50' in printed and 'results.json' in printed
  # Default output: the checkpoint directory's config and location; only the first video.
  assert cli.main(['evaluate', '--checkpoint', ckpt, '--manual_dir', str(data),
                                  '--max_videos', '1', '--out', str(tmp_path / 'one')]) == 0
  one = json.load(open(tmp_path / 'one' / 'results.json'))
  assert {r['video_id'] for r in one} == {gt['videos'][0]['id']} and len(one) == 10
  assert set(json.load(open(tmp_path / 'one' / 'metrics.json'))) >= {'AP', 'AR10'}


def test_evaluate_a_checkpoint_in_a_bucket(tiny_checkpoint, tmp_path, gcs_bucket):
  synthetic = pytest.importorskip('minvis_jax.data.synthetic')
  ckpt, config, variables = tiny_checkpoint
  url = f'{gcs_bucket}/tiny'
  checkpoints.save_variables(url, variables)
  checkpoints.save_config(url, config)
  data = tmp_path / 'data'
  synthetic.generate(str(data), 'valid', num_videos=2, num_frames=3, height=64, width=96, seed=0)
  flags = ['--manual_dir', str(data), '--top_k', '5', '--window', '1']
  assert cli.main(['evaluate', '--checkpoint', ckpt, '--out', str(tmp_path / 'eval'), *flags]) == 0
  assert cli.main(['evaluate', '--checkpoint', url, *flags]) == 0   # OUT: the checkpoint's URL
  for name in ('results.json', 'metrics.json'):
    with paths.open(f'{url}/{name}') as f:
      assert json.load(f) == json.load(open(tmp_path / 'eval' / name)), name
  assert not os.path.exists('gs:')
