"""Training input for the re-identification head (docs/reid.md): two views of one annotated frame.

Each global step of B images holds B / 2 pairs; rows 2p and 2p + 1 of a batch are views A and B
of pair p, and target slot g is the same instance in both (absent from a view: `valid` False
there). Each view is augmented independently (`input_pipeline.augment`: crop, scale, flip); view B
then, with probability `reid.move_prob`, moves `reid.move_count` instances elsewhere one after
the other (each one's pixels cut out, the hole filled with the background's median colour, pasted
at a random place), and with probability `reid.cover_prob` pastes a copy of another instance over
each moved one's old place (a new target, only in B). So the query that held an instance in A
often holds something else in B, which is what the contrastive loss must learn to tell apart.

Like the frame input, the stream is a pure function of (seed, step): pair p of step s reads video
`perm_e[(s * B / 2 + p) % V]` and draws its frame and both views from generators seeded by
(seed, s, p), so a resumed run repeats it exactly.
"""

import concurrent.futures
import dataclasses
from typing import Iterator

import ml_collections
import numpy as np

from minvis_jax.data import input_pipeline


@dataclasses.dataclass(frozen=True)
class PairConfig:
  """The slot-breaking moves of view B (`config.reid`)."""
  move_prob: float
  cover_prob: float
  move_count: int = 1

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> 'PairConfig':
    return cls(float(config.reid.move_prob), float(config.reid.cover_prob),
               int(config.reid.get('move_count', 1)))


def _box(mask: np.ndarray) -> tuple[int, int, int, int]:
  ys, xs = np.nonzero(mask)
  return int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1


def _paste(image: np.ndarray, masks: np.ndarray, source: np.ndarray, patch: np.ndarray,
           y: int, x: int) -> np.ndarray:
  """Pastes the pixels of `patch` [h, w, 3] where `source` [h, w] bool at (y, x), in front of every
  instance (their masks lose those pixels); returns the pasted mask [H, W] bool. In place."""
  h, w = source.shape
  placed = np.zeros(image.shape[:2], bool)
  placed[y:y + h, x:x + w] = source
  image[placed] = patch[source]
  masks[:, placed] = 0
  return placed


