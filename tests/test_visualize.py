"""Overlays, overlay videos (mp4 / GIF fallback) and loss plots."""

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from minvis_jax import visualize


def test_track_colors_distinct_and_deterministic():
  c = visualize.track_colors(20)
  assert c.shape == (20, 3) and c.dtype == np.uint8
  assert len({tuple(x) for x in c}) == 20
  np.testing.assert_array_equal(c, visualize.track_colors(20))
  np.testing.assert_array_equal(c[:5], visualize.track_colors(5))
  assert visualize.track_colors(0).shape == (0, 3)


def test_overlay_blends_draws_contour_and_tag():
  frame = np.full((64, 96, 3), 100, np.uint8)
  masks = np.zeros((2, 64, 96), bool)
  masks[0, 30:50, 40:80] = True
  masks[1, 0:10, 0:10] = True
  colors = np.array([[200, 0, 0], [0, 0, 250]], np.uint8)
  out = visualize.overlay(frame, masks, ['cat', 'dog'], [0.9, 0.5], colors, alpha=0.5)
  assert out.shape == frame.shape and out.dtype == np.uint8
  # Interior (away from the tag at the top-left corner): blend; edge: the pure colour.
  np.testing.assert_array_equal(out[45, 70], [150, 50, 50])
  np.testing.assert_array_equal(out[49, 60], [200, 0, 0])   # bottom row of the mask
  np.testing.assert_array_equal(out[40, 79], [200, 0, 0])   # right column
  # Outside every mask and tag: untouched.
  np.testing.assert_array_equal(out[60, 5], [100, 100, 100])
  np.testing.assert_array_equal(out[20, 90], [100, 100, 100])
  # The tag sits at the mask's top-left: its background colour and some text ink are there.
  tag = out[30:42, 40:80].reshape(-1, 3)
  assert (tag == [200, 0, 0]).all(-1).sum() > 20
  assert (tag.min(-1) > 200).sum() > 3  # anti-aliased white ink on a dark tag
  # Different text gives a different picture; no labels' instances -> the frame unchanged.
  other = visualize.overlay(frame, masks, ['cat', 'elephant'], [0.9, 0.5], colors)
  assert not np.array_equal(out, other)
  np.testing.assert_array_equal(visualize.overlay(frame, masks[:0], [], []), frame)


def test_overlay_empty_mask_and_bad_shapes():
  frame = np.zeros((8, 8, 3), np.uint8)
  out = visualize.overlay(frame, np.zeros((1, 8, 8), bool), ['x'], [1.0])
  np.testing.assert_array_equal(out, frame)
  with pytest.raises(ValueError, match='masks must be'):
    visualize.overlay(frame, np.zeros((1, 4, 8), bool), ['x'])
  with pytest.raises(ValueError, match='1 masks but 2 labels'):
    visualize.overlay(frame, np.zeros((1, 8, 8), bool), ['x', 'y'])
  with pytest.raises(ValueError, match='uint8'):
    visualize.overlay(frame.astype(np.float32), np.zeros((1, 8, 8), bool), ['x'])


def _frames(n, h=63, w=95):
  rng = np.random.default_rng(0)
  return [np.full((h, w, 3), 20 * t, np.uint8) + rng.integers(0, 5, (h, w, 3), dtype=np.uint8)
          for t in range(n)]


@pytest.mark.skipif(not visualize.mp4_available(), reason='imageio-ffmpeg not installed')
def test_write_mp4_odd_size(tmp_path):
  import imageio.v2 as imageio
  path = visualize.write_video(str(tmp_path / 'sub' / 'v.mp4'), iter(_frames(5)), fps=5)
  assert path.endswith('v.mp4')
  with imageio.get_reader(path) as reader:
    frames = [f for f in reader]
  assert len(frames) == 5
  assert frames[0].shape == (64, 96, 3)  # padded to even for yuv420p
  assert abs(float(frames[3][:63, :95].mean()) - float(_frames(5)[3].mean())) < 3


