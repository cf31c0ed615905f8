"""The video predictor: windows give the same tracks as one pass; results match a direct
computation and the predictor that kept dense logits on the host; memory stays flat."""

import functools
import gc
import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pycocotools import mask as mask_utils
from scipy.optimize import linear_sum_assignment

from support.tracks import assert_same_tracks
from minvis_jax import config_lib  # noqa: F401  (registers minvis_jax.configs in a checkout)
from minvis_jax import frame_masks
from minvis_jax import model_forward
from minvis_jax import predictor
from minvis_jax import tracking
from minvis_jax.configs import common
from minvis_jax.models import Mask2Former
from minvis_jax.models import ModelConfig

MINVIS = tracking.Tracker('minvis', 0.7, 0.0)   # configs/common.py's inference.* ('minvis')


def _setup(t=7):
  cfg = ModelConfig.from_config(common.tiny_model(num_classes=4))
  rng = np.random.default_rng(0)
  images = rng.normal(size=(t, 64, 96, 3)).astype(np.float32)
  images[:, 56:] = 0  # valid image is 56x96 inside the padding
  variables = jax.jit(Mask2Former(cfg).init)(jax.random.PRNGKey(0), images[:1])
  return cfg, variables, images


def test_windows_equal_one_pass_and_shapes():
  cfg, variables, images = _setup()
  one_device = jax.devices()[:1]
  one = predictor.VideoPredictor(model_forward.forward(cfg), variables, window=7, top_k=5,
                                 tracker=MINVIS, devices=one_device)(
      images, (56, 96), (112, 192))
  win = predictor.VideoPredictor(model_forward.forward(cfg), variables, window=3, top_k=5,
                                 tracker=MINVIS, devices=one_device)(
      images, (56, 96), (112, 192))
  assert len(one) == 5
  for a, b in zip(one, win):
    assert a['category'] == b['category'] and abs(a['score'] - b['score']) < 1e-6
    assert len(a['segmentations']) == 7
    for ra, rb in zip(a['segmentations'], b['segmentations']):
      assert ra['size'] == [112, 192]
      np.testing.assert_array_equal(mask_utils.decode(ra), mask_utils.decode(rb))


@functools.lru_cache(maxsize=2)
def _reference_step(model_config):
  model = Mask2Former(model_config)

  @jax.jit
  def step(variables, state, batch, valid):
    out = model.apply(variables, batch)
    state, perm = tracking.associate_chunk(state, out['pred_embds'], valid)
    logits = tracking.reorder(out['pred_logits'], perm)
    masks = tracking.reorder(out['pred_masks'], perm)
    s = jnp.sum(jnp.where(valid[:, None, None], logits, 0.0), axis=0)
    return state, s, masks.astype(jnp.float16)
  return step


@functools.lru_cache(maxsize=2)
def _reference_resize(padded_size, valid_size, out_size):
  (hp, wp), (h, w) = padded_size, valid_size

  @jax.jit
  def resize(m):
    m = jax.image.resize(m, (m.shape[0], hp, wp), 'bilinear', antialias=False)[:, :h, :w]
    return jax.image.resize(m, (m.shape[0], *out_size), 'bilinear', antialias=False) > 0
  return resize


def _reference_predict(cfg, variables, images, valid_size, out_size, window, top_k):
  """The predictor before host memory was made flat (kept as the reference): dense float16 mask
  logits of every query for every frame on the host, top-k picked and resized at the end."""
  step = _reference_step(cfg)
  state = tracking.init_state(cfg.num_queries, cfg.hidden_dim)
  logit_sum, frames = None, []
  for batch, valid in predictor._windows(images, window):
    state, s, masks = step(variables, state, jnp.asarray(batch), jnp.asarray(valid))
    logit_sum = s if logit_sum is None else logit_sum + s
    frames.extend(np.asarray(masks)[valid])
  probs = jax.nn.softmax(logit_sum / len(frames), axis=-1)[:, :-1]
  k = min(top_k, probs.size)
  scores, flat = jax.lax.top_k(probs.reshape(-1), k)
  queries = np.asarray(flat) // probs.shape[1]
  resize = _reference_resize(tuple(np.shape(images[0])[:2]), tuple(valid_size), tuple(out_size))
  segs = [[] for _ in range(k)]
  for frame in frames:
    binary = np.asarray(resize(jnp.asarray(frame[queries], jnp.float32)))
    rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0).astype(np.uint8)))
    for i, r in enumerate(rles):
      segs[i].append({'size': r['size'], 'counts': r['counts'].decode()})
  return [{'category': int(c), 'score': float(s), 'segmentations': seg}
          for c, s, seg in zip(np.asarray(flat) % probs.shape[1], np.asarray(scores), segs)]


