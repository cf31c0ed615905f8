"""Video inference: windows give the same tracks as one pass; results match a direct computation."""

import jax
import numpy as np
from pycocotools import mask as mask_utils
from scipy.optimize import linear_sum_assignment

from minvis_jax import config_lib
from minvis_jax import inference
from minvis_jax.models import Mask2Former


def _setup(t=7):
  cfg = config_lib.tiny_model(num_classes=4)
  rng = np.random.default_rng(0)
  images = rng.normal(size=(t, 64, 96, 3)).astype(np.float32)
  images[:, 56:] = 0  # valid image is 56x96 inside the padding
  variables = Mask2Former(cfg).init(jax.random.PRNGKey(0), images[:1])
  return cfg, variables, images


def test_windows_equal_one_pass_and_shapes():
  cfg, variables, images = _setup()
  one = inference.VideoPredictor(cfg, variables, window=7, top_k=5)(images, (56, 96), (112, 192))
  win = inference.VideoPredictor(cfg, variables, window=3, top_k=5)(images, (56, 96), (112, 192))
  assert len(one) == 5
  for a, b in zip(one, win):
    assert a['category'] == b['category'] and abs(a['score'] - b['score']) < 1e-6
    assert len(a['segmentations']) == 7
    for ra, rb in zip(a['segmentations'], b['segmentations']):
      assert ra['size'] == [112, 192]
      np.testing.assert_array_equal(mask_utils.decode(ra), mask_utils.decode(rb))


def test_scores_and_masks_match_a_direct_computation():
  cfg, variables, images = _setup()
  tracks = inference.VideoPredictor(cfg, variables, window=4, top_k=3)(images, (56, 96), (56, 96))
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


def test_results_for_video_uses_dataset_category_ids():
  tracks = [{'category': 1, 'score': 0.5, 'segmentations': [None]}]
  res = inference.results_for_video(tracks, 'v7', [10, 20, 30])
  assert res == [{'video_id': 'v7', 'category_id': 20, 'score': 0.5, 'segmentations': [None]}]


def test_2000_frames_with_flat_device_memory(monkeypatch):
  cfg = config_lib.tiny_model(num_classes=4)
  variables = Mask2Former(cfg).init(jax.random.PRNGKey(0), np.zeros((1, 64, 64, 3), np.float32))
  live = []
  windows = inference._windows

  def recording(images, window):
    for item in windows(images, window):
      live.append(sum(x.nbytes for x in jax.live_arrays()))
      yield item

  monkeypatch.setattr(inference, '_windows', recording)
  frames = (np.full((64, 64, 3), np.sin(t / 50.0), np.float32) for t in range(2000))
  tracks = inference.VideoPredictor(cfg, variables, window=100, top_k=2)(frames, (64, 64), (64, 64))
  assert len(tracks) == 2 and all(len(t['segmentations']) == 2000 for t in tracks)
  assert len(live) == 20
  # Device memory after the first windows stays the same however many frames have passed.
  assert max(live[2:]) - min(live[2:]) == 0, live
