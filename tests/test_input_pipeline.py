"""Frame-level training input: the annotation ratio of docs/method.md §1, determinism, sharding,
augmentation; the FrameSource protocol and InputConfig."""

import collections
import itertools
import json
import os

import numpy as np
import pytest

from minvis_jax import config_lib
from minvis_jax.data import input_pipeline
from minvis_jax.data import synthetic
from minvis_jax.data import ytvis
from minvis_jax.data.input_pipeline import InputConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize('length, fraction, expected', [
    (36, 0.1, [0, 9, 18, 27]),
    (36, 0.01, [18]),
    (36, 0.05, [0, 18]),          # round(1.8) = 2
    (25, 0.1, [0, 12]),           # 2.5 rounds half to even: 2
    (35, 0.1, [0, 8, 17, 26]),    # 3.5 rounds half to even: 4
    (5, 1.0, [0, 1, 2, 3, 4]),
    (1, 0.01, [0]),
])
def test_usable_frames(length, fraction, expected):
  np.testing.assert_array_equal(input_pipeline.usable_frames(length, fraction), expected)


class CountingSource:
  """A FolderSource that records which (video, frame) pairs were read."""

  def __init__(self, source):
    self.source = source
    self.origin = source.origin
    self.num_videos = source.num_videos
    self.has_annotations = source.has_annotations
    self.num_instances = source.num_instances
    self.reads = collections.Counter()

  def num_frames(self, v):
    return self.source.num_frames(v)

  def load(self, v, t):
    self.reads[(v, t)] += 1
    return self.source.load(v, t)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp('synthetic')
  synthetic.generate(str(out), 'train', num_videos=5, num_frames=10, height=64, width=96, seed=3)
  return str(out)


def make_config(data_dir, **data):
  c = config_lib.load_config(os.path.join(REPO, 'configs', 'tiny.py'))
  c.data.manual_dir = data_dir
  c.data.canvas = (64, 112)
  c.data.min_size_train = (48, 64)
  c.data.max_size_train = 112
  c.data.max_instances = 4
  c.batch_size = 4
  c.data.update(data)
  return c


def source(config):
  return CountingSource(input_pipeline.make_source(config.data, 'train'))


def test_only_sub_sampled_frames_are_read(data_dir):
  c = make_config(data_dir, annotation_fraction=0.2)   # 10 frames -> 2 usable: {0, 5}
  src = source(c)
  train_input = input_pipeline.TrainInput(InputConfig.from_config(c), src)
  for step in range(10):
    train_input.batch(step)
  assert {t for _, t in src.reads} == {0, 5}
  assert {v for v, _ in src.reads} == set(range(5))


def test_each_epoch_visits_every_video_once(data_dir):
  c = make_config(data_dir, flip=False)
  train_input = input_pipeline.TrainInput(InputConfig.from_config(c), source(c))
  videos = [train_input._video(p) for p in range(15)]
  for epoch in range(3):
    assert sorted(videos[5 * epoch:5 * epoch + 5]) == list(range(5))
  assert videos[:5] != videos[5:10]   # reshuffled per epoch


def test_stream_is_a_function_of_seed_and_step(data_dir):
  c = make_config(data_dir)
  a = input_pipeline.TrainInput(InputConfig.from_config(c), source(c))
  b = input_pipeline.TrainInput(InputConfig.from_config(c), source(c))
  resumed = input_pipeline.iterate(b, start_step=3, workers=2)
  for step in range(3, 6):
    x, y = a.batch(step), next(resumed)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  c.seed = 1
  other = input_pipeline.TrainInput(InputConfig.from_config(c), source(c)).batch(3)
  assert not np.array_equal(other['image'], a.batch(3)['image'])


def test_processes_read_only_their_rows(data_dir):
  c = make_config(data_dir)
  whole = input_pipeline.TrainInput(InputConfig.from_config(c), source(c)).batch(7)
  parts = []
  for p in range(2):
    src = source(c)
    parts.append(input_pipeline.TrainInput(InputConfig.from_config(c), src, process_index=p,
                                           process_count=2).batch(7))
    assert sum(src.reads.values()) == 2
  for k in whole:
    np.testing.assert_array_equal(np.concatenate([parts[0][k], parts[1][k]]), whole[k])


def test_batch_layout_and_augmentation(data_dir):
  c = make_config(data_dir)
  train_input = input_pipeline.TrainInput(InputConfig.from_config(c), source(c))
  shapes_seen, flips = set(), 0
  dataset = ytvis.load_split('synthetic', data_dir, 'train')
  folder = ytvis.FolderSource(dataset)
  for step, i in itertools.product(range(6), range(4)):
    ex = train_input.example(step, i)
    h, w = ex['image_size']
    shapes_seen.add((int(h), int(w)))
    assert ex['image'].shape == (64, 112, 3) and ex['masks'].shape == (4, 64, 112)
    assert not ex['image'][h:].any() and not ex['image'][:, w:].any()
    assert not ex['masks'][:, h:].any() and not ex['masks'][:, :, w:].any()
    n = int(ex['valid'].sum())
    assert ex['valid'][:n].all() and not ex['valid'][n:].any()
    assert ex['masks'][:n].reshape(n, -1).any(axis=1).all()   # no empty instance kept
    assert not ex['masks'][n:].any() and not ex['labels'][n:].any()
    # Recompute the example by hand from the same draws: frame, short side, flip.
    v = train_input._video(step * 4 + i)
    rng = np.random.default_rng([c.seed, 2, step, i])
    t = int(rng.choice(train_input.frames[v]))
    image, masks, labels = folder.load(v, t)
    short = c.data.min_size_train[rng.integers(2)]
    flip = rng.random() < 0.5
    flips += flip
    assert min(h, w) == short   # 64x96 frames: short side 48 or 64, long side fits 112
    resized = input_pipeline.transforms.resize_masks(masks, (h, w))
    if flip:
      resized = resized[:, :, ::-1]
    keep = resized.reshape(len(resized), -1).any(axis=1)
    np.testing.assert_array_equal(ex['masks'][:n, :h, :w], resized[keep][:4])
    np.testing.assert_array_equal(ex['labels'][:n], labels[keep][:4])
  assert shapes_seen == {(48, 72), (64, 96)}
  assert 0 < flips < 24