def move_instance(image: np.ndarray, masks: np.ndarray, labels: np.ndarray,
                  rng: np.random.Generator, config: PairConfig
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """View B's slot-breaking moves (module docstring).

  image uint8 [H, W, 3], masks uint8 [N, H, W] (slot g = instance g; empty = absent), labels [N]
  -> (image, masks [N + c, H, W], labels [N + c]): with probability `move_prob`, up to
  `move_count` distinct instances are moved one after the other, and with probability
  `cover_prob` a copy of another instance is pasted over each one's old place (c new instances,
  appended). Inputs are not modified.
  """
  image, masks = image.copy(), masks.copy()
  present = np.flatnonzero(masks.reshape(len(masks), -1).any(axis=1))
  if not len(present) or rng.random() >= config.move_prob:
    return image, masks, labels
  height, width = image.shape[:2]
  background = ~masks.any(axis=0)
  fill = (np.median(image[background], axis=0) if background.any() else np.zeros(3)
          ).astype(np.uint8)
  remaining, olds = list(present), []
  for _ in range(min(config.move_count, len(present))):
    i = int(rng.choice(remaining))
    remaining.remove(i)
    old = masks[i].astype(bool)
    if not old.any():   # hidden entirely by an instance moved before it
      continue
    y0, y1, x0, x1 = _box(old)
    source, patch = old[y0:y1, x0:x1], image[y0:y1, x0:x1].copy()
    image[old] = fill
    masks[i] = 0
    y = int(rng.integers(0, height - (y1 - y0) + 1))
    x = int(rng.integers(0, width - (x1 - x0) + 1))
    masks[i] |= _paste(image, masks, source, patch, y, x).astype(np.uint8)
    olds.append((i, (y0, y1, x0, x1)))
  for i, (y0, y1, x0, x1) in olds:
    others = [j for j in present if j != i]
    if not others or rng.random() >= config.cover_prob:
      continue
    j = int(rng.choice(others))
    if not masks[j].any():   # j is now hidden entirely by a moved instance
      continue
    cy0, cy1, cx0, cx1 = _box(masks[j].astype(bool))
    cover, cover_patch = masks[j, cy0:cy1, cx0:cx1].astype(bool), image[cy0:cy1, cx0:cx1].copy()
    # Centred on the moved instance's old place, kept inside the image.
    h, w = cover.shape
    y = int(np.clip((y0 + y1 - h) // 2, 0, height - h))
    x = int(np.clip((x0 + x1 - w) // 2, 0, width - w))
    placed = _paste(image, masks, cover, cover_patch, y, x)
    masks = np.concatenate([masks, placed[None].astype(np.uint8)])
    labels = np.concatenate([labels, labels[j:j + 1]])
  return image, masks, labels


def to_canvas(image: np.ndarray, masks: np.ndarray, labels: np.ndarray,
              canvas: tuple[int, int], max_instances: int) -> dict:
  """One view as a training row: padded to the canvas and to `max_instances` slots, slot g =
  instance g (not compacted: `valid` marks the slots present in this view)."""
  canvas_h, canvas_w = canvas
  h, w = image.shape[:2]
  n = min(len(labels), max_instances)
  out_image = np.zeros((canvas_h, canvas_w, 3), np.uint8)
  out_image[:h, :w] = image
  out_masks = np.zeros((max_instances, canvas_h, canvas_w), np.uint8)
  out_masks[:n, :h, :w] = masks[:n]
  out_labels = np.zeros(max_instances, np.int32)
  out_labels[:n] = labels[:n]
  valid = np.zeros(max_instances, bool)
  valid[:n] = out_masks[:n].reshape(n, -1).any(axis=1)
  return {'image': out_image, 'image_size': np.array([h, w], np.int32), 'labels': out_labels,
          'masks': out_masks, 'valid': valid}


class PairInput(input_pipeline.TrainInput):
  """Deterministic batches of view pairs of one process: the rows of `TrainInput.batch`, with rows
  2p and 2p + 1 the two views of one frame (module docstring)."""

  def __init__(self, config: input_pipeline.InputConfig, pair_config: PairConfig,
               source: input_pipeline.FrameSource, process_index: int = 0,
               process_count: int = 1):
    super().__init__(config, source, process_index, process_count)
    if self.local_batch % 2:
      raise ValueError(f'config.batch_size={config.batch_size}: with model.reid each process needs '
                       f'an even number of rows (two views per frame), got {self.local_batch}')
    self.pair_config = pair_config

  def pair(self, step: int, p: int) -> tuple[dict, dict]:
    """Views A and B of pair p of global step `step`."""
    v = self._video(step * (self.global_batch // 2) + p)
    rng = np.random.default_rng([self.seed, 2, step, p])
    t = int(rng.choice(self.frames[v]))
    image, masks, labels = self.source.load(v, t)
    rows = []
    for view in (0, 1):
      view_rng = np.random.default_rng([self.seed, 5, step, p, view])
      img, msk = input_pipeline.augment(image, masks, view_rng, self.config)
      lab = np.asarray(labels)
      if view == 1:
        img, msk, lab = move_instance(img, msk, lab, view_rng, self.pair_config)
      rows.append(to_canvas(img, msk, lab, self.config.canvas, self.config.max_instances))
    return rows[0], rows[1]

  def batch(self, step: int, pool: concurrent.futures.Executor | None = None) -> dict:
    """This process's rows of global step `step` (pairs offset / 2 ... (offset + b) / 2)."""
    first = self.offset // 2
    indices = range(first, first + self.local_batch // 2)
    views = (pool.map(lambda p: self.pair(step, p), indices) if pool
             else [self.pair(step, p) for p in indices])
    rows = [row for pair in views for row in pair]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def train_iterator(config: ml_collections.ConfigDict, start_step: int, process_index: int = 0,
                   process_count: int = 1) -> Iterator[dict]:
  """The view-pair batches of `config.data.train_split` from `start_step` (as
  `input_pipeline.train_iterator`)."""
  source = input_pipeline.make_source(config.data, config.data.train_split)
  train_input = PairInput(input_pipeline.InputConfig.from_config(config),
                          PairConfig.from_config(config), source, process_index, process_count)
  return input_pipeline.iterate(train_input, start_step, workers=config.data.workers)