def test_write_gif_and_mp4_fallback(tmp_path, monkeypatch):
  path = visualize.write_video(str(tmp_path / 'v.gif'), _frames(4, 32, 48), fps=4)
  with Image.open(path) as im:
    assert im.n_frames == 4 and im.size == (48, 32)
    assert im.info['duration'] == 250
  monkeypatch.setattr(visualize, 'mp4_available', lambda: False)
  path = visualize.write_video(str(tmp_path / 'w.mp4'), _frames(3, 32, 48))
  assert path == str(tmp_path / 'w.gif')
  with Image.open(path) as im:
    assert im.n_frames == 3
  with pytest.raises(ValueError, match='no frames'):
    visualize.write_video(str(tmp_path / 'e.gif'), [])


def _curve(pixels, color):
  """(columns, lowest row per column) of the pixels of a line's colour: the lowest, so that the
  legend's sample of the line (drawn above the descending curves) does not count."""
  near = np.abs(pixels.astype(int) - np.array(color)).sum(-1) < 60
  cols = np.flatnonzero(near.any(0))
  return cols, np.array([np.flatnonzero(near[:, c]).max() for c in cols])


def test_plot_losses(tmp_path):
  metrics = tmp_path / 'metrics.jsonl'
  rows = [dict(step=s, loss=10.0 / (s + 1), loss_mask=1.0 / (s + 1), lr=1e-3)
          for s in range(0, 50, 10)]
  metrics.write_text('\n'.join(json.dumps(r) for r in rows) + '\n\n')
  png = visualize.plot_losses(str(metrics), str(tmp_path / 'plots' / 'loss.png'),
                              keys=['loss_mask', 'nope'])
  with Image.open(png) as im:
    assert im.format == 'PNG' and im.size == (600, 400)
    pixels = np.asarray(im.convert('RGB'))
  # The curves sit where the data says: the loss (matplotlib's first colour) through its five points
  # on the log axis, and loss_mask (the second colour) one decade lower at every step.
  loss_cols, loss_rows = _curve(pixels, (31, 119, 180))
  mask_cols, mask_rows = _curve(pixels, (255, 127, 14))
  first, last = loss_rows[0], loss_rows[-1]
  decade = (last - first) / (np.log10(rows[0]['loss']) - np.log10(rows[-1]['loss']))
  assert last - first > 100   # a descending curve over most of the plot's height
  for k, row in enumerate(rows):
    x = loss_cols[0] + (loss_cols[-1] - loss_cols[0]) * k / (len(rows) - 1)
    expected = first + decade * (np.log10(rows[0]['loss']) - np.log10(row['loss']))
    assert abs(np.interp(x, loss_cols, loss_rows) - expected) <= 3, (k, x, expected)
    assert abs(np.interp(x, mask_cols, mask_rows) - expected - decade) <= 3, (k, x, expected)
  with pytest.raises(FileNotFoundError, match='missing.jsonl'):
    visualize.plot_losses(str(tmp_path / 'missing.jsonl'), str(tmp_path / 'x.png'))
  bad = tmp_path / 'bad.jsonl'
  bad.write_text('{"step": 1}\n')
  with pytest.raises(ValueError, match='bad.jsonl: no line with both'):
    visualize.plot_losses(str(bad), str(tmp_path / 'x.png'))
  bad.write_text('{"step": 1, "loss": 2}\nnot json\n')
  with pytest.raises(ValueError, match='bad.jsonl: line 2 is not JSON'):
    visualize.plot_losses(str(bad), str(tmp_path / 'x.png'))


