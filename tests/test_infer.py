"""`minvis-jax infer` on a frame folder and an MP4 with a random tiny model saved as a checkpoint
(conftest's `tiny_checkpoint`)."""

import json
import os

import jax
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from support import videos
from support.tracks import assert_same_tracks
from minvis_jax import cli
from minvis_jax import checkpoints
from minvis_jax import model_forward
from minvis_jax import paths
from minvis_jax import predictor
from minvis_jax import tracking
from minvis_jax import video_io
from minvis_jax import visualize
from minvis_jax.data import transforms
from minvis_jax.ytvis_eval import evaluate
from minvis_jax.models import ModelConfig


def _check_results(path, num_frames, size, top_k, num_classes=4):
  results = json.load(open(path))
  assert len(results) == top_k
  assert [r['score'] for r in results] == sorted((r['score'] for r in results), reverse=True)
  for r in results:
    assert r['video_id'] == 1 and 1 <= r['category_id'] <= num_classes and 0 < r['score'] <= 1
    assert len(r['segmentations']) == num_frames
    for seg in r['segmentations']:
      assert seg['size'] == list(size) and isinstance(seg['counts'], str)
      assert mask_utils.decode(dict(seg, counts=seg['counts'].encode())).shape == size
  return results


def _frame_count(path):
  if path.endswith('.gif'):
    with Image.open(path) as im:
      return im.n_frames, im.size[::-1]
  import imageio.v2 as imageio
  with imageio.get_reader(path) as reader:
    frames = [f for f in reader]
  return len(frames), frames[0].shape[:2]


def test_infer_on_frame_folder(tiny_checkpoint, tmp_path, capsys):
  ckpt, config, variables = tiny_checkpoint
  frames = videos.moving_square_frames(5)
  folder = videos.write_folder(tmp_path / 'frames', frames)
  out = tmp_path / 'out'
  assert cli.main(['infer', '--checkpoint', ckpt, '--video', folder,
                               '--out', str(out), '--top_k', '3', '--score_threshold', '0']) == 0
  results = _check_results(out / 'results.json', 5, (64, 96), 3)
  # The same tracks as the predictor run directly on the test-time input (the geometry of
  # docs/method.md §1), at infer's per-device batch ('auto': one frame a device on CPU): XLA:CPU's
  # GroupNorm reductions round differently for another batch size, which can flip a pixel at the
  # threshold.
  inputs = [transforms.test_frame(f, 128, 224, config.data.mean, config.data.std)[0]
            for f in frames]
  assert inputs[0].shape == (128, 192, 3)
  direct = predictor.VideoPredictor(
      model_forward.forward(ModelConfig.from_config(config.model)), variables, 1, 3,
      tracking.tracker_from_config(config), jax.devices()[:1])(
      inputs, (128, 192), (64, 96))
  assert_same_tracks(results, predictor.results_for_video(direct, 1, [1, 2, 3, 4]))
  # A results file the evaluator accepts for a 5-frame 64x96 video.
  gt = dict(videos=[dict(id=1, height=64, width=96, length=5)],
            categories=[dict(id=c, name=f'c{c}') for c in range(1, 5)],
            annotations=[dict(id=1, video_id=1, category_id=results[0]['category_id'], iscrowd=0,
                              segmentations=results[0]['segmentations'], areas=None)])
  (tmp_path / 'gt.json').write_text(json.dumps(gt))
  metrics = evaluate(str(tmp_path / 'gt.json'), str(out / 'results.json'))
  top = [dict(s, counts=s['counts'].encode()) for s in results[0]['segmentations']]
  if any(mask_utils.area(top)):
    assert metrics['AP'] == pytest.approx(1.0)  # the top track is its own ground truth
  overlay = [f for f in os.listdir(out) if f.startswith('overlay.')]
  assert overlay == ['overlay.mp4' if visualize.mp4_available() else 'overlay.gif']
  assert _frame_count(str(out / overlay[0])) == (5, (64, 96))
  assert 'wrote' in capsys.readouterr().out


@pytest.mark.skipif(not visualize.mp4_available(), reason='imageio-ffmpeg not installed')
def test_infer_on_mp4(tiny_checkpoint, tmp_path):
  ckpt, _, _ = tiny_checkpoint
  video = visualize.write_video(str(tmp_path / 'in.mp4'), videos.moving_square_frames(4), fps=5)
  frames = list(video_io.read_video(video))
  assert len(frames) == 4 and frames[0].shape == (64, 96, 3) and frames[0].dtype == np.uint8
  # Lossy, but close to what was written.
  assert np.abs(frames[2].astype(int) - videos.moving_square_frames(4)[2]).mean() < 12
  out = tmp_path / 'out'
  assert cli.main(['infer', '--checkpoint', ckpt, '--video', video,
                               '--out', str(out), '--top_k', '2']) == 0
  _check_results(out / 'results.json', 4, (64, 96), 2)
  assert _frame_count(str(out / 'overlay.mp4')) == (4, (64, 96))


def test_output_settings_are_checked_before_the_work_and_no_file_is_claimed(
    tiny_checkpoint, tmp_path, monkeypatch, capsys):
  ckpt, _, _ = tiny_checkpoint
  folder = videos.write_folder(tmp_path / 'frames', videos.moving_square_frames(3))
  taken = tmp_path / 'taken'
  taken.write_text('a file')
  ran = []
  monkeypatch.setattr(video_io, 'open_video', lambda *a: ran.append(a))
  assert cli.main(['infer', '--checkpoint', ckpt, '--video', folder, '--out', str(taken)]) == 2
  assert capsys.readouterr().err == (f'minvis-jax infer: error: {taken}: --out exists and is not '
                                     'a directory\n')
  assert not ran   # refused before the video was opened
  monkeypatch.undo()
  # An overlay writer that returns without writing: an error naming the file, never 'wrote'.
  monkeypatch.setattr(visualize, 'overlay_video', lambda path, frames, *a: path)
  out = tmp_path / 'out'
  assert cli.main(['infer', '--checkpoint', ckpt, '--video', folder, '--out', str(out)]) == 2
  captured = capsys.readouterr()
  assert captured.err.splitlines()[-1] == (f'minvis-jax infer: error: {out / "overlay.mp4"}: not '
                                           'written (empty or missing after the run)')
  assert 'wrote' not in captured.out


def test_infer_from_and_to_a_bucket(tiny_checkpoint, tmp_path, gcs_bucket):
  ckpt, config, variables = tiny_checkpoint
  url = f'{gcs_bucket}/tiny'
  checkpoints.save_variables(url, variables)
  checkpoints.save_config(url, config)
  folder = videos.write_folder(tmp_path / 'frames', videos.moving_square_frames(4))
  flags = ['--video', folder, '--top_k', '3', '--score_threshold', '0']
  assert cli.main(['infer', '--checkpoint', ckpt, '--out', str(tmp_path / 'out'), *flags]) == 0
  assert cli.main(['infer', '--checkpoint', url, '--out', f'{gcs_bucket}/out', *flags]) == 0
  with paths.open(f'{gcs_bucket}/out/results.json') as f:
    assert json.load(f) == json.load(open(tmp_path / 'out' / 'results.json'))
  overlay = [f for f in os.listdir(tmp_path / 'out') if f.startswith('overlay.')]
  assert paths.listdir(f'{gcs_bucket}/out') == sorted(['results.json', *overlay])
  assert paths.getsize(f'{gcs_bucket}/out/{overlay[0]}') > 0
