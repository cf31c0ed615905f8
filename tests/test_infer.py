"""`minvis-jax infer` on a frame folder and an MP4 with a random tiny model saved as a checkpoint
(conftest's `tiny_checkpoint`)."""

import io
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from support import videos
from support.tracks import assert_same_tracks
from minvis_jax import cli
from minvis_jax import checkpoints
from minvis_jax import infer
from minvis_jax import model_forward
from minvis_jax import paths
from minvis_jax import predictor
from minvis_jax import tracking
from minvis_jax import video_io
from minvis_jax import visualize
from minvis_jax.data import transforms
from minvis_jax.ytvis_eval import evaluate
from minvis_jax.models import ModelConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


# --- infer --online ---

def _png_stream(frames) -> bytes:
  """Concatenated PNG files, as `ffmpeg -f image2pipe -c:v png -` writes them."""
  out = io.BytesIO()
  for f in frames:
    Image.fromarray(f).save(out, format='PNG')
  return out.getvalue()


def _lines(out):
  return [json.loads(line) for line in (out / 'frames.jsonl').read_text().splitlines()]


def _check_lines(lines, num_frames, size=(64, 96)):
  assert [line['frame'] for line in lines] == list(range(num_frames))
  for line in lines:
    assert line['latency_ms'] > 0
    for t in line['tracks']:
      assert t['id'] >= 1 and 1 <= t['category_id'] <= 4 and 0 < t['score'] <= 1
      assert t['category'] == ('disc', 'square', 'triangle', 'cross')[t['category_id'] - 1]
      seg = t['segmentation']
      assert seg['size'] == list(size)
      assert mask_utils.decode(dict(seg, counts=seg['counts'].encode())).any()


@pytest.mark.slow
def test_infer_online_frames_piped_on_stdin(tiny_checkpoint, tmp_path):
  """PNG frames piped into the command (a process of its own), as from ffmpeg: a line a frame, the
  latency summary, and the end-of-stream results equal to the offline predictor's."""
  ckpt, config, variables = tiny_checkpoint
  frames = videos.moving_square_frames(5)
  out = tmp_path / 'out'
  proc = subprocess.run([sys.executable, '-m', 'minvis_jax.cli', 'infer', '--checkpoint', ckpt,
                         '--video', '-', '--out', str(out), '--online', 'summary', '--top_k', '3'],
                        input=_png_stream(frames), capture_output=True, timeout=600, cwd=REPO)
  assert proc.returncode == 0, proc.stderr.decode()[-2000:]
  stdout = proc.stdout.decode()
  assert re.search(r'-: 5 frames, latency p50 [\d.]+ ms / p95 [\d.]+ ms per frame; first frame '
                   r'[\d.]+ s with compiling; [\d.]+ frames/s overall', stdout), stdout
  lines = _lines(out)
  _check_lines(lines, 5)
  assert [line['time'] for line in lines] == [None] * 5   # no frame rate on a PNG pipe
  inputs = list(predictor.preprocess(frames, config.data))
  forward = model_forward.forward(ModelConfig.from_config(config.model))
  direct = predictor.VideoPredictor(forward, variables, 1, 3,
                                    tracking.tracker_from_config(config), jax.devices()[:1])(
      inputs, (128, 192), (64, 96))
  assert_same_tracks(json.load(open(out / 'results.json')),
                     predictor.results_for_video(direct, 1, [1, 2, 3, 4]))


class _Stdin:
  def __init__(self, data: bytes, interrupt_after: int | None = None):
    self.buffer = self
    self._data, self._pos, self._interrupt_after = data, 0, interrupt_after

  def read(self, n):
    if self._interrupt_after is not None and self._pos >= self._interrupt_after:
      raise KeyboardInterrupt
    out = self._data[self._pos:self._pos + n]
    self._pos += len(out)
    return out


def _run_stdin(monkeypatch, ckpt, out, data, interrupt_after=None, extra=()):
  monkeypatch.setattr(sys, 'stdin', _Stdin(data, interrupt_after))
  return cli.main(['infer', '--checkpoint', ckpt, '--video', '-', '--out', str(out), '--online',
                   *extra])