def test_crop_drops_instances_it_empties_and_frames_without_instances_are_kept(data_dir):
  c = make_config(data_dir, crop=True)
  cropped = input_pipeline.TrainInput(InputConfig.from_config(c), source(c))
  full = input_pipeline.TrainInput(InputConfig.from_config(make_config(data_dir)), source(c))
  fewer = 0
  for s, i in itertools.product(range(10), range(4)):
    ex = cropped.example(s, i)
    n = int(ex['valid'].sum())
    assert ex['masks'][:n].reshape(n, -1).any(axis=1).all()
    fewer += n < int(full.example(s, i)['valid'].sum())
  assert fewer > 0   # some crops cut instances out entirely


def test_too_many_instances_are_truncated(data_dir):
  c = make_config(data_dir, max_instances=1)
  ex = input_pipeline.TrainInput(InputConfig.from_config(c), source(c)).example(0, 0)
  assert ex['masks'].shape[0] == 1 and ex['valid'].sum() <= 1


def test_batch_not_divisible_by_processes_is_an_error(data_dir):
  c = make_config(data_dir)
  c.batch_size = 3
  with pytest.raises(ValueError, match='not a multiple of the 2 processes'):
    input_pipeline.TrainInput(InputConfig.from_config(c), source(c), process_index=0,
                              process_count=2)


def test_errors_in_the_reader_reach_the_consumer(data_dir, tmp_path):
  import shutil
  broken = tmp_path / 'broken'
  shutil.copytree(data_dir, broken)
  for path in (broken / 'train' / 'JPEGImages').rglob('*.jpg'):
    path.write_bytes(b'not a jpeg')
  c = make_config(str(broken))
  with pytest.raises(ValueError, match='jpg'):
    next(input_pipeline.train_iterator(c, 0))


def test_frames_without_instances_are_legal(data_dir):
  c = make_config(data_dir)
  src = source(c)

  class NoInstances:
    origin = src.origin
    num_videos = src.num_videos
    has_annotations = True
    num_instances = None   # not known up front (as TFDS records of an older build)
    num_frames = src.num_frames

    def load(self, v, t):
      image, masks, labels = src.load(v, t)
      return image, masks[:0], labels[:0]

  batch = input_pipeline.TrainInput(InputConfig.from_config(c), NoInstances()).batch(0)
  assert not batch['valid'].any() and not batch['masks'].any()
  assert batch['image'].any()


def test_folder_source_is_a_frame_source(data_dir):
  """FolderSource has every attribute of the FrameSource protocol that TrainInput reads."""
  src = source(make_config(data_dir))
  for name in ('origin', 'num_videos', 'has_annotations', 'num_instances'):
    assert name in input_pipeline.FrameSource.__annotations__ and hasattr(src, name), name
  assert callable(src.num_frames) and callable(src.load)
  assert src.has_annotations and src.num_instances > 0 and src.num_videos == 5


def test_input_config_is_built_once_and_hashable(data_dir):
  c = make_config(data_dir)
  ic = InputConfig.from_config(c)
  assert hash(ic) == hash(InputConfig.from_config(c))
  assert (ic.canvas, ic.min_size_train, ic.max_instances) == ((64, 112), (48, 64), 4)
  assert ic.batch_size == c.batch_size and ic.seed == c.seed


def _unannotated_config(manual_dir: str):
  c = config_lib.load_config('tiny')
  c.data.manual_dir = manual_dir
  c.batch_size = 2
  return c


def test_training_on_an_unannotated_split(tmp_path):
  synthetic.generate(str(tmp_path), 'train', num_videos=2, num_frames=2, height=32, width=32,
                     seed=0)
  json_path = ytvis.split_paths('synthetic', str(tmp_path), 'train')[0]
  with open(json_path) as f:
    data = json.load(f)
  c = _unannotated_config(str(tmp_path))
  input_pipeline.TrainInput(InputConfig.from_config(c),
                            input_pipeline.make_source(c.data, 'train'))  # annotated: fine
  data['annotations'] = []
  with open(json_path, 'w') as f:
    json.dump(data, f)
  with pytest.raises(ValueError, match=f'{json_path}: no instance to train on'):
    input_pipeline.TrainInput(InputConfig.from_config(c),
                              input_pipeline.make_source(c.data, 'train'))
  del data['annotations']  # e.g. YouTube-VIS valid.json given as training data
  with open(json_path, 'w') as f:
    json.dump(data, f)
  with pytest.raises(ValueError, match=f'{json_path}: has no "annotations", so it cannot be '
                                       'trained on'):
    input_pipeline.train_iterator(c, 0)
  # Reading it for evaluation stays fine: its results go to the evaluation server.
  assert not ytvis.load_split('synthetic', str(tmp_path), 'train').has_annotations
