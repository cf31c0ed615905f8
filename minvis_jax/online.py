"""Online MinVIS: frames go in one at a time (or a few) and each frame's visible tracks come out as
soon as it is processed; at the end of the stream, optionally, the offline predictor's video-level
result (docs/online.md).

The model is any per-frame forward callable (a live Flax model, `model_forward.frame_forward`, or an
exported artifact): this module does not import the model code. A frame's queries are associated
with the previous frame's exactly as offline (`tracking.track_chunk`), so query slot i is the same
track in both. Online, a slot carries a persistent track id while it is visible:
  - its running score is max_k softmax(mean class logits since the slot's segment began)[k] (the
    offline score, over the frames so far), its category the argmax;
  - it is seen in a frame when its running score is >= `Rules.report_score` and its mask at the
    original size is not empty; a seen slot without a live track gets a new id;
  - a slot unseen for `Rules.retire_frames` frames in a row is retired: its track id is never
    reported again and its segment restarts (a new object in that slot gets a new id and score).
Host memory holds a few numbers per query slot, whatever the stream's length; with `summary=True`
every frame's float16 mask logits also go to a temporary file (as offline) for the final result.
"""

import dataclasses
import functools
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from minvis_jax import frame_masks
from minvis_jax import tracking
from minvis_jax import video_tracks
from minvis_jax.data import transforms

# images float32 [N, Hp, Wp, 3] (normalised, zero-padded) -> {'pred_logits': [N, Q, K+1],
# 'pred_masks': [N, Q, Hp/4, Wp/4], 'pred_embds': [N, Q, C]}
Forward = Callable[[np.ndarray], dict]


class Rules(NamedTuple):
  """When a track is reported and retired (`config.inference.online_*`; these defaults are
  configs/common.py's, for configs saved before the keys existed)."""
  report_score: float = 0.9   # running score a slot needs to be seen
  retire_frames: int = 2      # unseen frames in a row after which a track is retired


def rules_from_config(config: ml_collections.ConfigDict) -> Rules:
  """`config.inference.online_report_score` / `online_retire_frames` (checked by
  `config_lib.validate`) -> Rules."""
  inf, default = config.inference, Rules()
  return Rules(float(inf.get('online_report_score', default.report_score)),
               int(inf.get('online_retire_frames', default.retire_frames)))


class InputSpec(NamedTuple):
  """The test-time input transform (docs/method.md §1): short side min_size (long side at most
  max_size), normalised by mean/std (RGB, 0-255 scale), zero-padded to a multiple of
  size_divisibility."""
  min_size: int
  max_size: int
  mean: tuple
  std: tuple
  size_divisibility: int = 32


def input_spec_from_config(data_config: ml_collections.ConfigDict) -> InputSpec:
  """`config.data` (min_size_test, max_size_test, mean, std, size_divisibility) -> InputSpec."""
  return InputSpec(int(data_config.min_size_test), int(data_config.max_size_test),
                   tuple(data_config.mean), tuple(data_config.std),
                   int(data_config.get('size_divisibility', 32)))


@dataclasses.dataclass
class FrameTracks:
  """One processed frame: its index in the stream and its visible tracks, each {'id', 'category'
  (0-based class), 'score' (running), 'segmentation': RLE {'size': [H, W], 'counts'}}, by id."""
  frame: int
  tracks: list[dict]


@functools.partial(jax.jit, static_argnums=0)
def _associate(tracker: tracking.Tracker, state: tracking.TrackState, video_sum, logits, embds,
               masks):
  """One chunk's forward output -> (state, video_sum plus the chunk's logits summed [Q, K+1],
  logits [N, Q, K+1] and float16 masks [N, Q, h, w] in track order): the offline window step
  without the forward."""
  state, perm = tracking.track_chunk(tracker, state, embds, logits,
                                     jnp.ones(logits.shape[0], bool))
  logits = tracking.reorder(logits, perm)
  masks = tracking.reorder(masks, perm).astype(jnp.float16)
  return state, video_sum + jnp.sum(logits, axis=0), logits, masks