def test_infer_online_bad_streams_name_the_frame_and_keep_the_lines(tiny_checkpoint, tmp_path,
                                                                    monkeypatch, capsys):
  ckpt, _, _ = tiny_checkpoint
  frames = videos.moving_square_frames(4)
  data = _png_stream(frames)
  # The stream stops in the middle of the last frame.
  cut = len(_png_stream(frames[:3])) + 100
  assert _run_stdin(monkeypatch, ckpt, tmp_path / 'a', data[:cut]) == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and re.search(
      r'error: stdin: frame 3: the stream stopped mid-frame \(after \d+ bytes of its PNG\)', err)
  _check_lines(_lines(tmp_path / 'a'), 3)
  # The frame size changes at frame 2.
  small = _png_stream(frames[:2]) + _png_stream([frames[2][:32, :48]]) + _png_stream(frames[3:])
  assert _run_stdin(monkeypatch, ckpt, tmp_path / 'b', small) == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and 'error: -: frame 2 is 32x48, the video is 64x96' in err
  _check_lines(_lines(tmp_path / 'b'), 2)
  # Not PNG at all.
  assert _run_stdin(monkeypatch, ckpt, tmp_path / 'c', b'GIF89a' + data) == 2
  assert 'stdin: frame 0: the stream is not a PNG' in capsys.readouterr().err
  # Offline infer cannot read stdin (it reads the video twice).
  monkeypatch.setattr(sys, 'stdin', _Stdin(data))
  assert cli.main(['infer', '--checkpoint', ckpt, '--video', '-', '--out', str(tmp_path)]) == 2
  assert 'need --online' in capsys.readouterr().err


def test_infer_online_ctrl_c_keeps_every_line(tiny_checkpoint, tmp_path, monkeypatch, capsys):
  """Ctrl-C while waiting for frame 3: the three lines written so far, whole, and exit 130."""
  ckpt, _, _ = tiny_checkpoint
  frames = videos.moving_square_frames(5)
  data = _png_stream(frames)
  assert _run_stdin(monkeypatch, ckpt, tmp_path, data, len(_png_stream(frames[:3]))) == 130
  assert '3 frames, latency p50' in capsys.readouterr().out
  text = (tmp_path / 'frames.jsonl').read_text()
  assert text.endswith('\n')
  _check_lines(_lines(tmp_path), 3)


def test_infer_online_on_a_frame_folder_with_overlay(tiny_checkpoint, tmp_path, capsys):
  ckpt, _, _ = tiny_checkpoint
  folder = videos.write_folder(tmp_path / 'frames', videos.moving_square_frames(4))
  out = tmp_path / 'out'
  assert cli.main(['infer', '--checkpoint', ckpt, '--video', folder, '--out', str(out),
                   '--online', 'overlay', '--set', 'inference.online_report_score=0.0']) == 0
  lines = _lines(out)
  _check_lines(lines, 4)
  # Report score 0: every query slot with a non-empty mask is reported, each with a stable id.
  assert lines[0]['tracks'] and [t['id'] for t in lines[0]['tracks']] == sorted(
      t['id'] for t in lines[0]['tracks'])
  overlay = [f for f in os.listdir(out) if f.startswith('overlay.')]
  assert _frame_count(str(out / overlay[0])) == (4, (64, 96))
  assert 'report score >= 0.0' in capsys.readouterr().out


def test_latency_text_leaves_out_the_compiling_frame():
  latencies = [3.0] + [0.01 * i for i in range(1, 101)]
  text = infer.latency_text(latencies, 10.1)
  p50, p95 = np.percentile(latencies[1:], [50, 95]) * 1000
  assert text == (f'101 frames, latency p50 {p50:.1f} ms / p95 {p95:.1f} ms per frame; first '
                  'frame 3.00 s with compiling; 10.00 frames/s overall')
  assert infer.latency_text([], 1.0) == '0 frames'
