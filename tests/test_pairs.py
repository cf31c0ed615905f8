"""View-pair training input of the reid head: determinism and exact resume, slot-aligned views of
one frame, the moves that break slot identity, processes."""

import numpy as np
import pytest

from minvis_jax import config_lib
from minvis_jax.data import input_pipeline
from minvis_jax.data import pairs


@pytest.fixture
def config(synthetic_split):
  c = config_lib.load_config('tiny')
  c.data.manual_dir = synthetic_split('train', 5, 6, 64, 96, seed=3)
  c.data.canvas = (64, 96)
  c.data.min_size_train = (48, 64)
  c.data.max_size_train = 96
  c.data.max_instances = 4
  c.batch_size = 4
  c.model.reid = True
  return config_lib.validate(c)


def make_input(c, **kw):
  return pairs.PairInput(input_pipeline.InputConfig.from_config(c), pairs.PairConfig.from_config(c),
                         input_pipeline.make_source(c.data, 'train'), **kw)


def test_stream_is_deterministic_and_resumes_exactly(config):
  a = make_input(config)
  resumed = pairs.train_iterator(config, start_step=2)
  for step in range(2, 5):
    x, y = a.batch(step), next(resumed)
    assert x['image'].shape == (4, 64, 96, 3)   # images per step = batch_size
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  # A fresh input (a resumed process) repeats it; another seed does not.
  again = make_input(config).batch(3)
  for k in again:
    np.testing.assert_array_equal(again[k], a.batch(3)[k])
  config.seed = 1
  assert not np.array_equal(make_input(config).batch(3)['image'], a.batch(3)['image'])


def test_views_are_one_frame_with_aligned_slots(config):
  config.reid.move_prob = 0.0
  config.data.flip = False
  train_input = make_input(config)
  source = input_pipeline.make_source(config.data, 'train')
  for step in range(4):
    batch = train_input.batch(step)
    for p in range(2):
      a, b = 2 * p, 2 * p + 1
      np.testing.assert_array_equal(batch['labels'][a], batch['labels'][b])
      # Each view's instance g is the frame's annotation g: the same frame, read twice.
      v = train_input._video(step * 2 + p)
      t = int(np.random.default_rng([config.seed, 2, step, p]).choice(train_input.frames[v]))
      _, masks, labels = source.load(v, t)
      n = min(len(labels), 4)
      np.testing.assert_array_equal(batch['labels'][a][:n], labels[:n])
      for row in (a, b):
        h, w = batch['image_size'][row]
        area = batch['masks'][row, :n, :h, :w].reshape(n, -1).sum(1) / (h * w)
        full = masks[:n].reshape(n, -1).sum(1) / masks[0].size
        # Without crop only the scale differs: each instance keeps its share of the image.
        np.testing.assert_allclose(area, full, atol=0.02)


def test_move_and_cover_change_what_holds_the_old_place():
  rng = np.random.default_rng(0)
  image = np.full((40, 60, 3), 100, np.uint8)
  masks = np.zeros((2, 40, 60), np.uint8)
  masks[0, 5:15, 5:15] = 1
  masks[1, 25:35, 40:55] = 1
  image[masks[0] == 1] = (250, 0, 0)
  image[masks[1] == 1] = (0, 250, 0)
  labels = np.array([3, 1])
  moved = 0
  for seed in range(20):
    img, msk, lab = pairs.move_instance(image, masks, labels, np.random.default_rng(seed),
                                        pairs.PairConfig(move_prob=1.0, cover_prob=1.0))
    assert msk.dtype == np.uint8 and len(msk) == len(lab)
    # No pixel belongs to two instances; every instance keeps its colour under its mask.
    assert msk.sum(0).max() <= 1
    for k in range(len(lab)):
      colour = (250, 0, 0) if lab[k] == 3 else (0, 250, 0)
      assert np.all(img[msk[k] == 1] == colour)
    if len(lab) == 3:   # a cover copy of the other instance was pasted over the old place
      i = 0 if lab[2] == 1 else 1   # the moved instance: the one not copied
      # The copy sits on the old place (centred there; it may be clipped or partly occluded).
      cy, cx = np.argwhere(msk[2]).mean(0)
      y0, x0 = np.argwhere(masks[i]).min(0)
      y1, x1 = np.argwhere(masks[i]).max(0)
      assert y0 <= cy <= y1 and x0 <= cx <= x1 and (msk[2] & masks[i]).any()
      assert not np.array_equal(msk[i], masks[i])   # it left its old place
      moved += 1
    np.testing.assert_array_equal(image[0, 0], (100, 100, 100))   # inputs untouched
  assert moved >= 15
  # move_prob 0: the view is returned as it is.
  img, msk, lab = pairs.move_instance(image, masks, labels, rng, pairs.PairConfig(0.0, 1.0))
  np.testing.assert_array_equal(img, image)
  np.testing.assert_array_equal(msk, masks)


def test_move_count_moves_several_instances():
  image = np.full((60, 90, 3), 100, np.uint8)
  masks = np.zeros((3, 60, 90), np.uint8)
  masks[0, 5:15, 5:15] = 1
  masks[1, 40:50, 60:75] = 1
  masks[2, 5:20, 60:70] = 1
  colours = [(250, 0, 0), (0, 250, 0), (0, 0, 250)]
  for k in range(3):
    image[masks[k] == 1] = colours[k]
  labels = np.array([0, 1, 2])
  left = []
  for seed in range(20):
    img, msk, lab = pairs.move_instance(image, masks, labels, np.random.default_rng(seed),
                                        pairs.PairConfig(1.0, 0.0, move_count=3))
    assert len(lab) == 3 and msk.sum(0).max() <= 1
    for k in range(3):
      assert np.all(img[msk[k] == 1] == colours[k])
      # Every instance left its old place: what is still there is a pasted one's, or background.
      assert not np.array_equal(msk[k], masks[k])
    # The old places hold no instance that was there before, except where a pasted one landed.
    left.append(sum(int((msk[k] & masks[k]).sum()) for k in range(3)))
  assert np.median(left) == 0
  # With covers: one new target per moved instance, appended with its source's label.
  img, msk, lab = pairs.move_instance(image, masks, labels, np.random.default_rng(0),
                                      pairs.PairConfig(1.0, 1.0, move_count=2))
  assert len(lab) == 5 and msk.sum(0).max() <= 1
  for k in range(5):
    assert np.all(img[msk[k] == 1] == colours[lab[k]])


def test_processes_read_only_their_pairs_and_need_even_rows(config):
  config.batch_size = 8
  whole = make_input(config).batch(5)
  parts = [make_input(config, process_index=p, process_count=2).batch(5) for p in range(2)]
  for k in whole:
    np.testing.assert_array_equal(np.concatenate([parts[0][k], parts[1][k]]), whole[k])
  config.batch_size = 6
  with pytest.raises(ValueError, match='even number of rows'):
    make_input(config, process_index=0, process_count=2)
  config.batch_size = 5
  with pytest.raises(ValueError, match='batch_size=5: expected an even number'):
    config_lib.validate(config)
