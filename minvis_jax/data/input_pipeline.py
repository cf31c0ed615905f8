"""Frame-level training input (docs/method.md §1, §4): one annotated frame per sample, augmented,
padded batches.

The stream is a pure function of (seed, step): sample i of global step s comes from video
`perm_e[(s * B + i) % V]` with e the epoch, and its frame and augmentation are drawn from a
generator seeded by (seed, s, i). A resumed run therefore continues the same stream, and a process
computes only its own rows of each global batch (rows [p * b, (p + 1) * b) for process p of the
b-row shard).
"""

import concurrent.futures
import dataclasses
import functools
import logging
import queue
import threading
from typing import Iterator, Protocol

import ml_collections
import numpy as np

from minvis_jax.data import categories
from minvis_jax.data import tfds_builders
from minvis_jax.data import transforms
from minvis_jax.data import ytvis


def usable_frames(num_frames: int, fraction: float) -> np.ndarray:
  """The annotated frames MinVIS may use for a video of `num_frames` frames (docs/method.md §1).

  n = max(round_half_even(L * r), 1); linspace(0, L, n, endpoint=False) cast to int when n > 1,
  else the middle frame L // 2. (L=36: r=0.1 -> [0, 9, 18, 27]; r=0.01 -> [18].)
  """
  if num_frames < 1:
    raise ValueError('a video needs at least one frame')
  n = max(int(np.round(num_frames * fraction)), 1)   # np.round rounds half to even
  if n == 1:
    return np.array([num_frames // 2])
  return np.linspace(0, num_frames, n, endpoint=False).astype(np.int64)


class FrameSource(Protocol):
  """What the training input reads: `data/ytvis.FolderSource` (a dataset folder) and
  `data/tfds_builders.TfdsSource` (TFDS records) satisfy it."""
  origin: str                  # where the split comes from (a file or records), for messages
  num_videos: int
  has_annotations: bool        # False for an unannotated split (e.g. YouTube-VIS valid.json)
  num_instances: int | None    # annotated instances of the split (None: not known)

  def num_frames(self, v: int) -> int:
    """Frames of video v."""

  def load(self, v: int, t: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Frame t of video v -> (image uint8 [H, W, 3], masks uint8 [N, H, W], labels int [N])."""


@dataclasses.dataclass(frozen=True)
class InputConfig:
  """The settings of the training input, built once from the experiment config (`from_config`).

  seed, batch_size: the stream's seed and global batch (frames); the rest are `config.data`'s
  fields of the same names (their meaning and defaults: configs/common.py).
  """
  seed: int
  batch_size: int
  annotation_fraction: float
  min_size_train: tuple[int, ...]
  max_size_train: int
  canvas: tuple[int, int]
  flip: bool
  crop: bool
  max_instances: int

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> 'InputConfig':
    """The full experiment config (checked by `config_lib.validate`) -> InputConfig."""
    data = config.data
    return cls(seed=int(config.seed), batch_size=int(config.batch_size),
               annotation_fraction=float(data.annotation_fraction),
               min_size_train=tuple(int(s) for s in data.min_size_train),
               max_size_train=int(data.max_size_train),
               canvas=(int(data.canvas[0]), int(data.canvas[1])), flip=bool(data.flip),
               crop=bool(data.crop), max_instances=int(data.max_instances))


def make_source(data: ml_collections.ConfigDict, split: str) -> FrameSource:
  """The frame source of a split: TFDS records when `data.tfds_dir` is set, else the raw folder."""
  if data.get('tfds_dir'):
    return categories.check(data, tfds_builders.TfdsSource(data.dataset, split, data.tfds_dir))
  return ytvis.FolderSource(categories.check(data, ytvis.load_split(data.dataset, data.manual_dir,
                                                                    split)))


def _fit(size: tuple[int, int], canvas: tuple[int, int]) -> tuple[int, int]:
  """Shrinks (h, w) (keeping the aspect ratio) until it fits the fixed canvas."""
  scale = min(1.0, canvas[0] / size[0], canvas[1] / size[1])
  return min(int(size[0] * scale + 0.5), canvas[0]), min(int(size[1] * scale + 0.5), canvas[1])


def augment(image: np.ndarray, masks: np.ndarray, rng: np.random.Generator,
            data: InputConfig) -> tuple[np.ndarray, np.ndarray]:
  """Training augmentation of the original: optional crop, random short-side resize, h-flip.

  image uint8 [H, W, 3], masks uint8 [N, H, W] -> resized versions (sizes fit `data.canvas`).
  """
  if data.crop:
    # Relative crop in [0.5, 1] of each side (detectron2 "relative_range"), before the resize.
    h, w = image.shape[:2]
    ch, cw = (max(1, int(s * rng.uniform(0.5, 1.0))) for s in (h, w))
    y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    image, masks = image[y:y + ch, x:x + cw], masks[:, y:y + ch, x:x + cw]
  short = data.min_size_train[rng.integers(len(data.min_size_train))]
  size = _fit(transforms.resize_shape(*image.shape[:2], short, data.max_size_train,
                                     ('data.min_size_train', 'data.max_size_train')), data.canvas)
  image = transforms.resize_image(image, size)
  masks = transforms.resize_masks(masks, size)
  if data.flip and rng.random() < 0.5:
    image, masks = image[:, ::-1], masks[:, :, ::-1]
  return image, masks


class TrainInput:
  """Deterministic frame-level batches of one process.

  A batch is {'image' uint8 [b, H, W, 3] (zero padded canvas), 'image_size' int32 [b, 2] (valid
  h, w), 'labels' int32 [b, N], 'masks' uint8 [b, N, H, W], 'valid' bool [b, N]} with
  b = batch_size / process_count rows, (H, W) = data.canvas and N = data.max_instances.
  """

  def __init__(self, config: InputConfig, source: FrameSource, process_index: int = 0,
               process_count: int = 1):
    # Not a config check: the process count is known only here.
    if config.batch_size % process_count:
      raise ValueError(f'config.batch_size={config.batch_size} is not a multiple of the '
                       f'{process_count} processes')
    self.config = config
    self.seed = config.seed
    self.global_batch = config.batch_size
    self.local_batch = config.batch_size // process_count
    self.offset = process_index * self.local_batch
    self.source = source
    origin = source.origin
    if source.num_videos == 0:
      raise ValueError(f'{origin}: the training split has no videos')
    # An unannotated split (e.g. YouTube-VIS valid.json) would train on empty targets and exit 0.
    if not source.has_annotations:
      raise ValueError(f'{origin}: has no "annotations", so it cannot be trained on (the valid and '
                       'test splits of YouTube-VIS / OVIS are unannotated: their results go to '
                       'the evaluation server); set data.train_split to an annotated split')
    if source.num_instances == 0:
      raise ValueError(f'{origin}: no instance to train on (its "annotations" are empty or all '
                       'crowd)')
    # Only these frames are ever read: the sub-sampled annotations of docs/method.md §1.
    self.frames = [usable_frames(source.num_frames(v), config.annotation_fraction)
                   for v in range(source.num_videos)]
    # Each epoch visits every video once (videos equally likely whatever their length).
    self._permutation = functools.lru_cache(maxsize=4)(
        lambda epoch: np.random.default_rng([self.seed, 1, epoch]).permutation(source.num_videos))

  def _video(self, position: int) -> int:
    epoch, index = divmod(position, self.source.num_videos)
    return int(self._permutation(epoch)[index])

  def example(self, step: int, i: int) -> dict:
    """Row i of global step `step`, as unbatched arrays."""
    v = self._video(step * self.global_batch + i)
    rng = np.random.default_rng([self.seed, 2, step, i])
    t = int(rng.choice(self.frames[v]))
    image, masks, labels = self.source.load(v, t)
    image, masks = augment(image, masks, rng, self.config)
    # Instances that the augmentation emptied are dropped (docs/method.md §1).
    keep = masks.any(axis=(1, 2))
    masks, labels = masks[keep], labels[keep]
    n_max = self.config.max_instances
    if len(labels) > n_max:
      logging.warning('video %d frame %d: %d instances, keeping the first %d (data.max_instances)',
                      v, t, len(labels), n_max)
      masks, labels = masks[:n_max], labels[:n_max]
    canvas_h, canvas_w = self.config.canvas
    h, w = image.shape[:2]
    out_image = np.zeros((canvas_h, canvas_w, 3), np.uint8)
    out_image[:h, :w] = image
    out_masks = np.zeros((n_max, canvas_h, canvas_w), np.uint8)
    out_masks[:len(masks), :h, :w] = masks
    out_labels = np.zeros(n_max, np.int32)
    out_labels[:len(labels)] = labels
    return {'image': out_image, 'image_size': np.array([h, w], np.int32), 'labels': out_labels,
            'masks': out_masks, 'valid': np.arange(n_max) < len(labels)}

  def batch(self, step: int, pool: concurrent.futures.Executor | None = None) -> dict:
    """This process's rows of global step `step`."""
    rows = range(self.offset, self.offset + self.local_batch)
    examples = (pool.map(lambda i: self.example(step, i), rows) if pool
                else [self.example(step, i) for i in rows])
    examples = list(examples)
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def iterate(train_input: TrainInput, start_step: int, workers: int = 4,
            prefetch: int = 2) -> Iterator[dict]:
  """Batches of steps start_step, start_step + 1, ... built ahead by a background thread.

  Any error of the producer (a bad record, a dead pool) is raised here, in the consumer, with its
  traceback: the thread puts it on the queue instead of dying silently behind a blocked `get`.
  `workers` (data.workers) is checked by `config_lib.validate`.
  """
  out: queue.Queue = queue.Queue(maxsize=prefetch)
  stop = threading.Event()

  def put(item) -> None:
    while not stop.is_set():
      try:
        out.put(item, timeout=0.1)
        return
      except queue.Full:
        continue

  def produce():
    pool = None
    try:
      pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix='minvis-input')
      step = start_step
      while not stop.is_set():
        put(train_input.batch(step, pool))
        step += 1
    except BaseException as e:  # noqa: BLE001  (re-raised in the consumer)
      put(e)   # at once, even if another worker is stuck in a read
    finally:
      if pool is not None:
        pool.shutdown(wait=False, cancel_futures=True)

  thread = threading.Thread(target=produce, daemon=True, name='minvis-input')
  thread.start()
  try:
    while True:
      try:
        item = out.get(timeout=1.0)
      except queue.Empty:
        # The thread reports its own errors; this catches one killed without a word.
        if not thread.is_alive() and out.empty():
          raise RuntimeError('the input thread exited without producing a batch') from None
        continue
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:
    stop.set()


def train_iterator(config: ml_collections.ConfigDict, start_step: int, process_index: int = 0,
                   process_count: int = 1) -> Iterator[dict]:
  """The trainer's input: this process's batches of `config.data.train_split` from `start_step`."""
  source = make_source(config.data, config.data.train_split)
  train_input = TrainInput(InputConfig.from_config(config), source, process_index, process_count)
  return iterate(train_input, start_step, workers=config.data.workers)
