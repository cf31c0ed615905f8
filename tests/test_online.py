"""The online tracker: per-frame tracks under the report and retire rules (a scripted forward whose
answers are known), and its end-of-stream summary against the offline predictor (tiny model)."""

import os
import subprocess
import sys
import tracemalloc

import jax
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from support import videos
from support.tracks import assert_same_tracks
from support.variables import random_variables
from minvis_jax import config_lib
from minvis_jax import model_forward
from minvis_jax import online
from minvis_jax import predictor
from minvis_jax import tracking
from minvis_jax.models import ModelConfig

SPEC = online.InputSpec(64, 96, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), 32)   # 64x96 stays 64x96
MINVIS = tracking.Tracker('minvis', 0.0, 0.0)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OBJECT, BACKGROUND = np.array([8.0, -8.0, -8.0]), np.array([-8.0, -8.0, 8.0])   # K = 2 classes


def _block(top, left, h=4, w=6):
  """A mask at the model's resolution 16x24 (64x96 / 4): +10 in a block, -10 elsewhere."""
  m = np.full((16, 24), -10.0, np.float32)
  m[top:top + h, left:left + w] = 10.0
  return m


class ScriptedForward:
  """Four query slots with one-hot embeddings (so the association recovers them whatever order the
  queries come in), shuffled from the second frame on:
    A: class 0, visible in every frame;
    B: class 1, its mask empty in frames 3-7;
    C: background throughout;
    D: background until frame 3, class 0 from frame 4 (mask always non-empty)."""

  def __init__(self, seed=0):
    self.t, self.rng, self.calls = 0, np.random.default_rng(seed), 0

  def frame(self, t):
    logits = np.stack([OBJECT, OBJECT[[1, 0, 2]], BACKGROUND,
                       OBJECT if t >= 4 else BACKGROUND])
    empty = np.full((16, 24), -10.0, np.float32)
    masks = np.stack([_block(1, 2), empty if 3 <= t <= 7 else _block(8, 14), _block(10, 1),
                      _block(2, 16)])
    embds = np.eye(4, dtype=np.float32)
    order = self.rng.permutation(4) if t else np.arange(4)
    return logits[order], masks[order], embds[order]

  def __call__(self, images):
    assert images.shape[1:] == (64, 96, 3) and images.dtype == np.float32
    self.calls += 1
    out = [self.frame(self.t + i) for i in range(len(images))]
    self.t += len(images)
    logits, masks, embds = (np.stack(x) for x in zip(*out))
    return {'pred_logits': logits, 'pred_masks': masks, 'pred_embds': embds}


def _frames(n):
  return [np.zeros((64, 96, 3), np.uint8) for _ in range(n)]


def _upsampled(m):
  return np.asarray(jax.image.resize(m, (64, 96), 'bilinear', antialias=False) > 0)


def _decode(rle):
  return mask_utils.decode(dict(rle, counts=rle['counts'].encode()))


@pytest.mark.parametrize('chunk', [1, 3])
def test_ids_are_stable_and_retired_tracks_never_return(chunk):
  forward = ScriptedForward()
  tracker = online.OnlineTracker(forward, MINVIS, SPEC, online.Rules(0.5, 3))
  frames = _frames(12)
  results = []
  for start in range(0, 12, chunk):
    results += tracker.process(frames[start:start + chunk])
  assert forward.calls == 12 // chunk and [r.frame for r in results] == list(range(12))
  # A is track 1 throughout; B is track 2 until its mask empties (frame 3), is retired after 3
  # unseen frames (3, 4, 5) and comes back as track 4 at frame 8; D becomes track 3 at frame 5 (at
  # frame 4 its running score since its segment restarted at frame 3 is softmax([0, -8, 0])[0] <
  # 0.5); C (background) is never reported.
  ids = [[t['id'] for t in r.tracks] for r in results]
  assert ids == [[1, 2]] * 3 + [[1]] * 2 + [[1, 3]] * 3 + [[1, 3, 4]] * 4
  categories = {t['id']: t['category'] for r in results for t in r.tracks}
  assert categories == {1: 0, 2: 1, 3: 0, 4: 1}
  assert tracker.live_tracks.keys() == {0, 1, 3}
  assert sorted(tracker.live_tracks.values()) == [1, 3, 4]
  d = [t for t in results[5].tracks if t['id'] == 3][0]
  # Its segment began at frame 3: the mean of one background and two object frames.
  expected = np.exp(8 / 3) / (np.exp(8 / 3) + np.exp(-8) + np.exp(-8 / 3))   # [8/3, -8, -8/3]
  assert d['score'] == pytest.approx(expected, rel=1e-6)
  a = results[11].tracks[0]
  assert a['score'] == pytest.approx(1 / (1 + 2 * np.exp(-16.0)), rel=1e-6)
  # Masks at the original size: the block's logits upsampled bilinearly (jax.image.resize,
  # half-pixel centres, as docs/method.md §1) and thresholded at 0.
  for r in results:
    for t in r.tracks:
      assert t['segmentation']['size'] == [64, 96]
    expected_a = _upsampled(_block(1, 2))
    np.testing.assert_array_equal(_decode(r.tracks[0]['segmentation']), expected_a)
  b = [t for t in results[9].tracks if t['id'] == 4][0]
  np.testing.assert_array_equal(_decode(b['segmentation']),
                                _upsampled(_block(8, 14)))


