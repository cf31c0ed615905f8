"""MinVIS video inference (docs/method.md §1): per-frame forward in windows, online association,
video results.

Memory is flat in the number of frames, on the device and on the host. One jitted step runs a
window of frames (the last one padded and marked invalid, so one compiled shape serves the whole
video): the forward sharded over the local devices along the frame axis and the exact sequential
association. Every query's float16 mask logits at the model's resolution [Q, Hp/4, Wp/4] go to an
anonymous temporary file, not to memory; once the last frame has set the scores, a second jitted
step computes the masks of docs/method.md §1 (resize, crop, resize, threshold) of the top-k queries
only, window by window, and the host run-length encodes them.

With the 'ctvis' tracker (tracks that begin and end, minvis_jax/tracking.py) the step returns the
tracker's per-frame output and the masks in query order; the host follows the tracks
(`video_tracks.TrackBook`): a track scores over the frames where it has a query, and its mask is
empty in the others.

Only the top-k queries' masks are resized and encoded: resizing and encoding every query's masks
costs far more than the forward on a CPU at video resolutions, and a second forward for the top-k
would nearly double the time. The file holds Q x Hp/4 x Wp/4 float16 values a frame (on `$TMPDIR`),
written sequentially and read back for k queries.
"""

import functools
from typing import Any, Callable, Iterable, Iterator, NamedTuple

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from minvis_jax import frame_masks
from minvis_jax import tracking
from minvis_jax import video_tracks
from minvis_jax.data import transforms

P = jax.sharding.PartitionSpec


class Forward(NamedTuple):
  """The per-frame computation the predictor runs: the live Flax model (`model_forward.forward`)
  or an exported one (`exported.load(path).predictor_forward()`); the predictor needs nothing else
  of the model.

  apply(variables, images [N, Hp, Wp, 3] normalised and zero padded) -> {'pred_logits'
    [N, Q, K+1], 'pred_masks' [N, Q, Hp/4, Wp/4], 'pred_embds' [N, Q, C]} (float32; other keys
    are ignored); traced inside the predictor's jitted step. Hashable: the step is compiled once
    per Forward, mesh and tracker.
  num_queries, hidden_dim: Q and C (the association's state).
  reid_dim: D of 'pred_reid' [N, Q, D] when the model has a reid head (docs/reid.md), else 0.
  """
  apply: Callable[[Any, jax.Array], dict]
  num_queries: int
  hidden_dim: int
  reid_dim: int = 0


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


@functools.lru_cache(maxsize=16)
def _step_fn(model: Forward, mesh: jax.sharding.Mesh, tracker: tracking.Tracker):
  """The jitted window step of a forward, mesh and tracker, shared by every predictor (so a new
  predictor, e.g. per video, command or test, reuses the compiled step)."""
  frames = P('frames')

  def forward(variables, images):    # on each device: its own frames
    return model.apply(variables, images)

  def reorder_masks(masks, perm):    # on each device: its own frames, in track order
    return tracking.reorder(masks, perm).astype(jnp.float16)

  @jax.jit
  def step(variables, state, images, valid):
    out = jax.shard_map(forward, mesh=mesh, in_specs=(P(), frames), out_specs=frames)(
        variables, images)
    # The association is sequential over frames: it runs on the gathered embeddings [W, Q, C].
    state, perm = tracking.track_chunk(tracker, state, tracking.select_embeddings(tracker, out),
                                       out['pred_logits'], valid)
    if tracker.kind not in tracking.PERMUTING:
      # 'ctvis': the host follows its tracks (video_tracks.TrackBook); masks in query order.
      return state, (perm, out['pred_logits']), out['pred_masks'].astype(jnp.float16)
    logits = tracking.reorder(out['pred_logits'], perm)           # [W, Q, K+1]
    logit_sum = jnp.sum(jnp.where(valid[:, None, None], logits, 0.0), axis=0)
    masks = jax.shard_map(reorder_masks, mesh=mesh, in_specs=(frames, frames), out_specs=frames)(
        out['pred_masks'], perm)                                  # [W, Q, Hp/4, Wp/4] float16
    return state, logit_sum, masks
  return step


