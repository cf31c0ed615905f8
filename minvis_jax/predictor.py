"""MinVIS video inference (docs/method.md §1): per-frame forward in windows, online association,
video results.

Memory is flat in the number of frames, on the device and on the host. One jitted step runs a
window of frames (the last one padded and marked invalid, so one compiled shape serves the whole
video): the forward sharded over the local devices along the frame axis and the exact sequential
association. Every query's float16 mask logits at the model's resolution [Q, Hp/4, Wp/4] go to an
anonymous temporary file, not to memory; once the last frame has set the scores, a second jitted
step computes the masks of docs/method.md §1 (resize, crop, resize, threshold) of the top-k queries
only, window by window, and the host run-length encodes them.

Only the top-k queries' masks are resized and encoded: resizing and encoding every query's masks
costs far more than the forward on a CPU at video resolutions, and a second forward for the top-k
would nearly double the time. The file holds Q x Hp/4 x Wp/4 float16 values a frame (on `$TMPDIR`),
written sequentially and read back for k queries.
"""

import functools
import os
import tempfile
from typing import Iterable, Iterator

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
from pycocotools import mask as mask_utils

from minvis_jax import ops
from minvis_jax import tracking
from minvis_jax.data import transforms
from minvis_jax.models import Mask2Former
from minvis_jax.models import ModelConfig

P = jax.sharding.PartitionSpec


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


def _mask_logits_t(m: jnp.ndarray, padded_size, valid_size, out_size) -> jnp.ndarray:
  """Mask logits [Q, Hp/4, Wp/4] -> [Q, W, H] (transposed: pycocotools' column-major order) at the
  original size: to the padded input size, crop the valid image, to the original size (bilinear,
  no antialias; docs/method.md §1).

  The three steps are linear along each axis, so they are applied as one product per axis with the
  composed [H, Hp/4] and [W, Wp/4] matrices (computed in float64): the same values as resizing
  twice up to float32 rounding, with far fewer flops.
  """
  (hp, wp), (h, w) = padded_size, valid_size
  rows = ops.bilinear_matrix(h, out_size[0]) @ ops.bilinear_matrix(m.shape[1], hp)[:h]  # [H, Hp/4]
  cols = ops.bilinear_matrix(w, out_size[1]) @ ops.bilinear_matrix(m.shape[2], wp)[:w]  # [W, Wp/4]
  # float16 first: the logits the earlier host-side implementation kept, so results are unchanged.
  m = m.astype(jnp.float16).astype(jnp.float32)
  highest = jax.lax.Precision.HIGHEST   # as jax.image.resize: no bfloat16 passes on TPU
  m = jnp.einsum('qhx,Xx->qXh', m, jnp.asarray(cols, jnp.float32), precision=highest)
  return jnp.einsum('qXh,Yh->qXY', m, jnp.asarray(rows, jnp.float32), precision=highest)


@functools.lru_cache(maxsize=16)
def _step_fn(model_config: ModelConfig, mesh: jax.sharding.Mesh, tracker: tracking.Tracker):
  """The jitted window step of a model config, mesh and tracker, shared by every predictor (so a
  new predictor, e.g. per video, command or test, reuses the compiled step)."""
  model = Mask2Former(model_config)
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
    logits = tracking.reorder(out['pred_logits'], perm)           # [W, Q, K+1]
    logit_sum = jnp.sum(jnp.where(valid[:, None, None], logits, 0.0), axis=0)
    masks = jax.shard_map(reorder_masks, mesh=mesh, in_specs=(frames, frames), out_specs=frames)(
        out['pred_masks'], perm)                                  # [W, Q, Hp/4, Wp/4] float16
    return state, logit_sum, masks
  return step


@functools.lru_cache(maxsize=16)
def _masks_fn(mesh: jax.sharding.Mesh, padded_size, valid_size, out_size):
  """Jitted: float16 logits [W, k, Hp/4, Wp/4] -> masks (docs/method.md §1) packed 8 pixels to a
  byte, column major (pycocotools' order) [W, k, ceil(H*W/8)] uint8, sharded over the frames."""
  def to_bits(masks):                # on each device: its own frames, one frame at a time
    def one(m):
      binary = _mask_logits_t(m, padded_size, valid_size, out_size) > 0    # [k, W, H]
      return jnp.packbits(binary.reshape(binary.shape[0], -1), axis=-1)
    return jax.lax.map(one, masks)
  frames = P('frames')
  return jax.jit(jax.shard_map(to_bits, mesh=mesh, in_specs=frames, out_specs=frames))


def _encode(bits: np.ndarray, out_size) -> list[bytes]:
  """Packed masks [k, ceil(H*W/8)] of one frame -> the RLE counts of each."""
  h, w = out_size
  masks = np.unpackbits(bits, axis=-1, count=h * w).reshape(-1, w, h)
  rles = mask_utils.encode(masks.transpose(2, 1, 0))   # [H, W, k] Fortran order, no copy
  return [r['counts'] for r in rles]