def test_a_frame_of_another_size_is_an_error_naming_it():
  tracker = online.OnlineTracker(ScriptedForward(), MINVIS, SPEC)
  tracker.process(_frames(2))
  with pytest.raises(ValueError, match=r'^frame 3 is 32x48, the stream is 64x96$'):
    tracker.process([np.zeros((64, 96, 3), np.uint8), np.zeros((32, 48, 3), np.uint8)])
  # Within the first chunk too.
  fresh = online.OnlineTracker(ScriptedForward(), MINVIS, SPEC)
  with pytest.raises(ValueError, match=r'^frame 1 is 32x48, the stream is 64x96$'):
    fresh.process([np.zeros((64, 96, 3), np.uint8), np.zeros((32, 48, 3), np.uint8)])
  with pytest.raises(ValueError, match='summary=True'):
    tracker.finish()


def test_memory_stays_bounded_on_a_long_stream():
  """Host memory does not grow with the stream: objects come and go for 600 frames."""
  class Churn(ScriptedForward):
    def frame(self, t):
      logits, masks, embds = super().frame(t % 12)   # B and D are retired and reborn every cycle
      return logits, masks, embds
  tracker = online.OnlineTracker(Churn(), MINVIS, SPEC, online.Rules(0.5, 2))
  tracemalloc.start()
  try:
    for i in range(600):
      tracker.process(_frames(1))
      assert len(tracker.live_tracks) <= 4
      if i == 99:
        base = tracemalloc.get_traced_memory()[0]
    grown = tracemalloc.get_traced_memory()[0] - base
  finally:
    tracemalloc.stop()
  assert tracker._next_id > 40    # a track was born and retired every cycle of 12 frames
  assert grown < 32 * 1024, grown


def test_rules_come_from_the_config_with_the_common_defaults():
  config = config_lib.load_config('tiny')
  assert online.rules_from_config(config) == online.Rules()
  config_lib.apply_overrides(config, ['inference.online_report_score=0.6',
                                      'inference.online_retire_frames=2'])
  assert online.rules_from_config(config) == online.Rules(0.6, 2)
  del config.inference['online_retire_frames']    # a config saved before the key existed
  assert online.rules_from_config(config).retire_frames == online.Rules().retire_frames


@pytest.mark.parametrize('tracker_kind,chunk', [('minvis', 1), ('memory', 2)])
def test_summary_equals_the_offline_predictor(tiny_config, tracker_kind, chunk):
  """Fed frame by frame (or `chunk` at a time), the online tracker's end-of-stream result is the
  offline predictor's for the same video and config (its window = the chunk), bit for bit."""
  config = tiny_config
  config.inference.tracker = tracker_kind
  config.inference.memory_min_score = 0.3
  model_config = ModelConfig.from_config(config.model)
  variables = random_variables(config.model, seed=1)
  frames = videos.moving_square_frames(5)
  tracker = tracking.tracker_from_config(config)
  offline = predictor.VideoPredictor(model_forward.forward(model_config), variables, chunk, 6,
                                     tracker, jax.devices()[:1])(
      predictor.preprocess(frames, config.data), predictor.valid_size(64, 96, config.data),
      (64, 96))
  # Report score 0: every query slot with a non-empty mask is reported in each frame.
  stream = online.OnlineTracker(model_forward.frame_forward(model_config, variables), tracker,
                                online.input_spec_from_config(config.data),
                                online.Rules(0.0, 3), top_k=6, summary=True)
  per_frame = []
  for start in range(0, len(frames), chunk):
    per_frame += stream.process(frames[start:start + chunk])
  summary = stream.finish()
  assert len(summary) == 6
  assert_same_tracks(summary, offline)
  # A frame's reported masks are its query slots' masks: the offline tracks' (non-empty) masks of
  # that frame are among them.
  for t, result in enumerate(per_frame):
    reported = {track['segmentation']['counts'] for track in result.tracks}
    assert len({track['id'] for track in result.tracks}) == len(result.tracks)
    for track in offline:
      seg = track['segmentations'][t]
      if mask_utils.area(dict(seg, counts=seg['counts'].encode())):
        assert seg['counts'] in reported, (t, track['category'])


def test_the_online_module_needs_no_model_code():
  """An exported model plugs in as the forward: importing and running the tracker with the Flax
  model modules blocked from import works."""
  code = """
import sys
for name in ('minvis_jax.models', 'flax'):
  sys.modules[name] = None   # any import of them raises ImportError
import numpy as np
from minvis_jax import online, tracking
logits = np.array([[[8.0, -8.0, -8.0], [-8.0, -8.0, 8.0]]], np.float32)   # slot 0 an object
masks = np.full((1, 2, 16, 24), -10.0, np.float32)
masks[:, :, 2:6, 3:9] = 10.0
out = {'pred_logits': logits, 'pred_masks': masks, 'pred_embds': np.eye(2, dtype=np.float32)[None]}
tracker = online.OnlineTracker(lambda images: out, tracking.Tracker('minvis', 0.0, 0.0),
                               online.InputSpec(64, 96, (0, 0, 0), (1, 1, 1)), summary=True)
frames = [np.zeros((64, 96, 3), np.uint8)] * 3
print([[t['id'] for t in tracker.process([f])[0].tracks] for f in frames])
print(len(tracker.finish()))
"""
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=REPO,
                        env=env, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.split('\n')[:2] == ['[[1], [1], [1]]', '4']   # top-k: 2 slots x 2 classes