def test_overlay_video_from_tracks(tmp_path, monkeypatch):
  monkeypatch.setattr(visualize, 'mp4_available', lambda: False)  # GIF: palette, but exact here
  frames = [np.zeros((48, 64, 3), np.uint8) for _ in range(3)]
  m = np.zeros((48, 64), np.uint8)
  m[24:40, 8:56] = 1
  rle = mask_utils.encode(np.asfortranarray(m))
  tracks = [dict(score=0.9, segmentations=[dict(rle, counts=rle['counts'].decode()), None, rle]),
            dict(score=0.1, segmentations=[rle, rle, rle])]   # below the threshold: not drawn
  path = visualize.overlay_video(str(tmp_path / 'o.mp4'), frames, tracks, ['a', 'b'], 0.5, fps=2)
  assert path.endswith('o.gif')
  with Image.open(path) as im:
    assert im.n_frames == 3
    read = []
    for i in range(3):
      im.seek(i)
      read.append(np.asarray(im.convert('RGB')))
  color = visualize.track_colors(1)[0]
  np.testing.assert_array_equal(read[0][39, 30], color)          # contour of the kept track
  np.testing.assert_array_equal(read[1], 0)                       # no mask on frame 1
  np.testing.assert_array_equal(read[2][39, 30], color)
  np.testing.assert_array_equal(read[2][44, 30], [0, 0, 0])
  np.testing.assert_array_equal(read[2][10, 30], [0, 0, 0])


def _red_pixels(png):
  """Pixels of the eval AP curve's colour (matplotlib's tab:red, #d62728)."""
  with Image.open(png) as im:
    rgb = np.asarray(im.convert('RGB')).astype(int)
  return int((np.abs(rgb - [214, 39, 40]).sum(-1) < 30).sum())


def test_plot_losses_with_eval_ap(tmp_path):
  train_rows = [dict(step=s, loss=10.0 / (s + 1)) for s in range(1, 60, 5)]
  eval_rows = [{'step': 20, 'eval/AP': 0.1, 'eval/AP50': 0.3},
               {'step': 40, 'eval/AP': 0.35, 'eval/AP50': 0.6},
               {'step': 60, 'eval/AP': -1.0}]    # undefined: not drawn
  write = lambda path, rows: path.write_text(''.join(json.dumps(r) + '\n' for r in rows))  # noqa: E731

  # Without eval lines: no second axis, nothing of the AP colour.
  (tmp_path / 'plain').mkdir()
  write(tmp_path / 'plain' / 'metrics.jsonl', train_rows)
  plain = visualize.plot_losses(str(tmp_path / 'plain' / 'metrics.jsonl'),
                                str(tmp_path / 'plain.png'))
  assert _red_pixels(plain) == 0
  # In-training evaluation: eval lines interleaved in metrics.jsonl (they have no 'loss').
  (tmp_path / 'inside').mkdir()
  write(tmp_path / 'inside' / 'metrics.jsonl', train_rows[:4] + eval_rows[:1] + train_rows[4:]
        + eval_rows[1:])
  inside = visualize.plot_losses(str(tmp_path / 'inside' / 'metrics.jsonl'),
                                 str(tmp_path / 'inside.png'))
  assert _red_pixels(inside) > 100
  # The watcher's eval.jsonl beside metrics.jsonl: the same picture.
  (tmp_path / 'watched').mkdir()
  write(tmp_path / 'watched' / 'metrics.jsonl', train_rows)
  write(tmp_path / 'watched' / 'eval.jsonl', eval_rows)
  watched = visualize.plot_losses(str(tmp_path / 'watched' / 'metrics.jsonl'),
                                  str(tmp_path / 'watched.png'))
  with Image.open(inside) as a, Image.open(watched) as b:
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # A different AP curve is a different picture.
  write(tmp_path / 'watched' / 'eval.jsonl', [dict(r, **{'eval/AP': 0.05}) for r in eval_rows[:2]])
  other = visualize.plot_losses(str(tmp_path / 'watched' / 'metrics.jsonl'),
                                str(tmp_path / 'other.png'))
  with Image.open(inside) as a, Image.open(other) as b:
    assert not np.array_equal(np.asarray(a), np.asarray(b))
  (tmp_path / 'watched' / 'eval.jsonl').write_text('{"step": 3, "eval/AP": 0.2}\nbroken\n')
  with pytest.raises(ValueError, match='eval.jsonl: line 2 is not JSON'):
    visualize.plot_losses(str(tmp_path / 'watched' / 'metrics.jsonl'), str(tmp_path / 'x.png'))