class _LogitStore:
  """Every frame's float16 mask logits [Q, h, w] in an anonymous temporary file: the host keeps
  nothing per frame (dense logits in memory would grow with the video)."""

  def __init__(self):
    self._file = tempfile.TemporaryFile()
    self.shape, self.frames = None, 0

  def add(self, masks: np.ndarray) -> None:
    """masks: float16 [Q, h, w] of the next frame."""
    if self.shape is None:
      self.shape = masks.shape
    data = np.ascontiguousarray(masks, np.float16).tobytes()
    try:
      self._file.write(data)
    except OSError as e:   # e.g. a full disk: say where and how much, not a bare errno
      raise OSError(e.errno, f'cannot write the mask logits of frame {self.frames} to a temporary '
                    f'file in {tempfile.gettempdir()} ({e.strerror}); the video needs '
                    f'{len(data) / 2**20:.1f} MiB of it a frame: point TMPDIR at a disk with '
                    'room') from e
    self.frames += 1

  def read(self, frame: int, queries) -> np.ndarray:
    """float16 [len(queries), h, w]: the logits of `queries` in `frame`."""
    self._file.flush()
    q, h, w = self.shape
    size = h * w * 2
    fd = self._file.fileno()
    out = np.empty((len(queries), h, w), np.float16)
    for i, query in enumerate(queries):
      out[i] = np.frombuffer(os.pread(fd, size, (frame * q + int(query)) * size),
                             np.float16).reshape(h, w)
    return out

  def close(self) -> None:
    self._file.close()


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

  window: frames per device per forward, or 'auto'; a window of the video is `window` times the
    number of devices, split along the frame axis. A per-device batch rather than a total one:
    XLA's convolutions round differently at different batch sizes (by an ulp, enough to flip a
    mask pixel whose logit is within rounding of 0), so the same per-device batch on any number
    of devices gives the same tracks, scores and masks, bit for bit (tests/test_sharded_eval.py).
  top_k: tracks kept per video.
  tracker: the association (`tracking.Tracker`).
  devices: the devices a window is sharded over (default: all local devices).
  The values come from `config.inference` (`from_config`), checked by `config_lib.validate`.
  """

  def __init__(self, model_config: ModelConfig, variables, window: int | str, top_k: int,
               tracker: tracking.Tracker, devices=None):
    devices = list(devices or jax.local_devices())
    self.mesh = jax.sharding.Mesh(np.array(devices), ('frames',))
    self.variables = local_replica(variables, self.mesh)
    self.window = window if window == 'auto' else window * len(devices)
    self.top_k = top_k
    self.tracker = tracker
    self.model_config = model_config
    self._init_state = tracking.init_state(model_config.num_queries,
                                           tracking.embedding_dim(tracker, model_config))

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
    step = _step_fn(self.model_config, self.mesh, self.tracker)
    frames = jax.sharding.NamedSharding(self.mesh, P('frames'))

    state, logit_sum, pending, store = self._init_state, None, None, _LogitStore()
    try:
      for batch, valid in _windows(_chain(first, images), window):
        state, s, masks = step(self.variables, state, jax.device_put(batch, frames),
                               jnp.asarray(valid))
        logit_sum = s if logit_sum is None else logit_sum + s
        # Write the previous window on the host while the device runs this one.
        if pending is not None:
          _store_window(store, *pending)
        pending = masks, valid
      _store_window(store, *pending)

      probs = jax.nn.softmax(logit_sum / store.frames, axis=-1)[:, :-1]    # [Q, K]
      num_classes = probs.shape[1]
      k = min(self.top_k, probs.size)
      scores, flat = jax.lax.top_k(probs.reshape(-1), k)
      flat = np.asarray(flat)
      queries = flat // num_classes
      segs = self._top_k_masks(store, queries, window, padded_size, valid_size, out_size)
      return [{'category': int(c), 'score': float(score), 'segmentations': seg}
              for c, score, seg in zip(flat % num_classes, np.asarray(scores), segs)]
    finally:
      store.close()

  def _top_k_masks(self, store, queries, window, padded_size, valid_size, out_size):
    """The RLEs of `queries` in every frame of `store`: [len(queries)][frames] dicts."""
    to_bits = _masks_fn(self.mesh, padded_size, valid_size, out_size)
    frames = jax.sharding.NamedSharding(self.mesh, P('frames'))
    size = list(out_size)
    segs = [[] for _ in queries]
    pending = None
    for start in range(0, store.frames, window):
      n = min(window, store.frames - start)
      batch = np.zeros((window, len(queries), *store.shape[1:]), np.float16)
      for i in range(n):
        batch[i] = store.read(start + i, queries)
      bits = to_bits(jax.device_put(batch, frames))
      # Encode the previous window on the host while the device runs this one.
      if pending is not None:
        _encode_window(segs, *pending, size)
      pending = bits, n
    if pending is not None:
      _encode_window(segs, *pending, size)
    return segs


def _store_window(store: _LogitStore, masks: jax.Array, valid: np.ndarray) -> None:
  for m in np.asarray(masks)[valid]:
    store.add(m)


def _encode_window(segs: list[list[dict]], bits: jax.Array, n: int, size: list[int]) -> None:
  for frame_bits in np.asarray(bits)[:n]:
    for track, counts in zip(segs, _encode(frame_bits, size)):
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
                                 data_config.max_size_test)


def from_config(config: ml_collections.ConfigDict, variables, devices=None) -> VideoPredictor:
  """The predictor of a full experiment config: `config.model` and `config.inference` (window,
  top_k, tracker); `devices`: this process's devices to use (default: all local devices)."""
  inf = config.inference
  return VideoPredictor(ModelConfig.from_config(config.model), variables, inf.window, inf.top_k,
                        tracking.tracker_from_config(config), devices)