def test_same_tracks_as_the_dense_logits_reference():
  """Videos of 1, 6 and 14 frames (over three windows): the results of the predictor that kept
  dense logits on the host."""
  cfg = ModelConfig.from_config(common.tiny_model(num_classes=4))
  rng = np.random.default_rng(5)
  size, valid_size, out_size = (64, 96), (56, 96), (100, 150)
  variables = jax.jit(Mask2Former(cfg).init)(jax.random.PRNGKey(5),
                                             np.zeros((1, *size, 3), np.float32))
  one_device = predictor.VideoPredictor(model_forward.forward(cfg), variables, window=4, top_k=6,
                                        tracker=MINVIS, devices=jax.devices()[:1])
  for t in (1, 6, 14):
    images = rng.normal(size=(t, *size, 3)).astype(np.float32)
    images[:, valid_size[0]:] = 0
    ours = one_device(images, valid_size, out_size)
    ref = _reference_predict(cfg, variables, images, valid_size, out_size, 4, 6)
    assert len(ours) == 6 and all(len(x['segmentations']) == t for x in ours)
    assert_same_tracks(ours, ref)
    # Non-trivial masks: some track covers part of some frame, not all or nothing everywhere.
    areas = [mask_utils.area(dict(s, counts=s['counts'].encode())) for x in ours
             for s in x['segmentations']]
    assert any(0 < a < out_size[0] * out_size[1] for a in areas)


def test_scores_and_masks_match_a_direct_computation():
  cfg, variables, images = _setup()
  tracks = predictor.VideoPredictor(model_forward.forward(cfg), variables, window=4, top_k=3,
                                    tracker=MINVIS, devices=jax.devices()[:1])(
      images, (56, 96), (56, 96))
  out = jax.tree.map(np.asarray, Mask2Former(cfg).apply(variables, images))
  e = out['pred_embds'] / np.linalg.norm(out['pred_embds'], axis=-1, keepdims=True)
  perm = [np.arange(e.shape[1])]
  prev = e[0]
  for t in range(1, len(e)):
    _, cols = linear_sum_assignment(1 - prev @ e[t].T)
    perm.append(cols)
    prev = e[t][cols]
  logits = np.stack([out['pred_logits'][t][p] for t, p in enumerate(perm)]).mean(0)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs = (probs / probs.sum(-1, keepdims=True))[:, :-1]
  best = np.argsort(-probs.reshape(-1), kind='stable')[:3]
  np.testing.assert_allclose([t['score'] for t in tracks], probs.reshape(-1)[best], rtol=1e-5)
  assert [t['category'] for t in tracks] == list(best % 4)
  # Frame 0's mask of the best track: upsample x4 (to the padded size), crop, threshold.
  q = best[0] // 4
  logits0 = out['pred_masks'][0][perm[0][q]].astype(np.float16).astype(np.float32)
  up = np.asarray(jax.image.resize(logits0, (64, 96), 'bilinear', antialias=False))[:56] > 0
  np.testing.assert_array_equal(mask_utils.decode(tracks[0]['segmentations'][0]), up)


def test_full_temporary_disk_is_a_clear_error(monkeypatch):
  import errno

  class FullDisk:
    def write(self, data):
      raise OSError(errno.ENOSPC, 'No space left on device')

    def close(self):
      pass

  cfg, variables, images = _setup(t=2)
  monkeypatch.setattr(frame_masks.tempfile, 'TemporaryFile', FullDisk)
  with pytest.raises(OSError, match=r'frame 0 .*No space left on device.*MiB .*TMPDIR'):
    predictor.VideoPredictor(model_forward.forward(cfg), variables, window=2, top_k=10,
                             tracker=MINVIS)(images, (56, 96), (56, 96))


def test_results_for_video_uses_dataset_category_ids():
  tracks = [{'category': 1, 'score': 0.5, 'segmentations': [None]}]
  res = predictor.results_for_video(tracks, 'v7', [10, 20, 30])
  assert res == [{'video_id': 'v7', 'category_id': 20, 'score': 0.5, 'segmentations': [None]}]


def test_2000_frames_with_flat_device_and_host_memory(monkeypatch):
  cfg = ModelConfig.from_config(common.tiny_model(num_classes=4))
  variables = jax.jit(Mask2Former(cfg).init)(jax.random.PRNGKey(0),
                                             np.zeros((1, 64, 64, 3), np.float32))
  live, host = [], []
  windows = predictor._windows

  def recording(images, window):
    for item in windows(images, window):
      live.append(sum(x.nbytes for x in jax.live_arrays()))
      # Live memory, not the cyclic collector's timing (a window's input can wait for it).
      gc.collect()
      host.append(tracemalloc.get_traced_memory()[0])
      yield item

  monkeypatch.setattr(predictor, '_windows', recording)
  frames = (np.full((64, 64, 3), np.sin(t / 50.0), np.float32) for t in range(2000))
  tracemalloc.start()
  try:
    tracks = predictor.VideoPredictor(model_forward.forward(cfg), variables, window=100, top_k=2,
                                      tracker=MINVIS, devices=jax.devices()[:1])(
        frames, (64, 64), (64, 64))
  finally:
    tracemalloc.stop()
  assert len(tracks) == 2 and all(len(t['segmentations']) == 2000 for t in tracks)
  assert len(live) == 20
  # Device memory after the first windows stays the same however many frames have passed.
  assert max(live[2:]) - min(live[2:]) == 0, live
  # Host memory over the last 1,300+ frames grows by the RLE offsets only (< 0.6 KB a frame; the
  # minima skip transient buffers); the dense float16 logits the predictor used to keep were
  # 20 queries x 16 x 16 x 2 B = 10 KB a frame.
  assert min(host[-5:]) - min(host[2:7]) < 1300 * 600, host
