"""Video-level tracks from the association's per-frame output, and the top-k rule of
docs/method.md §1: a track scores softmax(mean of its class logits over its frames)[:K], the top_k
(track, class) pairs are kept, and each pick's mask in every frame is read from the mask store.

Permuting trackers ('minvis', 'memory'; `SlotScores`): track i is query slot i after association,
present in every frame; the class logits are summed on the device (as they always were).
'ctvis' (`TrackBook`): a track is one column's life, from the frame it began to the frame it ended;
it scores over the frames where it has a query and its mask is empty in every other frame. The
book keeps, per track, its logit sum and its query in each frame of its life; a track that has
ended and can no longer be among the top_k is dropped, so the book holds the live tracks and at
most a few times top_k ended ones, however many tracks the video has.
"""

import array
from typing import Callable, NamedTuple

import jax
import numpy as np

from minvis_jax import tracking


class Selection(NamedTuple):
  """The top-k (track, class) pairs: category [k] (0-based), score [k], and rows(frame) -> [k]
  the mask store's row of each pick in that frame (-1: no mask, an empty one)."""
  categories: np.ndarray
  scores: np.ndarray
  rows: Callable[[int], np.ndarray]


class SlotScores:
  """The permuting trackers' scores: the class logits of each slot [Q, K+1], summed on the device
  over the frames (the store holds each frame's masks in slot order: row = track)."""

  def __init__(self):
    self.logit_sum, self.frames = None, 0

  def add(self, logit_sum: jax.Array, frames: int) -> None:
    """logit_sum [Q, K+1]: the class logits in slot order summed over `frames` frames."""
    self.logit_sum = logit_sum if self.logit_sum is None else self.logit_sum + logit_sum
    self.frames += frames

  def add_window(self, output: jax.Array, valid: np.ndarray) -> None:
    """The predictor's window output (the logit sum over its valid frames)."""
    self.add(output, int(np.sum(valid)))

  def select(self, top_k: int) -> Selection:
    probs = jax.nn.softmax(self.logit_sum / self.frames, axis=-1)[:, :-1]    # [Q, K]
    num_classes = probs.shape[1]
    scores, flat = jax.lax.top_k(probs.reshape(-1), min(top_k, probs.size))
    flat = np.asarray(flat)
    queries = flat // num_classes
    return Selection(flat % num_classes, np.asarray(scores), lambda frame: queries)


class _Track:
  """One 'ctvis' track: the frame it began in, its query in each frame since (-1: none), the sum
  of its class logits [K+1] over the frames it has a query in, and their number."""

  def __init__(self, start: int, num_logits: int):
    self.start = start
    self.queries = array.array('i')
    self.logit_sum = np.zeros(num_logits)
    self.count = 0

  def probs(self) -> np.ndarray:
    """softmax(mean class logits)[:K] [K]."""
    mean = self.logit_sum / self.count
    e = np.exp(mean - mean.max())
    return (e / e.sum())[:-1]

  def query(self, frame: int) -> int:
    i = frame - self.start
    return self.queries[i] if 0 <= i < len(self.queries) else -1


class TrackBook:
  """'ctvis' tracks, fed frame by frame with the tracker's output (module docstring); the store
  holds each frame's masks in query order: row = query."""

  def __init__(self, num_tracks: int, top_k: int):
    self.top_k = top_k
    self.frames = 0
    self._live: list[_Track | None] = [None] * num_tracks
    self._ended: list[_Track] = []

  def add(self, index: np.ndarray, born: np.ndarray, alive: np.ndarray,
          logits: np.ndarray) -> None:
    """One valid frame: index [M] (each column's query, -1: none), born [M], alive [M] (the
    tracker's `TrackFrames` row) and the frame's class logits [Q, K+1] in query order."""
    for m in np.flatnonzero(born | ~alive):
      self._end(m)
    for m in np.flatnonzero(born):
      self._live[m] = _Track(self.frames, logits.shape[1])
    for m, track in enumerate(self._live):
      if track is not None:
        q = int(index[m])
        track.queries.append(q)
        if q >= 0:
          track.logit_sum += logits[q]
          track.count += 1
    self.frames += 1

  def add_window(self, output, valid: np.ndarray) -> None:
    """The predictor's window output: (`tracking.TrackFrames` [W, M], class logits [W, Q, K+1]);
    valid [W]."""
    frames, logits = jax.tree.map(lambda x: np.asarray(x)[valid], output)
    for row in zip(*frames, logits):
      self.add(*row)

  def _end(self, m: int) -> None:
    track, self._live[m] = self._live[m], None
    if track is None or not track.count:
      return
    self._ended.append(track)
    if len(self._ended) > 4 * self.top_k:
      # Keep the tracks with a pair at least as good as the top_k-th best ended pair: the others
      # can never be picked (live tracks only add pairs).
      best = np.array([t.probs().max() for t in self._ended])
      pairs = np.sort(np.concatenate([t.probs() for t in self._ended]))[::-1]
      self._ended = [t for t, b in zip(self._ended, best) if b >= pairs[self.top_k - 1]]

  def select(self, top_k: int) -> Selection:
    """The top-k pairs over every track (the live ones end here); ties go to the track that
    ended first, then the lower class."""
    for m in range(len(self._live)):
      self._end(m)
    tracks = self._ended
    if not tracks:
      return Selection(np.zeros(0, np.int64), np.zeros(0), lambda frame: np.zeros(0, np.int64))
    probs = np.stack([t.probs() for t in tracks])                     # [N, K]
    num_classes = probs.shape[1]
    flat = np.argsort(-probs.reshape(-1), kind='stable')[:top_k]
    picks = [tracks[i] for i in flat // num_classes]
    return Selection(flat % num_classes, probs.reshape(-1)[flat],
                     lambda frame: np.array([t.query(frame) for t in picks], np.int64))


def for_tracker(tracker: tracking.Tracker, num_queries: int, top_k: int) -> SlotScores | TrackBook:
  """The video-level tracks of `tracker`'s output for Q queries."""
  if tracker.kind in tracking.PERMUTING:
    return SlotScores()
  return TrackBook(tracking.num_tracks(tracker, num_queries), top_k)