@functools.partial(jax.jit, static_argnums=0)
def _associate_tracks(tracker: tracking.Tracker, state: tracking.CtvisState, logits, embds, masks):
  """`_associate` for 'ctvis': one chunk's forward output -> (state, `tracking.TrackFrames`
  [N, M], logits [N, M, K+1] (0 where a column has no query) and float16 masks [N, M, h, w]
  (empty there) in column order, and the float16 masks [N, Q, h, w] in query order (the summary's
  store))."""
  state, frames = tracking.track_chunk(tracker, state, embds, logits,
                                       jnp.ones(logits.shape[0], bool))
  masks = masks.astype(jnp.float16)
  return (state, frames, tracking.gather_tracks(logits, frames.index, 0.0),
          tracking.gather_tracks(masks, frames.index, frame_masks.EMPTY), masks)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _initial(tracker: tracking.Tracker, num_queries: int, dim: int, num_logits: int):
  """The association state and the zero logit sum [Q, K+1]."""
  return (tracking.initial_state(tracker, num_queries, dim),
          jnp.zeros((num_queries, num_logits), jnp.float32))


def _softmax(x: np.ndarray) -> np.ndarray:
  e = np.exp(x - x.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def _bucket(n: int, limit: int) -> int:
  """Rows computed for n masks: the next power of two (so few shapes are compiled), <= limit."""
  return min(limit, 1 << max(n - 1, 0).bit_length())


class OnlineTracker:
  """MinVIS on a stream of frames of one size; `process` a chunk, `finish` at the end.

  forward: see `Forward`; tracker: the association (`tracking.tracker_from_config`); spec: the
  input transform; rules: report and retire rules; top_k: tracks of the final summary; summary:
  keep what `finish` needs (every frame's mask logits in a temporary file, as offline).
  """

  def __init__(self, forward: Forward, tracker: tracking.Tracker, spec: InputSpec,
               rules: Rules = Rules(), top_k: int = 10, summary: bool = False):
    self.forward, self.tracker, self.spec, self.rules = forward, tracker, spec, rules
    self.top_k = top_k
    self.frames = 0                 # frames processed so far
    self.out_size = None            # (H, W) of the stream, from its first frame
    self._store = frame_masks.LogitStore() if summary else None
    self._state = self._video_sum = None
    self._device = jax.local_devices()[0]
    self._mesh = jax.sharding.Mesh(np.array([self._device]), ('frames',))
    self._next_id = 1
    self._live: dict[int, int] = {}   # slot -> track id of its live track

  def _start(self, frame: np.ndarray, out: dict) -> None:
    """Per-slot state from the first frame and the first forward's shapes."""
    self.out_size = tuple(frame.shape[:2])
    self.valid_size = transforms.resize_shape(*self.out_size, self.spec.min_size,
                                              self.spec.max_size)
    q, c = tracking.select_embeddings(self.tracker, out).shape[1:]
    self.num_queries = q
    k1 = out['pred_logits'].shape[2]
    # Committed to the device, as every later state is: the step then compiles once.
    self._state, self._video_sum = jax.device_put(_initial(self.tracker, q, c, k1), self._device)
    # Slots: the query slots after association, or the 'ctvis' tracker's columns.
    slots = tracking.num_tracks(self.tracker, q)
    self.num_slots = slots
    self._seg_sum = np.zeros((slots, k1))        # class logits summed over each slot's segment
    self._seg_count = np.zeros(slots, np.int64)  # frames in each slot's segment
    self._unseen = np.zeros(slots, np.int64)     # frames in a row each slot has not been seen
    if self.tracker.kind not in tracking.PERMUTING:
      self._book = video_tracks.TrackBook(slots, self.top_k)

  def _preprocess(self, frames: Sequence[np.ndarray]) -> np.ndarray:
    images, stream = [], self.out_size or tuple(np.shape(frames[0])[:2])
    for i, frame in enumerate(frames):
      size = tuple(np.shape(frame)[:2])
      if size != stream:
        raise ValueError(f'frame {self.frames + i} is {size[0]}x{size[1]}, the stream is '
                         f'{stream[0]}x{stream[1]}')
      s = self.spec
      images.append(transforms.test_frame(np.asarray(frame), s.min_size, s.max_size, s.mean,
                                          s.std, s.size_divisibility)[0])
    return np.stack(images)

  def process(self, frames: Sequence[np.ndarray]) -> list[FrameTracks]:
    """frames: uint8 [H, W, 3] RGB of the stream's next frames (the first call fixes H, W; another
    size raises ValueError naming the frame) -> each frame's visible tracks."""
    if not len(frames):
      return []
    images = self._preprocess(frames)
    first = frames[0] if self.out_size is None else None
    out = self.forward(images)
    if first is not None:
      self._start(first, out)
      self.padded_size = images.shape[1:3]
      self._compile_masks(out['pred_masks'].shape[2:])
    embds = tracking.select_embeddings(self.tracker, out)
    if self.tracker.kind not in tracking.PERMUTING:
      return self._process_tracks(out, embds)
    self._state, self._video_sum, logits, masks = _associate(
        self.tracker, self._state, self._video_sum, out['pred_logits'], embds, out['pred_masks'])
    results = []
    # On the host once: per-frame indexing of device arrays would be eager jax ops, whose caches
    # grow with the stream.
    for frame_logits, mask_logits in zip(np.asarray(logits), np.asarray(masks)):
      if self._store is not None:
        self._store.add(mask_logits)
      results.append(self._frame(frame_logits, mask_logits))
    return results

  def _process_tracks(self, out: dict, embds) -> list[FrameTracks]:
    """`process` with the 'ctvis' tracker: its tracks are the slots, a new track in a column
    ends the column's id (as does the track's end), and the tracker's own retirement replaces
    `Rules.retire_frames` (a track hidden for a while keeps its id)."""
    self._state, frames, logits, masks, raw = _associate_tracks(
        self.tracker, self._state, out['pred_logits'], embds, out['pred_masks'])
    frames, logits, masks = jax.tree.map(np.asarray, (frames, logits, masks))
    raw_logits, raw = np.asarray(out['pred_logits']), np.asarray(raw)
    results = []
    for i in range(len(logits)):
      if self._store is not None:
        self._store.add(raw[i])
        self._book.add(frames.index[i], frames.born[i], frames.alive[i], raw_logits[i])
      results.append(self._frame(logits[i], masks[i], frames.index[i] >= 0, frames.born[i],
                                 frames.alive[i]))
    return results

  def _frame(self, logits: np.ndarray, masks: np.ndarray, present=None, born=None,
             alive=None) -> FrameTracks:
    """The report and retire rules on one frame: logits [S, K+1], float16 masks [S, h, w], both in
    slot order; for 'ctvis', present, born and alive [S] (the tracker's `TrackFrames` row)."""
    if present is None:
      self._seg_sum += logits
      self._seg_count += 1
    else:
      for slot in np.flatnonzero(born):
        self._live.pop(slot, None)
        self._seg_sum[slot], self._seg_count[slot] = 0, 0
      self._seg_sum += np.where(present[:, None], logits, 0.0)
      self._seg_count += present
    probs = _softmax(self._seg_sum / np.maximum(self._seg_count, 1)[:, None])[:, :-1]
    scores, categories = probs.max(axis=1), probs.argmax(axis=1)
    reportable = scores >= self.rules.report_score
    candidates = np.flatnonzero(reportable if present is None else reportable & present)
    rles = self._masks(masks, candidates)
    tracks, seen = [], np.zeros(self.num_slots, bool)
    for slot, rle in zip(candidates, rles):
      if rle is None:    # empty mask
        continue
      seen[slot] = True
      if slot not in self._live:
        self._live[slot] = self._next_id
        self._next_id += 1
      tracks.append({'id': self._live[slot], 'category': int(categories[slot]),
                     'score': float(scores[slot]), 'segmentation': rle})
    if present is not None:
      for slot in np.flatnonzero(~alive):
        self._live.pop(slot, None)
      self.frames += 1
      return FrameTracks(self.frames - 1, sorted(tracks, key=lambda t: t['id']))
    self._unseen = np.where(seen, 0, self._unseen + 1)
    for slot in np.flatnonzero(self._unseen >= self.rules.retire_frames):
      self._live.pop(slot, None)
      self._seg_sum[slot], self._seg_count[slot], self._unseen[slot] = 0, 0, 0
    self.frames += 1
    return FrameTracks(self.frames - 1, sorted(tracks, key=lambda t: t['id']))

  def _compile_masks(self, mask_size) -> None:
    """Compiles the mask step for every number of rows `_masks` may use, on the first frame:
    otherwise a frame with more visible tracks than any before would wait for a compile."""
    to_bits = frame_masks.masks_fn(self._mesh, tuple(self.padded_size), tuple(self.valid_size),
                                   self.out_size)
    for rows in sorted({_bucket(n, self.num_queries) for n in range(1, self.num_queries + 1)}):
      to_bits(np.zeros((1, rows, *mask_size), np.float16))

  def _masks(self, masks: np.ndarray, slots: np.ndarray) -> list[dict | None]:
    """RLEs at the original size of `slots`' masks (None where empty); masks [Q, h, w]."""
    if not len(slots):
      return []
    rows = np.zeros(_bucket(len(slots), self.num_queries), np.int32)
    rows[:len(slots)] = slots
    to_bits = frame_masks.masks_fn(self._mesh, tuple(self.padded_size), tuple(self.valid_size),
                                   self.out_size)
    bits = np.asarray(to_bits(masks[rows][None]))[0, :len(slots)]
    h, w = self.out_size
    nonempty = np.unpackbits(bits, axis=-1, count=h * w).any(axis=-1)
    size = [h, w]
    return [{'size': size, 'counts': counts.decode()} if ok else None
            for ok, counts in zip(nonempty, frame_masks.encode(bits, self.out_size))]

  @property
  def live_tracks(self) -> dict[int, int]:
    """{slot (query slot, or 'ctvis' column): track id} of the tracks not retired."""
    return dict(self._live)

  def finish(self) -> list[dict]:
    """The video-level result, as `predictor.VideoPredictor` returns it for the same frames:
    the top-k {'category', 'score', 'segmentations': [RLE per frame]}. Needs summary=True."""
    if self._store is None:
      raise ValueError('finish() needs an OnlineTracker made with summary=True')
    if not self.frames:
      raise ValueError('a video needs at least one frame')
    if self.tracker.kind in tracking.PERMUTING:
      book = video_tracks.SlotScores()
      book.add(self._video_sum, self._store.frames)
    else:
      book = self._book
    try:
      return _top_k_tracks(self._store, book.select(self.top_k), self._mesh,
                           tuple(self.padded_size), tuple(self.valid_size), self.out_size)
    finally:
      self.close()

  def close(self) -> None:
    """Removes the temporary file of the summary (if any)."""
    if self._store is not None:
      self._store.close()


def _top_k_tracks(store: frame_masks.LogitStore, picks: video_tracks.Selection, mesh,
                  padded_size, valid_size, out_size) -> list[dict]:
  """The offline result (docs/method.md §1) of the top-k `picks`: each pick's masks in every
  frame of `store`."""
  to_bits = frame_masks.masks_fn(mesh, padded_size, valid_size, out_size)
  segs = [[] for _ in picks.scores]
  size = list(out_size)
  for frame in range(store.frames if len(segs) else 0):
    bits = np.asarray(to_bits(store.read(frame, picks.rows(frame))[None]))[0]
    for track, counts in zip(segs, frame_masks.encode(bits, out_size)):
      track.append({'size': size, 'counts': counts.decode()})
  return [{'category': int(c), 'score': float(s), 'segmentations': seg}
          for c, s, seg in zip(picks.categories, picks.scores, segs)]
