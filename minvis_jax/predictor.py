"""MinVIS video inference (SPEC 1): per-frame forward in windows, online association, video results.

Device memory is flat in the number of frames: one jitted forward over `window` frames at a time
(the last window padded and marked invalid, so one compiled shape serves the whole video). The host
keeps, per frame, the reordered stride-4 mask logits as float16 (top-k is only known at the end).
"""

import functools
import json
from typing import Iterable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from pycocotools import mask as mask_utils

from minvis_jax import tracking
from minvis_jax.data import transforms
from minvis_jax.models import Mask2Former


def _windows(images: Iterable[np.ndarray], window: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Frames [Hp, Wp, 3] -> (batch [window, Hp, Wp, 3], valid [window]); the last one padded."""
  batch = []
  for image in images:
    batch.append(np.asarray(image, np.float32))
    if len(batch) == window:
      yield np.stack(batch), np.ones(window, bool)
      batch = []
  if batch:
    n = len(batch)
    pad = [np.zeros_like(batch[0])] * (window - n)
    yield np.stack(batch + pad), np.arange(window) < n


@functools.lru_cache(maxsize=8)
def _step_fn(model_config_json: str, tracker: tracking.Tracker = tracking.Tracker()):
  """The jitted window step of a model config, shared by every predictor of that model (so a new
  predictor, e.g. per command or per test, reuses the compiled forward of the same shapes)."""
  model = Mask2Former(ml_collections.ConfigDict(json.loads(model_config_json)))

  @jax.jit
  def step(variables, state, images, valid):
    out = model.apply(variables, images)
    state, perm = tracking.track_chunk(tracker, state, out['pred_embds'], out['pred_logits'],
                                       valid)
    logits = tracking.reorder(out['pred_logits'], perm)           # [W, Q, K+1]
    masks = tracking.reorder(out['pred_masks'], perm)             # [W, Q, H/4, W/4]
    logit_sum = jnp.sum(jnp.where(valid[:, None, None], logits, 0.0), axis=0)
    return state, logit_sum, masks.astype(jnp.float16)
  return step


class VideoPredictor:
  """Runs MinVIS on one video at a time with a fixed model and window size."""

  def __init__(self, model_config, variables, window: int = 30, top_k: int = 10,
               tracker: tracking.Tracker = tracking.Tracker()):
    self.variables = variables
    self.window = window
    self.top_k = top_k
    self._step = _step_fn(model_config.to_json(), tracker)
    self._init_state = tracking.init_state(model_config.num_queries, model_config.hidden_dim)

  def __call__(self, images: Iterable[np.ndarray], valid_size: tuple[int, int],
               out_size: tuple[int, int]) -> list[dict]:
    """images: iterable of normalised, zero-padded frames [Hp, Wp, 3]; valid_size (h, w) of the
    resized image inside the padding; out_size (H, W) of the original frames.

    Returns the top-k tracks:
    {'category': 0-based class, 'score', 'segmentations': [RLE per frame]}.
    """
    state = self._init_state
    logit_sum, frames, padded_size = None, [], None
    for batch, valid in _windows(images, self.window):
      padded_size = batch.shape[1:3]
      state, s, masks = self._step(self.variables, state, jnp.asarray(batch), jnp.asarray(valid))
      logit_sum = s if logit_sum is None else logit_sum + s
      frames.extend(np.asarray(masks)[valid])
    if not frames:
      raise ValueError('a video needs at least one frame')
    probs = jax.nn.softmax(logit_sum / len(frames), axis=-1)[:, :-1]    # [Q, K]
    num_classes = probs.shape[1]
    k = min(self.top_k, probs.size)
    scores, flat = jax.lax.top_k(probs.reshape(-1), k)
    queries = np.asarray(flat) // num_classes
    resize = _mask_resizer(tuple(padded_size), tuple(valid_size), tuple(out_size))
    segs = [[] for _ in range(k)]
    for frame in frames:
      binary = np.asarray(resize(jnp.asarray(frame[queries], jnp.float32)))   # [k, H, W] bool
      rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0).astype(np.uint8)))
      for i, r in enumerate(rles):
        segs[i].append({'size': r['size'], 'counts': r['counts'].decode()})
    return [{'category': int(c), 'score': float(s), 'segmentations': seg}
            for c, s, seg in zip(np.asarray(flat) % num_classes, np.asarray(scores), segs)]


@functools.lru_cache(maxsize=16)  # one compiled resize per frame geometry, shared by all videos
def _mask_resizer(padded_size, valid_size, out_size):
  """Mask logits [k, Hp/4, Wp/4] -> bool [k, H, W]: to the padded input size, crop the valid
  image, to the original size (bilinear, no antialias), threshold at logit > 0 (SPEC 1)."""
  hp, wp = padded_size
  h, w = valid_size
  oh, ow = out_size

  @jax.jit
  def resize(m):
    m = jax.image.resize(m, (m.shape[0], hp, wp), 'bilinear', antialias=False)[:, :h, :w]
    return jax.image.resize(m, (m.shape[0], oh, ow), 'bilinear', antialias=False) > 0
  return resize


def results_for_video(tracks: list[dict], video_id, category_ids: list[int]) -> list[dict]:
  """Tracks of `VideoPredictor` -> results-file entries (dataset category ids)."""
  return [{'video_id': video_id, 'category_id': int(category_ids[t['category']]),
           'score': t['score'], 'segmentations': t['segmentations']} for t in tracks]


def preprocess(frames: Iterable[np.ndarray], data_config) -> Iterator[np.ndarray]:
  """uint8 frames -> the model's test input (SPEC 1): resized, normalised, padded."""
  for frame in frames:
    yield transforms.test_frame(frame, data_config.min_size_test, data_config.max_size_test,
                                data_config.mean, data_config.std,
                                data_config.size_divisibility)[0]


def valid_size(height: int, width: int, data_config) -> tuple[int, int]:
  return transforms.resize_shape(height, width, data_config.min_size_test,
                                 data_config.max_size_test)


def from_config(config, variables, top_k: int | None = None,
               window: int | None = None) -> VideoPredictor:
  inf = config.get('inference', {}) or {}
  return VideoPredictor(config.model, variables, window or inf.get('window', 30),
                        top_k or inf.get('top_k', 10), tracking.tracker_from_config(config))