# Device bytes of one frame in the R50 forward per input pixel: an upper bound from the CPU peak
# RSS with one 384x640 frame per forward (1.5 GiB with the runtime and weights, see
# benchmarks/long_video.py); used by the 'auto' window on accelerators.
_BYTES_PER_PIXEL = 4096


def auto_window(padded_size: tuple[int, int], devices) -> int:
  """Frames per window from the device memory and frame size: one frame per device on CPU (host
  memory is shared and batching gains little there); elsewhere what half of the free memory of the
  smallest device holds, at most 16 frames per device."""
  n = len(devices)
  if devices[0].platform == 'cpu':
    return n
  free = []
  for d in devices:
    stats = d.memory_stats() or {}
    free.append(stats.get('bytes_limit', 0) - stats.get('bytes_in_use', 0))
  per_device = int(0.5 * min(free) // (_BYTES_PER_PIXEL * padded_size[0] * padded_size[1]))
  return n * min(max(per_device, 1), 16)


def local_replica(tree, mesh: jax.sharding.Mesh):
  """`tree` replicated over `mesh` (local devices); arrays sharded over other processes (e.g. an
  FSDP training state) are first gathered from them."""
  def put(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      x = multihost_utils.process_allgather(x, tiled=True)
    return jax.device_put(x, jax.sharding.NamedSharding(mesh, P()))
  return jax.tree.map(put, tree)


class VideoPredictor:
  """Runs MinVIS on one video at a time with a fixed model, window size and local devices.

  forward: the per-frame computation (`Forward`); variables: its first argument (the model's
    variables, or an exported model's weights), replicated over the devices.

  window: frames per device per forward, or 'auto'; a window of the video is `window` times the
    number of devices, split along the frame axis. A per-device batch rather than a total one:
    XLA's convolutions round differently at different batch sizes (by an ulp, enough to flip a
    mask pixel whose logit is within rounding of 0), so the same per-device batch on any number
    of devices gives the same tracks, scores and masks, bit for bit (tests/test_sharded_eval.py).
  top_k: tracks kept per video.
  tracker: the association (`tracking.Tracker`).
  devices: the devices a window is sharded over (default: all local devices).
  The values come from `config.inference` (`model_forward.from_config`), checked by
  `config_lib.validate`.
  """

  def __init__(self, forward: Forward, variables, window: int | str, top_k: int,
               tracker: tracking.Tracker, devices=None):
    devices = list(devices or jax.local_devices())
    self.mesh = jax.sharding.Mesh(np.array(devices), ('frames',))
    self.variables = local_replica(variables, self.mesh)
    self.window = window if window == 'auto' else window * len(devices)
    self.top_k = top_k
    self.tracker = tracker
    self.forward = forward
    self._init_state = tracking.initial_state(tracker, forward.num_queries,
                                              tracking.embedding_dim(tracker, forward))

  def frames_per_window(self, padded_size: tuple[int, int]) -> int:
    """Frames of one forward (all devices) for inputs of `padded_size` [Hp, Wp]."""
    if self.window == 'auto':
      return auto_window(tuple(padded_size), list(self.mesh.devices.flat))
    return self.window

  def __call__(self, images: Iterable[np.ndarray], valid_size: tuple[int, int],
               out_size: tuple[int, int]) -> list[dict]:
    """images: iterable of normalised, zero-padded frames [Hp, Wp, 3]; valid_size (h, w) of the
    resized image inside the padding; out_size (H, W) of the original frames.

    Returns the top-k tracks:
    {'category': 0-based class, 'score', 'segmentations': [RLE per frame]}.
    """
    images = iter(images)
    first = next(images, None)
    if first is None:
      raise ValueError('a video needs at least one frame')
    padded_size = tuple(np.shape(first)[:2])
    valid_size, out_size = tuple(valid_size), tuple(out_size)
    window = self.frames_per_window(padded_size)
    step = _step_fn(self.forward, self.mesh, self.tracker)
    frames = jax.sharding.NamedSharding(self.mesh, P('frames'))

    book = video_tracks.for_tracker(self.tracker, self.forward.num_queries, self.top_k)
    state, pending, store = self._init_state, None, frame_masks.LogitStore()
    try:
      for batch, valid in _windows(_chain(first, images), window):
        state, output, masks = step(self.variables, state, jax.device_put(batch, frames),
                                    jnp.asarray(valid))
        # Write the previous window on the host while the device runs this one.
        if pending is not None:
          _store_window(store, book, *pending)
        pending = output, masks, valid
      _store_window(store, book, *pending)

      picks = book.select(self.top_k)
      segs = self._top_k_masks(store, picks.rows, len(picks.scores), window, padded_size,
                               valid_size, out_size)
      return [{'category': int(c), 'score': float(score), 'segmentations': seg}
              for c, score, seg in zip(picks.categories, picks.scores, segs)]
    finally:
      store.close()

  def _top_k_masks(self, store, rows, k, window, padded_size, valid_size, out_size):
    """The RLEs of k picks in every frame of `store`, rows(frame) [k] their rows in it (-1: an
    empty mask): [k][frames] dicts."""
    to_bits = frame_masks.masks_fn(self.mesh, padded_size, valid_size, out_size)
    frames = jax.sharding.NamedSharding(self.mesh, P('frames'))
    size = list(out_size)
    segs = [[] for _ in range(k)]
    if not k:
      return segs
    pending = None
    for start in range(0, store.frames, window):
      n = min(window, store.frames - start)
      batch = np.zeros((window, k, *store.shape[1:]), np.float16)
      for i in range(n):
        batch[i] = store.read(start + i, rows(start + i))
      bits = to_bits(jax.device_put(batch, frames))
      # Encode the previous window on the host while the device runs this one.
      if pending is not None:
        _encode_window(segs, *pending, size)
      pending = bits, n
    if pending is not None:
      _encode_window(segs, *pending, size)
    return segs


def _store_window(store: frame_masks.LogitStore, book, output, masks: jax.Array,
                  valid: np.ndarray) -> None:
  """One window's step output on the host: the scores into `book`, the valid frames' masks into
  `store`."""
  book.add_window(output, valid)
  for m in np.asarray(masks)[valid]:
    store.add(m)


def _encode_window(segs: list[list[dict]], bits: jax.Array, n: int, size: list[int]) -> None:
  for frame_bits in np.asarray(bits)[:n]:
    for track, counts in zip(segs, frame_masks.encode(frame_bits, size)):
      track.append({'size': size, 'counts': counts.decode()})


def _chain(first, rest):
  yield first
  yield from rest


def results_for_video(tracks: list[dict], video_id, category_ids: list[int]) -> list[dict]:
  """Tracks of `VideoPredictor` -> results-file entries (dataset category ids)."""
  return [{'video_id': video_id, 'category_id': int(category_ids[t['category']]),
           'score': t['score'], 'segmentations': t['segmentations']} for t in tracks]


def preprocess(frames: Iterable[np.ndarray], data_config) -> Iterator[np.ndarray]:
  """uint8 frames -> the model's test input (docs/method.md §1): resized, normalised, padded."""
  for frame in frames:
    yield transforms.test_frame(frame, data_config.min_size_test, data_config.max_size_test,
                                data_config.mean, data_config.std,
                                data_config.size_divisibility)[0]


def valid_size(height: int, width: int, data_config) -> tuple[int, int]:
  return transforms.resize_shape(height, width, data_config.min_size_test,
                                 data_config.max_size_test,
                                 ('data.min_size_test', 'data.max_size_test'))
