"""`minvis-jax evaluate` on generated videos with a random tiny checkpoint."""

import json
import os

import pytest

from minvis_jax import cli
from minvis_jax.ytvis_eval import evaluate

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
  assert metrics == evaluate(str(data / 'valid.json'), str(out / 'results.json'))
  printed = capsys.readouterr().out
  assert 'AP50' in printed and 'results.json' in printed
  # Default output: the checkpoint directory's config and location; only the first video.
  assert cli.main(['evaluate', '--checkpoint', ckpt, '--manual_dir', str(data),
                                  '--max_videos', '1', '--out', str(tmp_path / 'one')]) == 0
  one = json.load(open(tmp_path / 'one' / 'results.json'))
  assert {r['video_id'] for r in one} == {gt['videos'][0]['id']} and len(one) == 10
  assert set(json.load(open(tmp_path / 'one' / 'metrics.json'))) >= {'AP', 'AR10'}
